"""What ``catdpo-ray eval`` may trust: the config it is given, and nothing it finds on its own.

Issue 11 ("Evaluation takes nothing implicit"): ``catdpo-ray eval`` used to read
``<model>/../config.yaml`` whenever it existed, so a shared run folder could choose the LLM judge's
URL, which environment variable was sent to it as a key, and switch on ``trust_remote_code``. Now:

- the config is ``--config FILE`` (the user named it: every key is taken) plus ``key=value``
  overrides, else the defaults plus overrides;
- ``--run-config`` (``eval_config(..., run_config=True)``) reads the run's ``config.yaml`` beside
  ``--model`` for what makes the evaluation match training (prompt format, categories, data,
  reference model), says so before anything runs, and takes none of :data:`PROTECTED_KEYS` from
  it: those come only from the command line or a file named with ``--config``;
- :func:`check_key_transport` refuses, before any request, to send a key over plain HTTP to a host
  that is not loopback unless ``eval.allow_insecure_key=true`` (:mod:`catdpo_ray.eval.judges`
  calls it too, per request);
- :func:`check_model_dir` refuses a ``--model`` folder that is not a model before any output folder
  is made.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from catdpo_ray.config import ConfigError, RunConfig, from_dict, load_config

#: Keys that decide where data or secrets go, or whether downloaded code runs. Never read from a run's
#: ``config.yaml`` that ``--run-config`` loads; only from the command line or a ``--config`` file.
PROTECTED_KEYS: tuple[str, ...] = (
    "eval.llm_base_url", "eval.llm_api_key_env", "eval.allow_insecure_key",
    "eval.classifier_model", "eval.reward_model", "eval.output_dir",
    "model.trust_remote_code", "scaling.ray_address",
)


class EvalInputError(ConfigError):
    """A usage error of ``catdpo-ray eval`` (exit status 2): a bad ``--model``, an unsafe judge URL."""


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _drop(raw: dict[str, Any], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


def run_config_path(model: str) -> Path:
    """The ``config.yaml`` of the run whose ``final/`` is ``model``."""
    return Path(model).resolve().parent / "config.yaml"


def eval_config(model: str, config_path: str | None = None, overrides: list[str] | None = None, *,
                run_config: bool = False, verbose: bool = True) -> RunConfig:
    """The evaluation's config, from sources the user named (see the module docstring).

    Args:
        model: the ``--model`` argument.
        config_path: ``--config FILE``: every key is taken from it.
        overrides: ``key=value`` items, applied last (they may set protected keys).
        run_config: ``--run-config``: also read :func:`run_config_path`, without its protected keys.
        verbose: print which file was read, and which keys of it were not taken, before anything runs.

    Raises:
        EvalInputError: ``run_config`` together with ``config_path``, or no run config beside ``model``.
    """
    import yaml

    overrides = list(overrides or [])
    if run_config and config_path is not None:
        raise EvalInputError("--run-config and --config exclude each other: name one config file")
    if not run_config:
        if verbose:
            where = f"config {Path(config_path).resolve()} (--config)" if config_path else "default config"
            print(f"[eval] {where} + {len(overrides)} command-line override(s)", flush=True)
            if config_path is None and Path(model).is_dir() and run_config_path(model).exists():
                print(f"[eval] not reading {run_config_path(model)}; pass --run-config to use the run's prompt "
                      "format, categories and data", flush=True)
        return load_config(config_path, overrides)
    path = run_config_path(model)
    if not path.exists():
        raise EvalInputError(f"--run-config: {path} does not exist (is --model a run's final/ directory?)")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise EvalInputError(f"{path}: the top level must be a mapping of sections")
    raw: dict[str, Any] = copy.deepcopy(loaded or {})
    defaults = RunConfig().to_dict()
    ignored = [k for k in PROTECTED_KEYS if _get(raw, k) is not None and _get(raw, k) != _get(defaults, k)]
    for key in PROTECTED_KEYS:
        _drop(raw, key)
    named = {item.partition("=")[0].strip() for item in overrides}
    # A judge whose model or endpoint was just withheld cannot run: keep it only if the user names it.
    judges = _get(raw, "eval.judges")
    needs = {"llm": "eval.llm_base_url", "classifier": "eval.classifier_model"}
    dropped_judges: list[str] = []
    pending: list[str] = []
    if isinstance(judges, list):
        kept = [j for j in judges if j not in needs or needs[j] in named]
        dropped_judges = [j for j in judges if j not in kept]
        # The file alone must validate without the withheld keys; the judges the user enabled by naming
        # their model/endpoint come back together with the overrides (which are validated as a whole).
        raw["eval"]["judges"] = [j for j in judges if j not in needs] or ["rule"]
        if "eval.judges" not in named and kept != raw["eval"]["judges"]:
            pending = [f"eval.judges={json.dumps(kept)}"]
    try:
        base = from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg = base.replace(pending + overrides) if pending or overrides else base
    if verbose:
        print(f"[eval] config {path} (asked by --run-config) + {len(overrides)} command-line override(s)", flush=True)
        if ignored:
            print(f"[eval] not taken from {path.name}: {', '.join(ignored)} (set them on the command line or in a "
                  "--config file)", flush=True)
        if dropped_judges:
            print(f"[eval] judges {dropped_judges} of {path.name} dropped: their model/endpoint is not taken from it",
                  flush=True)
    return cfg


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_transport(url: str, *, key_present: bool, allow_insecure_key: bool, key_name: str = "the key") -> None:
    """Refuse to send an API key in clear text over the network.

    Args:
        url: the endpoint (``eval.llm_base_url``).
        key_present: whether a key would be sent (its environment variable is set and not empty).
        allow_insecure_key: ``eval.allow_insecure_key``.
        key_name: how the key is named in the message (e.g. ``$OPENAI_API_KEY``).

    Raises:
        EvalInputError: a scheme other than http/https, or a key for a plain-HTTP non-loopback host
            without the opt-in.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EvalInputError(f"eval.llm_base_url={url!r}: expected an http:// or https:// URL with a host")
    if parts.scheme == "http" and key_present and not allow_insecure_key and not _is_loopback(parts.hostname):
        raise EvalInputError(
            f"eval.llm_base_url={url!r} is plain HTTP to a host that is not loopback: {key_name} would be sent "
            "unencrypted. Use https://, or set eval.allow_insecure_key=true if you accept that")


def check_model_dir(model: str) -> None:
    """Refuse a local ``--model`` that is not a model directory (no ``config.json``), before anything is written.

    A hub id (``org/name``, not an existing path) passes; its loading fails later with the hub's message.
    """
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if not looks_local:
        return
    if not path.exists():
        raise EvalInputError(f"--model {model}: no such directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        hint = f"; did you mean {path / 'final'}?" if (path / "final" / "config.json").is_file() else ""
        raise EvalInputError(f"--model {model}: not a model directory (no config.json; expected an HF model "
                             f"directory such as runs/NAME/final){hint}")
