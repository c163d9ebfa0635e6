"""On-policy violation estimate: the policy answers category prompts, a judge marks them (issue 12).

``dual.violation=generation`` reads the constraint of METHOD.md section 4 literally: category k is
violated while the policy *still produces unsafe responses* to category-k prompts. Every
``dual.generation_every`` optimizer steps each rank samples answers for its share of a seeded draw
of training prompts, the configured judge (the same judges as ``catdpo-ray eval``) marks them, and
the per-category counts

    n_gen_k = judged answers to category-k prompts,   v_gen_k = those judged unsafe

are summed across ranks by the step's one SUM all-reduce, exactly like the offline ``(n, v)``.
:class:`DualSignal` turns the global sums into the ``(n, v)`` fed to the unchanged projected
ascent (``generation``, or ``blend`` with the offline signal; formulas on the class).

Determinism. The draw depends only on ``(train.seed, step)`` and the answer to global prompt ``i``
only on ``(train.seed, step, i)``: sampling is the Gumbel-max trick (argmax of logits / T plus
Gumbel noise is an exact draw from softmax(logits / T)) with one ``torch.Generator`` per prompt, and
every prompt is left-padded to the width of the longest prompt of the whole round. So a resumed run
draws the same answers, and the answers (hence the counts) do not depend on the number of workers.

Collectives. Prompt ``i`` goes to rank ``i % world``; every rank runs the same number of ``generate``
calls (a rank out of prompts answers a discarded dummy), and under ZeRO-3 with more than one rank
``generate(synced_gpus=True)`` keeps every rank stepping the forward pass (which all-gathers the
partitioned parameters) until the last rank's batch is done.

Heavy imports (transformers, the judges) happen inside functions: the controller imports
:class:`DualSignal` without them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Modes of ``dual.violation`` that need generation rounds.
ONPOLICY_MODES = ("generation", "blend")


def offline_signal(violation: str, blend_offline: str) -> str:
    """The offline signal the worker computes per micro-batch: ``violation`` itself, or
    ``blend_offline`` in the on-policy modes (logged beside, and blended in ``blend``)."""
    return blend_offline if violation in ONPOLICY_MODES else violation


def is_generation_step(violation: str, generation_every: int, step: int) -> bool:
    """True after optimizer step ``step`` (1-based) when a generation round runs (same on every rank)."""
    return violation in ONPOLICY_MODES and step % generation_every == 0


def prompt_table(pairs: Sequence[Mapping[str, Any]], categories: Sequence[str], max_per_category: int) -> dict[str, Any]:
    """The pool of training prompts the rounds draw from; built once by the driver, sent in the plan.

    Unique prompts with the union of their rows' categories, at most ``max_per_category`` per
    category in the order of ``pairs`` (the driver's seeded shuffle), via
    :func:`catdpo_ray.eval.generation.category_prompts` (the eval's rule, on the training split).

    Args:
        pairs: training pair records with ``prompt`` (str) and ``categories`` (K-long multi-hot).
        categories: the run's category names (multi-hot order).
        max_per_category: pool cap per category (>= 1).

    Returns:
        ``{"categories": [K names], "prompts": [P str], "multi_hot": [P x K 0/1]}`` (JSON/pickle-able).

    Raises:
        ValueError: naming the pair index (and ``pair_id``) of a row without ``prompt`` or with a
            ``categories`` field of the wrong length.
    """
    from catdpo_ray.eval.generation import category_prompts

    if max_per_category < 1:
        raise ValueError(f"max_per_category: must be >= 1, got {max_per_category}")
    k = len(categories)
    for i, pair in enumerate(pairs):
        where = f"training pair {i} (pair_id={pair.get('pair_id')!r})"
        if not isinstance(pair.get("prompt"), str):
            raise ValueError(f"{where}: field 'prompt' is missing or not a string")
        cats = pair.get("categories")
        if not isinstance(cats, Sequence) or len(cats) != k:
            raise ValueError(f"{where}: field 'categories' must be a multi-hot list of {k} flags, got {cats!r}")
    index = {name: j for j, name in enumerate(categories)}
    table: dict[str, Any] = {"categories": list(categories), "prompts": [], "multi_hot": []}
    for item in category_prompts(pairs, categories, max_per_category):
        hot = [0] * k
        for name in item.categories:
            hot[index[name]] = 1
        table["prompts"].append(item.prompt)
        table["multi_hot"].append(hot)
    return table


def sample_prompts(table: Mapping[str, Any], per_category: int, *, seed: int, step: int) -> list[tuple[int, str]]:
    """This round's prompts: ``per_category`` drawn without replacement from each category's pool.

    Seeded by ``(seed, step, k)`` alone (string seeds: stable across processes and Python hash
    seeds), so every rank and every resume draws the same list. A category with an empty pool is
    skipped (its n_k stays 0, so its lambda is kept); one with fewer prompts gives all it has. A
    multi-label prompt drawn for category k counts for k only.

    Returns:
        ``[(category index, prompt)]``, category by category in table order.
    """
    prompts, hot = table["prompts"], table["multi_hot"]
    out: list[tuple[int, str]] = []
    for k in range(len(table["categories"])):
        pool = [j for j, row in enumerate(hot) if row[k]]
        rng = random.Random(f"catdpo-onpolicy/{seed}/{step}/{k}")
        out += [(k, prompts[j]) for j in rng.sample(pool, min(per_category, len(pool)))]
    return out


def prompt_seed(seed: int, step: int, index: int) -> int:
    """Seed of global prompt ``index``'s sampling in the round after ``step`` (independent of ranks)."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2**63)


class GumbelSampler:
    """Logits processor: ``scores / T + Gumbel(0, 1)`` with one generator per batch row.

    With greedy decoding the argmax is then an exact sample of softmax(scores / T) (Gumbel-max
    trick), and row r's noise comes only from its own generator, so an answer does not depend on
    which other prompts share its batch. ``scores``: ``[B, V]`` float32.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float) -> None:
        self.generators, self.temperature = list(generators), temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))
        return scores / self.temperature + gumbel.to(device=scores.device, dtype=scores.dtype)


@dataclass(frozen=True)
class PromptFormat:
    """How a raw prompt becomes ids: exactly as in training (``data.prompt_template`` or chat template,
    model BOS rule, left truncation to ``data.max_prompt_length``)."""

    template: str = "USER: {prompt} ASSISTANT:"
    use_chat_template: bool = False
    max_prompt_length: int = 64

    def encode(self, tokenizer: Any, prompt: str) -> list[int]:
        from catdpo_ray.data.tokenize import encode_prompt, format_prompt

        text = format_prompt(tokenizer, prompt, template=self.template, use_chat_template=self.use_chat_template)
        return encode_prompt(tokenizer, text, use_chat_template=self.use_chat_template)[-self.max_prompt_length :]


@torch.no_grad()
def generation_violations(model: Any, tokenizer: Any, prompts: Sequence[tuple[int, str]], judge: Any, *,
                          categories: Sequence[str], max_new_tokens: int, temperature: float, seed: int, step: int,
                          device: torch.device, zero3: bool, world: int, rank: int, batch_size: int = 32,
                          prompt_format: PromptFormat = PromptFormat()) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """This rank's on-policy counts for one round (a collective under ZeRO-3 with ``world > 1``).

    Args:
        model: the HF causal LM (``engine.module``; a peft model works too). Put in eval mode for the
            round and returned to its previous mode.
        tokenizer: its tokenizer.
        prompts: the round's global list from :func:`sample_prompts` (identical on every rank).
        judge: anything with ``name`` and ``judge(prompts, responses) -> list[Verdict]``
            (:mod:`catdpo_ray.eval.judges`); ``safe=None`` (unjudged) counts in neither n nor v.
        categories: the K category names (records carry the name).
        max_new_tokens / temperature: sampling (``temperature == 0``: greedy).
        seed / step: the run seed and the optimizer step; with the prompt index they seed each answer.
        device: where the model's inputs go.
        zero3: parameters are ZeRO-3 partitioned (generate then runs with ``synced_gpus``).
        world / rank: data-parallel size and this rank; prompt ``i`` is answered by rank ``i % world``.
        batch_size: prompts per ``generate`` call.
        prompt_format: the training prompt format.

    Returns:
        ``(n, v, records)``: ``[K]`` float64 counts of judged answers and unsafe ones on this rank (CPU;
        integers, so the sum over ranks is exact), and one record per answered prompt:
        ``index, rank, category, prompt, answer, safe, refused, judge, note``.
    """
    k = len(categories)
    n, v = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    records: list[dict[str, Any]] = []
    if not prompts:  # the same on every rank: no generate call anywhere
        return n, v, records
    encoded = [prompt_format.encode(tokenizer, p) for _, p in prompts]
    width = max(len(ids) for ids in encoded)  # global width: a row's layout ignores its batch mates
    mine = list(range(rank, len(prompts), world))
    calls = math.ceil(math.ceil(len(prompts) / world) / batch_size)  # equal on every rank
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    synced = zero3 and world > 1
    was_training = model.training
    model.eval()
    answers: dict[int, str] = {}
    try:
        for c in range(calls):
            rows = mine[c * batch_size : (c + 1) * batch_size]
            batch = rows or [0]  # a rank out of prompts answers prompt 0 and discards it
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                attention[r, width - len(encoded[i]) :] = 1
            kwargs: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if temperature > 0:
                gens = [torch.Generator().manual_seed(prompt_seed(seed, step, i)) for i in batch]
                kwargs["logits_processor"] = [GumbelSampler(gens, temperature)]
            out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id, synced_gpus=synced,
                                 use_cache=True,  # the trainer loads with config.use_cache=False
                                 **kwargs)
            texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
            answers.update({i: t.strip() for i, t in zip(rows, texts)})
    finally:
        model.train(was_training)
    if not mine:
        return n, v, records
    verdicts = judge.judge([prompts[i][1] for i in mine], [answers[i] for i in mine])
    if len(verdicts) != len(mine):
        raise RuntimeError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(mine)} answers")
    for i, verdict in zip(mine, verdicts):
        cat = prompts[i][0]
        if verdict.safe is not None:
            n[cat] += 1.0
            v[cat] += 0.0 if verdict.safe else 1.0
        records.append({"index": i, "rank": rank, "category": categories[cat], "prompt": prompts[i][1],
                        "answer": answers[i], "safe": verdict.safe, "refused": verdict.refused,
                        "judge": judge.name, "note": verdict.note})
    return n, v, records


def build_generation_judge(cfg: Any) -> Any:
    """The judge named by ``dual.generation_judge``, configured from ``eval.*`` like ``catdpo-ray eval``'s."""
    from catdpo_ray.eval.judges import JUDGES

    name = cfg.dual.generation_judge
    if name == "classifier" and not cfg.eval.classifier_model:
        raise ValueError("dual.generation_judge=classifier needs eval.classifier_model")
    if name == "llm" and not cfg.eval.llm_base_url:
        raise ValueError("dual.generation_judge=llm needs eval.llm_base_url")
    return JUDGES[name](cfg)


def _vector(value: Tensor | Sequence[float] | None, k: int, name: str) -> Tensor:
    if value is None:
        return torch.zeros(k, dtype=torch.float64)
    vec = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if vec.numel() != k:
        raise ValueError(f"{name}: expected {k} values (one per category), got {vec.numel()}")
    return vec


class DualSignal:
    """The global per-step sums -> the ``(n, v)`` that :meth:`catdpo_ray.dual.DualState.update` receives.

    Modes (``dual.violation``):

    - ``soft`` / ``hard`` / ``likelihood``: the offline ``(n_off, v_off)`` unchanged;
    - ``generation``: ``(n_gen, v_gen)``; zero on steps without a round, so lambda holds there and
      ``dual.update_every`` keeps counting optimizer steps;
    - ``blend``: ``n_k = n_off_k`` and ``v_k = (1 - w) v_off_k + w g_k n_off_k``, where ``w`` is
      ``dual.blend_weight`` and ``g_k = v_gen_k / n_gen_k`` of the latest round that judged category k
      (held between rounds; ``v_k = v_off_k`` until the first). Over a window the update then sees
      the rate ``sum v / sum n = (1 - w) * offline rate + w * (n_off-weighted mean of g)``: both terms
      are linear in the summed counts, so the offline part stays exactly summable across ranks and
      micro-batches, and the projected ascent is unchanged.

    Computed once, on the global sums (the controller), in float64; the returned ``(n, v)`` are what
    ``metrics.jsonl`` logs, so replaying DualState over the log reproduces lambda bit for bit. The
    held rates ``g`` are part of :meth:`state_dict` (checkpointed with the dual state).

    Worked example (K = 2, w = 0.5): round with n_gen = (4, 0), v_gen = (1, 0) -> g = (0.25, nan);
    offline n_off = (8, 2), v_off = (4, 1) -> n = (8, 2), v = (0.5 * 4 + 0.5 * 0.25 * 8, 1) = (3, 1).
    """

    def __init__(self, num_categories: int, mode: str, blend_weight: float = 0.5) -> None:
        if mode not in ("soft", "hard", "likelihood", *ONPOLICY_MODES):
            raise ValueError(f"dual.violation: unknown mode {mode!r}")
        if not 0.0 <= blend_weight <= 1.0:
            raise ValueError(f"dual.blend_weight: must be in [0, 1], got {blend_weight}")
        self.num_categories, self.mode, self.blend_weight = num_categories, mode, float(blend_weight)
        self._rates = torch.full((num_categories,), math.nan, dtype=torch.float64)

    @property
    def generation_rates(self) -> Tensor:
        """``[K]`` float64 latest judged unsafe rate per category; NaN where never judged."""
        return self._rates.clone()

    def combine(self, offline_counts: Tensor | Sequence[float], offline_violations: Tensor | Sequence[float],
                generation_counts: Tensor | Sequence[float] | None = None,
                generation_violations: Tensor | Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
        """One step's ``(n, v)``, both ``[K]`` float64. Generation arguments: None or zeros = no round."""
        k = self.num_categories
        n_off, v_off = _vector(offline_counts, k, "offline_counts"), _vector(offline_violations, k, "offline_violations")
        n_gen = _vector(generation_counts, k, "generation_counts")
        v_gen = _vector(generation_violations, k, "generation_violations")
        judged = n_gen > 0
        self._rates = torch.where(judged, v_gen / n_gen.clamp(min=1), self._rates)
        if self.mode == "generation":
            return n_gen, v_gen
        if self.mode == "blend":
            w = self.blend_weight
            known = ~torch.isnan(self._rates)
            blended = (1.0 - w) * v_off + w * torch.nan_to_num(self._rates) * n_off
            return n_off, torch.where(known, blended, v_off)
        return n_off, v_off

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the mode, the weight and the held rates (NaN as None)."""
        return {"mode": self.mode, "blend_weight": self.blend_weight,
                "generation_rates": [None if math.isnan(r) else r for r in self._rates.tolist()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the held rates (mode and weight stay the config's)."""
        rates = state.get("generation_rates")
        if rates is None or len(rates) != self.num_categories:
            raise ValueError(f"DualSignal state: 'generation_rates' must hold {self.num_categories} values, got {rates!r}")
        self._rates = torch.tensor([math.nan if r is None else float(r) for r in rates], dtype=torch.float64)


class OnPolicySignal:
    """The worker's handle on the rounds: ``apply`` before the step's all-reduce, ``flush`` on rank 0.

    ``apply`` rewrites this rank's ``[n | v]`` entries of the step statistics in place so that the
    one SUM all-reduce yields the ``(n, v)`` of :class:`DualSignal` (its formulas; every term is
    linear in this rank's counts, so rank sums equal the global formula): ``generation`` puts this
    rank's judged counts there (zeros off-round), ``blend`` keeps n_off and blends v with the held
    global rates g. A round costs two extra collectives on every rank (an all-reduce of the judged
    counts for g and the logged rates, an object all-gather of the records to rank 0).
    The held rates belong in the checkpoint: :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, cfg: Any, plan: Mapping[str, Any], tokenizer: Any, device: torch.device, *,
                 world: int, rank: int) -> None:
        self.cfg, self.tokenizer, self.device, self.world, self.rank = cfg, tokenizer, device, world, rank
        self.table = plan["onpolicy_prompts"]
        self.judge = build_generation_judge(cfg)
        self.signal = DualSignal(len(cfg.data.categories), cfg.dual.violation, cfg.dual.blend_weight)
        self.format = PromptFormat(cfg.data.prompt_template, cfg.data.use_chat_template, cfg.data.max_prompt_length)
        self._records: list[dict[str, Any]] = []
        self._rates: list[float | None] | None = None

    def apply(self, engine: Any, stats: Tensor, k: int, step: int) -> None:
        """Run a round if ``step`` is a generation step; rewrite ``stats[:2k]`` (this rank's n, v)."""
        import torch.distributed as dist

        from catdpo_ray.train import dist as D

        d = self.cfg.dual
        n_gen, v_gen = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        glob = torch.zeros(2 * k, dtype=torch.float64)
        self._rates = None
        if is_generation_step(d.violation, d.generation_every, step):
            prompts = sample_prompts(self.table, d.generation_prompts_per_category, seed=self.cfg.train.seed, step=step)
            n_gen, v_gen, records = generation_violations(
                engine.module, self.tokenizer, prompts, self.judge, categories=list(self.cfg.data.categories),
                max_new_tokens=d.generation_max_new_tokens, temperature=d.generation_temperature,
                seed=self.cfg.train.seed, step=step, device=self.device, zero3=self.cfg.train.zero_stage == 3,
                world=self.world, rank=self.rank, batch_size=d.generation_batch_size, prompt_format=self.format)
            glob = D.all_reduce(torch.cat([n_gen, v_gen]), self.device)
            gathered: list[Any] = [None] * self.world
            if D.is_distributed():
                dist.all_gather_object(gathered, records)
            else:
                gathered = [records]
            self._records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            self._rates = [float(glob[k + j] / glob[j]) if glob[j] > 0 else None for j in range(k)]
        n_off, v_off = stats[:k].clone(), stats[k : 2 * k].clone()
        _, v_blend = self.signal.combine(n_off, v_off, glob[:k], glob[k:])  # also refreshes the held g
        if d.violation == "generation":
            stats[:k], stats[k : 2 * k] = n_gen, v_gen
        else:
            stats[k : 2 * k] = v_blend

    def row_fields(self) -> dict[str, Any]:
        """Fields for the step's metrics row: the round's global unsafe rate per category (None off-round)."""
        cats = list(self.cfg.data.categories)
        return {"onpolicy_round": self._rates is not None,
                "onpolicy_unsafe_rate": None if self._rates is None else dict(zip(cats, self._rates))}

    def flush(self, link: Any, step: int) -> None:
        """Rank 0: send the round's records (all ranks') as one ``kind="onpolicy"`` row; no-op off-round."""
        if self._records:
            link.record({"kind": "onpolicy", "step": step, "records": self._records,
                         "unsafe_rate": dict(zip(self.cfg.data.categories, self._rates or []))})
        self._records = []

    def state_dict(self) -> dict[str, Any]:
        return self.signal.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.signal.load_state_dict(state)
