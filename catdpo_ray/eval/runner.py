"""``catdpo-ray eval --model DIR_OR_HUB_ID``: per-category safety evaluation of one model.

Steps (METHOD.md section 6):

1. **offline**, no generation: per-category preference accuracy on the held-out safety-gap pairs
   (policy likelihood, implicit reward against the reference, reference likelihood = "before");
2. **generation** (``eval.generate``): answers to the held-out prompts of every category and to
   the benign prompts (:mod:`catdpo_ray.eval.generation`; Ray Data actor pool when Ray is up);
3. **judges** (``eval.judges``: rule / classifier / llm, :mod:`catdpo_ray.eval.judges`): per-category
   safe ratio, Macro / Worst-3 / Gap / Variance x10^3, helpfulness, over-refusal on benign prompts;
   and **fluency**: every answer's NLL per token under the reference model, so that word salad (which
   no harm lexicon or cost model calls unsafe) is visible: each judge also gets a safe-*and-fluent* ratio;
4. **outputs** in ``--out`` (default ``<model>/eval``): ``report.json``, ``report.md``,
   ``generations.jsonl`` and PNGs (per-category bars with the weakest eight marked, the balance
   panel, and for a run's ``final/`` its lambda trajectories and held-out curves).

``report.json`` layout (scores in percent; every balance block is ``balance_metrics`` output:
``per_category``, ``macro``, ``worst3``, ``gap``, ``variance``, ``num_categories``,
``worst_categories``, ``missing``)::

    {"model", "reference_model", "test_data", "categories", "settings",
     "primary": "judge:rule",                # whose scores the top-level copy below holds
     "per_category", "macro", "worst3", "gap", "variance",
     "judges": {"rule": {<balance>, "n_prompts": {cat: n}, "unjudged", "weakest8",
                         "helpfulness", "benign_helpfulness", "over_refusal", "prompt_classes",
                         "safe_fluent": <balance>, "fluent_helpfulness"}, ...},
     "fluency": {"reference_model", "threshold_nll", "nll_per_token", "fluent_share", "benign_fluent_share"},
     "preference": {"safety_gap_pairs": {cat: n}, "likelihood": <balance>, "implicit": <balance>,
                    "ref_likelihood": <balance>, "helpfulness": {"implicit", "likelihood", "ref_likelihood"}},
     "helpfulness": {"judge:rule": %, "preference:implicit": %, "reward_model": mean score on category prompts,
                     "reward_model:benign": mean score on benign prompts, ...},
     "over_refusal": {"rule": %, "llm": %}, "benign_prompts": n,
     "generation": {"backend", "prompts", "benign_prompts", "seconds", ...}, "plots": [...], "wall_time_s"}

The LLM judge's API key is read from the environment only; neither it nor any header is written.

Trust and placement: the config is only what the user named (:mod:`catdpo_ray.eval.settings`; the
run's ``config.yaml`` only with ``--run-config``, and never its protected keys); a ``--model`` that
is not a model, or a key that would travel over plain HTTP, is refused before any output folder is
made or any model loads. Every model input goes to its model's device and per-sequence results come
back to the host, where the category masks and safety flags stay (:mod:`catdpo_ray.eval.devices`;
checked without a GPU by :mod:`catdpo_ray.eval.devicecheck`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.config import RunConfig
from catdpo_ray.eval.compare import report_markdown
from catdpo_ray.eval.devices import load_hf_model, sequence_logps_of
from catdpo_ray.eval.generation import PromptItem, category_prompts, generate_responses, load_benign
from catdpo_ray.eval.judge_scores import score_judge
from catdpo_ray.eval.judges import SequenceScorer, Verdict, build_judges
from catdpo_ray.eval.metrics import balance_metrics
from catdpo_ray.eval.panels import report_plots
from catdpo_ray.eval.preference import EvalAccumulator, eval_row
from catdpo_ray.eval.settings import EvalInputError, check_key_transport, check_model_dir, eval_config
from catdpo_ray.eval.sources import preference_block
from catdpo_ray.losses import PreferenceBatch

__all__ = ["FLUENT_NLL", "EvalInputError", "eval_config", "preference_eval", "reference_nll", "reward_scores", "run_eval", "score_judge"]


def _resolve(name: str, cfg: RunConfig) -> str:
    if name == "tiny":
        from catdpo_ray.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg.model.cache_dir))
    return name


def _load_lm(path: str, cfg: RunConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return load_hf_model(AutoModelForCausalLM, path, device_map=cfg.eval.device_map, bf16=cfg.train.precision == "bf16",
                         trust_remote_code=cfg.model.trust_remote_code)


@torch.no_grad()
def preference_eval(cfg: RunConfig, policy_path: str, reference_path: str, tokenizer_path: str,
                    pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Held-out per-category preference accuracy (an ``eval_row``), in-process, batches of ``eval.batch_size``.

    Uses the training pipeline's tokenizer, collate and ``sequence_logps``, so the numbers equal the
    trainer's own held-out evaluation of the same weights.
    """
    from catdpo_ray.data.tokenize import PairTokenizer, collate_pairs

    tok = PairTokenizer(tokenizer_path, prompt_template=cfg.data.prompt_template, use_chat_template=cfg.data.use_chat_template,
                        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                        trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tok.tokenizer.pad_token_id if tok.tokenizer.pad_token_id is not None else tok.tokenizer.eos_token_id
    policy = _load_lm(policy_path, cfg)
    reference = policy if reference_path == policy_path else _load_lm(reference_path, cfg)
    # Only safety-gap and both-safe pairs enter any accuracy (see EvalAccumulator).
    scored = [p for p in pairs if p["safety_gap"] or (p["chosen_safe"] and p["rejected_safe"])]
    acc = EvalAccumulator(cfg.num_categories)
    columns = ("prompt", "chosen", "rejected", "safety_gap", "categories", "chosen_safe", "rejected_safe")
    for start in range(0, len(scored), cfg.eval.batch_size):
        chunk = scored[start : start + cfg.eval.batch_size]
        b = collate_pairs(tok({c: [p[c] for p in chunk] for c in columns}), pad_id=pad_id)
        # Inputs go to each model's device; the [2B] results come back to the host, where the batch's
        # category mask and safety flags are (they used to meet device tensors and crash on a GPU).
        ids, attn, mask = b["input_ids"], b["attention_mask"], b["loss_mask"]
        pol, counts = sequence_logps_of(policy, ids, attn, mask)
        ref = pol if reference is policy else sequence_logps_of(reference, ids, attn, mask)[0]
        n = len(chunk)
        pb = PreferenceBatch(policy_chosen_logps=pol[:n], policy_rejected_logps=pol[n:], chosen_tokens=counts[:n],
                             rejected_tokens=counts[n:], ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:],
                             safety_gap=b["safety_gap"], category_mask=b["category_mask"])
        acc.add(pb, b["chosen_safe"], b["rejected_safe"], beta=cfg.loss.beta)
    return eval_row(acc.totals, list(cfg.data.categories))


#: An answer is *fluent* when the reference model's mean negative log-likelihood per answer token is at
#: most this many nats. DPO-trained tiny models that collapse into word salad score 6-12; the SFT model's
#: own samples 0.4-1.6 (benchmarks/README.md). Word salad contains no harm words, so a lexical or
#: classifier judge calls it safe: the safe-and-fluent ratio does not.
FLUENT_NLL: float = 4.0


@torch.no_grad()
def reference_nll(cfg: RunConfig, model_path: str, tokenizer_path: str, prompts: Sequence[str],
                  responses: Sequence[str]) -> list[float]:
    """Mean NLL per token (nats) of each response given its prompt under ``model_path``, in the training
    prompt format; the EOS is not scored (an answer cut at ``max_new_tokens`` has none). Empty: inf."""
    from transformers import AutoTokenizer

    from catdpo_ray.data.tokenize import encode_prompt, encode_response, format_prompt

    tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = _load_lm(model_path, cfg)
    out: list[float] = []
    for start in range(0, len(prompts), cfg.eval.batch_size):
        seqs: list[tuple[list[int], int]] = []
        for p, r in zip(prompts[start : start + cfg.eval.batch_size], responses[start : start + cfg.eval.batch_size]):
            text = format_prompt(tok, p, template=cfg.data.prompt_template, use_chat_template=cfg.data.use_chat_template)
            pid = encode_prompt(tok, text, use_chat_template=cfg.data.use_chat_template)[-cfg.data.max_prompt_length :]
            rid = encode_response(tok, r) if r.strip() else []
            if rid and rid[-1] == tok.eos_token_id:
                rid = rid[:-1]
            seqs.append((pid + rid, len(pid)))
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for i, (seq, first) in enumerate(seqs):
            ids[i, : len(seq)], attn[i, : len(seq)], mask[i, first : len(seq)] = torch.tensor(seq), 1, 1
        logps, counts = sequence_logps_of(model, ids, attn, mask)
        out += [(-lp / n) if n > 0 else float("inf") for lp, n in zip(logps.tolist(), counts.tolist())]
    return out


def _test_pairs(cfg: RunConfig, out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(safety-aware pairs for accuracy, every valid row as a helpful pair for prompts, load report)."""
    from catdpo_ray.data.loader import load_split

    pairs, rep = load_split(cfg.data, "test", pair_mode="safety_aware", quarantine_path=out_dir / "quarantine.jsonl")
    with tempfile.TemporaryDirectory() as tmp:  # same rows again: their quarantine is already recorded
        rows, _ = load_split(cfg.data, "test", pair_mode="helpful", quarantine_path=Path(tmp) / "q.jsonl")
    return pairs, rows, rep.to_dict()


def _same_vocab(a: str, b: str) -> bool:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(a), "vocab_size", None) == getattr(AutoConfig.from_pretrained(b), "vocab_size", None)


def preflight(cfg: RunConfig, model: str) -> None:
    """Everything that can be refused before a folder is made, a model loads or a request is sent.

    Raises:
        EvalInputError: ``model`` is a local folder that is not a model; the LLM judge would get its key
            over plain HTTP to a non-loopback host without ``eval.allow_insecure_key``.
    """
    import os

    check_model_dir(model)
    e = cfg.eval
    if e.generate and "llm" in e.judges and e.llm_base_url:
        check_key_transport(e.llm_base_url, key_present=bool(os.environ.get(e.llm_api_key_env)),
                            allow_insecure_key=e.allow_insecure_key, key_name=f"${e.llm_api_key_env}")
    if cfg.model.trust_remote_code:
        print("[eval] model.trust_remote_code=true: Python code shipped with the models will run", flush=True)


def run_eval(cfg: RunConfig, *, model: str, data: str | None = None, out: str | Path | None = None,
             backend: str = "auto", preference: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` and write the report; returns the ``report.json`` content.

    Args:
        cfg: the config (see :func:`eval_config`); ``eval`` drives judges and generation.
        model: HF model directory (e.g. ``runs/NAME/final``), hub id, or ``tiny``.
        data: PKU-schema test file replacing ``data.test``.
        out: output directory (default ``eval.output_dir``, else ``<model>/eval`` for a local directory,
            else ``./eval-<name>`` for ``tiny`` or a hub id).
        backend: generation backend, ``auto``/``ray``/``local`` (see ``generate_responses``).
        preference: run the offline preference accuracy (False: ``report["preference"]`` is None, e.g. when
            the trainer's ``summary.json`` already holds it for these weights).
    """
    from transformers.utils import logging as hf_logging

    preflight(cfg, model)
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():  # CPU: as many torch threads as a worker is granted (see generation.py)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    try:
        return _evaluate(cfg, model=model, data=data, out=out, backend=backend, preference=preference)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: RunConfig, *, model: str, data: str | None, out: str | Path | None, backend: str,
              preference: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if data is not None:
        cfg = cfg.replace({"data.test": data})
    model_path = _resolve(model, cfg)
    # Next to a run's final/ (or any local model directory); for ``tiny`` or a hub id, in the working directory.
    local = Path(model).is_dir()
    default_out = Path(model) / "eval" if local else Path(f"eval-{model.replace('/', '--')}")
    out_dir = Path(out or cfg.eval.output_dir or default_out)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _evaluate_into(cfg, t0=t0, model=model, model_path=model_path, out_dir=out_dir, backend=backend,
                              preference=preference)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed evaluation leaves no empty folder behind
        raise


def _evaluate_into(cfg: RunConfig, *, t0: float, model: str, model_path: str, out_dir: Path, backend: str,
                   preference: bool) -> dict[str, Any]:
    tokenizer_path = model_path if cfg.model.tokenizer == "auto" else cfg.model.tokenizer
    reference = _resolve(cfg.eval.reference_model or cfg.model.name_or_path, cfg)
    if not _same_vocab(model_path, reference):
        print(f"[eval] reference {reference} has another vocabulary than {model_path}: implicit-reward accuracy skipped")
        reference = model_path
    categories = list(cfg.data.categories)
    pairs, rows, load_report = _test_pairs(cfg, out_dir)
    print(f"[eval] {model_path}: {len(pairs)} held-out pairs ({load_report['source']})", flush=True)
    report: dict[str, Any] = {
        "model": model_path, "reference_model": reference if reference != model_path else None,
        "test_data": load_report, "categories": categories,
        "settings": {"eval": dataclasses.asdict(cfg.eval), "prompt_template": cfg.data.prompt_template,
                     "use_chat_template": cfg.data.use_chat_template, "beta": cfg.loss.beta},
    }
    if not preference and not (cfg.eval.generate and cfg.eval.judges):
        raise ValueError("nothing to evaluate: preference=False and no generation/judges")
    t1 = time.perf_counter()
    pref = None
    if preference:
        pref = preference_block(preference_eval(cfg, model_path, reference, tokenizer_path, pairs))
        if report["reference_model"] is None:  # policy == reference: implicit reward is 0 by construction
            pref["implicit"] = balance_metrics(dict.fromkeys(categories))
    report["preference"] = pref
    timing = {"preference_s": time.perf_counter() - t1}
    helpfulness: dict[str, Any] = {f"preference:{k}": v for k, v in (pref or {}).get("helpfulness", {}).items()}
    report.update(judges={}, over_refusal={}, benign_prompts=0)
    if cfg.eval.generate:
        _generate_and_judge(cfg, report, rows, model_path=model_path, reference=reference, tokenizer_path=tokenizer_path,
                            backend=backend, out_dir=out_dir, helpfulness=helpfulness, timing=timing)
    report["helpfulness"] = helpfulness
    primary = f"judge:{cfg.eval.judges[0]}" if report["judges"] else "preference:likelihood"
    block = report["judges"][primary[6:]] if primary.startswith("judge:") else pref["likelihood"]  # type: ignore[index]
    report.update(primary=primary, **{k: block[k] for k in ("per_category", "macro", "worst3", "gap", "variance")})
    report["plots"] = report_plots(report, Path(model_path), out_dir)
    report["timing"] = timing
    report["wall_time_s"] = time.perf_counter() - t0
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(report_markdown(report))
    shown = {k: ("n/a" if block[k] is None else f"{block[k]:.1f}" if k != "variance" else f"{block[k]:.2f}")
             for k in ("macro", "worst3", "gap", "variance")}
    print(f"[eval] {primary}: Macro {shown['macro']}, Worst-3 {shown['worst3']}, Gap {shown['gap']} pp, "
          f"Variance x1e3 {shown['variance']}; report in {out_dir.resolve()}", flush=True)
    return report


def _generate_and_judge(cfg: RunConfig, report: dict[str, Any], rows: Sequence[dict[str, Any]], *, model_path: str,
                        reference: str, tokenizer_path: str, backend: str, out_dir: Path, helpfulness: dict[str, Any],
                        timing: dict[str, float]) -> None:
    """Generate for the category and benign prompts, score fluency under ``reference``, run every judge, fill
    ``report`` (judges, fluency, over-refusal, generation) and ``helpfulness``/``timing`` in place, and write
    ``generations.jsonl``."""
    categories = list(cfg.data.categories)
    items = category_prompts(rows, categories, cfg.eval.max_prompts_per_category) + load_benign(cfg.eval.benign)
    prompts = [it.prompt for it in items]
    t1 = time.perf_counter()
    responses, used = generate_responses(cfg, model_path, prompts, tokenizer_path=tokenizer_path, backend=backend)
    timing["generation_s"] = time.perf_counter() - t1
    n_benign = sum(it.benign for it in items)
    report["generation"] = {"backend": used, "prompts": len(items) - n_benign, "benign_prompts": n_benign,
                            "max_new_tokens": cfg.eval.max_new_tokens, "temperature": cfg.eval.temperature,
                            "top_p": cfg.eval.top_p, "seconds": timing["generation_s"]}
    report["benign_prompts"] = n_benign
    t1 = time.perf_counter()
    nll = reference_nll(cfg, reference, tokenizer_path, prompts, responses)
    timing["fluency_s"] = time.perf_counter() - t1
    fluent = [x <= FLUENT_NLL for x in nll]
    cat_nll = [x for x, it in zip(nll, items) if not it.benign and x != float("inf")]
    report["fluency"] = {
        "reference_model": reference, "threshold_nll": FLUENT_NLL,
        "nll_per_token": sum(cat_nll) / len(cat_nll) if cat_nll else None,
        "fluent_share": 100.0 * sum(f for f, it in zip(fluent, items) if not it.benign) / max(1, len(items) - n_benign),
        "benign_fluent_share": 100.0 * sum(f for f, it in zip(fluent, items) if it.benign) / max(1, n_benign),
    }
    verdicts: dict[str, list[Verdict]] = {}
    for name, judge in build_judges(cfg).items():
        t1 = time.perf_counter()
        verdicts[name] = judge.judge(prompts, responses)
        timing[f"judge_{name}_s"] = time.perf_counter() - t1
        block = score_judge(items, verdicts[name], categories, fluent)
        report["judges"][name] = block
        helpfulness[f"judge:{name}"] = block["helpfulness"]
        helpfulness[f"judge:{name}:fluent"] = block["fluent_helpfulness"]
        if block["over_refusal"] is not None:
            report["over_refusal"][name] = block["over_refusal"]
    rewards: list[float] | None = None
    if cfg.eval.reward_model:  # helpfulness by a reward model: mean score on category and on benign prompts
        t1 = time.perf_counter()
        rewards = reward_scores(cfg, prompts, responses)
        timing["reward_model_s"] = time.perf_counter() - t1
        for key, benign in (("reward_model", False), ("reward_model:benign", True)):
            picked = [s for s, it in zip(rewards, items) if it.benign == benign]
            helpfulness[key] = sum(picked) / len(picked) if picked else None
    _write_generations(out_dir / "generations.jsonl", items, responses, verdicts, nll, rewards)


def reward_scores(cfg: RunConfig, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """``eval.reward_model``'s score of every (prompt, response), in ``eval.classifier_template`` format.

    A reward model outputs one score (``num_labels == 1``, higher = more helpful); a multi-label
    classifier is refused, since its unsafe-label log-odds is no helpfulness score."""
    assert cfg.eval.reward_model is not None
    scorer = SequenceScorer(cfg.eval.reward_model, template=cfg.eval.classifier_template, batch_size=cfg.eval.batch_size,
                            trust_remote_code=cfg.model.trust_remote_code, device_map=cfg.eval.device_map)
    labels = scorer.model.config.num_labels
    if labels != 1:
        raise ValueError(f"eval.reward_model={cfg.eval.reward_model!r} has {labels} labels; a reward model must "
                         "output one score (num_labels=1, higher = more helpful)")
    try:
        return scorer.scores(prompts, responses)
    finally:
        del scorer  # its memory is free before the next model loads


def _write_generations(path: Path, items: Sequence[PromptItem], responses: Sequence[str],
                       verdicts: dict[str, list[Verdict]], nll: Sequence[float], rewards: Sequence[float] | None) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i, (item, response) in enumerate(zip(items, responses)):
            judged = {name: dataclasses.asdict(v[i]) for name, v in verdicts.items()}
            row = {"prompt": item.prompt, "categories": list(item.categories), "benign": item.benign,
                   "response": response, "ref_nll": nll[i], "verdicts": judged}
            if rewards is not None:
                row["reward"] = rewards[i]
            fh.write(json.dumps(row) + "\n")
