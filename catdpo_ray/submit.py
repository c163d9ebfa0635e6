"""Submit ``catdpo-ray train|tune --config FILE`` to a Ray cluster as a Ray job.

The Python form of::

    ray job submit --address $RAY_ADDRESS --submission-id catdpo-train-<cfg>-<UTC>-<hex> \\
        --working-dir <staged package> --runtime-env-json '{"env_vars": {...}}' \\
        -- catdpo-ray train --config <cfg>.yaml [key=value ...]

through the job submission API (``JobSubmissionClient``, which the CLI calls too).

* **Working dir = the package only.** A temporary directory holding ``catdpo_ray/`` (source and its
  package data, no ``__pycache__``) and the job config, nothing else: no runs, data, checkpoints or
  caches. Ray uploads it (limit 500 MiB), unpacks it on every node and puts it first on
  ``PYTHONPATH``, so the job driver and every Train worker import *this* code -- on a cluster whose
  image has no catdpo-ray or an older one as well (the image supplies the pinned dependencies).
  ``--module`` runs ``python -m catdpo_ray.cli`` for images without the ``catdpo-ray`` script.
* **Runtime env = working dir + environment variables** (defaults below, ``--env K=V``,
  ``--pass-env NAME`` copies a variable such as ``HF_TOKEN`` from this shell). No ``pip``: the
  cluster image pins the dependencies (``cluster/Dockerfile``).
* **Unique submission id**, so resubmitting never collides with an earlier job.
* **Address** from ``--address`` or ``$RAY_ADDRESS`` (``http://<head>:8265``); the token for Ray's
  token authentication from ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
  (what ``ray get-auth-token`` prints).

Data and outputs do not travel: ``output.dir`` / ``output.storage_path`` must name storage every node
sees (a relative ``output.dir`` would land in the job's temporary working dir), and local data files
must exist on the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import catdpo_ray

#: Environment every job gets: unbuffered logs, no tokenizer thread pools inside Ray Data actors.
DEFAULT_ENV: dict[str, str] = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
#: Added when the config trains on GPUs: NCCL warnings (init failures, timeouts) reach the job log.
GPU_ENV: dict[str, str] = {"NCCL_DEBUG": "WARN"}
#: Ray's working_dir limit.
MAX_WORKING_DIR_BYTES = 500 * 1024**2
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass
class Submission:
    """Everything one submission sends."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    address: str
    headers: dict[str, str] = field(default_factory=dict)

    def cli(self) -> str:
        """The equivalent ``ray job submit`` command line."""
        env = {k: v for k, v in self.runtime_env.items() if k != "working_dir"}
        return " ".join([
            "ray job submit", f"--address {shlex.quote(self.address)}",
            f"--submission-id {self.submission_id}", f"--working-dir {shlex.quote(self.runtime_env['working_dir'])}",
            f"--runtime-env-json {shlex.quote(json.dumps(env))}", "--", self.entrypoint,
        ])


def stage_working_dir(config_path: str | Path, dest: str | Path) -> tuple[Path, str]:
    """Copy the package and the config into ``dest``; return (dest, config file name inside it)."""
    dest = Path(dest)
    package = Path(catdpo_ray.__file__).resolve().parent

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n in _SKIP_DIRS or n.endswith(_SKIP_SUFFIXES) or n.endswith(".egg-info")]

    shutil.copytree(package, dest / "catdpo_ray", ignore=ignore, dirs_exist_ok=True)
    name = Path(config_path).name
    shutil.copy2(config_path, dest / name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > MAX_WORKING_DIR_BYTES:
        raise ValueError(f"the staged working dir {dest} is {size / 2**20:.0f} MiB, over Ray's 500 MiB limit")
    return dest, name


def make_submission_id(command: str, config_path: str | Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"catdpo-{command}-{Path(config_path).stem.replace('_', '-')}-{stamp}-{secrets.token_hex(3)}"


def resolve_address(address: str | None) -> str:
    """``--address``, else ``$RAY_ADDRESS``; a bare ``host:port`` gets ``http://``."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` from Ray's token sources, or nothing if there is no token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"
    if not token and path:
        token = Path(path).read_text().strip()
    if not token and default.exists():
        token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_env(cfg: Any, extra: Mapping[str, str], pass_env: Sequence[str]) -> dict[str, str]:
    """Defaults, GPU additions, ``--env`` pairs, then variables copied from this shell."""
    env = {**DEFAULT_ENV, **(GPU_ENV if cfg.scaling.use_gpu else {}), **extra}
    missing = [name for name in pass_env if name not in os.environ]
    if missing:
        raise SystemExit(f"--pass-env: not set in this shell: {', '.join(missing)}")
    env.update({name: os.environ[name] for name in pass_env})
    return env


def check_portable(cfg: Any) -> list[str]:
    """Warnings for settings that only work on the submitting machine."""
    warnings = []
    if not Path(cfg.output.dir).is_absolute() and "://" not in cfg.output.dir:
        warnings.append(f"output.dir={cfg.output.dir!r} is relative: the run directory would land in the job's "
                        "temporary working dir; point it at shared storage")
    if cfg.data.hub_name is None:
        for split in ("train", "test"):
            value = getattr(cfg.data, split)
            if value != "bundled":
                warnings.append(f"data.{split}={value!r} is not uploaded; it must exist on the cluster's nodes")
    return warnings


def build_submission(config_path: str | Path, overrides: Sequence[str], staged_dir: Path, *, command: str = "train",
                     address: str | None = None, env: Mapping[str, str] | None = None,
                     pass_env: Sequence[str] = (), module: bool = False) -> Submission:
    """Validate the config locally, stage the working dir, assemble entrypoint and runtime env."""
    from catdpo_ray.config import load_config

    cfg = load_config(config_path, list(overrides))  # config errors surface here, before any upload
    for warning in check_portable(cfg):
        print(f"[submit] warning: {warning}", file=sys.stderr)
    working_dir, config_name = stage_working_dir(config_path, staged_dir)
    program = "python -m catdpo_ray.cli" if module else "catdpo-ray"
    entrypoint = " ".join([program, command, "--config", shlex.quote(config_name), *map(shlex.quote, overrides)])
    runtime_env = {"working_dir": str(working_dir), "env_vars": job_env(cfg, env or {}, pass_env)}
    return Submission(make_submission_id(command, config_path), entrypoint, runtime_env, resolve_address(address),
                      auth_headers())


def submit(sub: Submission, *, agent_wait_s: float = 120.0) -> str:
    """Send it; returns the submission id.

    A cluster that has just started answers "No available agent to submit job" until a node's
    dashboard agent has registered; that error is retried for ``agent_wait_s`` seconds (the
    submission id makes the retry safe: a job is created at most once)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(sub.address, headers=sub.headers or None)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                                     submission_id=sub.submission_id)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def wait(address: str, submission_id: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 3600.0,
         poll_s: float = 2.0, echo: bool = True) -> str:
    """Poll until the job is terminal, echoing new log text; returns the final status name."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address, headers=dict(headers) if headers else None)
    shown, deadline = 0, time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(submission_id)
        if echo:
            logs = client.get_job_logs(submission_id)
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status.value} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/submit.py [options] CONFIG [key=value ...]``."""
    p = argparse.ArgumentParser(prog="submit.py", description=__doc__.splitlines()[0])
    p.add_argument("config", help="job config (e.g. jobs/llama2_7b_pku.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides appended to the entrypoint")
    p.add_argument("--command", choices=["train", "tune"], default="train")
    p.add_argument("--address", default=None, help="dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job environment variable")
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME", help="copy NAME from this shell")
    p.add_argument("--module", action="store_true", help="run `python -m catdpo_ray.cli` instead of `catdpo-ray`")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit 1 unless SUCCEEDED")
    p.add_argument("--dry-run", action="store_true", help="stage and print the `ray job submit` command, send nothing")
    args = p.parse_args(argv)
    staged = Path(tempfile.mkdtemp(prefix="catdpo-job-"))
    sub = build_submission(args.config, args.overrides, staged, command=args.command, address=args.address,
                           env=_parse_env(args.env), pass_env=args.pass_env, module=args.module)
    if args.dry_run:
        print(sub.cli())
        return 0
    try:
        job_id = submit(sub)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # uploaded by submit_job; nothing reads it afterwards
    print(f"[submit] submitted {job_id} to {sub.address}\n[submit] logs: ray job logs --follow {job_id}")
    if not args.wait:
        return 0
    status = wait(sub.address, job_id, headers=sub.headers)
    print(f"[submit] {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
