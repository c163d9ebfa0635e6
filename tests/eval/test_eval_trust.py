"""``catdpo-ray eval`` takes nothing implicit (issue 11, items 5 and 10).

A shared run folder whose ``config.yaml`` was written by someone else points the LLM judge at a
server of theirs (a real one on this machine, recording every request), names a secret environment
variable as the key, switches on ``trust_remote_code`` and a classifier model, and moves the output.
Without the user naming that file, none of it may take effect: no request arrives, no key leaves,
and the config the evaluation ran with says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from catdpo_ray.cli import main
from catdpo_ray.config import load_config, to_yaml
from catdpo_ray.eval.judges import LLMJudge
from catdpo_ray.eval.settings import EvalInputError, check_key_transport, eval_config
from tests.eval.test_eval_judges import JudgeServer

SECRET = "sk-secret-0b7e44d1"
SMALL = ["eval.max_prompts_per_category=1", "eval.max_new_tokens=4", "data.max_test_rows=8", "eval.benign=bundled"]
#: Generate in this process, as ``catdpo-ray eval`` in a fresh process does: Ray is up in this one from earlier
#: tests, which would choose the actor pool (tests/eval/test_eval_generation.py's subject).
EVAL = ["eval", "--generation", "local"]


@pytest.fixture
def hostile_run(tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A run folder (``final/`` = the tiny model) whose config.yaml tries to take over the evaluation."""
    monkeypatch.setenv("CATDPO_VICTIM_SECRET", SECRET)
    run = tmp_path / "shared-run"
    shutil.copytree(tiny_model_dir, run / "final")
    server = JudgeServer(SECRET).__enter__()
    raw = yaml.safe_load(to_yaml(load_config(None, [f"model.name_or_path={tiny_model_dir}"])))
    raw["eval"].update(judges=["rule", "llm", "classifier"], llm_base_url=server.url, llm_api_key_env="CATDPO_VICTIM_SECRET",
                       classifier_model=str(tmp_path / "their-classifier"), allow_insecure_key=True,
                       output_dir=str(tmp_path / "their-output"))
    raw["model"]["trust_remote_code"] = True
    raw["data"]["prompt_template"] = "Q: {prompt}\nA:"  # harmless and useful: taken with --run-config
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    yield run, server, tmp_path
    server.__exit__(None, None, None)


def test_a_hostile_run_config_is_not_read_unless_asked(hostile_run, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    run, server, tmp = hostile_run
    out = tmp / "mine"
    assert main([*EVAL, "--model", str(run / "final"), "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["judges"]) == {"rule"} and report["settings"]["eval"]["llm_base_url"] is None
    assert report["generation"]["backend"] == "in-process"  # --generation local
    assert report["settings"]["prompt_template"] == load_config().data.prompt_template
    assert server.requests == [] and not (tmp / "their-output").exists()
    text = capsys.readouterr().out
    assert f"not reading {run / 'config.yaml'}; pass --run-config" in text


def test_run_config_on_request_keeps_the_protected_keys_out(hostile_run, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    run, server, tmp = hostile_run
    out = tmp / "mine"
    assert main([*EVAL, "--model", str(run / "final"), "--run-config", "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    # said before anything ran: which file, that it was asked for, and what was not taken from it
    first = text.index(f"[eval] config {run / 'config.yaml'} (asked by --run-config)")
    assert first < text.index("held-out pairs")
    assert ("not taken from config.yaml: eval.llm_base_url, eval.llm_api_key_env, eval.allow_insecure_key, "
            "eval.classifier_model, eval.output_dir, model.trust_remote_code") in text
    assert "judges ['llm', 'classifier'] of config.yaml dropped" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["judges"]) == {"rule"} and report["settings"]["prompt_template"] == "Q: {prompt}\nA:"
    s = report["settings"]["eval"]
    assert (s["llm_base_url"], s["llm_api_key_env"], s["allow_insecure_key"], s["classifier_model"]) == \
        (None, "OPENAI_API_KEY", False, None)
    assert server.requests == [] and not (tmp / "their-output").exists()
    cfg = eval_config(str(run / "final"), None, [], run_config=True, verbose=False)
    assert cfg.model.trust_remote_code is False and cfg.data.prompt_template == "Q: {prompt}\nA:"


def test_the_user_may_still_name_the_judge_on_the_command_line(hostile_run) -> None:  # noqa: ANN001
    """Protected keys from the command line are the user's own choice: the judge then runs."""
    run, server, tmp = hostile_run
    cfg = eval_config(str(run / "final"), None, ["eval.judges=[rule,llm]", f"eval.llm_base_url={server.url}",
                                                 "eval.llm_api_key_env=CATDPO_VICTIM_SECRET"], run_config=True, verbose=False)
    assert cfg.eval.judges == ["rule", "llm"] and cfg.eval.llm_base_url == server.url
    with pytest.raises(EvalInputError, match="exclude each other"):
        eval_config(str(run / "final"), str(run / "config.yaml"), [], run_config=True)


#: A TEST-NET-1 documentation address (RFC 5737): never routed, and the refusal means no packet is sent.
NON_LOOPBACK_URL = "http://192.0.2.10:9/v1"


def test_no_key_over_plain_http_to_a_non_loopback_host(tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything runs: no output folder, no request (nothing listens there, and no
    connection is even attempted -- a connection attempt would fail the CLI with another message)."""
    monkeypatch.setenv("CATDPO_VICTIM_SECRET", SECRET)
    args = ["eval", "--model", tiny_model_dir, "--out", str(tmp_path / "out"), "eval.judges=[rule,llm]",
            f"eval.llm_base_url={NON_LOOPBACK_URL}", "eval.llm_api_key_env=CATDPO_VICTIM_SECRET", *SMALL]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"eval: eval.llm_base_url='{NON_LOOPBACK_URL}' is plain HTTP to a host that is not loopback" in err
    assert "$CATDPO_VICTIM_SECRET would be sent unencrypted" in err and "eval.allow_insecure_key=true" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvalInputError, match="plain HTTP"):  # the judge refuses on its own too
        LLMJudge(NON_LOOPBACK_URL, model="m", api_key_env="CATDPO_VICTIM_SECRET")
    # The explicit opt-in lifts the refusal (checked without sending anything off this machine).
    LLMJudge(NON_LOOPBACK_URL, model="m", api_key_env="CATDPO_VICTIM_SECRET", allow_insecure_key=True)
    check_key_transport(NON_LOOPBACK_URL, key_present=True, allow_insecure_key=True)
    # and a loopback judge with the opt-in still gets exactly one request carrying the key
    with JudgeServer(SECRET) as server:
        judge = LLMJudge(server.url, model="m", api_key_env="CATDPO_VICTIM_SECRET", allow_insecure_key=True)
        assert judge.judge_one("hi", "hello").safe is True
        assert [r["auth"] for r in server.requests] == [f"Bearer {SECRET}"]


@pytest.mark.parametrize(("url", "key", "ok"), [
    ("http://127.0.0.1:8000/v1", True, True),
    ("http://localhost:8000/v1", True, True),
    ("http://[::1]:8000/v1", True, True),
    ("https://api.example.com/v1", True, True),
    ("http://judge.example.com/v1", False, True),   # no key, nothing to leak
    ("http://judge.example.com/v1", True, False),
    ("http://10.0.0.5:8000/v1", True, False),
    ("ftp://judge.example.com/v1", False, False),
])
def test_check_key_transport(url: str, key: bool, ok: bool) -> None:
    if ok:
        check_key_transport(url, key_present=key, allow_insecure_key=False)
    else:
        with pytest.raises(EvalInputError):
            check_key_transport(url, key_present=key, allow_insecure_key=False)


def test_a_folder_that_is_not_a_model_fails_clearly_and_leaves_nothing(tmp_path: Path, tiny_model_dir: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    assert main(["eval", "--model", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"eval: --model {notes}: not a model directory (no config.json" in err
    assert sorted(p.name for p in notes.iterdir()) == ["readme.txt"]  # no eval/ left behind
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    assert main(["eval", "--model", str(run)]) == 2
    assert f"did you mean {run / 'final'}?" in capsys.readouterr().err and not (run / "eval").exists()
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("choice", ["auto", "ray", "local"])
def test_generation_flag_reaches_the_runner(choice: str, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--generation`` is passed to ``run_eval`` as the backend (``auto`` when not given); other values are refused."""
    from catdpo_ray.eval import runner

    seen: list[str] = []
    monkeypatch.setattr(runner, "run_eval", lambda cfg, **kw: seen.append(kw["backend"]) or {})
    flag = [] if choice == "auto" else ["--generation", choice]
    assert main(["eval", *flag, "--model", tiny_model_dir]) == 0
    assert seen == [choice]
    with pytest.raises(SystemExit) as bad:
        main(["eval", "--generation", "gpu", "--model", tiny_model_dir])
    assert bad.value.code == 2
