"""Tokenization (a Ray Data ``map_batches`` stage) and the padding collate (worker side).

Tokenized pair columns (one row per pair):

=================  ==========  =====================================================
column             type        meaning
=================  ==========  =====================================================
``chosen_ids``     list[int]   prompt tokens + chosen response tokens + eos
``chosen_start``   int         index of the first response token in ``chosen_ids``
``rejected_ids``   list[int]   same for the rejected response
``rejected_start`` int
``safety_gap``     int         g in {0, 1}
``categories``     list[int]   multi-hot over the run's K categories
``chosen_safe``    int         1 if the chosen response is safe
``rejected_safe``  int
``truncated``      int         1 if the prompt or a response was cut
=================  ==========  =====================================================

The prompt is truncated from the left (keeping its end, where the question usually is) to
``max_prompt_length``; each response is then cut to fit ``max_length``. Truncation is counted
(column ``truncated``) and reported by the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TOKENIZED_COLUMNS: tuple[str, ...] = (
    "chosen_ids",
    "chosen_start",
    "rejected_ids",
    "rejected_start",
    "safety_gap",
    "categories",
    "chosen_safe",
    "rejected_safe",
    "truncated",
)


def format_prompt(tokenizer: Any, prompt: str, *, template: str, use_chat_template: bool) -> str:
    """The prompt text the model sees (chat template for instruct models, else ``template``)."""
    if use_chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return template.format(prompt=prompt)


def encode_prompt(tokenizer: Any, text: str, *, use_chat_template: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    # Chat templates carry their own BOS; plain templates get the model's BOS prepended.
    if not use_chat_template and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def encode_response(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


class PairTokenizer:
    """Callable for ``Dataset.map_batches``: pair records (numpy batch) -> tokenized columns."""

    def __init__(
        self,
        tokenizer_path: str,
        *,
        prompt_template: str,
        use_chat_template: bool,
        max_length: int,
        max_prompt_length: int,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.template = prompt_template
        self.use_chat_template = use_chat_template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

    def encode_pair(self, prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
        text = format_prompt(self.tokenizer, prompt, template=self.template, use_chat_template=self.use_chat_template)
        p = encode_prompt(self.tokenizer, text, use_chat_template=self.use_chat_template)
        truncated = len(p) > self.max_prompt_length
        if truncated:
            p = p[-self.max_prompt_length :]
        budget = self.max_length - len(p)
        out: dict[str, Any] = {"truncated": 0}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            r = encode_response(self.tokenizer, response)
            if len(r) > budget:
                r, truncated = r[:budget], True
            out[f"{side}_ids"] = np.asarray(p + r, dtype=np.int32)
            out[f"{side}_start"] = len(p)
        out["truncated"] = int(truncated)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [self.encode_pair(p, c, r) for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        out: dict[str, Any] = {
            name: [row[name] for row in rows] for name in ("chosen_ids", "rejected_ids")
        }
        for name in ("chosen_start", "rejected_start", "truncated"):
            out[name] = np.asarray([row[name] for row in rows], dtype=np.int64)
        out["safety_gap"] = np.asarray(batch["safety_gap"], dtype=np.int64)
        out["categories"] = [np.asarray(c, dtype=np.int8) for c in batch["categories"]]
        out["chosen_safe"] = np.asarray(batch["chosen_safe"], dtype=np.int64)
        out["rejected_safe"] = np.asarray(batch["rejected_safe"], dtype=np.int64)
        if "split" in batch:  # passed through so several splits can share one tokenization pass
            out["split"] = np.asarray(batch["split"], dtype=np.int8)
        return out


#: One PairTokenizer per worker process, keyed by its settings and the tokenizer files' stamps.
_TOKENIZERS: dict[tuple[Any, ...], PairTokenizer] = {}


def _files_stamp(path: str) -> tuple[Any, ...]:
    """(name, size, mtime) of the files of a local tokenizer directory: a rebuilt tokenizer is reloaded."""
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        return (path,)  # a hub id: its files are not ours to stamp
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.iterdir() if f.is_file()))


def tokenize_pairs(batch: dict[str, np.ndarray], **settings: Any) -> dict[str, Any]:
    """:class:`PairTokenizer` ``(**settings)`` applied to ``batch`` (numpy columns; also usable as a
    ``map_batches`` function).

    The tokenizer a process loaded is kept for the next call with the same settings and unchanged
    files, so repeated data preparations in one process (sweeps, tests, benchmarks) load it once.
    """
    key = (tuple(sorted(settings.items())), _files_stamp(str(settings["tokenizer_path"])))
    tok = _TOKENIZERS.get(key)
    if tok is None:
        _TOKENIZERS.clear()  # at most one tokenizer per process
        tok = _TOKENIZERS[key] = PairTokenizer(**settings)
    return tok(batch)


def _pad(seqs: list[np.ndarray], pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    length = -(-length // multiple) * multiple
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(np.array(s, dtype=np.int64))
        attn[i, : len(s)] = 1
    return ids, attn


def response_start_id(tokenizer: Any) -> int:
    """The start token of B-DPO's response-only pass: the tokenizer's BOS, else its EOS.

    Models without a BOS (Qwen, GPT-2 style) separate documents with EOS during pre-training, so
    ``p(y_1 | EOS)`` is the model's own estimate of the unconditional ``p(y_1)``; every response
    token is then scored in both mutual-information terms (METHOD.md section 5). Raises
    ``ValueError`` for a tokenizer with neither.
    """
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a BOS nor an EOS token: "
                     "B-DPO's response-only pass needs a start token")


#: Batch columns starting with this prefix (precomputed reference log-probs, ``data/reference.py``)
#: are passed through :func:`collate_pairs` as float32 tensors ``[B]``.
REFERENCE_PREFIX = "ref_"


def collate_pairs(
    batch: dict[str, Any], *, pad_id: int, bos_id: int | None = None, with_response_only: bool = False, multiple: int = 8
) -> dict[str, torch.Tensor]:
    """Pad a batch of tokenized pairs into one concatenated chosen+rejected batch.

    B-DPO's response-only pass is ``[bos_id] + response``: ``bos_id`` is the *start token*, the
    tokenizer's BOS or, without one, its EOS (:func:`response_start_id`). It is required there:
    without a start token the first response token ``y_1`` has no position to be predicted from,
    so ``log p(y)`` would miss ``log p(y_1)`` while ``log p(y|x)`` keeps ``log p(y_1|x)``, biasing
    ``I(x; y)`` by ``log p(y_1|x) / |y|``. With it, both terms score the same ``|y|`` tokens.

    Returns:
        ``input_ids``/``attention_mask``/``loss_mask``: ``[2B, T]``, rows ``0..B-1`` chosen and
        ``B..2B-1`` rejected; ``loss_mask`` is 1 on response tokens. ``safety_gap`` ``[B]``,
        ``category_mask`` ``[B, K]`` bool, ``chosen_safe``/``rejected_safe`` ``[B]``. With
        ``with_response_only`` also ``resp_input_ids``/``resp_attention_mask``/``resp_loss_mask``
        ``[2B, T']``: start token + response without the prompt (B-DPO's second mutual-information
        term). Every ``ref_*`` column of ``batch`` (precomputed reference log-probs) as float32 ``[B]``.
    """
    seqs = list(batch["chosen_ids"]) + list(batch["rejected_ids"])
    starts = np.concatenate([np.asarray(batch["chosen_start"]), np.asarray(batch["rejected_start"])])
    ids, attn = _pad(seqs, pad_id, multiple)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    loss_mask = (positions >= torch.as_tensor(starts, dtype=torch.long).unsqueeze(1)) & attn.bool()
    out = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask.long(),
        "safety_gap": torch.from_numpy(np.array(batch["safety_gap"], dtype=np.int64)),
        "category_mask": torch.from_numpy(np.stack([np.asarray(c) for c in batch["categories"]]).astype(bool)),
        "chosen_safe": torch.from_numpy(np.array(batch["chosen_safe"], dtype=np.int64)),
        "rejected_safe": torch.from_numpy(np.array(batch["rejected_safe"], dtype=np.int64)),
    }
    for name, column in batch.items():
        if name.startswith(REFERENCE_PREFIX):
            out[name] = torch.from_numpy(np.asarray(column, dtype=np.float32).copy())
    if with_response_only:
        if bos_id is None:
            raise ValueError("collate_pairs(with_response_only=True) needs a start token: pass "
                             "bos_id=response_start_id(tokenizer) (the EOS for tokenizers without a BOS)")
        resp = [np.asarray([bos_id, *np.asarray(s)[int(st) :].tolist()], dtype=np.int64) for s, st in zip(seqs, starts)]
        r_ids, r_attn = _pad(resp, pad_id, multiple)
        r_mask = r_attn.clone()
        r_mask[:, 0] = 0  # the start token is context, never scored
        out.update({"resp_input_ids": r_ids, "resp_attention_mask": r_attn, "resp_loss_mask": r_mask})
    return out


class PairCollate:
    """:func:`collate_pairs` as a picklable callable for ``iter_torch_batches(collate_fn=...)``.

    Subclasses Ray's ``NumpyBatchCollateFn`` when Ray is importable (the non-deprecated form);
    the class itself only needs numpy and torch.
    """

    def __init__(self, *, pad_id: int, bos_id: int | None = None, with_response_only: bool = False) -> None:
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.with_response_only = with_response_only

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return collate_pairs(batch, pad_id=self.pad_id, bos_id=self.bos_id, with_response_only=self.with_response_only)


def ray_collate(*, pad_id: int, bos_id: int | None = None, with_response_only: bool = False) -> Any:
    """A Ray ``NumpyBatchCollateFn`` wrapping :class:`PairCollate` (imports Ray; worker side)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _RayPairCollate(NumpyBatchCollateFn):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.inner = PairCollate(pad_id=pad_id, bos_id=bos_id, with_response_only=with_response_only)

        def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return self.inner(batch)

    return _RayPairCollate()
