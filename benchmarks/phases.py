"""The one-off costs of a ``catdpo-ray train`` run: a phase table from outside the trainer.

    python benchmarks/phases.py                       # default job, 60 steps: 2 workers, then local mode
    python benchmarks/phases.py --modes 2w --steps 60 -- train.eval_before_after=false   # extra overrides

Each mode runs the default job (``catdpo-ray train train.max_steps=60``, plus ``scaling.num_workers=0``
for local mode) in a subprocess whose console lines are time-stamped as they arrive. The phases come
from those stamps and the run directory:

- the driver's own lines: ``[data] train`` (pairs read), ``[data] tokenized ... in Xs``,
  ``[reference] <split>: ... in Xs`` (hit or computed), ``[train] ... on N worker(s)`` (``fit`` starts),
  the progress lines ``step i/N`` (printed when the driver drains the controller: about once a second,
  so those stamps are late by up to 1 s);
- ``metrics.jsonl``: ``step_time_s`` of every step (rank 0's step, the optimizer steps proper), and the
  ``startup`` row: rank 0's own start-up phases (``catdpo_ray/train/startup.py``), indented under the
  span they split (worker-group start, model load, DeepSpeed init, first batch, step 1);
- ``summary.json``: ``wall_time_s`` (``fit_run`` from the trainer's start to its summary) and
  ``fit_start_time`` (when ``fit()`` was called, the origin of the workers' entry time);
- the process exit.

What cannot be separated is said so in the table (final evaluation vs checkpoint vs export). ``os.getloadavg()`` is recorded at the start and end of each run.
Output: ``<out>/phases.json``, ``<out>/phases.md`` and each run's time-stamped console log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = {"2w": [], "local": ["scaling.num_workers=0"]}
_TABLE_ROW = re.compile(r"^(category\s+pairs|-{10,}|.+\s\d+\s+\d+\s*$)")


def run_logged(cmd: list[str], log_path: Path) -> tuple[list[tuple[float, str]], float, int]:
    """Run ``cmd``; return its console lines stamped with seconds since start, the wall time and the rc."""
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    with open(log_path, "w", buffering=1) as log:  # line-buffered: the log can be followed live
        for line in proc.stdout:
            stamp = time.perf_counter() - t0
            lines.append((stamp, line.rstrip("\n")))
            log.write(f"{stamp:8.2f} {line}")
    rc = proc.wait()
    return lines, time.perf_counter() - t0, rc


def _first(lines: list[tuple[float, str]], pattern: str) -> tuple[float, re.Match[str]] | None:
    rx = re.compile(pattern)
    for t, text in lines:
        if (m := rx.search(text)):
            return t, m
    return None


def _last(lines: list[tuple[float, str]], pattern: str) -> tuple[float, re.Match[str]] | None:
    found = [x for x in (_first([(t, s)], pattern) for t, s in lines) if x is not None]
    return found[-1] if found else None


def phases(lines: list[tuple[float, str]], wall: float, run_dir: Path) -> dict[str, Any]:
    """The phase table of one run (seconds) from its stamped console lines and its run directory."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "step_time_s" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "data_report.json").read_text()).get("reference", {})
    read = _first(lines, r"^\[data\] train ")
    tok = _first(lines, r"^\[data\] tokenized .* in ([\d.]+)s")
    fit = _first(lines, r"^\[train\] .* on \d+ worker")
    step1 = _first(lines, r"(^|\s)step 1/\d+ ")
    last = _last(lines, r"(^|\s)step \d+/\d+ ")
    if not (read and tok and fit and step1 and last):
        raise RuntimeError("console markers missing; see the log")
    # The pairs are read before Ray starts: the last line of the category table ends that phase.
    after_read = [t for t, s in lines if t >= read[0] and (s.startswith("[data]") or _TABLE_ROW.match(s))]
    pairs_done = max(t for t in after_read if t < tok[0])
    tok_s = float(tok[1].group(1))
    ref_end = _last(lines, r"^\[reference\] ")
    step_sum = sum(r["step_time_s"] for r in steps)
    fit_end = fit[0] + float(summary["wall_time_s"])
    out = {
        "python start, imports, config, read + validate + pair (driver)": pairs_done,
        "ray.init (local cluster start), console set-up": tok[0] - tok_s - pairs_done,
        "tokenization in the driver, transformers import + tokenizer load included (as printed)": tok_s,
    }
    # One entry per pass of the reference stage (``pairs``: train+test in one pass; ``test`` alone for SimPO).
    stages = [i for i in report.values() if isinstance(i, dict) and "seconds" in i]
    for i in stages:
        out[f"reference stage, {i.get('split', '?')} ({'cache hit' if i['hit'] else 'computed'})"] = float(i["seconds"])
    ref_total = sum(float(i["seconds"]) for i in stages)
    out["materialise, controller actor, trainer build (until fit starts)"] = fit[0] - (ref_end[0] if ref_end else tok[0])
    if ref_end is None:
        out["materialise, controller actor, trainer build (until fit starts)"] -= ref_total
    out["worker-group start + model load + DeepSpeed init (to step 1, less step 1; +-1 s)"] = (
        step1[0] - fit[0] - steps[0]["step_time_s"])
    # The same span from inside (rank 0's ``startup`` row, catdpo_ray/train/startup.py), phase by phase.
    startup = next((r for r in rows if r.get("kind") == "startup"), None)
    if startup is not None:
        fit_start = float(summary.get("fit_start_time") or 0.0)
        if fit_start:
            out["  fit() to the worker function: controller, placement group, worker actors, process group"] = (
                float(startup["entry_time"]) - fit_start)
        for phase, sec in startup["seconds"].items():
            if sec is not None:
                label = "worker process start to the function (inside the line above)" if phase == "launch" else phase
                out[f"  worker: {label.replace('_', ' ')}"] = float(sec)
    out["optimizer steps (sum of step_time_s)"] = step_sum
    out["between steps (drain, broadcast, console; +-1 s)"] = (last[0] - step1[0]) - (step_sum - steps[0]["step_time_s"])
    out["after the last step: final eval, checkpoint, export, worker-group teardown (+-1 s)"] = fit_end - last[0]
    out["after fit: run outputs (report, plots), Ray shutdown at exit"] = wall - fit_end
    return {"phases": out, "wall_s": wall, "steps": len(steps), "step_sum_s": step_sum,
            "fixed_cost_s": wall - step_sum, "fit_wall_s": float(summary["wall_time_s"]),
            "median_pairs_per_s": sorted(r["pairs_per_s"] for r in steps[5:] or steps)[len(steps[5:] or steps) // 2]}


def render(results: dict[str, dict[str, Any]], command: str) -> str:
    modes = list(results)
    names: list[str] = []
    for r in results.values():
        names += [n for n in r["phases"] if n not in names]
    lines = [f"Command: `{command}`", "", "| phase | " + " | ".join(f"{m} s" for m in modes) + " |",
             "|---|" + "---:|" * len(modes)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{results[m]['phases'].get(name, float('nan')):.1f}" for m in modes) + " |")
    for key, label in (("wall_s", "**end to end (process)**"), ("step_sum_s", "optimizer steps"),
                       ("fixed_cost_s", "**fixed cost** (end to end - steps)"),
                       ("median_pairs_per_s", "steady pairs/s (median, steps 6+)")):
        lines.append(f"| {label} | " + " | ".join(f"{results[m][key]:.1f}" for m in modes) + " |")
    lines.append("| load average 1-min (start-end) | " + " | ".join(
        f"{results[m]['load_start'][0]:.1f}-{results[m]['load_end'][0]:.1f}" for m in modes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/catdpo-phases"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (after --)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("catdpo-ray")
    base = [exe] if exe else [sys.executable, "-m", "catdpo_ray.cli"]
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        name = f"phases-{mode}"
        shutil.rmtree(args.out / "runs" / name, ignore_errors=True)
        cmd = [*base, "train", f"train.max_steps={args.steps}", *MODES[mode], *args.overrides,
               f"output.dir={args.out / 'runs'}", f"output.name={name}"]
        load_start = os.getloadavg()
        lines, wall, rc = run_logged(cmd, args.out / f"{name}.log")
        if rc != 0:
            print(f"{mode}: rc={rc}; see {args.out / f'{name}.log'}", file=sys.stderr)
            continue
        results[mode] = {**phases(lines, wall, args.out / "runs" / name), "load_start": load_start,
                         "load_end": os.getloadavg(), "command": " ".join(cmd)}
    command = "python benchmarks/phases.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(results, command) if results else "no run finished"
    (args.out / "phases.md").write_text(text + "\n")
    (args.out / "phases.json").write_text(json.dumps({"command": command, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
