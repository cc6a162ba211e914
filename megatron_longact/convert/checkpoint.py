"""Model-weight checkpoints in megatron-core's distributed format, and the two conversions.

A *weights checkpoint* is a folder::

    <dir>/longact_model.json   format tag, the ModelConfig, where the weights came from
    <dir>/weights/             megatron.core.dist_checkpointing, torch_dist backend:
                               {"model": gpt_model.sharded_state_dict()}
    <dir>/hf/                  the source config.json, tokenizer and generation files (optional)

The torch_dist format stores each tensor once, as its global (unsharded) value, with the
sharding metadata megatron attaches to each parameter (fused QKV rows per key group, SwiGLU's
gate/up halves of fc1, vocabulary-parallel embeddings), so a checkpoint written under one
(TP, PP) layout loads under any other. Checkpoint keys use the Transformer Engine layer names
(megatron's local spec maps its own names onto them), so the same files load into either spec.

Publication is atomic: everything is written to ``.<name>.partial`` next to ``<dir>`` and renamed
into place once complete, so a reader (or a resumed job) never sees half a checkpoint. With
``overwrite`` an existing ``<dir>`` is moved aside first and deleted after the rename.

Every function that takes ``parallel`` expects megatron's parallel state to be initialized for it
(:func:`megatron_longact.runtime.initialize`). ``dist_checkpointing.save`` starts helper
processes (a spawn Manager and forked writers): call it from a script with an
``if __name__ == "__main__":`` guard and not from a daemonic process.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from megatron_longact.config import ConfigError, from_dict, to_dict
from megatron_longact.convert import hf as hfmap
from megatron_longact.models.config import ModelConfig
from megatron_longact.runtime import ParallelConfig, collectives

FORMAT = "megatron_longact.model_weights"
FORMAT_VERSION = 1
META_FILE = "longact_model.json"
WEIGHTS_DIR = "weights"
HF_DIR = "hf"

# Fields that fix tensor shapes or the mapping; a checkpoint only loads into a model that agrees.
_SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "padded_vocab_size", "qk_layernorm",
                 "add_qkv_bias", "tie_word_embeddings")


def _rank() -> int:
    return collectives.rank()


def _barrier() -> None:
    collectives.barrier()


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def publish(staging: Path, final: Path, overwrite: bool) -> None:
    """Rename the complete ``staging`` folder to ``final`` (same filesystem, so the rename is
    atomic); an existing ``final`` is replaced only with ``overwrite``."""
    old = final.parent / f".{final.name}.old"
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite to replace it")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)


def read_meta(ckpt_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, whole metadata dict) of a weights checkpoint; ConfigError when ``ckpt_dir``
    is not one."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir}: no {META_FILE}; expected a checkpoint written by "
                          "longact-convert hf-to-mcore")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                          f"expected {FORMAT!r} version {FORMAT_VERSION}")
    return from_dict(ModelConfig, meta["model"], "model"), meta


def check_compatible(stored: ModelConfig, cfg: ModelConfig, where: str) -> None:
    """Raise ConfigError naming the first shape field where ``cfg`` differs from the checkpoint."""
    for name in _SHAPE_FIELDS:
        a, b = getattr(stored, name), getattr(cfg, name)
        if a != b:
            raise ConfigError(f"model.{name}: the model has {b!r} but the checkpoint {where} was "
                              f"written for {a!r}")


def save_model_weights(gpt_model, ckpt_dir: str | Path, cfg: ModelConfig, *, source: str = "",
                       hf_source_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``gpt_model``'s weights (this rank's stage and shards; every rank calls this) as a
    weights checkpoint at ``ckpt_dir`` and publish it atomically. ``hf_source_dir``: a Hugging Face
    folder whose config.json and tokenizer files are kept under ``hf/`` for the way back."""
    from megatron.core import dist_checkpointing

    final = Path(ckpt_dir).absolute()
    staging = partial_dir(final)
    if _rank() == 0:
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite to replace it")
        if staging.exists():
            shutil.rmtree(staging)  # left by an interrupted run
        (staging / WEIGHTS_DIR).mkdir(parents=True)
    _barrier()
    dist_checkpointing.save({"model": gpt_model.sharded_state_dict()}, str(staging / WEIGHTS_DIR))
    _barrier()
    if _rank() == 0:
        if hf_source_dir is not None:
            hf_out = staging / HF_DIR
            hf_out.mkdir()
            for name in ("config.json",) + hfmap.AUX_FILES:
                src = Path(hf_source_dir) / name
                if src.is_file():
                    shutil.copy2(src, hf_out / name)
        from megatron_longact.compat import megatron_version

        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": to_dict(cfg),
                "source": source, "megatron_core": megatron_version()}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish(staging, final, overwrite)
    _barrier()
    return final


def load_dist_weights(gpt_model, weights_dir: str | Path) -> None:
    """Load the ``"model"`` entry of any megatron distributed checkpoint at ``weights_dir`` into
    ``gpt_model``: a weights checkpoint's ``weights/`` folder or a training checkpoint
    (:mod:`megatron_longact.checkpoint` stores the model under the same key; its optimizer and
    other entries are not read). A tensor the model needs and the checkpoint lacks is an error."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not (Path(weights_dir) / "metadata.json").is_file():
        raise ConfigError(f"{weights_dir}: no metadata.json; expected a megatron distributed checkpoint")
    from megatron_longact.checkpoint import has_legacy_object_keys

    # Training checkpoints written before the object keys lost their "/" cannot go through
    # megatron's unexpected-key check (it parses every stored key); the strict load_state_dict
    # below still catches a missing model tensor.
    strict = (StrictHandling.ASSUME_OK_UNEXPECTED if has_legacy_object_keys(weights_dir)
              else StrictHandling.RAISE_UNEXPECTED)
    # A fresh sharded state dict: save() rewrites the one it is given in place.
    loaded = dist_checkpointing.load({"model": gpt_model.sharded_state_dict()}, str(weights_dir),
                                     strict=strict)
    gpt_model.load_state_dict(loaded["model"], strict=True)


def load_model_weights(gpt_model, ckpt_dir: str | Path, cfg: ModelConfig | None = None) -> ModelConfig:
    """Load a weights checkpoint into ``gpt_model`` (any TP/PP layout; every rank calls this).

    With ``cfg`` (the model's config), the stored shape is checked against it first. Returns the
    stored ModelConfig.
    """
    stored, _ = read_meta(ckpt_dir)
    if cfg is not None:
        check_compatible(stored, cfg, str(ckpt_dir))
    load_dist_weights(gpt_model, Path(ckpt_dir) / WEIGHTS_DIR)
    return stored


def load_hf_weights(gpt_model, hf: hfmap.HFCheckpoint, cfg: ModelConfig, *, tp_rank: int,
                    tp_size: int) -> list[str]:
    """Fill ``gpt_model`` (this rank's stage and TP shard) from a Hugging Face checkpoint; returns
    the global names loaded. Shapes are checked before anything is copied."""
    from megatron_longact.models.sharding import load_global_tensors

    def get_full(name, shape):
        full = hfmap.global_tensor_from_hf(name, hf.get, cfg)
        if tuple(full.shape) != tuple(shape):
            raise ConfigError(f"{name}: the Hugging Face weights give shape {tuple(full.shape)}, the "
                              f"model expects {tuple(shape)}")
        return full

    return load_global_tensors(gpt_model, get_full, tp_rank=tp_rank, tp_size=tp_size)


def _converter_model_config(cfg: ModelConfig) -> ModelConfig:
    # The local spec builds on CPU and GPU alike and its checkpoint keys are the TE names, so
    # the conversion does not depend on whether Transformer Engine is installed.
    return dataclasses.replace(cfg, transformer_impl="local", recompute="none")


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, parallel: ParallelConfig, *,
                family: str | None = None, model_overrides: dict | None = None,
                overwrite: bool = False) -> ModelConfig:
    """Convert a Hugging Face folder into a weights checkpoint. Every rank calls this; each builds
    its own stage and shard of the model under ``parallel`` (one process with TP=PP=1 is enough:
    the result loads under any layout). Returns the model's ModelConfig."""
    from megatron.core import parallel_state as ps

    from megatron_longact.models.builder import build_model

    hf = hfmap.HFCheckpoint(hf_dir)
    cfg = hfmap.model_config_from_hf(hf.config, family, **(model_overrides or {}))
    hf.check_complete(cfg)
    cfg.check_layout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    model, _ = build_model(_converter_model_config(cfg), parallel)
    with torch.no_grad():
        load_hf_weights(model, hf, cfg, tp_rank=ps.get_tensor_model_parallel_rank(),
                        tp_size=ps.get_tensor_model_parallel_world_size())
    save_model_weights(model, out_dir, cfg, source=str(Path(hf_dir).absolute()),
                       hf_source_dir=hf_dir, overwrite=overwrite)
    return cfg


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, parallel: ParallelConfig, *,
                model_cfg: ModelConfig | None = None, hf_source_dir: str | Path | None = None,
                max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> ModelConfig:
    """Write model weights as a Hugging Face folder (safetensors, config.json, tokenizer files).

    ``ckpt_dir`` is a weights checkpoint (it names its model and keeps the source config.json and
    tokenizer files), or any megatron distributed checkpoint holding ``{"model": ...}``, such as a
    training checkpoint ``step_N``; then ``model_cfg`` says what model it holds, and
    ``hf_source_dir`` (the Hugging Face folder the run started from) supplies config.json and the
    tokenizer; without it a config.json is generated. One process, TP=PP=1: the whole model is built
    in host memory (2 bytes per parameter in bf16), the HF tensors are written shard by shard."""
    from megatron_longact.models.builder import build_model

    if _world() != 1:
        raise ConfigError(f"mcore-to-hf runs in one process; got a world of {_world()} ranks")
    if (Path(ckpt_dir) / META_FILE).is_file():
        cfg, _ = read_meta(ckpt_dir)
        if model_cfg is not None:
            check_compatible(cfg, model_cfg, str(ckpt_dir))
        weights = Path(ckpt_dir) / WEIGHTS_DIR
        src_hf = Path(hf_source_dir) if hf_source_dir is not None else Path(ckpt_dir) / HF_DIR
    else:
        if model_cfg is None:
            raise ConfigError(f"{ckpt_dir}: no {META_FILE}, so the model is unknown; pass the run "
                              "config (--config) that trained it")
        cfg, weights = model_cfg, Path(ckpt_dir)
        src_hf = Path(hf_source_dir) if hf_source_dir is not None else None
    model, _ = build_model(_converter_model_config(cfg), parallel)
    load_dist_weights(model, weights)
    base = None
    if src_hf is not None and (src_hf / "config.json").is_file():
        base = json.loads((src_hf / "config.json").read_text())
    hf_config = hfmap.hf_config_from_model_config(cfg, base)

    final = Path(out_dir).absolute()
    staging = partial_dir(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite to replace it")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    writer = hfmap.SafetensorsShardWriter(staging, max_shard_bytes)
    params = ((hfmap.canonical_name(n), p.detach()) for n, p in model.named_parameters())
    for name, tensor in hfmap.iter_hf_tensors(params, cfg):
        writer.add(name, tensor)
    writer.close()
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name in hfmap.AUX_FILES if src_hf is not None else ():
        if (src_hf / name).is_file():
            shutil.copy2(src_hf / name, staging / name)
    publish(staging, final, overwrite)
    return cfg


def _world() -> int:
    return collectives.size()
