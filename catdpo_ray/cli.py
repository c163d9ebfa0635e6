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
    if result.summary.get("status") == "interrupted":
        # The driver printed the resume command and wrote every file (atomically). In local mode the training
        # thread may still sit inside a Ray Data iterator; a normal interpreter exit would then print its
        # shutdown traceback after our message. End here instead.
        import os

        import ray

        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)  # what follows is shutdown noise of the stopped pipeline
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        ray.shutdown()  # stops the local cluster this process started
        os._exit(130)
    if result.error is not None:
        print(f"training stopped: {result.summary.get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from catdpo_ray.config import to_yaml
    from catdpo_ray.config_docs import config_reference

    print(config_reference() if args.reference else to_yaml(_load(args)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from catdpo_ray.tune import load_sweep_config, run_sweep

    # Without --config: the embedded default sweep (= jobs/sweep_tiny_cpu.yaml); overrides apply on top.
    result = run_sweep(load_sweep_config(args.config, args.overrides))
    return 0 if result.best is not None else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from catdpo_ray.eval.runner import run_eval
    from catdpo_ray.eval.settings import EvalInputError, eval_config

    # Only the config the user names is used: --config FILE, or with --run-config the run's config.yaml
    # beside --model minus the keys that pick endpoints, keys, models or remote code (eval/settings.py).
    try:
        cfg = eval_config(args.model, args.config, args.overrides, run_config=args.run_config)
        run_eval(cfg, model=args.model, data=args.data, out=args.out, backend=args.generation)
    except (EvalInputError, ImportError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from catdpo_ray.eval.compare import compare_runs

    compare_runs(args.runs, out=args.out)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan the job's memory; exit 0 when it fits, 3 when it does not (2: usage / config error)."""
    from catdpo_ray.plan import Hardware, format_plan, parse_size, preflight
    from catdpo_ray.plan.planner import resolve_model_path

    cfg = _load(args)
    try:
        hw = Hardware(gpu_memory=parse_size(args.gpu_memory, what="--gpu-memory"), gpus_per_node=args.gpus_per_node,
                      host_memory=parse_size(args.host_memory, what="--host-memory") if args.host_memory else None)
        if args.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node: {args.gpus_per_node} must be at least 1")
        result = preflight(cfg, resolve_model_path(cfg), hw)
    except (ValueError, OSError) as exc:
        print(f"plan error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json

        plan = result.plan
        print(json.dumps({"fits": result.fits, "model": result.model, "problems": result.problems, "fix": result.fix,
                          "per_gpu_total_bytes": plan.device_total, "model_states_bytes": plan.model_states,
                          "host_per_node_bytes": plan.host_per_node, "device": plan.device, "host": plan.host,
                          "total_params": plan.total_params, "trainable_params": plan.trainable_params}, indent=2))
    else:
        print(format_plan(result))
    return result.exit_code


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
    p.add_argument("--run-config", action="store_true",
                   help="also read the run's config.yaml beside --model (prompt format, categories, data); "
                        "never its judge URL/key, models, output dir, Ray address or trust_remote_code")
    p.add_argument("--generation", choices=("auto", "ray", "local"), default="auto",
                   help="where answers are generated: ray = a Ray Data actor pool (eval.num_actors replicas), "
                        "local = in this process, auto = ray when Ray is already up in this process or a cluster "
                        "address is configured (scaling.ray_address, $RAY_ADDRESS), else local (default)")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="side-by-side table and panels for several run directories")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="comparison")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("plan", help="per-GPU / per-node memory plan and verdict (exit 0 fits, 3 does not)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB or 40GB (default 80GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--host-memory", default=None, help="host memory per node, e.g. 512GB (default: unchecked on "
                   "GPU runs, this machine's memory on CPU runs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of the table")
    _add_config_args(p)
    p.set_defaults(func=cmd_plan)
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
    except Exception as exc:
        refusal = _refusal(exc)
        if refusal is None:
            raise
        label, code = refusal
        print(f"{label}: {exc}", file=sys.stderr)
        return code


def _refusal(exc: BaseException) -> tuple[str, int] | None:
    """(label, exit code) for the errors that are a clear refusal, not a crash: no traceback for them."""
    from catdpo_ray.data.loader import EmptySplitError
    from catdpo_ray.data.schema import BadRowError
    from catdpo_ray.data.sources import DataFileError
    from catdpo_ray.train.driver import PlanRefused
    from catdpo_ray.train.resume import ResumeRefused

    if isinstance(exc, ResumeRefused):
        return "resume refused", 2
    if isinstance(exc, PlanRefused):
        return "plan", 3
    if isinstance(exc, (EmptySplitError, BadRowError, DataFileError)):
        return "data error", 2
    return None


if __name__ == "__main__":
    raise SystemExit(main())
