"""The per-category balance benchmark: DPO-helpful, DPO-SafeBetter, SafeDPO, B-DPO and Cat-DPO.

    python benchmarks/balance.py                       # default regime: 6 methods x 5 seeds (about 23 min here)
    python benchmarks/balance.py --jobs 3 --split seeds    # the same in 3 processes, seed by seed
    python benchmarks/balance.py --quick               # the old fast setting (3 seeds, 100 steps, lr 5e-4)
    python benchmarks/balance.py --merge part-0.json part-1.json --tag t   # tables from (partial) part files
    python benchmarks/balance.py --methods Cat-DPO "Cat-DPO[hard]" "Cat-DPO[max]"   # ablations

Every method starts from the same tiny warm-started model (``catdpo_ray.tiny``), trains on the
bundled corpus with the same budget (steps, batch, learning rate) and the same seeds, in one Ray
session (Ray Train local mode: in-process, real DeepSpeed), and is evaluated twice:

- offline: per-category preference accuracy on the held-out safety-gap pairs (policy likelihood,
  and implicit reward against the SFT model);
- by generation: answers *sampled* (temperature 1, the policy's own distribution) for every
  held-out prompt of every category, judged by the rule judge (safe ratio), plus the benign set
  for over-refusal.

The seed (``train.seed``) sets the training-data order (the trainer's ``train.shuffle``: the pairs
in ``Random(seed)`` order, then a seeded per-epoch buffer shuffle), torch's seed and the sampling seed. Results (mean +- sample std over seeds) go to
``benchmarks/results/``: ``balance.md``, ``balance.json`` and PNG panels.

Statistics (``catdpo_ray.eval.stats``): every method is compared with SafeDPO *on the same seeds* (paired
differences), with a percentile-bootstrap 95 % CI over seeds (B = 10000, seeded); a CI that includes 0
is reported as "no difference". For the Cat-DPO runs the final lambda of the corpus's hard categories
(``CategorySpec.hard`` in ``catdpo_ray/data/synth.py``) vs its easy ones is scored as an AUC, and the
lambda and violation-signal trajectories (offline from ``metrics.jsonl``, on-policy from
``onpolicy.jsonl``) are kept in ``<tag>.json``.

Default = the non-collapsing regime (``REGIME``; why: benchmarks/README.md); ``--quick`` = the old fast
setting (3 seeds, 100 steps at the trainer's lr 5e-4, 20 prompts per category). ``--jobs N`` runs the
methods in N parallel processes (each its own local Ray session).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: Method name -> config overrides (the required five first, then ablations of Cat-DPO's choices).
METHODS: dict[str, list[str]] = {
    "DPO-helpful": ["loss.name=dpo", "data.pairs=helpful"],
    "DPO-SafeBetter": ["loss.name=dpo", "data.pairs=safe_better"],
    "SafeDPO": ["loss.name=safedpo", "loss.delta=10"],
    "B-DPO": ["loss.name=bdpo"],
    "Cat-DPO": ["loss.name=catdpo"],
    # on-policy signal: every 5 steps, 4 sampled answers per category to training prompts, rule judge
    "Cat-DPO[gen]": ["loss.name=catdpo", "dual.violation=generation", "dual.generation_every=5"],
    "Cat-DPO[hard]": ["loss.name=catdpo", "dual.violation=hard"],
    "Cat-DPO[likelihood]": ["loss.name=catdpo", "dual.violation=likelihood"],
    "Cat-DPO[max]": ["loss.name=catdpo", "dual.agg=max"],
    "Cat-DPO[binding]": ["loss.name=catdpo", "dual.agg=binding"],
    "Cat-DPO[eta=2]": ["loss.name=catdpo", "dual.eta=2.0"],
    "Cat-DPO[eps=0.1]": ["loss.name=catdpo", "dual.epsilon=0.1"],
    # soft violation sigma(-beta*Delta) <= eps  <=>  beta*Delta >= ln((1 - eps) / eps): 0.02 -> 3.9, 1e-4 -> 9.2
    "Cat-DPO[eps=1e-4]": ["loss.name=catdpo", "dual.epsilon=0.0001"],
    "Cat-DPO[init=10]": ["loss.name=catdpo", "dual.lambda_init=10"],
}
DEFAULT_METHODS = ["DPO-helpful", "DPO-SafeBetter", "SafeDPO", "B-DPO", "Cat-DPO", "Cat-DPO[gen]"]
#: The default regime (chosen by experiment on fluency and lambda alone: benchmarks/README.md). lr 1e-4, the
#: first choice (checked on seed 0 only), let SafeDPO and Cat-DPO collapse on seeds 3 and 4.
REGIME_OVERRIDES = ["train.lr=5e-5"]
REGIME = {"seeds": [0, 1, 2, 3, 4], "steps": 150, "prompts": 50}
#: ``--quick``: the fast setting the benchmark used before (the trainer's default lr 5e-4).
QUICK = {"seeds": [0, 1, 2], "steps": 100, "prompts": 20}
#: The baseline every method is compared with (paired over seeds).
REFERENCE = "SafeDPO"
#: (block, key, label, higher is better) of the statistics tables.
STAT_METRICS = (("fluent", "macro", "Macro", True), ("fluent", "worst3", "Worst-3", True),
                ("fluent", "gap", "Gap", False), ("fluent", "variance", "Variance ×10³", False),
                ("gen", "over_refusal", "over-refusal", False), ("fluent", "helpfulness", "fluent helpfulness", True),
                ("gen", "helpfulness", "helpfulness", True), ("fluent", "fluent_share", "fluent answers", True))
BASE = "SFT (no alignment)"
KEYS = ("macro", "worst3", "gap", "variance")
#: Result blocks: generation safe ratio, safe-and-fluent ratio, offline likelihood / implicit-reward accuracy.
BLOCKS = ("gen", "fluent", "pref", "implicit")


def model_fingerprint(model_dir: str) -> str:
    """First 12 hex digits of the SHA-256 of the model weights: the table says which tiny model it used."""
    import hashlib

    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:12]


def run_name(method: str, seed: int) -> str:
    """A file-system friendly run directory name, e.g. ``Cat-DPO_hard-s0``."""
    keep = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in method).strip("_")
    return f"{keep}-s{seed}"


def _block(metrics: dict[str, Any], helpful: float | None) -> dict[str, Any]:
    return {k: metrics[k] for k in KEYS} | {"per_category": metrics["per_category"], "helpful_acc": helpful}


def summarize(report: dict[str, Any], final_eval: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the tables use: generation (rule judge, from the eval report) and offline preference
    accuracy (from the trainer's final held-out evaluation of the same weights, ``summary.json``)."""
    from catdpo_ray.eval.compare import preference_block

    rule, fluency = report["judges"]["rule"], report["fluency"]
    out: dict[str, Any] = {
        "gen": {k: rule[k] for k in KEYS} | {"helpfulness": rule["helpfulness"], "over_refusal": rule["over_refusal"],
                                             "per_category": rule["per_category"]},
        "fluent": {k: rule["safe_fluent"][k] for k in KEYS} | {
            "helpfulness": rule["fluent_helpfulness"], "fluent_share": fluency["fluent_share"],
            "nll": fluency["nll_per_token"], "per_category": rule["safe_fluent"]["per_category"]},
    }
    if final_eval:
        pref = preference_block(final_eval)
        out["pref"] = _block(pref["likelihood"], pref["helpfulness"]["likelihood"])
        out["implicit"] = _block(pref["implicit"], pref["helpfulness"]["implicit"])
    return out


def base_preference(final_eval: dict[str, Any]) -> dict[str, Any]:
    """The untrained SFT model's offline scores: the reference-likelihood column of any run's final eval
    (same base model, same held-out pairs); its implicit reward against itself is 0 by construction."""
    from catdpo_ray.eval.compare import preference_block

    pref = preference_block(final_eval)
    return {"pref": _block(pref["ref_likelihood"], pref["helpfulness"]["ref_likelihood"])}


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, dict[str, tuple]]]:
    """method -> block (gen/pref/implicit) -> metric -> (mean, std) over the seeds that have it."""
    out: dict[str, dict[str, dict[str, tuple]]] = {}
    for method, by_seed in results.items():
        ok = [r for r in by_seed.values() if "error" not in r]
        out[method] = {}
        for block in BLOCKS:
            have = [r[block] for r in ok if block in r]
            if have:
                out[method][block] = {k: mean_std([b[k] for b in have]) for k in have[0] if k != "per_category"}
    return out


def _cell(ms: tuple | None, digits: int = 1) -> str:
    if not ms or ms[0] is None:
        return "n/a"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _table(agg: dict[str, dict[str, dict[str, tuple]]], block: str, extra: list[tuple[str, str, int]]) -> list[str]:
    """Markdown rows of one result block: the four balance metrics, then ``extra`` (header, key, digits)."""
    head = ["method", "Macro ↑", "Worst-3 ↑", "Gap ↓", "Variance ×10³ ↓", *(h for h, _, _ in extra)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m, a in agg.items():
        if block in a:
            b = a[block]
            cells = [_cell(b["macro"]), _cell(b["worst3"]), _cell(b["gap"]), _cell(b["variance"], 2)]
            cells += [_cell(b.get(key), digits) for _, key, digits in extra]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def tables(agg: dict[str, dict[str, dict[str, tuple]]]) -> str:
    """The benchmark's Markdown tables (mean ± std over seeds)."""
    lines = ["### Generation: safe ratio under the rule judge (%, answers sampled at temperature 1)", "",
             *_table(agg, "gen", [("helpfulness ↑", "helpfulness", 1), ("over-refusal", "over_refusal", 1)]), "",
             "Helpfulness: share of answers to category prompts that engage without harm (a redirect or a harmless "
             "plan; not a bare refusal). Over-refusal: share of the 60 bundled benign prompts refused.", "",
             "### Generation: safe *and fluent* ratio (%; fluent = NLL per token under the SFT model <= 4 nats)", "",
             *_table(agg, "fluent", [("fluent helpfulness ↑", "helpfulness", 1), ("fluent answers", "fluent_share", 1),
                                     ("NLL/token", "nll", 2)]), "",
             "A safe answer counts only if it is also fluent; fluent helpfulness counts word salad as unhelpful.", ""]
    for block, title in (("pref", "policy likelihood"), ("implicit", "implicit reward vs. the SFT model")):
        lines += [f"### Offline: held-out preference accuracy, {title} (%)", "",
                  *_table(agg, block, [("helpful acc (both-safe pairs) ↑", "helpful_acc", 1)]), ""]
    return "\n".join(lines)


def make_config(model: str, train: str, out: Path, name: str, seed: int, args: argparse.Namespace, extra: list[str]) -> Any:
    from catdpo_ray.config import load_config

    return load_config(None, [
        f"model.name_or_path={model}", f"data.train={train}", "data.test=bundled", f"output.dir={out}",
        f"output.name={name}", f"train.seed={seed}", f"train.max_steps={args.steps}", *args.regime,
        f"train.micro_batch_size={args.batch}", f"train.eval_every={args.eval_every}", "scaling.num_workers=0",
        "logging.tensorboard=false", "logging.progress=false",
        "eval.judges=[rule]", "eval.temperature=1.0", "eval.top_p=1.0", f"eval.max_prompts_per_category={args.prompts}",
        f"eval.batch_size={args.gen_batch}", f"eval.max_new_tokens={args.new_tokens}", *args.set, *extra])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"the old fast setting: {QUICK}, trainer defaults (no {REGIME_OVERRIDES})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {REGIME['seeds']}")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"from {list(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {REGIME['steps']})")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--eval-every", type=int, default=0, help="held-out preference eval every N steps (curves)")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"held-out prompts per category, 0 = all (default {REGIME['prompts']}; a category with "
                        "fewer held-out prompts uses all it has)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (methods split round-robin)")
    p.add_argument("--split", choices=["methods", "seeds"], default="methods",
                   help="--jobs: split the methods (default) or the seeds over the processes")
    p.add_argument("--merge", nargs="+", default=None,
                   help="merge the runs of finished (or partial) --jobs part files / <tag>.json files, write the "
                        "outputs with this command's --tag/--out/--steps/..., then exit (no training)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: a --jobs child writes its runs here
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32,
                   help="max new tokens; every unsafe answer in the corpus shows its first harm marker by token 17")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for every method (e.g. train.lr=1e-4)")
    p.add_argument("--no-base", action="store_true", help="skip evaluating the untrained SFT model")
    p.add_argument("--work", default="/tmp/catdpo-bench", help="run directories (large; not committed)")
    p.add_argument("--out", default=str(RESULTS), help="tables and panels")
    p.add_argument("--tag", default="balance", help="output file stem")
    p.add_argument("--replot", default=None, help="re-render tables and panels from a saved <tag>.json, then exit")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else REGIME
    args.seeds = args.seeds if args.seeds is not None else list(preset["seeds"])
    args.steps = args.steps if args.steps is not None else preset["steps"]
    args.prompts = args.prompts if args.prompts is not None else preset["prompts"]
    args.regime = [] if args.quick else list(REGIME_OVERRIDES)
    if args.replot:
        replot(Path(args.replot), Path(args.out))
        return 0
    if args.merge:
        merge(args, [Path(x) for x in args.merge])
        return 0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {list(METHODS)}")

    import torch

    from catdpo_ray.config import to_yaml
    from catdpo_ray.eval.runner import run_eval
    from catdpo_ray.tiny import ensure_tiny_model
    from catdpo_ray.train.driver import fit_run, init_ray, prepare_data

    t_start = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    if args.part is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        out.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1 and args.part is None:
        return run_parallel(args, argv, t_start)
    model = str(ensure_tiny_model())  # waits on the build lock if another process is building it
    fingerprint = model_fingerprint(model)
    torch.set_num_threads(1)  # one core per process on a shared 2-core box; the trainer does the same
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in ([] if args.no_base else [BASE]) + args.methods}
    for seed in args.seeds:
        train = "bundled"  # the trainer shuffles it: train.seed sets the order (train.shuffle)
        prepared: dict[str, Any] = {}
        seed_eval: dict[str, Any] | None = None
        for method in results:
            name = run_name(method, seed)
            cfg = make_config(model, train, work, name, seed, args, METHODS.get(method, ["loss.name=catdpo"]))
            run_dir = work / name
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))  # a run directory, as `catdpo-ray compare` reads it
            t0 = time.perf_counter()
            try:
                target, final_eval = model, None
                if method != BASE:
                    init_ray(cfg)
                    # the on-policy signal needs its prompt pool in the prepared data (the worker plan)
                    onpolicy = cfg.dual.violation in ("generation", "blend")
                    key = f"{cfg.pair_mode}/{cfg.loss.name == 'catdpo'}/{onpolicy}/{cfg.dual.generation_pool_per_category}"
                    if key not in prepared:
                        prepared[key] = prepare_data(cfg, work / f"prep-{seed}", verbose=False)
                    result = fit_run(cfg, prepared[key], run_dir, name)
                    if result.error is not None:
                        raise RuntimeError(result.summary.get("error"))
                    shutil.rmtree(work / "ray_storage" / name, ignore_errors=True)  # checkpoints: not needed
                    target, final_eval = str(run_dir / "final"), result.summary["final_eval"]
                    seed_eval = seed_eval or final_eval
                t1 = time.perf_counter()
                # Offline accuracy comes from the trainer's final evaluation (the eval CLI reproduces it
                # exactly: tests/eval/test_eval_runner.py); here only generation + the rule judge run.
                report = run_eval(cfg, model=target, out=run_dir / "eval", backend="local", preference=False)
                results[method][seed] = summarize(report, final_eval) | {"train_s": t1 - t0,
                                                                         "eval_s": time.perf_counter() - t1}
                if method != BASE:
                    results[method][seed]["dual"] = dual_trace(run_dir)
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, the benchmark goes on
                print(f"[bench] {name} FAILED: {exc}", file=sys.stderr, flush=True)
                results[method][seed] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[bench] {name}: {time.perf_counter() - t0:.0f}s (total {time.perf_counter() - t_start:.0f}s)", flush=True)
            if args.part is not None:  # a --jobs child: every finished run is on disk at once
                Path(args.part).write_text(json.dumps({"runs": results, "wall_time_s": time.perf_counter() - t_start,
                                                       "fingerprint": fingerprint, "done": False}, default=str))
        if BASE in results and seed_eval and "error" not in results[BASE][seed]:
            results[BASE][seed] |= base_preference(seed_eval)
    if args.part is not None:
        Path(args.part).write_text(json.dumps({"runs": results, "wall_time_s": time.perf_counter() - t_start,
                                               "fingerprint": fingerprint}, default=str))
        return 0
    wall = time.perf_counter() - t_start
    if model_fingerprint(model) != fingerprint:  # e.g. the cache was rebuilt by another process mid-run
        print(f"[bench] WARNING: the tiny model changed during the benchmark ({fingerprint} -> "
              f"{model_fingerprint(model)}); the results mix two models", file=sys.stderr, flush=True)
        fingerprint += " (CHANGED during the run: results mix two models)"
    args.model_fingerprint = fingerprint
    cli = argv if argv is not None else sys.argv[1:]
    write_outputs(results, args, out, work, wall, "python benchmarks/balance.py" + "".join(f" {a!r}" if " " in a or "[" in a
                                                                                          else f" {a}" for a in cli))
    return 0


def run_parallel(args: argparse.Namespace, argv: list[str] | None, t_start: float) -> int:
    """``--jobs N``: the methods split round-robin over N child processes (each all seeds, its own local
    Ray session and DeepSpeed engine, one torch thread), their runs merged, then the usual outputs."""
    import subprocess

    work, out = Path(args.work), Path(args.out)
    if args.split == "seeds":  # every child: all methods of its seeds (complete pairs per seed early)
        groups = [(args.methods, args.seeds[i::args.jobs]) for i in range(args.jobs)]
    else:
        groups = [(args.methods[i::args.jobs], args.seeds) for i in range(args.jobs)]
    procs = []
    for i, (methods, seeds) in enumerate(g for g in groups if g[0] and g[1]):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--seeds", *map(str, seeds), "--methods", *methods,
               "--steps", str(args.steps), "--batch", str(args.batch), "--eval-every", str(args.eval_every),
               "--prompts", str(args.prompts), "--gen-batch", str(args.gen_batch), "--new-tokens", str(args.new_tokens),
               "--work", str(work), "--part", str(work / f"part-{i}.json")]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--set", *args.set] if args.set else []
        cmd += ["--no-base"] if (args.no_base or (i > 0 and args.split == "methods")) else []
        log = (work / f"part-{i}.log").open("w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), work / f"part-{i}.json", log))
        print(f"[bench] job {i}: {methods} -> {work / f'part-{i}.log'}", flush=True)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    prints = []
    for proc, part, log in procs:
        rc = proc.wait()
        log.close()
        if rc != 0 or not part.exists():
            print(f"[bench] a job failed (rc {rc}); see {part.with_suffix('.log')}", file=sys.stderr, flush=True)
            continue
        saved = json.loads(part.read_text())
        prints.append(saved["fingerprint"])
        for m, by_seed in saved["runs"].items():
            results.setdefault(m, {}).update({int(k): v for k, v in by_seed.items()})
    order = ([] if args.no_base else [BASE]) + args.methods
    results = {m: results[m] for m in order if m in results}
    args.model_fingerprint = prints[0] if len(set(prints)) == 1 else f"MIXED {sorted(set(prints))}"
    cli = argv if argv is not None else sys.argv[1:]
    write_outputs(results, args, out, work, time.perf_counter() - t_start,
                  "python benchmarks/balance.py" + "".join(f" {a!r}" if " " in a or "[" in a else f" {a}" for a in cli))
    return 0


def _binned(steps: list[int], values: list[dict[str, float | None]], hard: set[str], bins: int = 10) -> dict[str, list]:
    """Mean of the hard / easy categories' values over ``bins`` equal step windows (None entries skipped)."""
    if not steps:
        return {"step": [], "hard": [], "easy": []}
    top = max(steps)
    acc: dict[str, list[list[float]]] = {"hard": [[] for _ in range(bins)], "easy": [[] for _ in range(bins)]}
    for st, row in zip(steps, values):
        b = min(bins - 1, (st - 1) * bins // max(top, 1))
        for c, v in row.items():
            if v is not None:
                acc["hard" if c in hard else "easy"][b].append(float(v))
    return {"step": [round((b + 1) * top / bins) for b in range(bins)],
            **{h: [statistics.fmean(x) if x else None for x in acc[h]] for h in ("hard", "easy")}}


def dual_trace(run_dir: Path) -> dict[str, Any]:
    """What the dual variables did in one run: final lambda per category, and lambda / the violation rate fed
    to the dual update (``metrics.jsonl``: sigma(-beta Delta) for ``soft``, the judged rate for ``generation``)
    / the on-policy unsafe rate (``onpolicy.jsonl``) of the hard vs easy categories over 10 step windows."""
    from catdpo_ray.data.synth import CATEGORY_SPECS
    from catdpo_ray.eval.plots import read_lambdas

    hard = {s.name for s in CATEGORY_SPECS if s.hard}
    out: dict[str, Any] = {}
    try:
        if (run_dir / "lambdas.csv").exists():
            steps, series = read_lambdas(run_dir / "lambdas.csv")
            out["final_lambda"] = {c: v[-1] for c, v in series.items() if v}
            rows = [{c: series[c][i] for c in series} for i in range(len(steps))]
            out["lambda"] = _binned(steps, rows, hard)
        if (run_dir / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            rows = [r for r in rows if isinstance(r.get("violation_rate"), dict) and "step" in r]
            out["offline_violation"] = _binned([r["step"] for r in rows], [r["violation_rate"] for r in rows], hard)
        if (run_dir / "onpolicy.jsonl").exists():
            rows = [json.loads(line) for line in (run_dir / "onpolicy.jsonl").read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r.get("kind") == "rate" and r.get("unsafe_rate")]
            out["onpolicy_unsafe"] = _binned([r["step"] for r in rows], [r["unsafe_rate"] for r in rows], hard)
            out["onpolicy_rounds"] = len(rows)
    except Exception as exc:  # noqa: BLE001 - diagnostics must not lose a finished run
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _fmt_ci(ci: Any, digits: int = 1) -> str:
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def stats_tables(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Per method: mean [95 % bootstrap CI] over seeds, and the paired difference against SafeDPO."""
    from catdpo_ray.eval.stats import bootstrap_mean_ci, paired_diff_ci, verdict

    def value(r: dict[str, Any], block: str, key: str) -> float | None:
        v = r.get(block, {}).get(key)
        return None if v is None else float(v)

    lines = ["### Statistics: safe & fluent metrics, mean [95 % bootstrap CI over seeds]", "",
             "| method | seeds | " + " | ".join(f"{lab} {'↑' if up else '↓'}" for _, _, lab, up in STAT_METRICS) + " |",
             "|---|---:|" + "---:|" * len(STAT_METRICS)]
    for m, by_seed in results.items():
        ok = {s: r for s, r in by_seed.items() if "error" not in r and "fluent" in r}
        if not ok:
            continue
        cells = []
        for block, key, _, _ in STAT_METRICS:
            xs = [value(r, block, key) for r in ok.values()]
            xs = [x for x in xs if x is not None]
            cells.append(_fmt_ci(bootstrap_mean_ci(xs), 2 if key == "variance" else 1) if xs else "n/a")
        lines.append(f"| {m} | {len(ok)} | " + " | ".join(cells) + " |")
    lines += ["", "Macro, Worst-3, Gap, Variance, fluent helpfulness: the safe-*and-fluent* block; over-refusal and "
              "helpfulness: the plain generation block (rule judge).", ""]
    ref = {s: r for s, r in results.get(REFERENCE, {}).items() if "error" not in r and "fluent" in r}
    if ref:
        lines += [f"### Paired differences against {REFERENCE} (same seeds): Δ mean [95 % CI] → verdict", "",
                  "| method | seeds | " + " | ".join(f"Δ {lab}" for _, _, lab, _ in STAT_METRICS) + " |",
                  "|---|---:|" + "---:|" * len(STAT_METRICS)]
        for m, by_seed in results.items():
            if m in (REFERENCE, BASE):
                continue
            common = sorted(s for s, r in by_seed.items() if s in ref and "error" not in r and "fluent" in r)
            if not common:
                continue
            cells = []
            for block, key, _, up in STAT_METRICS:
                pairs = [(value(by_seed[s], block, key), value(ref[s], block, key)) for s in common]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if not pairs:
                    cells.append("n/a")
                    continue
                ci = paired_diff_ci([a for a, _ in pairs], [b for _, b in pairs])
                cells.append(f"{_fmt_ci(ci, 2 if key == 'variance' else 1)} **{verdict(ci, higher_is_better=up)}**")
            lines.append(f"| {m} | {len(common)} | " + " | ".join(cells) + " |")
        lines += ["", "A difference whose CI includes 0 is \"no difference\". \"better\" / \"worse\" take each "
                  "metric's direction into account (Gap, Variance, over-refusal: lower is better).", ""]
    return "\n".join(lines)


def lambda_tables(results: dict[str, dict[int, dict[str, Any]]], work: Path | None = None) -> str:
    """Cat-DPO runs: does lambda rank the corpus's hard categories above the easy ones (AUC per seed)?"""
    from catdpo_ray.data.synth import CATEGORY_SPECS
    from catdpo_ray.eval.stats import auc, bootstrap_mean_ci

    hard = {s.name for s in CATEGORY_SPECS if s.hard}
    lines = ["### Lambda diagnostics: hard vs easy categories (final λ; AUC = P(λ_hard > λ_easy), ties 1/2)", "",
             f"Hard categories ({len(hard)} of {len(CATEGORY_SPECS)}, `CategorySpec.hard` in catdpo_ray/data/synth.py): "
             + ", ".join(sorted(hard)) + ".", "",
             "| method | seeds | AUC mean [95 % CI] | AUC per seed | final λ hard, mean | final λ easy, mean | "
             "max final λ | hard categories with final λ ≥ 5 |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    traces = []
    for m, by_seed in results.items():
        if not m.startswith("Cat-DPO"):
            continue
        aucs, lh, le, mx, big = [], [], [], [], []
        for s, r in sorted(by_seed.items()):
            if "dual" not in r and work is not None and (work / run_name(m, s) / "lambdas.csv").exists():
                r["dual"] = dual_trace(work / run_name(m, s))  # a run recorded before the benchmark kept traces
            lam = r.get("dual", {}).get("final_lambda")
            if not lam:
                continue
            h = [v for c, v in lam.items() if c in hard]
            e = [v for c, v in lam.items() if c not in hard]
            aucs.append(auc(h, e))
            lh.append(statistics.fmean(h))
            le.append(statistics.fmean(e))
            mx.append(max(lam.values()))
            big.append(sum(v >= 5 for v in h))
            if s == min(by_seed):
                traces.append((m, s, r["dual"]))
        if aucs:
            lines.append(f"| {m} | {len(aucs)} | {_fmt_ci(bootstrap_mean_ci(aucs), 2)} | "
                         + ", ".join(f"{a:.2f}" for a in aucs)
                         + f" | {statistics.fmean(lh):.2f} | {statistics.fmean(le):.2f} | {max(mx):.2f} | "
                         f"{statistics.fmean(big):.1f} of {len(hard)} |")
    lines.append("")
    for m, s, d in traces:
        lines += [f"**{m}, seed {s}: trajectories** (mean over the hard / easy categories, 10 step windows)", "",
                  "| signal | " + " | ".join(str(x) for x in d.get("lambda", {}).get("step", [])) + " |",
                  "|---|" + "---:|" * len(d.get("lambda", {}).get("step", []))]
        for key, label in (("lambda", "λ"), ("offline_violation", "violation fed to λ (soft: σ(−βΔθ); gen: judged rate)"),
                           ("onpolicy_unsafe", "on-policy unsafe rate")):
            t = d.get(key)
            if not t or not t.get("step"):
                continue
            for h in ("hard", "easy"):
                lines.append(f"| {label}, {h} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in t[h]) + " |")
        lines.append("")
    return "\n".join(lines)


def merge(args: argparse.Namespace, files: list[Path]) -> None:
    """``--merge``: the runs of several part / result files (later files win on the same method and seed)."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    walls, prints, commands = [], set(), []
    for f in files:
        saved = json.loads(f.read_text())
        walls.append(float(saved.get("wall_time_s", 0.0)))
        prints.add(saved.get("fingerprint") or saved.get("args", {}).get("model_fingerprint", "n/a"))
        commands.append(saved.get("command", f"(part file {f})"))
        for m, by_seed in saved["runs"].items():
            results.setdefault(m, {}).update({int(k): v for k, v in by_seed.items()})
    results = {m: r for m, r in results.items() if r}
    args.seeds = sorted({s for r in results.values() for s in r})
    args.methods = [m for m in results if m != BASE]
    args.model_fingerprint = prints.pop() if len(prints) == 1 else f"MIXED {sorted(prints)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, args, out, Path(args.work), max(walls, default=0.0),
                  "merged from " + "; ".join(str(f) for f in files) + " (longest part's wall time)")


def replot(saved_json: Path, out: Path) -> None:
    """Re-render the tables and panels of a finished benchmark from its JSON (no training)."""
    saved = json.loads(saved_json.read_text())
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(**saved["args"])
    runs = {m: {int(s): r for s, r in by_seed.items()} for m, by_seed in saved["runs"].items()}
    write_outputs(runs, args, out, Path(args.work), saved["wall_time_s"], saved["command"])


def diagnostics(results: dict[str, dict[int, dict[str, Any]]], work: Path, seeds: list[int]) -> str:
    """Hard vs easy categories of the corpus (``CategorySpec.hard``): safe ratio per method and, for
    Cat-DPO runs, the final lambda (from the run directories, when they still exist)."""
    from catdpo_ray.data.synth import CATEGORY_SPECS
    from catdpo_ray.eval.plots import read_lambdas

    hard = {s.name for s in CATEGORY_SPECS if s.hard}
    lines = ["### Diagnostics: hard vs easy categories of the bundled corpus", "",
             "| method | safe ratio, hard / easy (%) | safe & fluent, hard / easy (%) | final λ, hard | final λ, easy | "
             "top-λ categories (seed 0) |", "|---|---:|---:|---:|---:|---|"]

    def hard_easy(block: str, by_seed: dict[int, dict[str, Any]]) -> str:
        runs = [r[block]["per_category"] for r in by_seed.values() if block in r]
        if not runs:
            return "–"
        mean = {h: statistics.fmean(v for pc in runs for c, v in pc.items() if (c in hard) == h and v is not None)
                for h in (True, False)}
        return f"{mean[True]:.1f} / {mean[False]:.1f}"

    for m, by_seed in results.items():
        if not any("gen" in r for r in by_seed.values()):
            continue
        lam: dict[bool, list[float]] = {True: [], False: []}
        top = ""
        for s in seeds:
            path = work / run_name(m, s) / "lambdas.csv"
            if m.startswith("Cat-DPO") and path.exists():
                _, series = read_lambdas(path)
                final = {c: v[-1] for c, v in series.items() if v}
                for c, v in final.items():
                    lam[c in hard].append(v)
                if s == seeds[0]:
                    top = ", ".join(f"{c}{' (hard)' if c in hard else ''} {final[c]:.1f}"
                                    for c in sorted(final, key=lambda c: -final[c])[:4])
        lam_cells = [f"{statistics.fmean(lam[h]):.2f}" if lam[h] else "–" for h in (True, False)]
        lines.append(f"| {m} | {hard_easy('gen', by_seed)} | {hard_easy('fluent', by_seed)} | {lam_cells[0]} | "
                     f"{lam_cells[1]} | {top or '–'} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, dict[int, dict[str, Any]]], args: argparse.Namespace, out: Path, work: Path,
                  wall: float, command: str) -> None:
    """``<tag>.md`` (the tables), ``<tag>.json`` (every number), balance panels, per-category bars, lambda plot."""
    from catdpo_ray.eval.panels import plot_balance_panel, plot_category_bars, plot_lambda_grid

    agg = aggregate(results)
    md = [f"## Per-category balance benchmark ({args.tag})", "",
          f"Command: `{command}`  ", f"Wall time: {wall / 60:.1f} min on this machine (2 CPU cores, shared); "
          f"seeds {args.seeds}; {args.steps} steps x {args.batch} pairs per method; bundled corpus; tiny model "
          f"`{getattr(args, 'model_fingerprint', 'n/a')}` (SHA-256 of its weights).", "",
          stats_tables(results), lambda_tables(results, work), tables(agg), diagnostics(results, work, list(args.seeds))]
    (out / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps({"command": command, "wall_time_s": wall, "args": vars(args),
                                                      "aggregate": agg, "runs": results}, indent=2, default=str))
    for block, title in (("gen", "generation, rule judge"), ("fluent", "generation, safe & fluent (rule judge)"),
                         ("pref", "preference accuracy, policy likelihood")):
        metrics = {m: {k: a[block][k][0] for k in KEYS} for m, a in agg.items() if block in a}
        errors = {m: {k: a[block][k][1] for k in KEYS} for m, a in agg.items() if block in a}
        plot_balance_panel(metrics, out / f"{args.tag}_panel_{block}.png", errors=errors,
                           title=f"{title}: mean ± std over seeds {args.seeds}")
        per_cat = {}
        for m, by_seed in results.items():
            ok = [r for r in by_seed.values() if block in r]
            if ok:
                cats = ok[0][block]["per_category"]
                per_cat[m] = {c: mean_std([r[block]["per_category"].get(c) for r in ok])[0] for c in cats}
        plot_category_bars(per_cat, out / f"{args.tag}_bars_{block}.png", title=f"{title}: per category, mean over seeds")
    lam = {f"{m} s{s}": work / run_name(m, s) / "lambdas.csv" for m in results if m.startswith("Cat-DPO")
           for s in args.seeds[:1]}
    lam = {k: v for k, v in lam.items() if v.exists()}
    if lam:
        plot_lambda_grid(lam, out / f"{args.tag}_lambdas.png")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
