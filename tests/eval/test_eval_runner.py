"""``catdpo-ray eval`` and ``catdpo-ray compare`` end to end on real (short) local-mode training runs.

Two runs (Cat-DPO and SafeDPO, 3 steps each, the tiny model, a slice of the bundled corpus) are
trained once for the module; the eval runs through the CLI with all three judges (the LLM judge
against the local test server, the classifier judge with a real tiny HF cost model).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from catdpo_ray.cli import main
from catdpo_ray.config import load_config, to_yaml
from catdpo_ray.eval.compare import balance_table, category_table, compare_runs, preference_block
from catdpo_ray.eval.generation import load_benign
from catdpo_ray.eval.runner import eval_config, run_eval
from tests.eval.test_eval_judges import JudgeServer, build_cost_model
from tests.train.helpers import small_corpus

API_KEY = "sk-e2e-7d3a91c4b2"


@pytest.fixture(scope="module")
def runs(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from catdpo_ray.ray_session import init_ray
    from catdpo_ray.train.driver import fit_run, prepare_data

    tmp = tmp_path_factory.mktemp("eval_runs")
    train, test = small_corpus(tmp, 96, 80)
    base = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train={train}", f"data.test={test}",
                              f"output.dir={tmp}", "scaling.num_workers=0", "train.micro_batch_size=8", "train.max_steps=3",
                              "train.eval_every=2", "logging.tensorboard=false", "logging.progress=false"])
    init_ray(base)
    data = prepare_data(base, tmp / "prep", verbose=False)
    out = {}
    for loss in ("catdpo", "safedpo"):
        cfg = base.replace([f"loss.name={loss}", f"output.name={loss}", "dual.eta=5.0"])
        run_dir = tmp / loss
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        result = fit_run(cfg, data, run_dir, loss)
        assert result.error is None, result.summary.get("error")
        out[loss] = run_dir
    return out


@pytest.fixture
def judge_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[JudgeServer]:
    monkeypatch.setenv("CATDPO_E2E_JUDGE_KEY", API_KEY)
    with JudgeServer(API_KEY, {i.prompt for i in load_benign("bundled")}) as server:
        yield server


def test_offline_preference_equals_the_trainers_final_eval(runs: dict[str, Path], tmp_path: Path) -> None:
    """Same weights, same pairs, same tokenization: the eval CLI's accuracies are the trainer's."""
    final = runs["catdpo"] / "final"
    # --run-config: the run's data, prompt format and categories (the default config would use other pairs)
    cfg = eval_config(str(final), None, ["eval.generate=false"], run_config=True)
    report = run_eval(cfg, model=str(final), out=tmp_path)
    trainer = preference_block(json.loads((runs["catdpo"] / "summary.json").read_text())["final_eval"])
    for key in ("likelihood", "implicit", "ref_likelihood"):
        assert report["preference"][key]["per_category"] == pytest.approx(trainer[key]["per_category"]), key
    assert report["preference"]["safety_gap_pairs"] == trainer["safety_gap_pairs"]
    assert report["primary"] == "preference:likelihood" and report["judges"] == {}
    assert report["macro"] == pytest.approx(trainer["likelihood"]["macro"])


def test_eval_cli_on_a_run_with_all_three_judges(runs: dict[str, Path], judge_server: JudgeServer,
                                                 tmp_path: Path) -> None:
    run_dir = runs["catdpo"]
    cost = build_cost_model(tmp_path / "cost")
    out = tmp_path / "report"
    # --generation local: in this process, as the command in a fresh process (Ray is up here from earlier tests)
    rc = main(["eval", "--generation", "local", "--model", str(run_dir / "final"), "--config", str(run_dir / "config.yaml"),
               "--out", str(out),
               "eval.judges=[rule,classifier,llm]", f"eval.classifier_model={cost}", f"eval.reward_model={cost}", f"eval.llm_base_url={judge_server.url}",
               "eval.llm_api_key_env=CATDPO_E2E_JUDGE_KEY", "eval.llm_model=test-judge", "eval.max_prompts_per_category=3",
               "eval.max_new_tokens=24", "eval.temperature=1.0"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["judges"]) == {"rule", "classifier", "llm"} and report["generation"]["backend"] == "in-process"
    for block in report["judges"].values():
        assert {"per_category", "macro", "worst3", "gap", "variance", "n_prompts", "missing"} <= set(block)
    rule, llm = report["judges"]["rule"], report["judges"]["llm"]
    # the test server judges with the same lexicon, so both judges must agree category by category
    assert llm["per_category"] == rule["per_category"] and llm["over_refusal"] == rule["over_refusal"]
    assert llm["prompt_classes"]["benign"] == {"benign": report["benign_prompts"]} and report["benign_prompts"] >= 20
    # the rule scores are recomputed from the written generations
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    for cat, score in rule["per_category"].items():
        rows = [g for g in gens if cat in g["categories"]]
        assert score == pytest.approx(100.0 * sum(g["verdicts"]["rule"]["safe"] for g in rows) / len(rows))
    # the classifier's verdicts follow its scores (cost > 0 unsafe)
    assert all(g["verdicts"]["classifier"]["safe"] == (g["verdicts"]["classifier"]["score"] <= 0.0) for g in gens)
    # the reward model (here the same score model, same template) scores every answer; helpfulness is its mean
    assert all(g["reward"] == pytest.approx(g["verdicts"]["classifier"]["score"], abs=1e-5) for g in gens)
    for key, benign in (("reward_model", False), ("reward_model:benign", True)):
        picked = [g["reward"] for g in gens if g["benign"] == benign]
        assert picked and report["helpfulness"][key] == pytest.approx(sum(picked) / len(picked)), key
    assert report["primary"] == "judge:rule" and report["per_category"] == rule["per_category"]
    assert report["over_refusal"]["rule"] == rule["over_refusal"] and "judge:llm" in report["helpfulness"]
    # fluency under the reference (the run's SFT model): recorded per answer, and safe & fluent <= safe
    flu = report["fluency"]
    assert 0.0 <= flu["fluent_share"] <= 100.0 and flu["nll_per_token"] > 0 and all("ref_nll" in g for g in gens)
    assert all(rule["safe_fluent"]["per_category"][c] <= s for c, s in rule["per_category"].items())
    for png in ("bars_judge-rule.png", "bars_judge-classifier.png", "bars_judge-llm.png", "bars_preference-likelihood.png",
                "balance.png", "lambdas.png", "eval_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "Worst-3" in (out / "report.md").read_text()
    # the key went over the wire and nowhere else
    assert judge_server.requests and all(r["auth"] == f"Bearer {API_KEY}" for r in judge_server.requests)
    for path in [*out.rglob("*"), *run_dir.rglob("*")]:
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_compare_two_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["catdpo"]), str(runs["safedpo"]), "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    assert "| catdpo | catdpo |" in md and "| safedpo | safedpo |" in md
    assert "| category | catdpo | safedpo |" in md  # the side-by-side per-category table
    for png in ("bars_preference-likelihood.png", "balance_preference-likelihood.png", "bars_preference-implicit.png",
                "lambdas.png", "eval_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    result = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["catdpo", "safedpo"]
    m = {r["name"]: r["sources"]["preference:likelihood"] for r in result["runs"]}
    assert f"| catdpo | {m['catdpo']['macro']:.1f} | {m['catdpo']['worst3']:.1f} | {m['catdpo']['gap']:.1f} |" in md


def test_compare_rejects_a_directory_without_results(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither summary.json"):
        compare_runs([tmp_path], out=tmp_path / "out")


def test_markdown_tables() -> None:
    rows = {"a": {"macro": 80.0, "worst3": 70.0, "gap": 40.0, "variance": 20.0, "num_categories": 5},
            "b": {"macro": None, "worst3": None, "gap": None, "variance": None, "num_categories": 0}}
    table = balance_table(rows, extra={"helpfulness (%)": {"a": 55.0}})
    assert table.splitlines()[0] == "| run | Macro ↑ | Worst-3 ↑ | Gap (pp) ↓ | Variance ×10³ ↓ | categories | helpfulness (%) |"
    assert table.splitlines()[2] == "| a | 80.0 | 70.0 | 40.0 | 20.00 | 5 | 55.0 |"
    assert "| b | n/a | n/a | n/a | n/a | 0 | n/a |" in table
    cols = {"x": {f"c{i}": float(10 * i) for i in range(10)} | {"none": None}}
    lines = category_table(cols, counts={"n": {"c0": 4}}).splitlines()
    assert lines[0] == "| category | n | x |" and lines[2] == "| c0 | 4 | 0.0 ▼ |"
    assert lines[9] == "| c7 | 0 | 70.0 ▼ |" and lines[10] == "| c8 | 0 | 80.0 |"  # weakest eight marked
    assert lines[-1] == "| none | 0 | n/a |"


def test_panels_draw_missing_categories_error_bars_and_lambdas(tmp_path: Path) -> None:
    from catdpo_ray.eval.panels import plot_balance_panel, plot_category_bars, plot_lambda_grid

    scores = {"A": {f"c{i}": 10.0 * i for i in range(10)} | {"none": None}, "B": {"c0": 50.0, "c1": None}}
    assert plot_category_bars(scores, tmp_path / "bars.png").stat().st_size > 1000
    metrics = {"A": {"macro": 80.0, "worst3": 60.0, "gap": 30.0, "variance": 5.0},
               "B": {"macro": None, "worst3": None, "gap": None, "variance": None}}
    errors = {"A": {"macro": 1.0, "worst3": 2.0, "gap": 3.0, "variance": 0.5}, "B": {}}
    assert plot_balance_panel(metrics, tmp_path / "panel.png", errors=errors).stat().st_size > 1000
    lam = tmp_path / "lambdas.csv"
    lam.write_text("step,a,b\n1,0.5,0.0\n2,1.0,0.2\n")
    assert plot_lambda_grid({"run": lam}, tmp_path / "lam.png").stat().st_size > 1000


def test_reward_model_must_output_one_score(tmp_path: Path) -> None:
    from catdpo_ray.eval.runner import reward_scores

    one = build_cost_model(tmp_path / "one")
    two = build_cost_model(tmp_path / "two", num_labels=2, id2label={0: "safe", 1: "unsafe"})
    cfg = load_config(None, [f"eval.reward_model={one}"])
    assert reward_scores(cfg, ["p", "p"], ["this answer is fine", "this answer has a cost"]) == pytest.approx([-2.0, 3.0], abs=1e-4)
    with pytest.raises(ValueError, match="2 labels"):
        reward_scores(cfg.replace({"eval.reward_model": two}), ["p"], ["r"])
