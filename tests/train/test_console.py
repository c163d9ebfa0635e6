"""Console routing: framework noise to <run>/logs/framework.log, our own lines to the console."""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path

import pytest

from catdpo_ray.train.console import quiet_worker, setup_console, worker_env


def test_framework_loggers_and_warnings_go_to_the_file_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import deepspeed  # noqa: F401  - installs the DeepSpeed logger and its stdout handler

    capsys.readouterr()  # DeepSpeed's import-time accelerator warning: before setup_console, not its business
    for name in ("DeepSpeed", "transformers", "torch.distributed"):  # an earlier in-process run's quiet_worker()
        logging.getLogger(name).setLevel(logging.NOTSET)              # raised these; the file must see warnings
    ds_handlers = list(logging.getLogger("DeepSpeed").handlers)
    out = io.StringIO()
    console = setup_console(tmp_path, console=out, route_workers=False)
    try:
        logging.getLogger("ray.train").warning("PlacementGroupCleaner: placement group removed")
        logging.getLogger("DeepSpeed").warning("[Torch] Checkpoint ckpt is about to be saved!")
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`all_gather_into_tensor` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger("catdpo_ray.train.driver").warning("the test split has fewer pairs than workers")
        logging.getLogger("catdpo_ray.train.driver").info("an info line: file only")
        # plain prints: DeepSpeed's op-build notice (local mode builds the engine in this process) goes to the
        # file, in pieces as print() writes it; every other line, however it starts, reaches stdout intact
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("Deep", end="")
        print("Speed is a library")
        print("step 1/4 | loss 0.69")
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled.")
        print("Deep", end="")  # unfinished when the console closes: passed on, not lost
    finally:
        console.close()
    print("after close: DeepSpeed x built successfully")
    text = (tmp_path / "logs" / "framework.log").read_text()
    for expected in ("WARNING ray.train: PlacementGroupCleaner: placement group removed",
                     "WARNING DeepSpeed: [Torch] Checkpoint ckpt is about to be saved!",
                     "WARNING transformers.modeling_utils: Some weights were not initialized",
                     "WARNING py.warnings: ", "FutureWarning: `all_gather_into_tensor` is deprecated",
                     "WARNING catdpo_ray.train.driver: the test split has fewer pairs than workers",
                     "INFO catdpo_ray.train.driver: an info line: file only",
                     "INFO DeepSpeed: DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
                     "WARNING ray.data._internal.progress: Progress bars disabled."):
        assert expected in text, expected
    assert out.getvalue() == "WARNING: the test split has fewer pairs than workers\n"
    captured = capsys.readouterr()
    assert captured.out == ("DeepSpeed is a library\nstep 1/4 | loss 0.69\n"
                            "Deepafter close: DeepSpeed x built successfully\n")
    assert captured.err == ""
    assert logging.getLogger("DeepSpeed").handlers == ds_handlers  # close() put DeepSpeed's handler back


def test_worker_output_lines_are_filed_and_ours_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray's own dispatcher (what ray.init(log_to_driver=True) feeds) with a batch in Ray's format."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    out = io.StringIO()
    console = setup_console(tmp_path, console=out)
    try:
        batch = {"ip": "10.0.0.1", "pid": 4242, "actor_name": "TrainController", "is_err": True, "job": "01",
                 "lines": ["PlacementGroupCleaner started", "[catdpo] rank 0: resumed at step 4",
                           "RuntimeError: NCCL timeout", "RuntimeError: NCCL timeout"]}
        dispatcher.emit(batch)
        dispatcher.emit(batch)
    finally:
        console.close()
    assert not any(name == "catdpo_framework_log" for name, _ in dispatcher.handlers)
    log = (tmp_path / "logs" / "framework.log").read_text()
    assert log.count("(TrainController pid=4242, ip=10.0.0.1) stderr: PlacementGroupCleaner started") == 2
    assert log.count("stderr: RuntimeError: NCCL timeout") == 4
    log_path = tmp_path / "logs" / "framework.log"
    assert out.getvalue().splitlines() == [
        "[catdpo] rank 0: resumed at step 4",
        f"(TrainController pid=4242, ip=10.0.0.1) RuntimeError: NCCL timeout  [more in {log_path}]",
        "[catdpo] rank 0: resumed at step 4",
    ]
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_real_ray_actor_output_goes_to_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real local Ray cluster: an actor's prints reach framework.log, not the driver's stdout."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True, configure_logging=False)
    out = io.StringIO()
    console = setup_console(tmp_path, console=out)
    try:
        @ray.remote(num_cpus=0)
        class Noisy:
            def speak(self) -> int:
                print("PlacementGroupCleaner: noise from an actor", flush=True)
                print("[catdpo] our own line", flush=True)
                return 1

        actor = Noisy.remote()
        assert ray.get(actor.speak.remote()) == 1
        log = tmp_path / "logs" / "framework.log"
        deadline = time.monotonic() + 30
        while "[catdpo] our own line" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        console.close()
        ray.shutdown()
    assert "stdout: PlacementGroupCleaner: noise from an actor" in log.read_text()
    assert out.getvalue() == "[catdpo] our own line\n"
    assert "PlacementGroupCleaner" not in capsys.readouterr().out


def test_worker_env_and_quiet_worker() -> None:
    assert worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in worker_env(use_gpu=True)
    before = logging.getLogger("DeepSpeed").level
    try:
        quiet_worker()
        assert logging.getLogger("DeepSpeed").level == logging.ERROR
    finally:
        logging.getLogger("DeepSpeed").setLevel(before)
