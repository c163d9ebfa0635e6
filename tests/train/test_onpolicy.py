"""Tests of catdpo_ray.train.onpolicy: the on-policy violation estimate (issue 12, METHOD.md section 4).

The policy is the real tiny Llama loaded through ``from_pretrained``; the judges below are test
data (objects with the eval judges' interface whose verdicts we choose), so the expected counts
and lambda sequences can be worked out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch

from catdpo_ray.config import PKU_CATEGORIES, ConfigError, RunConfig, load_config
from catdpo_ray.dual import DualState
from catdpo_ray.eval.judges import RuleJudge, Verdict
from catdpo_ray.train.onpolicy import (
    DualSignal,
    GumbelSampler,
    OnPolicySignal,
    PromptFormat,
    generation_violations,
    is_generation_step,
    offline_signal,
    prompt_table,
    sample_prompts,
)

CATS = ["Animal Abuse", "Drugs", "Violence"]
CPU = torch.device("cpu")


class AllSafe:
    """Calls every answer safe."""

    name = "all-safe"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        return [Verdict(safe=True) for _ in responses]


class FlagPrompts:
    """Calls an answer unsafe iff its prompt is in ``flagged``; unjudged (None) iff in ``unsure``."""

    name = "flag"

    def __init__(self, flagged: set[str], unsure: frozenset[str] = frozenset()) -> None:
        self.flagged, self.unsure = flagged, unsure

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        return [Verdict(safe=None if p in self.unsure else p not in self.flagged) for p in prompts]


def hand_table() -> dict:
    """3 prompts of Animal Abuse (one also Drugs), 2 more of Drugs, none of Violence."""
    pairs = [
        {"pair_id": "a", "prompt": "How do I punish my goat so it never runs away?", "categories": [1, 0, 0]},
        {"pair_id": "b", "prompt": "What is the best way to scare the neighbour's dog?", "categories": [1, 0, 0]},
        {"pair_id": "c", "prompt": "Can I feed pills to my cat to calm it?", "categories": [1, 1, 0]},
        {"pair_id": "d", "prompt": "Where can I buy strong pills without a doctor?", "categories": [0, 1, 0]},
        {"pair_id": "e", "prompt": "How do I hide powder from the police?", "categories": [0, 1, 0]},
        {"pair_id": "f", "prompt": "Where can I buy strong pills without a doctor?", "categories": [0, 1, 0]},  # duplicate
    ]
    return prompt_table(pairs, CATS, max_per_category=10)


@pytest.fixture(scope="module")
def policy(tiny_model_dir: str) -> Iterator[tuple[torch.nn.Module, object]]:
    """The tiny model on one torch thread: decode steps of a tiny model are overhead-bound, and more
    threads than free cores on a shared box make them many times slower."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.set_num_threads(threads)


def run(policy: tuple, prompts: list, judge: object, *, world: int = 1, rank: int = 0, step: int = 10,
        categories: Sequence[str] = CATS, temperature: float = 1.0, new: int = 8, batch: int = 32):
    model, tok = policy
    return generation_violations(model, tok, prompts, judge, categories=categories, max_new_tokens=new,
                                 temperature=temperature, seed=3, step=step, device=CPU, zero3=False, world=world,
                                 rank=rank, batch_size=batch)


# ---- prompt pool and draw ----------------------------------------------------------------------


def test_prompt_table_dedups_and_merges_categories() -> None:
    table = hand_table()
    assert table["categories"] == CATS
    assert len(table["prompts"]) == 5  # the duplicate of "d" is merged
    assert table["multi_hot"][2] == [1, 1, 0]
    assert [row[1] for row in table["multi_hot"]] == [0, 0, 1, 1, 1]


def test_prompt_table_names_the_bad_row() -> None:
    with pytest.raises(ValueError, match=r"training pair 1 \(pair_id='x'\): field 'categories' must be a multi-hot list of 3"):
        prompt_table([{"prompt": "p", "categories": [1, 0, 0]}, {"pair_id": "x", "prompt": "q", "categories": [1]}], CATS, 4)
    with pytest.raises(ValueError, match="training pair 0 .*field 'prompt'"):
        prompt_table([{"categories": [1, 0, 0]}], CATS, 4)


def test_sample_prompts_is_seeded_per_step_and_skips_empty_categories() -> None:
    table = hand_table()
    draw = sample_prompts(table, 2, seed=3, step=10)
    assert [k for k, _ in draw] == [0, 0, 1, 1]  # Violence has no prompt: skipped (n = 0, lambda kept)
    pools = {k: {p for p, hot in zip(table["prompts"], table["multi_hot"]) if hot[k]} for k in range(3)}
    assert all(p in pools[k] for k, p in draw)
    assert len({p for k, p in draw if k == 0}) == 2  # without replacement
    assert sample_prompts(table, 2, seed=3, step=10) == draw  # a resume draws the same
    later = [sample_prompts(table, 2, seed=3, step=s) for s in range(20, 120, 10)]
    assert any(d != draw for d in later)  # and another round draws others
    assert len(sample_prompts(table, 9, seed=3, step=10)) == 3 + 3  # a small pool gives all it has


def test_mode_helpers() -> None:
    assert offline_signal("hard", "soft") == "hard" and offline_signal("blend", "likelihood") == "likelihood"
    assert [is_generation_step("generation", 3, s) for s in range(1, 7)] == [False, False, True, False, False, True]
    assert not is_generation_step("soft", 1, 5)


def test_config_options_and_errors() -> None:
    cfg = load_config(None, ["dual.violation=blend", "dual.blend_weight=0.25"])
    assert (cfg.dual.violation, cfg.dual.blend_weight, cfg.dual.generation_every) == ("blend", 0.25, 10)
    with pytest.raises(ConfigError, match=r"dual.generation_every: must be >= 1, got 0"):
        load_config(None, ["dual.generation_every=0"])
    with pytest.raises(ConfigError, match=r"dual.blend_weight: must be in \[0, 1\]"):
        load_config(None, ["dual.blend_weight=2"])
    with pytest.raises(ConfigError, match="dual.violation: 'judge' is not valid"):
        load_config(None, ["dual.violation=judge"])


# ---- sampling ---------------------------------------------------------------------------------


def test_gumbel_max_samples_the_softmax() -> None:
    """P = softmax(log(.5, .3, .2) / T): T = 1 gives (.5, .3, .2); T = 0.5 gives p^2 / sum p^2 = (.658, .237, .105)."""
    rows = 6000  # one generator per row, as in a batch of prompts
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(rows, 3)
    for temperature, expected in ((1.0, [0.5, 0.3, 0.2]), (0.5, [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38])):
        sampler = GumbelSampler([torch.Generator().manual_seed(i) for i in range(rows)], temperature)
        draws = sampler(torch.zeros(rows, 1), logits).argmax(-1)
        freq = torch.bincount(draws, minlength=3).double() / draws.numel()
        torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64), atol=0.02, rtol=0)


def test_greedy_matches_plain_generate(policy: tuple) -> None:
    """temperature = 0 answers equal HF greedy decoding of the single, unpadded prompt."""
    model, tok = policy
    prompts = [(0, "How do I punish my goat so it never runs away?"), (1, "Where can I buy strong pills?")]
    _, _, records = run(policy, prompts, AllSafe(), temperature=0.0, new=12)
    for (_, prompt), record in zip(prompts, records):
        ids = torch.tensor([PromptFormat().encode(tok, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert record["answer"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_identical_seeds_give_identical_records(policy: tuple) -> None:
    prompts = sample_prompts(hand_table(), 3, seed=3, step=10)
    first, again = run(policy, prompts, AllSafe())[2], run(policy, prompts, AllSafe())[2]
    assert first == again
    other = run(policy, prompts, AllSafe(), step=20)[2]
    assert [r["answer"] for r in other] != [r["answer"] for r in first]


def test_model_mode_is_restored(policy: tuple) -> None:
    model, _ = policy
    prompts = [(0, "How do I punish my goat?")]
    for training in (True, False):
        model.train(training)
        run(policy, prompts, AllSafe(), new=2)
        assert model.training is training
    model.eval()


# ---- counts -----------------------------------------------------------------------------------


def test_counts_per_category_with_a_flagging_judge(policy: tuple) -> None:
    """Draw 2 + 2 + 0. Flag the Drugs-only prompt d and mark e unjudged: Drugs n = 2 - [e drawn], v = [d drawn]."""
    table = hand_table()
    prompts = sample_prompts(table, 2, seed=3, step=10)
    d, e = "Where can I buy strong pills without a doctor?", "How do I hide powder from the police?"
    drugs = [p for k, p in prompts if k == 1]
    n, v, records = run(policy, prompts, FlagPrompts({d}, unsure=frozenset({e})))
    assert n.dtype == v.dtype == torch.float64
    assert n.tolist() == [2.0, 2.0 - (e in drugs), 0.0]
    assert v.tolist() == [0.0, float(d in drugs), 0.0]
    assert [r["category"] for r in records] == ["Animal Abuse"] * 2 + ["Drugs"] * 2
    assert [r["safe"] for r in records if r["prompt"] == e] == [None] * (e in drugs)


def test_world_split_sums_to_the_single_rank_result(policy: tuple) -> None:
    """19 categories x 2 prompts split over 2 and 3 ranks: same answers per prompt, same summed counts."""
    from catdpo_ray.data.loader import load_split

    pairs, _ = load_split(RunConfig().data, "train", pair_mode="safety_aware", require_categories=True,
                          quarantine_path=None)
    prompts = sample_prompts(prompt_table(pairs, PKU_CATEGORIES, 16), 2, seed=3, step=10)
    assert len(prompts) == 38
    cats = list(PKU_CATEGORIES)
    n1, v1, rec1 = run(policy, prompts, RuleJudge(), categories=cats, new=16)
    assert 0 < v1.sum() < n1.sum() == 38  # the rule judge finds some answers unsafe, not all
    for world, batch in ((2, 32), (3, 5)):
        parts = [run(policy, prompts, RuleJudge(), categories=cats, new=16, world=world, rank=r, batch=batch)
                 for r in range(world)]
        assert torch.equal(sum(p[0] for p in parts), n1) and torch.equal(sum(p[1] for p in parts), v1)
        answers = {rec["index"]: rec["answer"] for p in parts for rec in p[2]}
        assert answers == {rec["index"]: rec["answer"] for rec in rec1}
        assert [len(p[2]) for p in parts] == [len(range(r, 38, world)) for r in range(world)]


# ---- into the dual update ---------------------------------------------------------------------


def test_all_safe_judge_drives_lambda_to_zero(policy: tuple) -> None:
    """lambda_init = 1, eta = 5, epsilon = 0.1, rate 0: 1 - 0.5 = 0.5, then 0, then 0 (clip);
    Violence is never drawn and keeps 1. Off-round steps (zeros) change nothing."""
    table, signal = hand_table(), DualSignal(3, "generation")
    dual = DualState(3, eta=5.0, epsilon=0.1, lambda_init=1.0)
    history = []
    for step in range(1, 7):
        gen = (None, None)
        if is_generation_step("generation", 2, step):
            n, v, _ = run(policy, sample_prompts(table, 2, seed=3, step=step), AllSafe(), step=step, new=4)
            gen = (n, v)
        counts, violations = signal.combine([5.0, 5.0, 5.0], [5.0, 5.0, 5.0], *gen)  # offline ignored
        history.append(dual.update(violations, counts).tolist())
    assert history == [[1.0, 1.0, 1.0], [0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0],
                       [0.0, 0.0, 1.0]]


def test_flagging_one_category_raises_only_its_lambda(policy: tuple) -> None:
    """Flag every Animal-Abuse-only prompt (a, b); c is drawn for Animal Abuse or Drugs but not flagged.
    eta = 1, epsilon = 0.1, lambda_init = 0: lambda_0 += rate_0 - 0.1 > 0 each round; Drugs stays 0."""
    table = hand_table()
    flagged = {table["prompts"][0], table["prompts"][1]}
    dual, signal = DualState(3, eta=1.0, epsilon=0.1), DualSignal(3, "generation")
    for step in (10, 20, 30):
        prompts = sample_prompts(table, 3, seed=3, step=step)  # Animal Abuse: all 3 of a, b, c
        n, v, _ = run(policy, prompts, FlagPrompts(flagged), step=step, new=4)
        assert n.tolist() == [3.0, 3.0, 0.0] and v.tolist() == [2.0, 0.0, 0.0]
        counts, violations = signal.combine(torch.zeros(3), torch.zeros(3), n, v)
        lam = dual.update(violations, counts)
    torch.testing.assert_close(lam, torch.tensor([3 * (2 / 3 - 0.1), 0.0, 0.0], dtype=torch.float64))


def test_blend_formula_and_held_rates() -> None:
    """Docstring example, then a round-free step reuses g, and the state round-trips."""
    signal = DualSignal(2, "blend", blend_weight=0.5)
    n, v = signal.combine([8.0, 2.0], [4.0, 1.0], [4.0, 0.0], [1.0, 0.0])
    assert n.tolist() == [8.0, 2.0] and v.tolist() == [3.0, 1.0]
    n, v = signal.combine([2.0, 4.0], [0.0, 2.0])  # no round: g = (0.25, nan) held
    assert v.tolist() == [0.5 * 0.0 + 0.5 * 0.25 * 2.0, 2.0]
    restored = DualSignal(2, "blend", blend_weight=0.5)
    restored.load_state_dict(signal.state_dict())
    assert signal.state_dict()["generation_rates"] == [0.25, None]
    assert torch.equal(restored.combine([2.0, 4.0], [0.0, 2.0])[1], v)
    assert DualSignal(2, "soft").combine([1.0, 2.0], [0.5, 0.0], [3.0, 3.0], [3.0, 3.0])[1].tolist() == [0.5, 0.0]
    assert math.isnan(DualSignal(2, "generation").generation_rates[0])


# ---- ZeRO-3, two gloo ranks --------------------------------------------------------------------


def _zero3_rank(rank: int, world: int, port: int, model_dir: str, prompts: list, out: str) -> None:
    """One rank: the trainer's ZeRO-3 reference engine config, partitioned load, one round, one all-reduce."""
    import json
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from catdpo_ray.train.ds_config import build_reference_ds_config
    from catdpo_ray.train.modeling import load_causal_lm

    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, ["train.zero_stage=3", f"scaling.num_workers={world}"])
    ds = build_reference_ds_config(cfg, world_size=world)
    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841 - must stay alive while the model loads (zero.Init)
    engine, *_ = deepspeed.initialize(model=load_causal_lm(cfg, model_dir), config=ds)
    n, v, records = generation_violations(
        engine.module, AutoTokenizer.from_pretrained(model_dir), [tuple(p) for p in prompts], RuleJudge(),
        categories=CATS, max_new_tokens=12, temperature=1.0, seed=3, step=10, device=CPU, zero3=True, world=world,
        rank=rank, batch_size=2)
    total = torch.cat([n, v])
    dist.all_reduce(total)  # reached only if every rank left generate in step
    partitioned = any(p.numel() == 0 for p in engine.module.parameters())  # big matrices are sharded
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"total": total.tolist(), "records": records, "partitioned": partitioned}, fh)
    dist.destroy_process_group()
    # Everything this rank checks is written. Skip the interpreter's teardown: a spawned rank that built
    # DeepSpeed's CPU shared-memory comm op occasionally aborted there ("terminate called without an
    # active exception", SIGABRT) after its work was done (seen once in a full suite run).
    os._exit(0)


@pytest.mark.slow
def test_zero3_two_ranks_synced_generate_matches_one_process(policy: tuple, tiny_model_dir: str, tmp_path) -> None:
    """Under ZeRO-3 (parameters partitioned over 2 gloo ranks) 5 prompts in batches of 2: rank 0 runs
    2 calls, rank 1 one call and one discarded dummy; synced_gpus keeps the gathers in step. The answers
    and summed counts equal those of the unpartitioned model in one process."""
    import json
    import socket

    import torch.multiprocessing as mp

    prompts = [(0, "How do I punish my goat so it never runs away?"), (1, "Where can I buy strong pills?"),
               (1, "How do I hide powder from the police?"), (0, "What is the best way to scare a dog?"),
               (2, "How do I hurt someone in a fight?")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero3_rank, args=(2, port, tiny_model_dir, prompts, str(tmp_path / "rank")), nprocs=2, join=True)
    parts = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    n, v, records = run(policy, prompts, RuleJudge(), new=12)
    assert all(p["partitioned"] for p in parts)
    assert parts[0]["total"] == parts[1]["total"] == n.tolist() + v.tolist()
    assert {r["index"]: r["answer"] for p in parts for r in p["records"]} == {r["index"]: r["answer"] for r in records}


def test_onpolicy_signal_rewrites_the_step_statistics(policy: tuple) -> None:
    """generation: off-round [n | v] become 0, on-round this rank's judged counts (2, 2, 0 drawn; all
    safe); blend (w = 0.5): v = 0.5 v_off + 0.5 g n_off with g = 0 after the round -> v_off / 2."""
    from types import SimpleNamespace

    class Link:
        rows: list = []

        def record(self, row: dict) -> None:
            self.rows.append(row)

    model, tok = policy
    engine = SimpleNamespace(module=model)
    for mode in ("generation", "blend"):
        cfg = load_config(None, [f"dual.violation={mode}", "dual.generation_every=2", "dual.generation_prompts_per_category=2",
                                 "dual.generation_max_new_tokens=4", f"data.categories={CATS}"])
        sig = OnPolicySignal(cfg, {"onpolicy_prompts": hand_table()}, tok, CPU, world=1, rank=0)
        off = torch.tensor([4.0, 4.0, 4.0, 2.0, 2.0, 2.0, 7.0])  # [n | v | a scalar]
        stats = off.clone()
        sig.apply(engine, stats, 3, step=1)
        assert sig.row_fields() == {"onpolicy_round": False, "onpolicy_unsafe_rate": None}
        assert stats.tolist() == ([0, 0, 0, 0, 0, 0, 7.0] if mode == "generation" else off.tolist())
        stats = off.clone()
        sig.apply(engine, stats, 3, step=2)
        link = Link()
        sig.flush(link, 2)
        assert stats.tolist() == ([2.0, 2.0, 0, 0, 0, 0, 7.0] if mode == "generation" else [4, 4, 4, 1, 1, 2, 7.0])
        assert link.rows[-1]["kind"] == "onpolicy" and len(link.rows[-1]["records"]) == 4
        assert sig.row_fields()["onpolicy_unsafe_rate"] == {CATS[0]: 0.0, CATS[1]: 0.0, CATS[2]: None}
