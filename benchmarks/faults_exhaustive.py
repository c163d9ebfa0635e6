"""Exhaustive fault injection: every kill point x every step (x every rank), each compared EXACTLY with
one uninterrupted run of the same configuration. The slow sibling of ``tests/faults/`` (which keeps
a few representative cases inside the test budget).

    python benchmarks/faults_exhaustive.py                         # local + 2 workers, every case
    python benchmarks/faults_exhaustive.py --mode local            # local mode only (~15 s a case)
    python benchmarks/faults_exhaustive.py --mode ray2 --points ckpt_done --steps 2 4
    python benchmarks/faults_exhaustive.py --controller            # also kill the MarginController after each step

Modes (the configurations of ``tests/faults/conftest.py``):

- ``local``: Ray Train local mode, checkpoint every step. The injected death ends the run
  (``InjectedFault``); the case is the failed run plus the user's rerun with the same name.
- ``ray2``: two Ray-managed workers, checkpoint every 2 steps, ``output.max_failures=1``: Ray restarts
  the group itself. ``ckpt_done`` kills land within a second of the report, before or after Ray
  registered the checkpoint (RAY_DEEPSPEED_NOTES.md pitfall 15): both must give the same run.

A case passes when the finished run's final/ tensors, lambdas.csv, step rows (minus wall-clock
fields) and eval rows equal the reference's. Results: ``benchmarks/results/faults_exhaustive.md``
and ``.json`` (one row per case: mode, point, step, rank, outcome, resume steps, seconds, error).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402  (MonkeyPatch, outside a test session)

from tests.faults.conftest import (  # noqa: E402
    LOCAL_KNOBS,
    MAX_STEPS,
    N_TEST,
    N_TRAIN,
    RAY2_KNOBS,
    Corpus,
    assert_same_run,
    install_memo,
    make_cfg,
    rows_of,
    train,
)
from tests.train.helpers import small_corpus  # noqa: E402

STEPS = {"local": MAX_STEPS, "ray2": 5}
KNOBS = {"local": LOCAL_KNOBS, "ray2": RAY2_KNOBS}
CHECKPOINT_EVERY = {"local": 1, "ray2": 2}
RANKS = {"local": [0], "ray2": [0, 1]}


def cases(mode: str, points: list[str], steps: list[int] | None) -> list[tuple[str, int, int]]:
    out = []
    for point in points:
        for step in steps or range(1, STEPS[mode] + 1):
            if step > STEPS[mode]:
                continue
            if point != "step" and step % CHECKPOINT_EVERY[mode] and step != STEPS[mode]:
                continue  # no checkpoint at this step: the point is never reached
            out.extend((point, step, rank) for rank in RANKS[mode])
    return out


def run_case(mode: str, point: str, step: int, rank: int, model: str, corpus: Corpus, ref: Path, mp: Any) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"faults-{mode}-{point}-{step}-{rank}-"))
    cfg = make_cfg(model, corpus, out, "run", KNOBS[mode])
    marker = out / "fired"
    t0 = time.perf_counter()
    row: dict[str, Any] = {"mode": mode, "point": point, "step": step, "rank": rank}
    try:
        result = train(cfg, fault=f"{point}:{step}:{rank}:{marker}", monkeypatch=mp)
        row["fired"] = marker.exists()
        if mode == "local" and result.error is not None:
            result = train(cfg)  # the user's rerun
        if result.error is not None:
            raise RuntimeError(result.summary.get("error"))
        row["resumes"] = [r["step"] for r in rows_of(result.run_dir, "resume")]
        assert_same_run(result.run_dir, ref, steps=STEPS[mode])
        row["outcome"] = "identical"
    except Exception as exc:  # noqa: BLE001 - recorded per case
        row["outcome"] = "DIFFERENT" if isinstance(exc, AssertionError) else "ERROR"
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def controller_case(mode: str, after: int, model: str, corpus: Corpus, ref: Path) -> dict[str, Any]:
    """Kill the MarginController once ``metrics.jsonl`` shows ``after`` step rows."""
    import ray

    from catdpo_ray.train.driver import controller_name

    out = Path(tempfile.mkdtemp(prefix=f"faults-{mode}-controller-{after}-"))
    run_dir = out / "run"
    row: dict[str, Any] = {"mode": mode, "point": "controller", "step": after, "rank": -1}
    done = threading.Event()

    def killer() -> None:
        while not done.is_set():
            try:
                n = sum('"kind": "step"' in x for x in (run_dir / "metrics.jsonl").read_text().splitlines())
                run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
            except (OSError, ValueError):
                n = 0
            if n >= after:
                ray.kill(ray.get_actor(controller_name(run_id)), no_restart=False)
                row["fired"] = True
                return
            time.sleep(0.02)

    t0 = time.perf_counter()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = train(make_cfg(model, corpus, out, "run", KNOBS[mode]))
        if result.error is not None:
            raise RuntimeError(result.summary.get("error"))
        row["resumes"] = [r["step"] for r in rows_of(result.run_dir, "resume")]
        assert_same_run(result.run_dir, ref, steps=STEPS[mode])
        row["outcome"] = "identical"
    except Exception as exc:  # noqa: BLE001
        row["outcome"] = "DIFFERENT" if isinstance(exc, AssertionError) else "ERROR"
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        traceback.print_exc()
    finally:
        done.set()
        thread.join(timeout=5)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    from catdpo_ray.tiny import ensure_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["local", "ray2", "both"], default="both")
    ap.add_argument("--points", nargs="+", default=["step", "ckpt_write", "ckpt_done"])
    ap.add_argument("--steps", nargs="+", type=int, default=None)
    ap.add_argument("--controller", action="store_true", help="also kill the MarginController after each step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    model = str(ensure_tiny_model(None))
    corpus = Corpus(*small_corpus(Path(tempfile.mkdtemp(prefix="faults-corpus-")), N_TRAIN, N_TEST))
    mp = pytest.MonkeyPatch()
    install_memo(mp)  # tokenize + reference-score once per configuration
    rows: list[dict[str, Any]] = []
    for mode in (["local", "ray2"] if args.mode == "both" else [args.mode]):
        ref_out = Path(tempfile.mkdtemp(prefix=f"faults-{mode}-ref-"))
        ref = train(make_cfg(model, corpus, ref_out, "ref", KNOBS[mode]))
        if ref.error is not None:
            print(f"reference run failed: {ref.summary.get('error')}", file=sys.stderr)
            return 1
        for point, step, rank in cases(mode, args.points, args.steps):
            rows.append(run_case(mode, point, step, rank, model, corpus, ref.run_dir, mp))
            print(json.dumps(rows[-1]), flush=True)
        if args.controller:
            for after in range(1, STEPS[mode]):
                rows.append(controller_case(mode, after, model, corpus, ref.run_dir))
                print(json.dumps(rows[-1]), flush=True)
    mp.undo()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults_exhaustive.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Exhaustive fault injection", "", "| mode | point | step | rank | fired | outcome | resumes | s | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['point']} | {r['step']} | {r['rank']} | {r.get('fired', '')} | {r['outcome']} | "
                     f"{r.get('resumes', '')} | {r['seconds']} | {r.get('error', '').replace('|', '/')[:200]} |")
    bad = [r for r in rows if r["outcome"] != "identical"]
    lines += ["", f"{len(rows) - len(bad)} of {len(rows)} cases identical to the uninterrupted run."]
    (out / "faults_exhaustive.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
