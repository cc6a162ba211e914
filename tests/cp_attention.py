"""A context-parallel core attention for megatron's local layer spec, for the tests only.

megatron-core's local ``DotProductAttention`` asserts ``context_parallel_size == 1`` (only
Transformer Engine's attention implements CP, and TE needs CUDA), so no model with CP > 1 can run on
the CPU test machines. This module stands in for TE's ring attention with the simplest correct
algorithm: every CP rank all-gathers the keys and values of its CP peers, puts them back in global
sequence order, and attends its own queries to them with the causal mask of their global positions.

Sequence layout (megatron's load-balanced CP, ``get_batch_on_this_cp_rank``): the global sequence
of S tokens is cut into 2*CP chunks of S/(2*CP); CP rank r holds chunks r and 2*CP-1-r, in that
order. The gather's backward sums the gradients of every rank's copy of the keys/values and keeps
this rank's slice, as a reduce-scatter would.

Numerics: fp32 softmax over all S keys for every query; identical arithmetic for CP=1 and CP>1
(the same keys in the same order), so a CP=2 run matches a CP=1 run with this attention to fp32
rounding of the surrounding layers.

Shapes: ``q_SBND`` [local seq, batch, local query heads, head dim], ``k_SBGD`` / ``v_SBGD`` with G
local key/value groups.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist


def cp_positions(seq_global: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions of CP rank ``cp_rank``'s tokens, in its local order."""
    chunk = seq_global // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk)])


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over ``group`` (rank order); backward: sum-reduce, own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.local = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * ctx.local:(r + 1) * ctx.local], None


class CPDotProductAttention(torch.nn.Module):
    """Drop-in ``core_attention`` for ``get_gpt_layer_local_spec`` that supports CP >= 1 (causal
    self-attention only; no dropout, no packed sequences, no attention bias)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state as ps

        self.config = config
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = max(config.num_query_groups // tp, 1)
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.cp_group = ps.get_context_parallel_group()
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        s_local, b = query.shape[:2]
        if self.cp_size > 1:
            key = _GatherSeq.apply(key, self.cp_group)
            value = _GatherSeq.apply(value, self.cp_group)
            seq = s_local * self.cp_size
            # Gathered rows are [rank 0's chunks, rank 1's chunks, ...]: put them in global order.
            gathered_pos = torch.cat([cp_positions(seq, self.cp_size, r) for r in range(self.cp_size)])
            order = torch.argsort(gathered_pos)
            key, value = key[order], value[order]
        else:
            seq = s_local
        q_pos = cp_positions(seq, self.cp_size, self.cp_rank) if self.cp_size > 1 else torch.arange(seq)
        rep = self.heads // self.groups
        k = key.repeat_interleave(rep, dim=2) if rep > 1 else key
        v = value.repeat_interleave(rep, dim=2) if rep > 1 else value
        # [b, n, sq, d] x [b, n, d, sk] in fp32.
        q_BNSD = query.permute(1, 2, 0, 3).float()
        k_BNSD = k.permute(1, 2, 0, 3).float()
        v_BNSD = v.permute(1, 2, 0, 3).float()
        scores = torch.matmul(q_BNSD, k_BNSD.transpose(-1, -2)) * self.scale
        future = torch.arange(seq)[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future.to(scores.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v_BNSD).to(query.dtype)  # [b, n, sq, d]
        return out.permute(2, 0, 1, 3).reshape(s_local, b, self.heads * self.head_dim)


def cp_layer_spec(cfg):
    """megatron's local GPT layer spec with :class:`CPDotProductAttention` as core attention."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    spec = copy.deepcopy(specs.get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm,
                                                        normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = CPDotProductAttention
    return spec


def use_cp_attention() -> None:
    """Make the package's model builder use :func:`cp_layer_spec` in this process."""
    from megatron_longact.models import builder

    builder.layer_spec = cp_layer_spec
