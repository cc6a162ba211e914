"""Map between global (unsharded, single-process) tensors and this rank's local shards.

Index spaces: a *global* name is the parameter name of the model as one process would build it
(``decoder.layers.{global_layer}.…``); a *local* name is the name on this pipeline stage
(``decoder.layers.{stage_local_layer}.…``). A *global* tensor is the whole weight; a *local*
tensor is this tensor-parallel rank's part of it, cut as megatron cuts it (contiguous chunks
along ``partition_dim``, or, with ``partition_stride`` s > 1, chunk r of each of s equal blocks:
SwiGLU's fc1 stores ``[gate_r; up_r]``).
"""

from __future__ import annotations

import re
import zlib

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def layer_offset(gpt_model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = gpt_model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_name(local_name: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)


def tp_info(param) -> tuple[bool, int, int]:
    """(is tensor-parallel, partition dim, partition stride) as megatron tags the parameter."""
    return (bool(getattr(param, "tensor_model_parallel", False)),
            int(getattr(param, "partition_dim", -1)), int(getattr(param, "partition_stride", 1)))


def global_shape(param, tp_size: int) -> tuple[int, ...]:
    is_tp, dim, _ = tp_info(param)
    shape = list(param.shape)
    if is_tp and tp_size > 1:
        shape[dim] *= tp_size
    return tuple(shape)


def shard(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of the global tensor ``full`` for ``param``."""
    is_tp, dim, stride = tp_info(param)
    if not is_tp or tp_size == 1:
        return full
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard(parts: list[torch.Tensor], param) -> torch.Tensor:
    """Inverse of :func:`shard`: the global tensor from every TP rank's part, in rank order."""
    is_tp, dim, stride = tp_info(param)
    if not is_tp or len(parts) == 1:
        return parts[0]
    per_rank_blocks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([blocks[s] for blocks in per_rank_blocks], dim=dim)
                      for s in range(stride)], dim=dim)


def _seeded_normal(name: str, shape, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def reference_init(name: str, shape, *, std: float, num_layers: int, seed: int) -> torch.Tensor:
    """Deterministic global initial value of parameter ``name``, the same for every layout.

    Normal(0, std) for matrices, with megatron's depth scaling std / sqrt(2 * num_layers) on the
    output projections (linear_proj, linear_fc2); ones for norm weights; zeros for biases.
    """
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if "layernorm" in name or "layer_norm" in name:
        return torch.ones(shape)
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = std / (2.0 * num_layers) ** 0.5
    return _seeded_normal(name, shape, std, seed)


@torch.no_grad()
def load_global_tensors(gpt_model, get_full, *, tp_rank: int, tp_size: int) -> list[str]:
    """Fill every parameter of ``gpt_model`` with its shard of ``get_full(global_name, shape)``.

    The tied output layer on the last pipeline stage takes the embedding's value. Returns the global
    names that were loaded.
    """
    offset = layer_offset(gpt_model)
    loaded = []
    for local, param in gpt_model.named_parameters():
        name = global_name(local, offset)
        if name == "output_layer.weight" and getattr(gpt_model, "share_embeddings_and_output_weights", False):
            name = "embedding.word_embeddings.weight"
        full = get_full(name, global_shape(param, tp_size))
        param.copy_(shard(full, param, tp_rank, tp_size).to(param.dtype))
        loaded.append(name)
    return loaded
