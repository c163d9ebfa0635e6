"""Nested dicts and dotted ``key=value`` overrides into the config dataclasses, checked by annotation.

:mod:`catdpo_ray.config` declares the sections; this module turns YAML-loaded dicts into them: every
value is checked against its field's annotation (``Literal`` choices, unions, lists, mappings, numbers
that PyYAML reads as strings), and an unknown, removed or mistyped key fails with its dotted name.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem, with the offending dotted key in the message."""


#: Keys that existed once and were removed, with what to do instead (old config.yaml files).
REMOVED_KEYS: dict[str, str] = {
    "scaling.data_cpus": "it was never read (Ray Data sizes its own CPU use); delete it",
}



def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["section.key=value", ...]`` -> ``{"section.key": value}``, each value read as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, _, text = item.partition("=")
        out[key.strip()] = yaml.safe_load(text) if text.strip() != "" else None
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set an existing dotted key of the nested dict ``raw``; an unknown section or key is refused."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            where = ".".join(parts[: i + 1])
            valid = sorted(k for k, v in node.items() if isinstance(v, dict)) if isinstance(node, dict) else []
            raise ConfigError(f"unknown config section {where!r}; valid sections here: {valid}")
        node = node[part]
    last = parts[-1]
    if last not in node:
        _refuse_removed(key)
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
    node[last] = value


def _refuse_removed(key: str) -> None:
    """A removed key gets its own message (an old ``config.yaml`` may still hold it)."""
    if key in REMOVED_KEYS:
        raise ConfigError(f"config key {key!r} was removed: {REMOVED_KEYS[key]}")


def _type_name(tp: Any) -> str:
    """An annotation as the error messages name it."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float where needed)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return build_dataclass(tp, value, key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices or (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, arm, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(f"{key} key", kt, k): _coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads "1e-6" (no dot) as a string: accept it as the number it is
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover


def build_dataclass(cls: Any, raw: dict[str, Any], prefix: str = "") -> Any:
    """``raw`` (nested dict) -> ``cls(**...)``, every value checked against its annotation; unknown and
    removed keys are refused by their dotted name (``prefix`` + key)."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    for name in unknown:
        _refuse_removed(prefix + name)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in raw.items()}
    return cls(**kwargs)


def apply_overrides(base: dict[str, Any], overrides: list[str] | dict[str, Any]) -> None:
    """Apply overrides to the nested dict ``base`` in place: ``["section.key=value", ...]`` (values read
    as YAML) or ``{"section.key": value}``."""
    pairs = _parse_overrides(overrides) if isinstance(overrides, list) else overrides
    for key, value in pairs.items():
        _set_dotted(base, key, value)


__all__ = ["REMOVED_KEYS", "ConfigError", "apply_overrides", "build_dataclass"]
