"""The valid range of every numeric config key, checked at load time (before Ray starts).

:func:`catdpo_ray.config.validate` runs :func:`check_ranges` first; ``catdpo-ray config
--reference`` prints each range beside its key (:mod:`catdpo_ray.config_docs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args, get_type_hints

from catdpo_ray.config import ConfigError

if TYPE_CHECKING:
    from catdpo_ray.config import RunConfig


@dataclass(frozen=True)
class Bound:
    """The valid range of one numeric key: ``lo`` / ``hi`` inclusive unless ``*_open``; ``None``
    = unbounded on that side. Values must also be finite (YAML's ``.inf``/``.nan`` are refused)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    #: Why the range is what it is, appended to the message when not obvious.
    why: str = ""

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1]``, ``in (0, 1]``, ``in [0, 0.5)``."""
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"{'<' if self.hi_open else '<='} {hi}"


def _num(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


_UNIT = Bound(0.0, 1.0)
_POSITIVE = Bound(0.0, lo_open=True)
_NON_NEGATIVE = Bound(0.0)
_AT_LEAST_ONE = Bound(1.0)

#: The valid range of every numeric key, checked at load time (before Ray starts). A key that is
#: nullable (``int | None``) may also be ``null``; list values are checked element by element.
#: Every int/float key of :class:`RunConfig` must be here or in :data:`UNBOUNDED_KEYS` (tested).
RANGES: dict[str, Bound] = {
    "model.lora.r": _AT_LEAST_ONE,
    "model.lora.alpha": _AT_LEAST_ONE,
    "model.lora.dropout": Bound(0.0, 1.0, hi_open=True),
    "data.max_length": Bound(2.0, why="it must exceed data.max_prompt_length >= 1"),
    "data.max_prompt_length": _AT_LEAST_ONE,
    "data.max_train_rows": _AT_LEAST_ONE,
    "data.max_test_rows": _AT_LEAST_ONE,
    "loss.beta": _POSITIVE,
    "loss.label_smoothing": Bound(0.0, 0.5, hi_open=True, why="at 0.5 the conservative DPO loss ignores the labels"),
    "loss.delta": _NON_NEGATIVE,
    "loss.simpo_gamma": _NON_NEGATIVE,
    "loss.bdpo_tau": _POSITIVE,
    "dual.eta": _NON_NEGATIVE,
    "dual.epsilon": Bound(0.0, 1.0, why="a violation rate"),
    "dual.lambda_max": _POSITIVE,
    "dual.update_every": _AT_LEAST_ONE,
    "dual.check_every": _AT_LEAST_ONE,
    # The on-policy keys are also checked in DualConfig.__post_init__ (same messages).
    "dual.generation_every": _AT_LEAST_ONE,
    "dual.generation_prompts_per_category": _AT_LEAST_ONE,
    "dual.generation_pool_per_category": _AT_LEAST_ONE,
    "dual.generation_max_new_tokens": _AT_LEAST_ONE,
    "dual.generation_temperature": _NON_NEGATIVE,
    "dual.generation_batch_size": _AT_LEAST_ONE,
    "dual.blend_weight": _UNIT,
    "train.seed": Bound(0.0, why="numpy and Ray Data shuffles take non-negative seeds"),
    "train.shuffle_buffer": _AT_LEAST_ONE,
    "train.length_grouping": Bound(0.0, why="0 = off"),
    "train.epochs": _AT_LEAST_ONE,
    "train.max_steps": _AT_LEAST_ONE,
    "train.micro_batch_size": _AT_LEAST_ONE,
    "train.grad_accum": _AT_LEAST_ONE,
    # lr = 0 is allowed on purpose: a frozen-weights run isolates the data order in tests.
    "train.lr": _NON_NEGATIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.warmup_ratio": _UNIT,
    "train.min_lr_ratio": _UNIT,
    "train.grad_clip": Bound(0.0, why="0 = no clipping"),
    "train.log_every": _AT_LEAST_ONE,
    "train.eval_every": Bound(0.0, why="0 = only at the end"),
    "train.checkpoint_every": Bound(0.0, why="0 = only at the end"),
    "train.stop_after_step": _AT_LEAST_ONE,
    "scaling.num_workers": Bound(0.0, why="0 = Ray Train local mode"),
    "scaling.cpus_per_worker": _POSITIVE,
    "output.num_checkpoints_to_keep": _AT_LEAST_ONE,
    "output.max_failures": Bound(-1.0, why="-1 = retry without limit, as in Ray's FailureConfig"),
    "eval.max_new_tokens": _AT_LEAST_ONE,
    "eval.temperature": Bound(0.0, why="0 = greedy decoding"),
    "eval.top_p": Bound(0.0, 1.0, lo_open=True),
    "eval.batch_size": _AT_LEAST_ONE,
    "eval.max_prompts_per_category": _AT_LEAST_ONE,
    "eval.llm_timeout_s": _POSITIVE,
    "eval.num_actors": Bound(0.0, why="0 = max(1, scaling.num_workers)"),
    "eval.num_gpus_per_actor": Bound(0.0, why="fractions share a GPU"),
    "tune.eta": _NON_NEGATIVE,
    "tune.epsilon": Bound(0.0, 1.0, why="a violation rate"),
    "tune.num_samples": _AT_LEAST_ONE,
    "tune.asha_grace_period": _AT_LEAST_ONE,
    "tune.helpfulness_floor": Bound(0.0, 100.0, why="a percentage"),
    "tune.max_concurrent": Bound(0.0, why="0 = derive from the cluster"),
}

#: Numeric keys with no range to check (any finite value is meaningful).
UNBOUNDED_KEYS: frozenset[str] = frozenset({"eval.classifier_threshold"})

def _get_dotted(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _nullable(cfg: Any, key: str) -> bool:
    *sections, last = key.split(".")
    owner = _get_dotted(cfg, ".".join(sections)) if sections else cfg
    return type(None) in get_args(get_type_hints(type(owner))[last])


def check_ranges(cfg: RunConfig) -> None:
    """Every key of :data:`RANGES` holds a value in its range (or ``null`` where allowed).

    Raises:
        ConfigError: ``"<key>: must be <range>[ or null] (<why>), got <value>"``; a list names
            the element, e.g. ``dual.epsilon[2]``.
    """
    for key, bound in RANGES.items():
        value = _get_dotted(cfg, key)
        if value is None:
            continue  # the type check admitted None: the key is nullable
        values = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, v in values:
            if bound.contains(float(v)):
                continue
            where = key if index is None else f"{key}[{index}]"
            null = " or null" if _nullable(cfg, key) else ""
            why = f" ({bound.why})" if bound.why else ""
            finite = "" if math.isfinite(float(v)) else "a finite number "
            raise ConfigError(f"{where}: must be {finite}{bound.describe()}{null}{why}, got {v!r}")
