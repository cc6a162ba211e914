"""Training checkpoints: model, optimizer, scheduler, LongAct state, RNG and step in one megatron
distributed checkpoint (torch_dist), written under a temporary name and published atomically.

Layout under the checkpoint root (Megatron-LM's, so that its tools and users' scripts find them)::

    iter_0000004/                       a complete checkpoint (dist_checkpointing files + manifest.json)
    .tmp_iter_0000006/                  a save in progress or interrupted (never loaded)
    .old_iter_0000004/                  the published copy of a step being re-saved (see below)
    latest_checkpointed_iteration.txt   the newest published iteration, as a number

Publishing: every rank writes into ``.tmp_iter_N``; after a barrier rank 0 writes
``manifest.json`` (every file with its size, optionally a CRC32, the TP/PP layout and the model
shape), renames the folder to ``iter_N`` (atomic on one filesystem) and replaces the tracker file
atomically. A crash at any point leaves the previous checkpoint and the tracker intact. Re-saving
an existing step first renames the published copy to ``.old_iter_N`` and deletes it only after the
new copy is in place; :func:`recover` (run at start-up) puts a stranded ``.old_iter_N`` back and
removes stale temporary folders. Loading checks the manifest first and fails with a message naming
the checkpoint and the bad file before any tensor is read.

Nothing is published with non-finite weights or optimizer state: :func:`save` checks every local
tensor it is about to write (one pass, far cheaper than the write) and raises
:class:`NonFiniteCheckpointError` on every rank before the rename.

The optimizer uses megatron's ``dp_reshardable`` format (resumable under another data-parallel
size, not under another TP/PP: :func:`check_layout` says so in one line before any model is built;
docs/megatron_internals.md explains the choice and how to move a run to another TP/PP).

Checkpoints written before this layout (``step_NNNNNNNN`` folders and a ``latest`` file) load when
named explicitly (``checkpoint.resume=<root>/step_NNNNNNNN``); ``resume: auto`` on such a root
stops with one line that says how to rename them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path

import torch

from megatron_longact.models.builder import unwrap
from megatron_longact.runtime import collectives

MANIFEST = "manifest.json"
TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_OLD_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
# Key of the global objects (scheduler, step, LongAct state, ...). Megatron stores a sharded
# object as "<key>/shard_<offset>_<shape>" and splits that on "/", so the key must not hold one.
# Checkpoints written before carry "longact_objects/<name>" (LEGACY_OBJECT_PREFIX); they still load.
OBJECT_PREFIX = "longact_objects."
LEGACY_OBJECT_PREFIX = "longact_objects/"
# Test hook, read only here and unset in real runs: ``STEP:SECONDS[:WHERE]`` sleeps inside the
# save of STEP so that a test can kill -9 the run there. WHERE is ``write`` (default: the files
# are written, nothing is published yet) or ``swap`` (a re-save moved the published copy aside
# and has not moved the new one in yet).
_PAUSE_ENV = "LONGACT_TEST_PAUSE_IN_SAVE"


def _test_pause(step: int, where: str) -> None:
    spec = os.environ.get(_PAUSE_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == step and (parts[2] if len(parts) > 2 else "write") == where:
        print(f"checkpoint: test pause in the save of step {step} ({where})", flush=True)
        time.sleep(float(parts[1]))


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit this run."""


class NonFiniteCheckpointError(CheckpointError):
    """The state about to be saved holds NaN or inf; nothing was published."""


def iter_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


step_dir = iter_dir  # the name used before the Megatron-LM layout


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: Path, step: int, checksum: bool, info: dict | None = None) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(folder))
            files[rel] = {"size": p.stat().st_size}
            if checksum:
                files[rel]["crc32"] = _crc32(p)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files, "checksum": checksum, **(info or {})},
                              indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: str | Path) -> dict:
    """Check a checkpoint against its manifest; return the manifest or raise CheckpointError."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is a file, expected a checkpoint folder")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        if (folder / TRACKER).is_file() or any(_ITER_DIR.match(p.name) for p in folder.iterdir()):
            raise CheckpointError(f"checkpoint {folder} is a checkpoint root, not one checkpoint; "
                                  f"name one of its iter_* folders or use checkpoint.resume=auto "
                                  f"with checkpoint.dir={folder}")
        raise CheckpointError(f"checkpoint {folder} is incomplete: it has no {MANIFEST} (the save "
                              "did not finish, or this is not a checkpoint of this project)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        int(manifest["step"])
        sizes = {rel: int(info["size"]) for rel, info in files.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupt ({type(exc).__name__}: "
                              f"{exc})") from None
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {rel} is missing")
        size = path.stat().st_size
        if size != sizes[rel]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} has {size} bytes, the "
                                  f"manifest says {sizes[rel]} (truncated or overwritten)")
        if "crc32" in info and _crc32(path) != info["crc32"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} fails its CRC32 check")
    return manifest


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (they have a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _ITER_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_ITER_DIR.match(p.name).group(1)))


def read_tracker(root: str | Path) -> int | None:
    """The iteration named by ``latest_checkpointed_iteration.txt``, or None without one."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: got {text[:40]!r}, expected an iteration number")
    return int(text)


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


def resolve_auto(root: str | Path) -> Path | None:
    """The checkpoint ``resume: auto`` continues from, or None for a fresh start.

    Starting from scratch is only allowed when the root holds no trace of a checkpoint: when the
    tracker names an iteration and no valid checkpoint is left, or when only old-layout folders
    exist, this raises CheckpointError instead (silently restarting at step 0 would train over a
    run that has progress).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint.dir: {root} is a file, expected a folder")
    if not root.is_dir():
        return None
    tracked = read_tracker(root)
    found = latest_valid(root)
    if found is not None:
        return found
    if tracked is not None:
        raise CheckpointError(
            f"{root / TRACKER} names iteration {tracked} but {iter_dir(root, tracked).name} and every "
            f"other checkpoint under {root} is missing or damaged; refusing to start from step 0 "
            f"(restore it, name a checkpoint with checkpoint.resume=PATH, or start fresh with "
            f"checkpoint.resume=none)")
    old = sorted(p.name for p in root.iterdir() if _OLD_STEP_DIR.match(p.name))
    if old:
        n = int(_OLD_STEP_DIR.match(old[-1]).group(1))
        raise CheckpointError(
            f"checkpoint.dir {root} holds checkpoints in the old step_NNNNNNNN layout ({old[-1]}); "
            f"rename each to iter_NNNNNNN and write the newest number to {TRACKER}, e.g. "
            f"`mv {root}/{old[-1]} {iter_dir(root, n)} && echo {n} > {root}/{TRACKER}`, or resume "
            f"from it directly with checkpoint.resume={root / old[-1]}")
    return None


def recover(root: str | Path) -> list[str]:
    """Start-up clean-up of ``root`` (rank 0, before any save): put back a published copy that a
    re-save moved aside and was killed before finishing, and delete stale ``.tmp_*`` folders.
    Returns what was done, one line each, for the log."""
    root = Path(root)
    done = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if p.name.startswith(".old_iter_"):
            final = root / p.name[len(".old_"):]
            if final.is_dir() and (final / MANIFEST).is_file():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name} (its replacement {final.name} is published)")
            else:
                if final.exists():
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(p, final)
                done.append(f"restored {final.name} from {p.name} (a re-save was interrupted)")
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp_") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the interrupted save {p.name}")
    return done


def check_layout(folder: str | Path, tp: int, pp: int, model_shape: dict | None = None) -> dict:
    """Verify ``folder`` and check that this run can load it: the same TP/PP (the optimizer
    format is reshardable across DP only) and the same model shape. One-line CheckpointError
    otherwise; returns the manifest. Cheap (reads the manifest and file sizes), so it runs before
    any model is built."""
    folder = Path(folder)
    manifest = verify(folder)
    saved = manifest.get("layout")
    if saved and (saved.get("tp"), saved.get("pp")) != (tp, pp):
        raise CheckpointError(
            f"checkpoint {folder} was saved with TP={saved.get('tp')}, PP={saved.get('pp')}; this run "
            f"has TP={tp}, PP={pp}. Resume with parallel.tensor_model_parallel_size={saved.get('tp')} "
            f"parallel.pipeline_model_parallel_size={saved.get('pp')}, or move the weights to the new "
            f"layout: `longact-convert mcore-to-hf {folder} HF_DIR --config RUN.yaml`, then "
            f"`longact-convert hf-to-mcore HF_DIR MCORE_DIR` and start with "
            f"checkpoint.load_weights=MCORE_DIR (the optimizer state does not move)")
    shape = manifest.get("model")
    if shape and model_shape:
        diff = sorted(k for k in shape if k in model_shape and shape[k] != model_shape[k])
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"checkpoint {folder} holds another model: model.{k} is {shape[k]!r} there and "
                f"{model_shape[k]!r} in this run's config")
    return manifest


# Model-config fields that decide the tensors' shapes; saved in the manifest for check_layout.
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "head_dim", "vocab_size", "make_vocab_size_divisible_by",
                "qk_layernorm", "add_qkv_bias", "tie_word_embeddings")


def model_shape(model_cfg) -> dict:
    return {k: getattr(model_cfg, k) for k in SHAPE_FIELDS if hasattr(model_cfg, k)}


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


def _local_state_is_finite(model_chunks, optimizer) -> torch.Tensor:
    """1.0 when every local parameter and optimizer-state tensor is finite, else 0.0.

    One fused reduction per tensor into a device scalar and a single host sync at the end."""
    from megatron_longact.compat import inner_optimizers

    tensors = [p for chunk in model_chunks for p in chunk.parameters()]
    if optimizer is not None:
        for inner in inner_optimizers(optimizer):
            base = getattr(inner, "optimizer", inner)
            for group in base.param_groups:
                tensors.extend(group["params"])
            for state in base.state.values():
                tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    bad = None
    for t in tensors:
        if t.numel() == 0:
            continue
        x = (~torch.isfinite(t.detach())).any()
        bad = x if bad is None else bad | x
    return torch.tensor([0.0 if bad is not None and bool(bad) else 1.0])


def _all_finite(model_chunks, optimizer) -> bool:
    ok = _local_state_is_finite(model_chunks, optimizer)
    collectives.all_reduce(ok, op="min")
    return bool(ok.item() == 1.0)


def _layout_info() -> dict:
    from megatron.core import parallel_state as ps

    return {"layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                       "pp": ps.get_pipeline_model_parallel_world_size(),
                       "dp": ps.get_data_parallel_world_size()}}


def _publish(root: Path, step: int, tmp: Path, final: Path, checksum: bool, keep: int,
             info: dict) -> None:
    """Rank 0: manifest, atomic rename, tracker. A re-save never deletes the published copy
    before the new one is in place: the old copy is moved aside first (one rename), so a kill
    between the two renames leaves it complete under .old_iter_N, where :func:`recover` finds it."""
    _write_manifest(tmp, step, checksum, info)
    aside = root / f".old_{final.name}"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        _test_pause(step, "swap")
    os.replace(tmp, final)
    pointer = root / (TRACKER + ".tmp")
    pointer.write_text(f"{step}\n")
    os.replace(pointer, root / TRACKER)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    if keep > 0:
        for old in list_complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class PendingSave:
    """An asynchronous save in flight: the files are being written by a background process;
    :meth:`finalize` (every rank) waits for it on every rank, then publishes."""

    def __init__(self, queue, final: Path):
        self.queue = queue
        self.final = final
        self.done = False

    def finalize(self, blocking: bool = True) -> bool:
        """True once published. Non-blocking calls return False while any rank still writes."""
        if self.done:
            return True
        # megatron runs the request's finalize functions (its metadata, then our publish) only
        # after the write finished on every rank.
        self.queue.maybe_finalize_async_calls(blocking=blocking)
        if self.queue.get_num_unfinalized_calls() == 0:
            self.queue.close()
            self.done = True
        return self.done


def save(root: str | Path, step: int, model_chunks, optimizer, objects: dict, *, keep: int = 0,
         checksum: bool = False, extra_models: dict | None = None, model_cfg=None,
         async_save: bool = False):
    """Save a checkpoint of ``step`` and publish it atomically; every rank must call it.

    ``objects``: picklable global state (scheduler, LongAct state, data position, ...), identical
    on every rank. ``keep`` > 0 deletes all but the newest ``keep`` complete checkpoints after
    publishing. ``model_cfg`` (optional) records the model shape for :func:`check_layout`.
    Raises NonFiniteCheckpointError (on every rank, nothing written) when the weights or the
    optimizer state hold NaN/inf. Returns the published folder, or with ``async_save`` a
    :class:`PendingSave` whose ``finalize()`` publishes it once the background write completed.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iter_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if not _all_finite(model_chunks, optimizer):
        raise NonFiniteCheckpointError(
            f"not saving step {step}: the weights or optimizer state hold NaN or inf; the last "
            f"published checkpoint under {root} stays the newest")
    info = _layout_info()
    if model_cfg is not None:
        info["model"] = model_shape(model_cfg)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous interrupted save of the same step
        tmp.mkdir()
    _barrier()
    sd = _sharded_state_dict(model_chunks, optimizer, objects, is_loading=False,
                             extra_models=extra_models, object_prefix=OBJECT_PREFIX)

    def publish():
        _test_pause(step, "write")
        _barrier()
        if _rank() == 0:
            _publish(root, step, tmp, final, checksum, keep, info)
        _barrier()

    if not async_save:
        dist_checkpointing.save(sd, str(tmp))
        publish()
        return final
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True)
    request.add_finalize_fn(publish)
    queue = AsyncCallsQueue(persistent=False)
    queue.schedule_async_request(request)
    return PendingSave(queue, final)


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
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load(sd, str(folder))
    # CheckpointException derives from BaseException, so `except Exception` alone misses it.
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - re-raised with the checkpoint named
        raise CheckpointError(f"checkpoint {folder} could not be loaded: {type(exc).__name__}: "
                              f"{_one_line(exc)}") from exc
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
