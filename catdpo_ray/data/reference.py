"""Reference log-probs as a cached Ray Data stage (ARCHITECTURE.md "Data flow").

The reference model never changes during a run, so its sequence log-probs (METHOD.md section 2)
are computed once per tokenized split, stored as columns, cached on disk under a fingerprint of
everything they depend on (``catdpo_ray.data.fingerprint``), and reused by every epoch, rerun and
Tune trial. Training workers then hold no reference model.

Columns added (float32 ``[N]``, exactly what the online path computes):

=========================  ==================================================================
``ref_chosen_logps``       log pi_ref(y_w | x): sum over response tokens
``ref_rejected_logps``     log pi_ref(y_l | x)
``ref_resp_chosen_logps``  B-DPO only: log pi_ref(y_w) scored without the prompt, after the
                           start token (:func:`~catdpo_ray.data.tokenize.response_start_id`)
``ref_resp_rejected_logps`` B-DPO only: same for y_l
=========================  ==================================================================

B-DPO's mutual information is then ``mutual_information(ref_chosen_logps,
ref_resp_chosen_logps, chosen_tokens)`` in the worker (METHOD.md section 5: computed once, with
the reference). LoRA runs score the base model: the adapter-disabled policy is the same function.

A cache miss is scored on a Ray Data actor pool, one actor per GPU, when the run trains on GPUs, and
in the driver process on CPUs (:func:`scoring_place`). Scoring uses the training loop's own pieces:
``load_causal_lm`` (training dtype and attention implementation), ``collate_pairs`` and
``sequence_logps``. Within a Ray batch pairs are scored in
length order (less padding); right padding never reaches a real token under the causal mask, so
a pair's numbers do not depend on its neighbours beyond float tolerance (tested).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from catdpo_ray.config import RunConfig
from catdpo_ray.data.fingerprint import (
    TOKENIZER_PATTERNS,
    WEIGHT_PATTERNS,
    UncacheableError,
    batch_row_keys,
    fingerprint,
    pairs_digest,
    read_entry,
    source_identity,
    write_entry,
)

#: Losses that use no reference model (METHOD.md section 3).
REFERENCE_FREE_LOSSES = frozenset({"simpo"})
REF_COLUMNS: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")
RESP_COLUMNS: tuple[str, ...] = ("ref_resp_chosen_logps", "ref_resp_rejected_logps")
ReferenceMode = Literal["precompute", "online", "none"]


def resolve_reference_mode(cfg: RunConfig) -> ReferenceMode:
    """``none`` for reference-free losses, else ``model.reference`` with ``auto`` -> ``precompute``."""
    if cfg.loss.name in REFERENCE_FREE_LOSSES:
        return "none"
    return "precompute" if cfg.model.reference == "auto" else cfg.model.reference  # type: ignore[return-value]


def reference_columns(cfg: RunConfig) -> tuple[str, ...]:
    """The columns the stage adds for this config (B-DPO adds its response-only terms)."""
    return REF_COLUMNS + (RESP_COLUMNS if cfg.loss.name == "bdpo" else ())


def default_reference_cache_dir(cfg: RunConfig) -> Path:
    """``model.reference_cache_dir``, else ``<model.cache_dir or $CATDPO_CACHE or ~/.cache/catdpo_ray>/reference_cache``."""
    if cfg.model.reference_cache_dir:
        return Path(cfg.model.reference_cache_dir).expanduser()
    from catdpo_ray.tiny import default_cache_dir

    base = Path(cfg.model.cache_dir).expanduser() if cfg.model.cache_dir else default_cache_dir()
    return base / "reference_cache"


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ReferenceScorer:
    """``Dataset.map_batches`` callable (numpy batches, actor pool): tokenized pairs ->
    ``row_key`` + the reference columns, for the rows of the batch in their order.

    Args:
        config: ``RunConfig.to_dict()`` (dtype, attention implementation, revision, loss).
        model_path: the reference weights (local directory or hub id); LoRA: the base model.
        tokenizer_path: the tokenizer that produced the ids (pad and start tokens).
        micro_batch_size: pairs per forward (``2 x micro_batch_size`` sequences).
        num_threads: torch CPU threads (``None``: the cores this process may use).
    """

    def __init__(self, config: dict[str, Any], model_path: str, tokenizer_path: str, *, micro_batch_size: int = 16,
                 num_threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        from catdpo_ray.config import from_dict
        from catdpo_ray.data.tokenize import response_start_id
        from catdpo_ray.train.modeling import load_causal_lm  # imports no DeepSpeed

        cfg = from_dict(config)
        self.device = torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or _usable_cores())
        tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # as the worker
        self.with_response_only = cfg.loss.name == "bdpo"
        self.start_id = response_start_id(tok) if self.with_response_only else None
        self.micro_batch_size = micro_batch_size
        self.model = load_causal_lm(cfg, model_path).to(self.device).eval()
        self.model.requires_grad_(False)

    def _logps(self, ids: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Exactly ``Models._logps`` of the worker: ``[2b, T]`` -> ``[2b]`` float32 sums."""
        from catdpo_ray.losses import sequence_logps

        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False).logits
        return sequence_logps(logits, ids.to(self.device), mask.to(self.device))[0].float().cpu()

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from catdpo_ray.data.tokenize import collate_pairs

        n = len(batch["chosen_start"])
        lengths = np.asarray([max(len(c), len(r)) for c, r in zip(batch["chosen_ids"], batch["rejected_ids"])])
        order = np.argsort(lengths, kind="stable")  # similar lengths share a micro-batch: less padding
        names = REF_COLUMNS + (RESP_COLUMNS if self.with_response_only else ())
        out = {name: np.zeros(n, dtype=np.float32) for name in names}
        for lo in range(0, n, self.micro_batch_size):
            idx = order[lo : lo + self.micro_batch_size]
            b = collate_pairs({k: v[idx] for k, v in batch.items()}, pad_id=self.pad_id, bos_id=self.start_id,
                              with_response_only=self.with_response_only)
            size = len(idx)
            ref = self._logps(b["input_ids"], b["attention_mask"], b["loss_mask"])
            out["ref_chosen_logps"][idx], out["ref_rejected_logps"][idx] = ref[:size].numpy(), ref[size:].numpy()
            if self.with_response_only:
                resp = self._logps(b["resp_input_ids"], b["resp_attention_mask"], b["resp_loss_mask"])
                out["ref_resp_chosen_logps"][idx], out["ref_resp_rejected_logps"][idx] = resp[:size].numpy(), resp[size:].numpy()
        return {"row_key": batch_row_keys(batch), **out}


def attach_reference(batch: Any, *, table: dict[str, np.ndarray], split_name: str) -> Any:
    """Append the reference columns to a pyarrow table or batch, looked up by
    row key in ``table`` (sorted ``row_key`` + columns). A row without an entry raises: a cache
    can never be joined to the wrong pairs, nor silently miss one."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from catdpo_ray.data.fingerprint import KEY_COLUMNS

    keys = batch_row_keys(BlockAccessor.for_block(batch.select(list(KEY_COLUMNS))).to_numpy())
    sorted_keys = table["row_key"]
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    bad = np.flatnonzero(sorted_keys[pos] != keys)
    if bad.size:
        raise KeyError(f"{split_name} split: {bad.size} of {len(keys)} rows have no reference log-probs "
                       f"(first row key {keys[bad[0]].decode()}); the reference table does not belong to these pairs")
    for name, values in table.items():
        if name != "row_key":
            batch = batch.append_column(name, pa.array(values[pos], type=pa.float32()))
    return batch


def table_row_keys(table: Any) -> np.ndarray:
    """Row keys of a tokenized ``pyarrow.Table``, in its order: ``[N]`` ``S32``."""
    from ray.data.block import BlockAccessor

    from catdpo_ray.data.fingerprint import KEY_COLUMNS

    if table.num_rows == 0:
        return np.zeros(0, dtype="S32")
    return batch_row_keys(BlockAccessor.for_block(table.select(list(KEY_COLUMNS))).to_numpy())


def dataset_row_keys(ds: Any) -> np.ndarray:
    """Row keys of a (materialised) tokenized Ray dataset, in its order: ``[N]`` ``S32``."""
    from catdpo_ray.data.tables import dataset_table

    return table_row_keys(dataset_table(ds))


def fingerprint_inputs(cfg: RunConfig, model_path: str, tokenizer_path: str, keys: np.ndarray, *,
                       memo: Path | None = None) -> dict[str, Any]:
    """Everything the reference columns depend on (module ``catdpo_ray.data.fingerprint``)."""
    import transformers

    tok_revision = cfg.model.revision if cfg.model.tokenizer == "auto" else None
    return {
        "model": source_identity(model_path, WEIGHT_PATTERNS, revision=cfg.model.revision, what="model", memo=memo),
        "tokenizer": source_identity(tokenizer_path, TOKENIZER_PATTERNS, revision=tok_revision, what="tokenizer",
                                     memo=memo),
        "pairs": pairs_digest(keys),
        "rows": len(keys),
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "prompt_template": cfg.data.prompt_template,
        "use_chat_template": cfg.data.use_chat_template,
        "precision": cfg.train.precision,
        "attn_implementation": cfg.model.attn_implementation,
        "columns": list(reference_columns(cfg)),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


#: Rows per scoring call: the batch of the actor pool's ``map_batches`` and the driver's chunk.
SCORE_BATCH_ROWS = 256


def scoring_place(cfg: RunConfig) -> Literal["driver", "actors"]:
    """Where a cache miss is scored: ``actors`` (a Ray Data pool, one actor per GPU) when the run
    trains on GPUs, else ``driver``: on CPUs the pool would be a single actor using every core of one
    node, which is what this process does without starting one more process that imports torch and
    transformers and loads the weights (6-10 s a stage on the 2-core test machine)."""
    return "actors" if cfg.scaling.use_gpu else "driver"


def score_in_driver(table: Any, cfg: RunConfig, model_path: str, tokenizer_path: str,
                    micro_batch_size: int) -> dict[str, np.ndarray]:
    """Run :class:`ReferenceScorer` here over ``table`` (``pyarrow.Table``), :data:`SCORE_BATCH_ROWS`
    rows at a time in the numpy batch format Ray Data hands an actor, with this process's torch threads.
    The weights are released when it returns."""
    from ray.data.block import BlockAccessor

    scorer = ReferenceScorer(cfg.to_dict(), model_path, tokenizer_path, micro_batch_size=micro_batch_size,
                             num_threads=torch.get_num_threads())
    parts = [scorer(BlockAccessor.for_block(table.slice(lo, SCORE_BATCH_ROWS)).to_batch_format("numpy"))
             for lo in range(0, table.num_rows, SCORE_BATCH_ROWS)]
    del scorer
    return _joined(parts, cfg)


def score_on_actors(table: Any, cfg: RunConfig, model_path: str, tokenizer_path: str,
                    micro_batch_size: int) -> dict[str, np.ndarray]:
    """Run :class:`ReferenceScorer` over ``table`` (``pyarrow.Table``, put in the object store as two
    blocks) on an actor pool; the small result comes to the driver."""
    import ray
    import ray.data

    from catdpo_ray.data.tables import to_dataset

    if cfg.scaling.use_gpu:  # one actor per GPU Ray can give us
        size = max(1, int(ray.cluster_resources().get("GPU", 0)))
        resources: dict[str, Any] = {"num_gpus": 1}
    else:  # one actor using every core of its node (scoring_place sends CPU runs to the driver)
        size, resources = 1, {"num_cpus": 1}
    scored = to_dataset(table, 2).map_batches(
        ReferenceScorer,
        fn_constructor_args=(cfg.to_dict(), model_path, tokenizer_path),
        fn_constructor_kwargs={"micro_batch_size": micro_batch_size},
        batch_size=SCORE_BATCH_ROWS, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
        ray_remote_args_fn=_no_restarts, **resources,
    )
    return _joined(list(scored.iter_batches(batch_size=None, batch_format="numpy")), cfg)


def _joined(parts: list[dict[str, np.ndarray]], cfg: RunConfig) -> dict[str, np.ndarray]:
    """Scored batches -> one column each, in the dtypes the cache stores."""
    if not parts:
        return {"row_key": np.zeros(0, dtype="S32"), **{c: np.zeros(0, dtype=np.float32) for c in reference_columns(cfg)}}
    # Arrow hands fixed-width byte keys back as an object array: restore the dtypes the cache stores.
    return {name: np.concatenate([p[name] for p in parts]).astype("S32" if name == "row_key" else np.float32)
            for name in parts[0]}


def _no_restarts() -> dict[str, Any]:
    """Remote args of each scoring actor: a failed stage fails the run at once (no restart caveat)."""
    return {"max_restarts": 0}


def add_reference_columns(ds: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """:func:`add_reference_table` for a materialised Ray dataset: its blocks come to this process in
    order and the result goes back as a dataset of as many blocks (``ds`` itself where no reference
    is precomputed). Returns ``(dataset, info)``."""
    from catdpo_ray.data.tables import dataset_table, to_dataset

    table, info = add_reference_table(dataset_table(ds), **kwargs)
    return (to_dataset(table, ds.num_blocks()) if info["mode"] == "precompute" else ds), info


def add_reference_table(table: Any, *, cfg: RunConfig, model_path: str, tokenizer_path: str, split_name: str,
                        cache_dir: str | Path | None = None, micro_batch_size: int = 16) -> tuple[Any, dict[str, Any]]:
    """Tokenized split (``pyarrow.Table``) -> the same rows, same order, plus the reference columns.

    A valid cache entry is read and no model is loaded; otherwise the stage scores the split (where
    :func:`scoring_place` says: a Ray Data actor pool on GPUs, this process on CPUs) and writes the
    entry (unless the weights cannot be identified: then it says so in ``info``). The columns are joined here, by row key (:func:`attach_reference`).

    Returns:
        ``(table, info)``; ``info``: ``mode``, ``split``, ``rows``, ``columns``, ``fingerprint``,
        ``entry``, ``hit`` (bool), ``reason`` (why it was (re)computed), ``scored_in`` (``driver``,
        ``actors``, or None on a hit), ``seconds``.
    """
    t0 = time.perf_counter()
    mode = resolve_reference_mode(cfg)
    info: dict[str, Any] = {"mode": mode, "split": split_name}
    if mode != "precompute":
        return table, {**info, "hit": False, "reason": f"model.reference resolves to {mode!r}", "seconds": 0.0}
    present = sorted(set(table.column_names) & set(REF_COLUMNS + RESP_COLUMNS))
    if present:
        raise ValueError(f"{split_name} split already has reference column(s) {present}: the reference stage "
                         "runs once per split (prepare_data already ran it unless model.reference=online)")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_reference_cache_dir(cfg)
    keys = table_row_keys(table)
    try:
        inputs = fingerprint_inputs(cfg, model_path, tokenizer_path, keys, memo=root / "file_hashes.json")
        key: str | None = fingerprint(inputs)
        ref, reason = read_entry(root, key, expected_rows=len(keys))
    except UncacheableError as err:
        key, ref, reason, inputs = None, None, f"not cached: {err}", {}
    if ref is not None and not np.array_equal(ref["row_key"], np.sort(keys)):
        ref, reason = None, f"corrupt entry {root / str(key)}: row keys differ from the split's pairs"
    hit = ref is not None
    place = None if hit else scoring_place(cfg)
    if ref is None:
        score = score_in_driver if place == "driver" else score_on_actors
        scored = score(table, cfg, model_path, tokenizer_path, micro_batch_size)
        order = np.argsort(scored["row_key"], kind="stable")
        ref = {name: col[order] for name, col in scored.items()}
        if not np.array_equal(ref["row_key"], np.sort(keys)):
            raise RuntimeError(f"{split_name} split: the reference stage returned other rows than it was given")
        if key is not None:
            write_entry(root, key, ref, inputs)
    out = attach_reference(table, table=ref, split_name=split_name)
    info.update(rows=len(keys), columns=list(reference_columns(cfg)), fingerprint=key,
                entry=str(root / key) if key else None, hit=hit, reason=reason, scored_in=place,
                seconds=round(time.perf_counter() - t0, 3))
    return out, info


__all__ = [
    "REFERENCE_FREE_LOSSES",
    "REF_COLUMNS",
    "RESP_COLUMNS",
    "ReferenceScorer",
    "add_reference_columns",
    "add_reference_table",
    "attach_reference",
    "dataset_row_keys",
    "default_reference_cache_dir",
    "fingerprint_inputs",
    "reference_columns",
    "resolve_reference_mode",
    "score_in_driver",
    "score_on_actors",
    "scoring_place",
    "table_row_keys",
]
