"""``catdpo-ray`` command line: train | tune | eval | compare | config.

Every subcommand takes ``[--config FILE] [section.key=value ...]``; with no arguments ``train``
runs the embedded default (Cat-DPO, bundled corpus, tiny model, 2 CPU workers, DeepSpeed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (defaults apply to missing keys)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.2 dual.eta=0.25")


def _load(args: argparse.Namespace):  # noqa: ANN202 - RunConfig, imported lazily
    from catdpo_ray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from catdpo_ray.train.driver import run_training

    result = run_training(_load(args))
    if result.error is not None:
        print(f"training stopped: {result.summary.get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from catdpo_ray.config import config_reference, to_yaml

    print(config_reference() if args.reference else to_yaml(_load(args)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from catdpo_ray.tune import load_sweep_config, run_sweep

    # Without --config: the embedded default sweep (= jobs/sweep_tiny_cpu.yaml); overrides apply on top.
    result = run_sweep(load_sweep_config(args.config, args.overrides))
    return 0 if result.best is not None else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from catdpo_ray.eval.runner import eval_config, run_eval

    # A run's final/ brings the run's config.yaml (prompt format, categories, reference model)
    # unless --config is given; key=value overrides apply on top either way.
    run_eval(eval_config(args.model, args.config, args.overrides), model=args.model, data=args.data, out=args.out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from catdpo_ray.eval.compare import compare_runs

    compare_runs(args.runs, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catdpo-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (default: Cat-DPO on the bundled corpus with the tiny model)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("tune", help="Ray Tune sweep over dual.eta x dual.epsilon")
    _add_config_args(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("eval", help="per-category safety evaluation of a model directory or hub id")
    p.add_argument("--model", required=True, help="HF model directory or hub id (e.g. runs/NAME/final)")
    p.add_argument("--data", default=None, help="PKU-schema test file (default: data.test of the config)")
    p.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="side-by-side table and panels for several run directories")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="comparison")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("config", help="print the resolved config (or --reference: every key)")
    p.add_argument("--reference", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from catdpo_ray.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
