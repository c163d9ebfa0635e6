"""A console a person can read: our progress on it, framework noise in ``<run>/logs/framework.log``.

Three sources of noise reach a default run's console, each routed here:

1. Python loggers of the frameworks in the driver (``ray``, ``ray.train``, ``ray.data``,
   ``DeepSpeed``, ``transformers``, ``torch.distributed`` ...) and ``warnings.warn`` calls
   (deprecations): :func:`setup_console` gives them a file handler and stops them reaching the
   console; ``catdpo_ray`` loggers at WARNING+ still go to the console (and the file).
2. Everything Ray actors and workers print (Ray Train V2's controller and its
   ``PlacementGroupCleaner``, actor-restart notices, DeepSpeed's and transformers' logs in the
   workers): Ray streams their stdout/stderr to the driver (``log_to_driver``) through one
   dispatcher; :func:`setup_console` swaps Ray's printing handler for one that appends every line
   to the file and puts on the console only the lines of our own workers (``[catdpo]`` prefix)
   and, once per distinct text, lines that report an error. The lines also stay in Ray's session
   logs (``/tmp/ray/session_latest/logs/worker-*.out|err`` on each node). If a Ray version lacks
   that dispatcher, fall back to ``ray.init(log_to_driver=False)``: worker output is then only in
   those session logs, and our progress still comes from the driver-side sinks.
3. Import-time and per-process noise in the workers: :func:`worker_env` gives the environment
   (``DS_ACCELERATOR=cpu`` avoids DeepSpeed's "Setting accelerator to CPU" warning, quieter
   transformers / tokenizers) to pass as ``ray.init(runtime_env={"env_vars": ...})``, and
   :func:`quiet_worker` lowers DeepSpeed's and transformers' loggers inside a worker process.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

#: Driver-side loggers whose records go to the file only.
FRAMEWORK_LOGGERS: tuple[str, ...] = (
    "ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed", "transformers", "torch",
    "torch.distributed", "datasets", "huggingface_hub", "peft", "mlflow", "urllib3", "filelock", "py.warnings",
)
#: Our own loggers: WARNING and above also on the console.
OWN_LOGGER = "catdpo_ray"
#: Prefix our worker code puts on lines meant for the console.
OWN_PREFIX = "[catdpo]"
#: Worker output lines shown on the console once per distinct text.
MATTERS = re.compile(r"Traceback|(Error|Exception)\b|OutOfMemory|\bOOM\b|SIGKILL|SIGTERM")
#: Lines frameworks ``print`` in the driver's own process (local mode builds the engine there): to the file.
FRAMEWORK_PRINTS = re.compile(r"^DeepSpeed \S+ built successfully$")
_PRINT_START = "DeepSpeed "
_HANDLER_NAME = "catdpo_framework_log"
_RAY_PRINT_HANDLER = "ray_print_logs"


def worker_env(*, use_gpu: bool) -> dict[str, str]:
    """Environment variables that quiet framework start-up in every Ray worker process.

    Pass as ``ray.init(runtime_env={"env_vars": worker_env(use_gpu=...)})``.
    """
    env = {
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Ray's own de-duplication of repeated worker lines (default on; kept explicit).
        "RAY_DEDUP_LOGS": "1",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # set, not detected: DeepSpeed then warns nothing at import
    return env


def quiet_worker() -> None:
    """Call first in a worker: DeepSpeed INFO/WARNING logs and transformers warnings off the
    stream (DeepSpeed 0.19.8 has no log-level environment variable; its ``DeepSpeed`` logger
    writes to stdout with its own handler), Python warnings shown once per location."""
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("once", category=FutureWarning)
    warnings.filterwarnings("once", category=DeprecationWarning)


class _DivertPrints:
    """A stdout wrapper: whole lines matching :data:`FRAMEWORK_PRINTS` go to ``logger``, the rest through."""

    def __init__(self, stream: TextIO, logger: logging.Logger) -> None:
        self.stream, self.logger, self._partial = stream, logger, ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if FRAMEWORK_PRINTS.match(line):
                self.logger.info("%s", line)
            else:
                self.stream.write(line + "\n")
        start = self._partial[: len(_PRINT_START)]
        if self._partial and not _PRINT_START.startswith(start):  # cannot become a framework line: pass it on
            self.stream.write(self._partial)
            self._partial = ""
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def release(self) -> TextIO:
        """Pass on a held, unfinished line and return the wrapped stream."""
        if self._partial:
            self.stream.write(self._partial)
            self._partial = ""
        return self.stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@dataclass
class Console:
    """What :func:`setup_console` changed, so :meth:`close` can put it back (sweeps, tests)."""

    log_path: Path
    handler: logging.Handler
    console_handler: logging.Handler
    saved: dict[str, tuple[list[logging.Handler], bool, int]] = field(default_factory=dict)
    ray_printers: list[tuple[str, Any]] | None = None
    shown: set[str] = field(default_factory=set)
    on_worker_output: Any = None
    stdout: Any = None

    def route_ray_workers(self) -> bool:
        """Swap Ray's worker-output printer for ours (call after ``ray.init``, which installs a fresh
        printer). Returns False where this Ray version has no dispatcher to swap."""
        dispatcher = _ray_dispatcher()
        if dispatcher is None or self.on_worker_output is None:
            return False
        with dispatcher._lock:
            printers = [h for h in dispatcher.handlers if h[0] == _RAY_PRINT_HANDLER]
            if self.ray_printers is None or printers:
                self.ray_printers = printers
            dispatcher.handlers = [h for h in dispatcher.handlers if h[0] not in (_RAY_PRINT_HANDLER, _HANDLER_NAME)]
            dispatcher.handlers.append((_HANDLER_NAME, self.on_worker_output))
        return True

    def close(self) -> None:
        if self.stdout is not None and isinstance(sys.stdout, _DivertPrints):
            sys.stdout.release()
            sys.stdout = self.stdout
        for name, (handlers, propagate, level) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate, logger.level = propagate, level
        logging.captureWarnings(False)
        dispatcher = _ray_dispatcher()
        if self.ray_printers is not None and dispatcher is not None:
            import ray

            with dispatcher._lock:
                dispatcher.handlers = [h for h in dispatcher.handlers if h[0] != _HANDLER_NAME]
                if ray.is_initialized():  # ray.shutdown drops the printer and ray.init adds a new one
                    dispatcher.handlers.extend(self.ray_printers)
        self.handler.close()


def _ray_dispatcher() -> Any:
    """Ray's worker-output dispatcher (``handlers``: a list of ``(name, callable)``), or None."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    return dispatcher if isinstance(getattr(dispatcher, "handlers", None), list) and hasattr(dispatcher, "_lock") else None


def setup_console(run_dir: str | Path, *, console: TextIO | None = None, route_workers: bool = True) -> Console:
    """Send framework logs and Ray worker output to ``<run_dir>/logs/framework.log``.

    Call before ``ray.init`` with ``route_workers=False`` (Ray's start-up notices then reach the file,
    not the console) and :meth:`Console.route_ray_workers` after it; or after ``ray.init`` with the
    default. Ray's stream handler on the ``ray`` logger (installed at ``import ray``) is dropped either way.

    Args:
        run_dir: the run directory.
        console: where our own warnings and worker ``[catdpo]`` lines go (default stderr).
        route_workers: also swap Ray's worker-output printer now (False: Python logging only, for now).

    Returns:
        A :class:`Console`; ``close()`` restores the previous logging setup.
    """
    import ray  # noqa: F401 - its import installs the stream handler on the "ray" logger replaced below
    import ray.data  # noqa: F401 - and this one Ray Data's, on "ray.data"

    log_path = Path(run_dir) / "logs" / "framework.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = console if console is not None else sys.stderr
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(out)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    state = Console(log_path, handler, to_console)
    for name in (*FRAMEWORK_LOGGERS, OWN_LOGGER):
        logger = logging.getLogger(name)
        state.saved[name] = (list(logger.handlers), logger.propagate, logger.level)
        # Drop Ray's / DeepSpeed's own stream handlers: they print straight to the console.
        logger.handlers[:] = [handler] + ([to_console] if name == OWN_LOGGER else [])
        logger.propagate = False
        if name == OWN_LOGGER or logger.level in (logging.NOTSET, logging.DEBUG):
            logger.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file

    # Worker lines go to the file through a child of "ray" (whose only handler is now the file's):
    # one writer for the file, and INFO set here because Ray leaves "ray" at WARNING.
    worker_log = logging.getLogger("ray.worker_output")
    state.saved.setdefault("ray.worker_output", (list(worker_log.handlers), worker_log.propagate, worker_log.level))
    worker_log.setLevel(logging.INFO)

    def on_worker_output(data: dict[str, Any]) -> None:
        source = data.get("actor_name") or data.get("task_name") or "worker"
        tag = f"({source} pid={data.get('pid')}, ip={data.get('ip')})"
        stream = "stderr" if data.get("is_err") else "stdout"
        for line in data.get("lines", []):
            worker_log.info("%s %s: %s", tag, stream, line)
            if line.startswith(OWN_PREFIX):
                print(line, file=out, flush=True)
            elif MATTERS.search(line) and line not in state.shown:
                state.shown.add(line)
                print(f"{tag} {line}  [more in {log_path}]", file=out, flush=True)

    state.on_worker_output = on_worker_output
    if not isinstance(sys.stdout, _DivertPrints):
        state.stdout, sys.stdout = sys.stdout, _DivertPrints(sys.stdout, logging.getLogger("DeepSpeed"))
    if route_workers:
        state.route_ray_workers()
    return state
