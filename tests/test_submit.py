"""Job submission: what the working dir and runtime env carry, ids, address, token -- and the tiny
job submitted for real to a local Ray head through the job submission API."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from catdpo_ray import submit as S

REPO = Path(__file__).resolve().parents[1]
TINY_JOB = REPO / "jobs" / "tiny_cpu.yaml"


def test_working_dir_holds_the_package_and_the_config_only(tmp_path: Path) -> None:
    (REPO / "catdpo_ray" / "__pycache__").mkdir(exist_ok=True)  # exists after any import; must not travel
    staged, name = S.stage_working_dir(TINY_JOB, tmp_path / "wd")
    assert name == "tiny_cpu.yaml"
    top = sorted(p.name for p in staged.iterdir())
    assert top == ["catdpo_ray", "tiny_cpu.yaml"]
    files = [p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()]
    assert "catdpo_ray/cli.py" in files and "catdpo_ray/train/worker.py" in files
    assert any(f.startswith("catdpo_ray/data/sample/") for f in files)  # package data `bundled` needs
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert sum(p.stat().st_size for p in staged.rglob("*") if p.is_file()) < 50 * 2**20


def test_submission_carries_entrypoint_env_and_unique_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    sub = S.build_submission(REPO / "jobs" / "llama2_7b_pku.yaml", ["train.max_steps=10", "output.name=a b"],
                             tmp_path / "wd", env={"WANDB_MODE": "offline"}, pass_env=["HF_TOKEN"])
    assert sub.address == "http://10.0.0.5:8265"  # from the environment
    assert shlex.split(sub.entrypoint) == ["catdpo-ray", "train", "--config", "llama2_7b_pku.yaml",
                                           "train.max_steps=10", "output.name=a b"]
    assert set(sub.runtime_env) == {"working_dir", "env_vars"}  # the package and variables, nothing else
    assert sub.runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                                           "NCCL_DEBUG": "WARN", "WANDB_MODE": "offline", "HF_TOKEN": "hf_test"}
    assert sub.submission_id.startswith("catdpo-train-llama2-7b-pku-")
    other = S.build_submission(REPO / "jobs" / "llama2_7b_pku.yaml", [], tmp_path / "wd2")
    assert other.submission_id != sub.submission_id
    assert "-- catdpo-ray train --config llama2_7b_pku.yaml" in sub.cli() and "--working-dir" in sub.cli()
    tune = S.build_submission(REPO / "jobs" / "sweep_tiny_cpu.yaml", [], tmp_path / "wd3", command="tune",
                              module=True, address="127.0.0.1:8265")
    assert tune.entrypoint == "python -m catdpo_ray.cli tune --config sweep_tiny_cpu.yaml"


def test_config_errors_and_missing_address_fail_before_any_upload(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from catdpo_ray.config import ConfigError, load_config

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    with pytest.raises(ConfigError, match="train.max_stepz"):
        S.build_submission(TINY_JOB, ["train.max_stepz=3"], tmp_path / "wd")
    assert not (tmp_path / "wd").exists()
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SystemExit, match="RAY_ADDRESS"):
        S.resolve_address(None)
    with pytest.raises(SystemExit, match="NOT_SET_ANYWHERE"):
        S.job_env(load_config(TINY_JOB), {}, ["NOT_SET_ANYWHERE"])


def test_portability_warnings_for_relative_outputs_and_local_data() -> None:
    from catdpo_ray.config import load_config

    assert S.check_portable(load_config(REPO / "jobs" / "llama2_7b_pku.yaml")) == []
    warnings = S.check_portable(load_config(TINY_JOB, ["data.train=/home/me/pairs.jsonl"]))
    assert any("output.dir" in w for w in warnings) and any("data.train" in w for w in warnings)


def test_token_comes_from_rays_sources_in_precedence_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert S.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert S.auth_headers() == {"Authorization": "Bearer from-file"}
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert S.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert S.auth_headers() == {"Authorization": "Bearer from-env"}


def test_dry_run_prints_the_ray_job_submit_command(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert S.main(["--dry-run", str(TINY_JOB), "train.max_steps=2", "output.dir=/shared/runs"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ray job submit --address http://127.0.0.1:8265 --submission-id catdpo-train-tiny-cpu-")
    words = shlex.split(line)
    staged = Path(words[words.index("--working-dir") + 1])
    try:
        assert json.loads(words[words.index("--runtime-env-json") + 1]) == {"env_vars": S.DEFAULT_ENV}
        assert words[words.index("--") + 1:] == ["catdpo-ray", "train", "--config", "tiny_cpu.yaml",
                                                 "train.max_steps=2", "output.dir=/shared/runs"]
        assert (staged / "tiny_cpu.yaml").exists()
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the real thing: a local Ray head on 127.0.0.1 with token authentication


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_of_head(temp_dir: str) -> list[int]:
    """The head's daemons (their command lines name our private temp dir) and all their descendants
    (workers, agents, job drivers). Only these are stopped: ``ray stop`` would stop every Ray
    process on the machine, including other people's clusters."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (proc.info["cmdline"] or [])):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    pids = {p.pid for p in roots}
    for proc in roots:
        try:
            pids.update(child.pid for child in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    pids.discard(os.getpid())
    return sorted(pids)


def _stop_head(temp_dir: str) -> None:
    import psutil

    pids = _pids_of_head(temp_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    # The head's daemons (raylet, GCS, dashboard, agents) take more than 5 s over SIGTERM; this head and
    # its temp dir are thrown away, so whatever is still running after 1 s is killed.
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=1)
    for proc in alive:
        proc.kill()


@pytest.fixture
def local_head() -> Iterator[dict[str, str]]:
    """``ray start --head`` on 127.0.0.1, free ports, 2 CPUs, a private temp dir, token auth on with
    a fresh token (in the environment only; ~/.ray/auth_token is left alone)."""
    import ray

    ray.shutdown()  # an in-process local cluster left by earlier tests must not share the machine with this head
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = os.urandom(16).hex()
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--include-dashboard=true"]
    address = f"http://127.0.0.1:{dash}"
    try:  # cleanup covers a failed start too: `ray start` may leave daemons behind when it errors
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        _wait_for_dashboard(address, token)
        yield {"address": address, "token": token, "temp_dir": temp_dir}
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str, timeout_s: float = 120.0) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
            return
        except Exception:  # noqa: BLE001 - the dashboard's job module takes a while to come up
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_job_submitted_to_a_local_head_succeeds(local_head: dict[str, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_TOKEN", local_head["token"])
    monkeypatch.setenv("RAY_ADDRESS", local_head["address"])  # the address comes from the environment
    runs = tmp_path / "runs"
    overrides = ["scaling.num_workers=1", "train.max_steps=2", "data.max_train_rows=96", "data.max_test_rows=32",
                 "logging.tensorboard=false", f"output.dir={runs}", "output.name=submitted"]
    sub = S.build_submission(TINY_JOB, overrides, tmp_path / "wd")
    # The job first says which catdpo_ray it imports: the uploaded copy of the package, not the one installed
    # here -- what makes the same submission work on a cluster whose image lacks (or has an older) catdpo-ray.
    sub.entrypoint = "python -c 'import catdpo_ray; print(\"FROM\", catdpo_ray.__file__)' && " + sub.entrypoint
    client = JobSubmissionClient(sub.address, headers={"Authorization": f"Bearer {local_head['token']}"})
    with pytest.raises(urllib.error.HTTPError) as denied:  # token auth is on: no token, no jobs
        urllib.request.urlopen(f"{sub.address}/api/jobs/", timeout=30)
    assert denied.value.code == 401

    job_id = S.submit(sub, agent_wait_s=420)  # a loaded 2-core box can take minutes to start the job agent
    assert job_id == sub.submission_id
    status = S.wait(sub.address, job_id, headers=sub.headers, timeout_s=840, poll_s=0.5, echo=False)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]

    run_dir = runs / "submitted"
    for name in ("config.yaml", "metrics.jsonl", "lambdas.csv", "summary.json", "final/config.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["last_step"]["step"] == 2
    assert str(run_dir) in logs
    info = client.get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith("gcs://")  # uploaded, not a path on this machine

    origin = next(line for line in logs.splitlines() if line.startswith("FROM "))
    assert local_head["temp_dir"] in origin and str(REPO) not in origin
