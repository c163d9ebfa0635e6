"""Where the model, tokenizer and data of a config live: filesystem checks the driver runs
before Ray starts (:func:`catdpo_ray.config.validate` stays free of I/O). No network is touched."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from catdpo_ray.config import ConfigError

if TYPE_CHECKING:
    from catdpo_ray.config import RunConfig


#: A Hugging Face hub repository id: ``owner/name`` (letters, digits, ``_ . -``; no ``--``/``..``).
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a hub id (``owner/name``); says nothing of existence."""
    return bool(_HUB_ID_RE.match(value)) and ".." not in value and "--" not in value and len(value) <= 200


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_location(key: str, value: str, *, revision: str | None = None, need: str = "config.json") -> None:
    """``value`` is an existing local model directory holding ``need``, or a hub id.

    A directory wins when both readings are possible (``org/model`` that exists locally is the
    local copy, as in ``from_pretrained``). With ``HF_HUB_OFFLINE=1`` a hub id must be in the
    local HF cache. No network is touched.

    Raises:
        ConfigError: naming ``key`` and ``value`` and what is wrong.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        if need and not (path / need).is_file():
            raise ConfigError(f"{key} {value!r}: the directory has no {need}, so it is not a Hugging Face model directory")
        return
    if path.exists():
        raise ConfigError(f"{key} {value!r}: is a file, not a model directory or a hub id")
    if not is_hub_id(value):
        raise ConfigError(f"{key} {value!r}: no such directory, and not a hub id of the form owner/name")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(value, need or "config.json", revision=revision)
        if not isinstance(cached, str):
            raise ConfigError(f"{key} {value!r}: HF_HUB_OFFLINE is set and the hub id is not in the local Hugging Face cache")


def check_paths(cfg: RunConfig) -> None:
    """Filesystem checks the driver runs before Ray starts (``validate`` stays free of I/O).

    Checks ``model.name_or_path`` (``tiny``, a model directory with ``config.json``, or a hub id),
    ``model.tokenizer`` (``auto``, a directory, or a hub id), and that ``data.train``/``data.test``
    name existing files unless they are ``bundled`` or ``data.hub_name`` is set.

    Raises:
        ConfigError: naming the key, the value and the problem.
    """
    if cfg.model.name_or_path != "tiny":
        check_model_location("model.name_or_path", cfg.model.name_or_path, revision=cfg.model.revision)
    if cfg.model.tokenizer != "auto":
        check_model_location("model.tokenizer", cfg.model.tokenizer, need="")
    if cfg.data.hub_name is None:
        for split in ("train", "test"):
            location = getattr(cfg.data, split)
            if location == "bundled":
                continue
            path = Path(location).expanduser()
            if not path.exists():
                raise ConfigError(f"data.{split} {location!r}: no such file")
            if path.is_dir():
                raise ConfigError(f"data.{split} {location!r}: is a directory; name one .jsonl, .json or .parquet file")
