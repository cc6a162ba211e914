"""Training checkpoints: model, optimizer, scheduler, LongAct state, RNG and step in one megatron
distributed checkpoint (torch_dist), written under a temporary name and published atomically.

Layout under the checkpoint root::

    step_00000004/            a complete checkpoint (dist_checkpointing files + manifest.json)
    .tmp_step_00000006/       a save in progress or interrupted (never loaded)
    latest                    text file naming the newest complete checkpoint

Publishing: every rank writes into ``.tmp_step_N``; after a barrier rank 0 writes
``manifest.json`` (every file with its size, and optionally a CRC32), renames the folder to
``step_N`` (atomic on one filesystem) and replaces ``latest`` atomically. A crash at any point
leaves the previous checkpoint and ``latest`` intact. Loading checks the manifest first and fails
with a message naming the checkpoint and the bad file before any tensor is read.

The optimizer uses megatron's ``dp_reshardable`` format (resumable under another data-parallel
size; see docs/megatron_internals.md for why not the default format).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch

from megatron_longact.models.builder import unwrap
from megatron_longact.runtime import collectives

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
# Key of the global objects (scheduler, step, LongAct state, ...). Megatron stores a sharded
# object as "<key>/shard_<offset>_<shape>" and splits that on "/", so the key must not hold one.
# Checkpoints written before carry "longact_objects/<name>" (LEGACY_OBJECT_PREFIX); they still load.
OBJECT_PREFIX = "longact_objects."
LEGACY_OBJECT_PREFIX = "longact_objects/"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: Path, step: int, checksum: bool) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(folder))
            files[rel] = {"size": p.stat().st_size}
            if checksum:
                files[rel]["crc32"] = _crc32(p)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files, "checksum": checksum}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: str | Path) -> dict:
    """Check a checkpoint against its manifest; return the manifest or raise CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: it has no {MANIFEST} (the save "
                              "did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupt ({exc})") from None
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {rel} is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} has {size} bytes, the "
                                  f"manifest says {info['size']} (truncated or overwritten)")
        if "crc32" in info and _crc32(path) != info["crc32"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} fails its CRC32 check")
    return manifest


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (they have a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_valid(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes :func:`verify` (older ones are tried when
    the newest is damaged), or None."""
    for folder in reversed(list_complete(root)):
        try:
            verify(folder)
            return folder
        except CheckpointError:
            continue
    return None


def _rank() -> int:
    return collectives.rank()


def _barrier() -> None:
    collectives.barrier()


def has_legacy_object_keys(folder: str | Path) -> bool:
    """True when the torch_dist checkpoint at ``folder`` stores its objects under the old
    "longact_objects/<name>" keys (which megatron's metadata reader cannot parse)."""
    if not (Path(folder) / ".metadata").is_file():
        return False
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return any(k.startswith(LEGACY_OBJECT_PREFIX) for k in keys)


def _sharded_state_dict(model_chunks, optimizer, objects: dict, *, is_loading: bool,
                        with_rng: bool = True, extra_models: dict | None = None,
                        object_prefix: str = OBJECT_PREFIX) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if len(model_chunks) != 1:
        raise NotImplementedError("checkpoints of virtual-pipeline model chunks are not supported yet")
    model_sd = unwrap(model_chunks[0]).sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_SHARDING)
    for name, module in (extra_models or {}).items():
        # Frozen companions of the model (e.g. the RL reference policy), under their own prefix.
        sd[f"model_{name}"] = unwrap(module).sharded_state_dict(prefix=f"{name}.")
    rank = _rank()
    for key, obj in objects.items():
        # Global objects (identical on every rank): saved once, by global rank 0.
        sd[key] = ShardedObject(f"{object_prefix}{key}", obj, (1,), (0,), replica_id=rank)
    if not with_rng:
        return sd
    # RNG state differs per model-parallel rank; DP replicas hold the same one.
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    rng = None if is_loading else {
        "python": __import__("random").getstate(), "torch": torch.get_rng_state(),
        "megatron": _megatron_rng_states()}
    sd["rng"] = ShardedObject("longact_rng", rng,
                              (ps.get_pipeline_model_parallel_world_size(),
                               ps.get_tensor_model_parallel_world_size()),
                              (pp, tp), replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    return sd



def _megatron_rng_states():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def save(root: str | Path, step: int, model_chunks, optimizer, objects: dict, *, keep: int = 0,
         checksum: bool = False, extra_models: dict | None = None) -> Path:
    """Save a checkpoint of ``step`` and publish it atomically; every rank must call it.

    ``objects``: picklable global state (scheduler, LongAct state, data position, ...), identical
    on every rank. ``keep`` > 0 deletes all but the newest ``keep`` complete checkpoints after
    publishing. Returns the published folder.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous interrupted save of the same step
        tmp.mkdir()
    _barrier()
    sd = _sharded_state_dict(model_chunks, optimizer, objects, is_loading=False,
                             extra_models=extra_models, object_prefix=OBJECT_PREFIX)
    dist_checkpointing.save(sd, str(tmp))
    _barrier()
    if _rank() == 0:
        _write_manifest(tmp, step, checksum)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        if keep > 0:
            for old in list_complete(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(folder: str | Path, model_chunks, optimizer, object_keys: list[str], *,
         load_rng: bool = True, extra_models: dict | None = None) -> dict:
    """Load a checkpoint into the model and optimizer; return the saved objects by key.

    Verifies the manifest first (CheckpointError on a damaged checkpoint). ``load_rng`` restores
    the RNG states when the model-parallel layout matches the saved one.
    """
    from megatron.core import dist_checkpointing

    from megatron_longact.compat import prepare_optimizer_for_load, restore_torch_adam_step

    folder = Path(folder)
    verify(folder)
    if optimizer is not None:
        prepare_optimizer_for_load(optimizer)
    prefix = LEGACY_OBJECT_PREFIX if has_legacy_object_keys(folder) else OBJECT_PREFIX
    sd = _sharded_state_dict(model_chunks, optimizer, {k: None for k in object_keys}, is_loading=True,
                             with_rng=load_rng, extra_models=extra_models, object_prefix=prefix)
    try:
        loaded = dist_checkpointing.load(sd, str(folder))
    except Exception as exc:  # noqa: BLE001 - re-raised with the checkpoint named
        raise CheckpointError(f"checkpoint {folder} could not be loaded: {type(exc).__name__}: {exc}") from exc
    unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    for name, module in (extra_models or {}).items():
        prefix = f"{name}."
        unwrap(module).load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v
                                      for k, v in loaded[f"model_{name}"].items()})
    if optimizer is not None:
        # no_grad: with fp32 parameters the DistributedOptimizer's main params are views of the
        # model's leaf parameters, and copying into them under autograd is an error.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_torch_adam_step(optimizer, loaded["optimizer"])
    if load_rng and loaded.get("rng"):
        import random

        rng = loaded["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(rng["megatron"])
    return {k: loaded[k] for k in object_keys}
