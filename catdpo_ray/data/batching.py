"""Micro-batches without short batches or padding waste (worker side; numpy and torch only).

The worker's data path, each piece optional after the first:

1. :class:`ExactMicroBatches` re-chunks Ray's numpy row-batches into micro-batches of exactly
   ``micro_batch_size`` rows. Ray's ``local_shuffle_buffer_size`` can emit short batches
   mid-stream (ray#66085); a short micro-batch's mean loss over-weights its pairs, an epoch falls
   short of its planned steps and the resume position (a count of micro-batches) drifts. Only the
   epoch's final remainder (< ``micro_batch_size`` rows) is dropped, and counted.
2. :func:`length_grouped` sorts the rows of each window of ``window`` micro-batches by length and
   permutes the resulting micro-batches with a seeded RNG: similar lengths share a micro-batch
   (less padding) while the number of micro-batches and a resume's skip arithmetic are unchanged.
3. :func:`collate_packed` packs a micro-batch's 2B chosen and rejected sequences into a few rows
   with ``position_ids`` restarting at 0 per sequence and *no* ``attention_mask``: transformers
   (>= 5, ``masking_utils.find_packed_sequence_indices``) then builds a block-diagonal causal mask
   for ``sdpa``/``eager``/``flex_attention``, and the flash-attention path derives ``cu_seqlens``
   from the position ids of a single row (``_is_packed_sequence`` requires batch size 1).
   :func:`packed_sequence_logps` returns the same per-sequence values as
   :func:`catdpo_ray.losses.sequence_logps` on the padded batch.
4. :func:`batch_token_counts` / :func:`padding_share`: real tokens vs. token slots of a collated
   micro-batch (padded or packed), for the step metrics.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from catdpo_ray.data.tokenize import collate_pairs
from catdpo_ray.losses import _LabelLogProb

NumpyBatch = dict[str, np.ndarray]

#: Attention implementations whose transformers mask/kernel path detects packed sequences from
#: ``position_ids`` when ``attention_mask`` is None, and whether they need everything in one row.
_PACKING_ONE_ROW: dict[str, bool] = {
    "sdpa": False, "eager": False, "flex_attention": False,
    "flash_attention_2": True, "flash_attention_3": True, "flash_attention_4": True,
}
#: Keys of :func:`collate_pairs` that :func:`collate_packed` replaces by the packed layout.
_PADDED_KEYS = ("input_ids", "attention_mask", "loss_mask")


# ---------------------------------------------------------------------------------------------
# 1. exact micro-batches


def _num_rows(batch: NumpyBatch) -> int:
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"ragged numpy batch: columns have row counts { {k: len(v) for k, v in batch.items()} }")
    return sizes.pop()


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Row-concatenate column pieces; a list column that Ray gave as 2-D in one batch and as an
    object array of 1-D arrays in another (equal vs. varying lengths) becomes an object array."""
    if len(parts) == 1:
        return parts[0]
    if len({(p.ndim, p.dtype == object) for p in parts}) == 1 and len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts)
    rows = [row for p in parts for row in p]
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):  # element-wise: slice assignment would broadcast equal-length rows
        out[i] = row
    return out


class ExactMicroBatches:
    """Iterable of numpy micro-batches of exactly ``micro_batch_size`` rows, in stream order.

    Args:
        batches: numpy row-batches of any sizes (e.g. ``shard.iter_batches(batch_format="numpy",
            local_shuffle_buffer_size=..., local_shuffle_seed=...)``).
        micro_batch_size: rows per micro-batch (> 0).

    After iteration ends, :attr:`micro_batches` is the number yielded and :attr:`dropped_rows` the
    epoch's final remainder (``total_rows % micro_batch_size``) that was dropped.
    """

    def __init__(self, batches: Iterable[NumpyBatch], micro_batch_size: int) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        self._batches = batches
        self.micro_batch_size = micro_batch_size
        self.micro_batches = 0
        self.dropped_rows = 0
        self._started = False

    def __iter__(self) -> Iterator[NumpyBatch]:
        if self._started:
            raise RuntimeError("ExactMicroBatches is single-pass: build a new one per epoch")
        self._started = True
        m = self.micro_batch_size
        pending: list[NumpyBatch] = []  # pieces not yet emitted, in order
        have = 0
        for batch in self._batches:
            n = _num_rows(batch)
            if n == 0:
                continue
            pending.append(batch)
            have += n
            while have >= m:
                out = self._cut(pending, m)
                pending, have = self._rest(pending, m, have)
                self.micro_batches += 1
                yield out
        self.dropped_rows = have

    @staticmethod
    def _cut(pending: list[NumpyBatch], m: int) -> NumpyBatch:
        """The first ``m`` rows of the pending pieces."""
        pieces, need = [], m
        for batch in pending:
            take = min(need, _num_rows(batch))
            pieces.append({k: v[:take] for k, v in batch.items()})
            need -= take
            if need == 0:
                break
        return {k: _concat([p[k] for p in pieces]) for k in pieces[0]}

    @staticmethod
    def _rest(pending: list[NumpyBatch], m: int, have: int) -> tuple[list[NumpyBatch], int]:
        """The pending pieces after removing the first ``m`` rows."""
        rest, drop = [], m
        for batch in pending:
            n = _num_rows(batch)
            if drop >= n:
                drop -= n
                continue
            rest.append({k: v[drop:] for k, v in batch.items()} if drop else batch)
            drop = 0
        return rest, have - m


# ---------------------------------------------------------------------------------------------
# 2. length grouping


def pair_lengths(batch: NumpyBatch) -> np.ndarray:
    """``[B]`` padded-length key of each pair: max(len(chosen_ids), len(rejected_ids))."""
    return np.asarray([max(len(c), len(r)) for c, r in zip(batch["chosen_ids"], batch["rejected_ids"])], dtype=np.int64)


def _group_window(window: list[NumpyBatch], m: int, rng: random.Random,
                  length_fn: Callable[[NumpyBatch], np.ndarray]) -> list[NumpyBatch]:
    rows = {k: _concat([b[k] for b in window]) for k in window[0]}
    order = np.argsort(length_fn(rows), kind="stable")  # ties keep stream order: deterministic
    chunks = [order[i * m : (i + 1) * m] for i in range(len(window))]
    rng.shuffle(chunks)  # otherwise every window would run short-to-long
    return [{k: v[idx] for k, v in rows.items()} for idx in chunks]


def length_grouped(micro_batches: Iterable[NumpyBatch], *, window: int, seed: int,
                   length_fn: Callable[[NumpyBatch], np.ndarray] = pair_lengths) -> Iterator[NumpyBatch]:
    """Regroup each window of ``window`` equal-size micro-batches by length (seeded, deterministic).

    The rows of micro-batches ``[jW, (j+1)W)`` are stably sorted by ``length_fn`` and cut into
    ``W`` micro-batches of the same size, which are shuffled with ``Random(hash of (seed, j))``; a
    last window with fewer than ``W`` micro-batches is handled the same way. Every input
    micro-batch yields exactly one output micro-batch, so step counts per rank are unchanged, and
    output ``i`` depends only on input window ``i // W``: a resume that skips ``N`` output
    micro-batches sees exactly the tail of the uninterrupted stream. ``window <= 1`` passes the
    stream through unchanged.
    """
    if window <= 1:
        yield from micro_batches
        return
    buf: list[NumpyBatch] = []
    index = 0
    for mb in micro_batches:
        buf.append(mb)
        if len(buf) == window:
            yield from _group_window(buf, _num_rows(buf[0]), random.Random(seed * 1_000_003 + index), length_fn)
            buf, index = [], index + 1
    if buf:
        yield from _group_window(buf, _num_rows(buf[0]), random.Random(seed * 1_000_003 + index), length_fn)


def micro_batch_stream(batches: Iterable[NumpyBatch], *, micro_batch_size: int, collate_fn: Callable[[NumpyBatch], Any],
                       skip: int = 0, length_window: int = 0, seed: int = 0) -> tuple[Iterator[Any], ExactMicroBatches]:
    """Exact micro-batches, length-grouped when ``length_window > 1``, the first ``skip`` dropped
    uncollated (the resume position), the rest collated.

    Returns:
        ``(iterator of collated micro-batches, the ExactMicroBatches)``; read its ``dropped_rows``
        once the iterator is exhausted.
    """
    exact = ExactMicroBatches(batches, micro_batch_size)
    grouped = length_grouped(exact, window=length_window, seed=seed)

    def gen() -> Iterator[Any]:
        for i, mb in enumerate(grouped):
            if i >= skip:
                yield collate_fn(mb)

    return gen(), exact


# ---------------------------------------------------------------------------------------------
# 3. padding share


def batch_token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(real tokens, token slots)`` of a collated micro-batch, padded or packed.

    Padded: ``attention_mask`` ``[2B, T]`` sums vs. ``2B * T``; packed: ``seq_index >= 0`` over
    ``[R, L]``. Summed over micro-batches and ranks, ``1 - real / slots`` is the step's padding share.
    """
    real = batch["seq_index"] >= 0 if "seq_index" in batch else batch["attention_mask"].bool()
    return int(real.sum()), real.numel()


def padding_share(batch: dict[str, torch.Tensor]) -> float:
    """Share of token slots that are padding in one collated micro-batch (0 = none)."""
    real, slots = batch_token_counts(batch)
    return 1.0 - real / slots if slots else 0.0


# ---------------------------------------------------------------------------------------------
# 4. padding-free packing


def _attn_implementation(model_or_config: Any) -> str | None:
    if isinstance(model_or_config, str) or model_or_config is None:
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "_attn_implementation", None)


def supports_packing(model_or_config: Any) -> bool:
    """Whether transformers isolates packed sequences for this attention implementation.

    Takes a model, its config or the implementation name. True for ``sdpa``, ``eager``,
    ``flex_attention`` (masking_utils builds the block-diagonal mask from ``position_ids``) and
    ``flash_attention_2/3/4`` (varlen kernel from ``position_ids``, one row only); False for any
    other (custom kernels, paged attention): the padded collate stays the fallback.
    """
    return _attn_implementation(model_or_config) in _PACKING_ONE_ROW


def packs_into_one_row(model_or_config: Any) -> bool:
    """Flash attention detects packing only at batch size 1: pack the micro-batch into one row."""
    return _PACKING_ONE_ROW.get(_attn_implementation(model_or_config) or "", False)


def _first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices per row: first-fit in decreasing length (ties by index; deterministic)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(batch: NumpyBatch, *, pad_id: int, one_row: bool = False, row_tokens: int = 0, multiple: int = 8,
                   bos_id: int | None = None, with_response_only: bool = False) -> dict[str, torch.Tensor]:
    """Pack a micro-batch's chosen and rejected sequences into rows without cross-attention.

    Sequence ``s`` (``0..B-1`` chosen, ``B..2B-1`` rejected, as in :func:`collate_pairs`) occupies
    consecutive slots of one row with ``position_ids`` ``0..len-1``. Rows hold at most
    ``max(row_tokens, longest sequence)`` tokens (first-fit decreasing; the default 0 = the longest
    sequence, so a row's attention, quadratic in its length under sdpa/eager masks, never costs
    more than a padded row's), or everything goes into one row (``one_row``: flash attention, whose
    varlen kernel skips across-sequence work and needs batch size 1). Rows are padded to a
    common length (a multiple of ``multiple``); the padding is its own position-0 segment.
    The model must be called with ``input_ids`` and ``position_ids`` and **no** ``attention_mask``
    (a 2-D mask disables transformers' packed-sequence detection) and ``use_cache=False``.

    Returns:
        ``input_ids``, ``position_ids``, ``loss_mask`` (1 on scored response tokens, never on a
        sequence's first token) and ``seq_index`` (sequence of each slot, -1 on padding), all
        ``[R, L]`` int64; ``seq_lengths`` ``[2B]``; plus every non-token key of
        :func:`collate_pairs` (``safety_gap``, ``category_mask``, ..., the padded ``resp_*``).
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in [*batch["chosen_ids"], *batch["rejected_ids"]]]
    starts = [int(s) for s in [*batch["chosen_start"], *batch["rejected_start"]]]
    lengths = [len(s) for s in seqs]
    rows = [list(range(len(seqs)))] if one_row else _first_fit_rows(lengths, max(row_tokens, *lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    seq_index = torch.full_like(ids, -1)
    for r, row in enumerate(rows):
        off = 0
        for i in sorted(row):  # stream order within a row: the layout is a pure function of the batch
            n = lengths[i]
            ids[r, off : off + n] = torch.from_numpy(seqs[i])
            pos[r, off : off + n] = torch.arange(n)
            # Position 0 is never scored (nothing predicts it), as sequence_logps skips column 0.
            loss_mask[r, off + max(starts[i], 1) : off + n] = 1
            seq_index[r, off : off + n] = i
            off += n
        pos[r, off:] = torch.arange(width - off)  # padding: a separate segment restarting at 0
    rest = collate_pairs(batch, pad_id=pad_id, bos_id=bos_id, with_response_only=with_response_only, multiple=1)
    out = {k: v for k, v in rest.items() if k not in _PADDED_KEYS}
    out.update(input_ids=ids, position_ids=pos, loss_mask=loss_mask, seq_index=seq_index,
               seq_lengths=torch.tensor(lengths, dtype=torch.long))
    return out


def packed_sequence_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence response log-probs and token counts from packed logits.

    Same quantity as :func:`catdpo_ray.losses.sequence_logps` on the padded batch (METHOD.md
    section 2): ``logits[r, t]`` predicts ``input_ids[r, t + 1]``, scored iff ``loss_mask[r, t + 1]``
    (which is 0 at every sequence start, so no logit predicts across a boundary), summed per
    ``seq_index``. Computed in float32 (float64 stays float64) without a full log-softmax copy.

    Args:
        logits: ``[R, L, V]`` from ``model(input_ids, position_ids=..., use_cache=False)``.
        batch: :func:`collate_packed` output (``input_ids``, ``loss_mask``, ``seq_index``,
            ``seq_lengths`` ``[2B]``).

    Returns:
        ``(logps, token_counts)``, both ``[2B]``.
    """
    ids, mask, seq = batch["input_ids"], batch["loss_mask"][:, 1:].bool(), batch["seq_index"][:, 1:]
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} [R,L,V] vs input_ids {tuple(ids.shape)} [R,L]")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    labels = torch.where(mask, ids[:, 1:], torch.zeros_like(ids[:, 1:]))
    token = _LabelLogProb.apply(logits[:, :-1], labels, dtype)  # [R, L-1]
    token = torch.where(mask, token, torch.zeros((), dtype=dtype, device=logits.device))
    n = batch["seq_lengths"].shape[0]
    index = seq.clamp(min=0).reshape(-1)  # padding slots carry 0 and are masked to 0 above
    logps = torch.zeros(n, dtype=dtype, device=logits.device).index_add(0, index, token.reshape(-1))
    counts = torch.zeros(n, dtype=dtype, device=logits.device).index_add(0, index, mask.reshape(-1).to(dtype))
    return logps, counts


def packed_forward_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on a packed batch (no attention mask, no cache) and score it: ``[2B]`` each."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return packed_sequence_logps(logits, batch)


__all__ = [
    "ExactMicroBatches",
    "batch_token_counts",
    "collate_packed",
    "length_grouped",
    "micro_batch_stream",
    "packed_forward_logps",
    "packed_sequence_logps",
    "packs_into_one_row",
    "padding_share",
    "pair_lengths",
    "supports_packing",
]
