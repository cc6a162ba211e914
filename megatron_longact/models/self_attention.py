"""megatron's self-attention with a KV cache that holds rotated keys.

megatron-core 0.16's static KV cache (``StaticInferenceContext``, what native generation uses)
stores keys *before* RoPE and, at every forward, applies RoPE to the whole cached key sequence
again (``Attention._adjust_key_value_for_inference`` hands back the cache with the embedding of
every position, and ``Attention.forward`` rotates it). A decode step therefore costs
O(sequence) rotations per layer on top of the attention itself, all recomputing values the
previous step already had.

:class:`CachedRopeSelfAttention` rotates only the keys of the columns a forward writes, before
they enter the cache, and tells ``forward`` that the keys are rotated (a key embedding of
``None``, the same hand-off megatron's dynamic-batching path uses). RoPE is elementwise per
position, so a key rotated when it is written equals, bit for bit, the same key rotated later with
the whole table: the cache holds exactly the values megatron would have computed, and generation
gives the same tokens and log-probs (``tests/test_generation.py``). Training forwards (no
inference context), the dynamic engine, flash decoding and context parallelism take megatron's
own path unchanged.

With the project's SDPA core attention (models/attention.py) the cache is also laid out head-major,
[batch, groups, max_sequence, head_dim] instead of megatron's [max_sequence, batch, groups,
head_dim]: each (row, group) then reads its keys and values as one contiguous block, which is the
layout the fused attention kernels stream through (megatron's layout puts consecutive positions of
one head ``batch x groups x head_dim`` elements apart). The attention receives them as megatron
shapes them, [sequence, batch, groups, head_dim] views, so nothing else changes. Megatron's own
and Transformer Engine's core attentions reshape keys with ``view`` and keep megatron's layout.
"""

from __future__ import annotations

import torch

from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import deprecate_inference_params

from megatron_longact.models.attention import SDPADotProductAttention


# Attribute of an inference context: the layer numbers whose cache this module laid out head-major.
_HEAD_MAJOR = "longact_head_major_layers"


class CachedRopeSelfAttention(SelfAttention):
    """``SelfAttention`` whose static KV cache stores keys after RoPE (see the module docstring)."""

    def _rotates_on_write(self, context: BaseInferenceContext | None, rotary_pos_emb) -> bool:
        cp = getattr(self.pg_collection, "cp", None)
        return (context is not None and context.is_static_batching() and not self.training
                and rotary_pos_emb is not None and rotary_pos_emb[1] is not None
                and not self.config.flash_decode
                and (cp is None or cp.size() == 1))

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        *args, inference_params=None, **kwargs):
        context = deprecate_inference_params(inference_context, inference_params)
        if not self._rotates_on_write(context, rotary_pos_emb):
            return super()._adjust_key_value_for_inference(context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        start = context.sequence_len_offset
        end = start + key.size(0)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        if not isinstance(self.core_attention, SDPADotProductAttention):
            query, key, value, (q_pos_emb, _), mask_type, block_table = \
                super()._adjust_key_value_for_inference(context, query, key, value, rotary_pos_emb,
                                                        *args, **kwargs)
            return query, key, value, (q_pos_emb, None), mask_type, block_table
        # Head-major cache (module docstring). Same bookkeeping as megatron's static path: rows
        # [batch_size_offset, + b), columns [sequence_len_offset, + s), and no causal mask type
        # once the prompt is in the cache.
        first, last = context.batch_size_offset, context.batch_size_offset + key.size(1)
        memory = context.key_value_memory_dict.get(self.layer_number)
        if memory is None:
            memory = tuple(torch.empty(context.max_batch_size, t.size(2), context.max_sequence_length,
                                       t.size(3), dtype=t.dtype, device=t.device) for t in (key, value))
            context.key_value_memory_dict[self.layer_number] = memory
            if not hasattr(context, _HEAD_MAJOR):
                setattr(context, _HEAD_MAJOR, set())
            getattr(context, _HEAD_MAJOR).add(self.layer_number)
        if end > memory[0].size(2) or last > memory[0].size(0):
            raise ValueError(f"KV cache: columns up to {end} and rows up to {last} do not fit the "
                             f"cache of {memory[0].size(2)} columns and {memory[0].size(0)} rows")
        for cache, new in zip(memory, (key, value)):
            cache[first:last, :, start:end] = new.permute(1, 2, 0, 3)
        key, value = (cache[first:last, :, :end].permute(2, 0, 1, 3) for cache in memory)
        mask_type = AttnMaskType.no_mask if start > 0 else self.attn_mask_type
        return query, key, value, (q_pos_emb[start:end], None), mask_type, None


def share_cache_rows(context: BaseInferenceContext, source_B: torch.Tensor, filled: int) -> None:
    """Make row ``b`` of every layer's static KV cache a copy of row ``source_B[b]``, over the
    first ``filled`` columns: a prefill that ran once per distinct prompt then serves every row
    that repeats it (generation's prompt sharing). Knows both layouts: head-major rows (this
    module's) and megatron's [sequence, batch, ...]."""
    head_major = getattr(context, _HEAD_MAJOR, set())
    for layer_number, memory in context.key_value_memory_dict.items():
        batch_dim, seq_dim = (0, 2) if layer_number in head_major else (1, 0)
        for cache in memory:
            filled_part = cache.narrow(seq_dim, 0, filled)
            rows = filled_part.index_select(batch_dim, source_B.to(cache.device))
            filled_part.narrow(batch_dim, 0, source_B.numel()).copy_(rows)
