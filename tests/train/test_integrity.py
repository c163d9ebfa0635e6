"""Checkpoint manifests and safe loading on real DeepSpeed checkpoints of the tiny model.

One 1-rank gloo DeepSpeed engine per ZeRO stage (2 and 3) takes one AdamW step and saves the
way ``worker._checkpoint`` does (``save_checkpoint(tag="ckpt")`` + ``catdpo_state.json``); each
damage case works on a copy: truncation, a same-size byte flip, a missing rank manifest,
another run's checkpoint, an unlisted file. ``weights_only=True`` loading is checked by loading
the checkpoint back into the engine, and a planted pickle by loading it in place of the model file.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from catdpo_ray.train.integrity import (
    UnsafeCheckpointError,
    choose_checkpoint,
    manifest_name,
    safe_torch_load,
    verify_checkpoint,
    write_manifest,
)

RUN = "catdpo-20261130-000000-abcd"


class _Planted:
    """A pickle payload: unpickling it with weights_only=False creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _engine(model_dir: str, stage: int) -> tuple[Any, Any]:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from catdpo_ray.config import load_config
    from catdpo_ray.train.ds_config import build_ds_config, lr_multiplier

    cfg = load_config(None, [f"train.zero_stage={stage}", "scaling.num_workers=0", "train.micro_batch_size=2"])
    deepspeed.init_distributed(dist_backend="gloo")
    ds = build_ds_config(cfg, world_size=1)
    keep = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # zero.Init while loading, as worker.Models does
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = partial(lr_multiplier, total_steps=10, warmup_ratio=0.1, schedule="cosine", min_ratio=0.1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-3),
                                      lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule), config=ds)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    return engine, keep


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def saved(request: pytest.FixtureRequest, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A live engine and its saved, manifested checkpoint (written as worker._checkpoint does)."""
    from catdpo_ray.train.localgroup import init_local_group, release_local_group

    init_local_group()
    try:
        engine, keep = _engine(tiny_model_dir, request.param)
        ckpt = tmp_path_factory.mktemp(f"ckpt_z{request.param}") / "checkpoint_000001"
        engine.save_checkpoint(str(ckpt), tag="ckpt", client_state={"catdpo_step": 1})
        (ckpt / "catdpo_state.json").write_text(json.dumps({"step": 1}))
        t0 = time.perf_counter()
        write_manifest(ckpt, run_id=RUN, step=1, extra={"tag": "ckpt"})
        write_s = time.perf_counter() - t0
        yield {"engine": engine, "dir": ckpt, "stage": request.param, "write_s": write_s, "keep": keep}
    finally:
        release_local_group()


def _local_weights(engine: Any) -> list[torch.Tensor]:
    """This rank's weights: the ZeRO-3 partitions (``ds_tensor``; the module's tensors are empty
    placeholders there), else the module's parameters."""
    return [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach() for p in engine.module.parameters()]


def _copy(src: Path, tmp: Path, name: str = "checkpoint_000001") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def _optim_file(d: Path) -> Path:
    (f,) = sorted((d / "ckpt").glob("*optim_states.pt"))
    return f


def test_manifest_lists_every_file_and_verifies(saved: dict[str, Any]) -> None:
    d = saved["dir"]
    manifest = json.loads((d / manifest_name(0)).read_text())
    expected = {"catdpo_state.json", "latest", "zero_to_fp32.py", "zero_to_torch.py", "ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "ckpt/mp_rank_00_model_states.pt" if saved["stage"] == 2 else "ckpt/zero_pp_rank_0_mp_rank_00_model_states.pt"}
    assert set(manifest["files"]) == expected
    assert manifest["files"]["catdpo_state.json"]["size"] == len(json.dumps({"step": 1}))
    assert (manifest["run_id"], manifest["step"], manifest["world_size"]) == (RUN, 1, 1)
    t0 = time.perf_counter()
    res = verify_checkpoint(d, run_id=RUN)
    verify_s = time.perf_counter() - t0
    assert res.ok, res.reason
    assert (res.step, res.files) == (1, 6) and res.bytes == sum(m["size"] for m in manifest["files"].values())
    print(f"\nZeRO-{saved['stage']}: {res.bytes / 2**20:.1f} MiB, write_manifest {saved['write_s']:.3f}s, "
          f"verify {verify_s:.3f}s ({res.bytes / 2**20 / verify_s:.0f} MiB/s)")


def test_truncated_optimizer_file_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(saved["dir"], tmp_path)
    f = _optim_file(d)
    size = f.stat().st_size
    with f.open("r+b") as fh:
        fh.truncate(size // 2)
    res = verify_checkpoint(d, run_id=RUN)
    assert not res.ok
    assert res.reason == (f"{f}: size mismatch ({size // 2} bytes, manifest says {size}): truncated or replaced")


def test_same_size_byte_flip_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(saved["dir"], tmp_path)
    f = _optim_file(d)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    res = verify_checkpoint(d, run_id=RUN)
    assert not res.ok and res.reason.startswith(f"{f}: hash mismatch (sha256 ")
    assert res.reason.endswith("the bytes changed after saving")


def test_missing_rank_manifest_other_run_unlisted_and_no_manifest(saved: dict[str, Any], tmp_path: Path) -> None:
    two = _copy(saved["dir"], tmp_path, "two_ranks")
    write_manifest(two, run_id=RUN, step=1, rank=0, world_size=2)  # rank 1 never finished its save
    res = verify_checkpoint(two, run_id=RUN)
    assert res.reason == (f"{two}: manifest missing for rank(s) [1] of world size 2 (catdpo_manifest.rank1.json): "
                          "that rank's save did not finish")
    other = verify_checkpoint(saved["dir"], run_id="someone-else")
    assert other.reason == (f"{saved['dir']}: not this run's checkpoint (it belongs to run {RUN!r}, this run is "
                            "'someone-else'); refusing to load it")
    extra = _copy(saved["dir"], tmp_path, "extra")
    (extra / "ckpt" / "planted.pt").write_bytes(b"x")
    assert verify_checkpoint(extra, run_id=RUN).reason == (
        f"{extra / 'ckpt' / 'planted.pt'}: file not in any manifest (1 unlisted); the checkpoint was changed after it was saved")
    bare = _copy(saved["dir"], tmp_path, "bare")
    (bare / manifest_name(0)).unlink()
    assert verify_checkpoint(bare, run_id=RUN).reason == (
        f"{bare}: manifest missing (catdpo_manifest.rank<k>.json): not a complete catdpo checkpoint")
    missing = _copy(saved["dir"], tmp_path, "missing")
    (missing / "catdpo_state.json").unlink()
    assert verify_checkpoint(missing, run_id=RUN).reason == (
        f"{missing / 'catdpo_state.json'}: file missing (listed in catdpo_manifest.rank0.json)")


def test_two_rank_manifests_verify_per_rank(saved: dict[str, Any], tmp_path: Path) -> None:
    """Ray merges per-rank directories: each rank's manifest lists only its own files."""
    d = _copy(saved["dir"], tmp_path)
    (d / manifest_name(0)).unlink()
    rank1 = ["ckpt/" + _optim_file(d).name]
    write_manifest(d, run_id=RUN, step=1, rank=1, world_size=2, files=rank1)
    rank0 = [r for r in json.loads((saved["dir"] / manifest_name(0)).read_text())["files"] if r not in rank1]
    write_manifest(d, run_id=RUN, step=1, rank=0, world_size=2, files=rank0)
    assert verify_checkpoint(d, run_id=RUN).ok
    f = _optim_file(d)
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    assert verify_checkpoint(d, run_id=RUN, ranks=[0]).ok  # rank 0 hashes only its own files
    assert "hash mismatch" in verify_checkpoint(d, run_id=RUN, ranks=[1]).reason


def test_choose_checkpoint_falls_back_to_newest_good(saved: dict[str, Any], tmp_path: Path) -> None:
    good = _copy(saved["dir"], tmp_path, "checkpoint_000001")
    bad = _copy(saved["dir"], tmp_path, "checkpoint_000002")
    with _optim_file(bad).open("r+b") as fh:
        fh.truncate(10)
    chosen, rejected = choose_checkpoint([bad, tmp_path / "checkpoint_000003", good], RUN)
    assert chosen == good
    assert [(p.name, r.split(": ")[1].split(" (")[0]) for p, r in rejected] == [
        ("checkpoint_000002", "size mismatch"), ("checkpoint_000003", "checkpoint directory missing")]
    assert choose_checkpoint([bad], RUN)[0] is None


def test_loads_with_weights_only_and_refuses_planted_pickle(saved: dict[str, Any], tmp_path: Path) -> None:
    engine = saved["engine"]
    before = [w.clone() for w in _local_weights(engine)]
    with torch.no_grad():
        for w in _local_weights(engine):
            w.add_(1.0)  # visibly different weights: the load must put the saved ones back
    with safe_torch_load():
        path, client = engine.load_checkpoint(str(saved["dir"]), tag="ckpt")
    assert path is not None and client["catdpo_step"] == 1
    after = _local_weights(engine)
    assert sum(w.numel() for w in after) > 100_000 and all(torch.equal(a, b) for a, b in zip(before, after))

    marker = tmp_path / "pwned"
    evil = _copy(saved["dir"], tmp_path)
    (model_file,) = sorted((evil / "ckpt").glob("*model_states.pt"))
    torch.save({"module": _Planted(marker)}, model_file)
    with pytest.raises(UnsafeCheckpointError) as err, safe_torch_load():
        engine.load_checkpoint(str(evil), tag="ckpt")
    assert str(err.value).startswith(f"{model_file}: refused to unpickle (weights_only=True): it needs io.open")
    assert not marker.exists()
    # the payload is live: DeepSpeed's own torch.load(weights_only=False) would have run it
    torch.load(model_file, weights_only=False)["module"].close()
    assert marker.exists()


def test_safe_torch_load_restores_deepspeed() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load
    with pytest.raises(ValueError), safe_torch_load():
        assert TorchCheckpointEngine.load is not original
        raise ValueError
    assert TorchCheckpointEngine.load is original
