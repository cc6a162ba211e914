"""A core attention for megatron's local layer spec that runs on PyTorch's fused attention.

megatron-core's local ``DotProductAttention`` materialises the attention: it repeats the key/value
groups to every query head (``repeat_interleave``, a copy of K and V), builds the [b, heads, sq, sk]
score matrix with ``baddbmm``, applies a materialised causal mask and a softmax, and multiplies by V
(docs/performance.md measured it at about a quarter of an RL step on the CPU demo).
:class:`SDPADotProductAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention``, which picks a fused kernel (flash attention
on the CPU and on CUDA, memory-efficient attention on CUDA when a mask is given), reads grouped
keys/values without repeating them (``enable_gqa``) and, for the causal case, never builds the mask.

It is the local spec's core attention unless ``model.core_attention: megatron`` asks for
megatron's own (:func:`megatron_longact.models.builder.layer_spec`). Transformer Engine's spec
keeps TE's attention. The two local choices compute the same attention; results differ by
floating-point rounding only (the fused kernels sum in a different order).

Masks follow megatron's convention, so the rest of megatron (and the static KV cache of
generation) drives it unchanged:
- ``attention_mask`` given: it is the whole mask, ``True`` where a query must not see a key,
  broadcastable to [b, heads, sq, sk]; the mask type is then ignored, as in megatron's local
  attention (whose softmax uses a given mask instead of its causal default).
- no mask and a causal type: causal attention. With ``sq < sk`` (queries are the last ``sq``
  positions of the keys, as in a cached forward) the causal diagonal is aligned bottom-right.
- no mask and ``no_mask``: every query sees every key (megatron switches to it for decode steps
  after the first forward of a static KV cache).

Not supported (a clear error at construction or call, never a silent difference): context
parallelism (only Transformer Engine implements it), sliding-window attention, softmax types
other than ``vanilla``, packed (THD) sequences and attention bias.

Shapes (megatron's): ``query`` [sq, b, heads, d], ``key``/``value`` [sk, b, groups, d] with this
tensor-parallel rank's heads and groups; the output is [sq, b, heads * d].
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def _backends_for(query: torch.Tensor, sq: int, sk: int):
    """The SDPA backends a call may use. A cached forward (``sq != sk``: each decode step, each
    chunk of a prefill) has a new key length every call. On CUDA, PyTorch prefers cuDNN's
    attention on Hopper, and cuDNN builds an execution plan for every new shape: about 15 ms of
    host time a call on an H200, against well under a millisecond of attention, which made
    generation 30x slower than its kernels. Those calls therefore use flash, memory-efficient or
    math attention, which need no plan; calls with ``sq == sk`` (training, the first prefill) keep
    PyTorch's choice, cuDNN included, whose plans are cached per shape."""
    if not query.is_cuda or sq == sk:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _causal_keep(sq: int, sk: int, device) -> torch.Tensor:
    """[sq, sk] bool, True where query i (at key position sk - sq + i) may see key j."""
    q_pos = torch.arange(sk - sq, sk, device=device)
    return torch.arange(sk, device=device)[None, :] <= q_pos[:, None]


class SDPADotProductAttention(torch.nn.Module):
    """Drop-in ``core_attention`` for megatron's local GPT layer spec (same constructor and
    ``forward`` signature as megatron's ``DotProductAttention``)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.utils import is_layer_window_attention

        self.config = config
        if config.context_parallel_size != 1:
            raise NotImplementedError(
                f"core attention 'sdpa': context_parallel_size={config.context_parallel_size}; "
                "context parallelism needs Transformer Engine's attention (model.transformer_impl)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise NotImplementedError("core attention 'sdpa': sliding-window attention is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"core attention 'sdpa': softmax_type {config.softmax_type!r} "
                                      "is not supported (only 'vanilla')")
        if pg_collection is not None:
            tp = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp = parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp or config.num_query_groups % tp:
            raise ValueError(f"core attention 'sdpa': {config.num_attention_heads} heads and "
                             f"{config.num_query_groups} query groups must both divide by TP={tp}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self._causal = AttnMaskType.causal
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scores by the layer number and the fp32
        # softmax multiplies them back: the function is unchanged, so it needs no counterpart.
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("core attention 'sdpa': packed (THD) sequences are not supported")
        if attention_bias is not None:
            raise NotImplementedError("core attention 'sdpa': attention bias is not supported")
        sq, b = query.shape[:2]
        sk = key.shape[0]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        keep, causal = None, False
        if attention_mask is not None:
            keep = ~attention_mask.to(torch.bool)
        elif mask_type == self._causal and sq > 1:
            if sq == sk:
                causal = True
            else:
                keep = _causal_keep(sq, sk, query.device)
        # [s, b, n, d] -> [b, n, s, d] (views; the kernels take strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0:
            from megatron.core import tensor_parallel

            # Like megatron's attention: dropout masks differ per TP rank (their heads differ).
            rng = tensor_parallel.get_cuda_rng_tracker().fork() if not self.config.sequence_parallel \
                else contextlib.nullcontext()
            with rng:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale,
                                                     enable_gqa=self.heads != self.groups)
        else:
            with _backends_for(query, sq, sk):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal,
                                                     scale=self.softmax_scale,
                                                     enable_gqa=self.heads != self.groups)
        # [b, n, sq, d] -> [sq, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

