"""Where a CPU run scores a reference-cache miss: this process vs a one-actor Ray Data pool, side by side.

    python benchmarks/reference_place.py                  # the default job's 2070 pairs, 3 rounds
    python benchmarks/reference_place.py --repeats 5 -- data.max_train_rows=400   # extra overrides

The default job's pairs are read and tokenized once (``prepare_data`` with ``model.reference=online``,
so nothing is scored there). Then, in one process with Ray up, each round scores the whole table both
ways, in alternating order: :func:`~catdpo_ray.data.reference.score_in_driver` (what a CPU run does
now) and :func:`~catdpo_ray.data.reference.score_on_actors` (the pool, what a GPU run does, here with
one CPU actor as CPU runs had before). No cache is read or written. Each call is timed from the call to
its result, so the pool's time includes starting its actor process (imports, model load), as on a
cache miss. The two results are checked to agree (row keys exactly, log-probs within 1e-5).

Prints a table (median, min, max per place), the load average before and after, and the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = ap.parse_args(argv)

    import pyarrow as pa

    from catdpo_ray.config import load_config
    from catdpo_ray.data.reference import score_in_driver, score_on_actors
    from catdpo_ray.data.tables import dataset_table
    from catdpo_ray.ray_session import init_ray
    from catdpo_ray.train.prepare import prepare_data

    cfg = load_config(None, ["scaling.num_workers=0", *args.overrides])
    init_ray(cfg)
    data = prepare_data(cfg.replace({"model.reference": "online"}), Path(tempfile.mkdtemp(prefix="refplace")),
                        verbose=False)
    table = pa.concat_tables([dataset_table(data.train), dataset_table(data.test)])
    micro = max(16, cfg.train.micro_batch_size)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"driver": [], "actor pool": []}
    results: dict[str, dict[str, np.ndarray]] = {}
    for i in range(args.repeats):
        order = ["driver", "actor pool"] if i % 2 == 0 else ["actor pool", "driver"]
        for place in order:
            t0 = time.perf_counter()
            if place == "driver":
                out = score_in_driver(table, cfg, data.model_path, data.tokenizer_path, micro)
            else:
                out = score_on_actors(table, cfg, data.model_path, data.tokenizer_path, micro)
            times[place].append(time.perf_counter() - t0)
            results[place] = out
            print(f"round {i + 1} {place:10s} {times[place][-1]:6.2f} s", flush=True)
    load_after = os.getloadavg()

    a, b = results["driver"], results["actor pool"]
    ia, ib = np.argsort(a["row_key"]), np.argsort(b["row_key"])
    assert np.array_equal(a["row_key"][ia], b["row_key"][ib]), "the two places scored other rows"
    worst = max(float(np.max(np.abs(a[c][ia] - b[c][ib]))) for c in a if c != "row_key")
    assert worst <= 1e-5, f"the two places disagree by {worst}"

    print(f"\n{table.num_rows} pairs, tiny model, fp32, micro-batch {micro}; {args.repeats} rounds, order alternating")
    print("| place | median s | min s | max s |\n|---|---:|---:|---:|")
    for place, ts in times.items():
        print(f"| {place} | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} |")
    print(f"\nlargest difference between the two: {worst:.2e}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print("command: python " + " ".join(shlex.quote(x) for x in sys.argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
