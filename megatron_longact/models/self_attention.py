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
"""

from __future__ import annotations

from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.utils import deprecate_inference_params


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
        k_pos_emb = rotary_pos_emb[1]
        key = apply_rotary_pos_emb(key, k_pos_emb[start:start + key.size(0)], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = \
            super()._adjust_key_value_for_inference(context, query, key, value, rotary_pos_emb,
                                                    *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table
