"""Checkpoint conversion between Hugging Face and megatron-core.

:mod:`megatron_longact.convert.hf` maps tensors and configs; :mod:`megatron_longact.convert.checkpoint`
writes and reads megatron distributed checkpoints of the model weights and drives the two
conversions behind ``longact-convert``.
"""

from megatron_longact.convert.checkpoint import (
    hf_to_mcore,
    load_dist_weights,
    load_hf_weights,
    load_model_weights,
    mcore_to_hf,
    read_meta,
    save_model_weights,
)
from megatron_longact.convert.hf import (
    HFCheckpoint,
    fuse_qkv,
    global_to_hf,
    hf_config_from_model_config,
    hf_to_global,
    model_config_from_hf,
    split_qkv,
)

__all__ = [
    "HFCheckpoint",
    "hf_to_mcore",
    "load_dist_weights",
    "load_hf_weights",
    "load_model_weights",
    "mcore_to_hf",
    "read_meta",
    "save_model_weights",
    "fuse_qkv",
    "global_to_hf",
    "hf_config_from_model_config",
    "hf_to_global",
    "model_config_from_hf",
    "split_qkv",
]
