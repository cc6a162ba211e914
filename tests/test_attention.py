"""The SDPA core attention (models/attention.py) against megatron's own DotProductAttention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_longact.models.config import ModelConfig
from tests.dist_harness import run_distributed


def _config(**over):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                tensor_model_parallel_size=over.pop("tp", 1), use_cpu_initialization=True,
                params_dtype=torch.float32, masked_softmax_fusion=False, attention_dropout=0.0)
    return TransformerConfig(**{**base, **over})


def _pair(config, mask_type):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_longact.models.attention import SDPADotProductAttention

    return (SDPADotProductAttention(config, 1, mask_type, "self"),
            DotProductAttention(config, 1, mask_type, "self"))


def _qkv(sq, sk, b, heads, groups, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, n, d, generator=g).to(dtype).requires_grad_()
            for s, n in ((sq, heads), (sk, groups), (sk, groups))]


def _run_and_grad(module, q, k, v, mask, mask_type):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask, attn_mask_type=mask_type)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


def _cases(runtime):
    from megatron.core.transformer.enums import AttnMaskType

    tp = runtime.parallel.tensor_model_parallel_size
    config = _config(tp=tp)
    heads, groups = 4 // tp, 2 // tp
    sdpa, megatron = _pair(config, AttnMaskType.causal)
    results = {}
    q, k, v = _qkv(12, 12, 3, heads, groups)
    # Causal, no mask given: megatron builds its default causal mask; SDPA runs is_causal.
    results["causal"] = [_run_and_grad(m, q, k, v, None, AttnMaskType.causal) for m in (sdpa, megatron)]
    # A given mask (True = hidden, megatron's convention) is the whole mask: causal plus padding of
    # the first columns of row 1, which still sees its own diagonal.
    hidden = ~torch.ones(12, 12, dtype=torch.bool).tril()[None, None].repeat(3, 1, 1, 1)
    hidden[1, :, :, :4] = True
    hidden[1, :, torch.arange(12), torch.arange(12)] = False
    results["given_mask"] = [_run_and_grad(m, q, k, v, hidden, AttnMaskType.causal) for m in (sdpa, megatron)]
    # Decode step of a KV cache: one query over all keys, no mask.
    q1, k1, v1 = _qkv(1, 12, 3, heads, groups, seed=1)
    results["no_mask"] = [_run_and_grad(m, q1, k1, v1, None, AttnMaskType.no_mask) for m in (sdpa, megatron)]
    # Fewer queries than keys, causal: the queries are the last positions (bottom-right diagonal).
    out_tail, _ = _run_and_grad(sdpa, q[-5:], k, v, None, AttnMaskType.causal)
    out_full, _ = _run_and_grad(sdpa, q, k, v, None, AttnMaskType.causal)
    results["tail"] = (out_tail, out_full[-5:])
    # bf16 against the fp32 reference.
    bf = _pair(_config(tp=tp, params_dtype=torch.bfloat16, bf16=True), AttnMaskType.causal)[0]
    out_bf, _ = _run_and_grad(bf, *(t.to(torch.bfloat16) for t in (q, k, v)), None, AttnMaskType.causal)
    results["bf16"] = (out_bf.float(), results["causal"][1][0])
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_matches_megatron_local_attention(tp):
    res = run_distributed(_cases, tp=tp, timeout=120)[0]
    for case in ("causal", "given_mask", "no_mask"):
        (out_a, grads_a), (out_b, grads_b) = res[case]
        assert torch.allclose(out_a, out_b, atol=1e-5, rtol=1e-5), case
        for name, ga, gb in zip("qkv", grads_a, grads_b):
            assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-5), f"{case}: d{name}"
    assert torch.allclose(*res["tail"], atol=1e-6)
    assert torch.allclose(*res["bf16"], atol=3e-2)
    # The masked row really differs from the unmasked one (the mask is not ignored).
    assert not torch.allclose(res["given_mask"][0][0], res["causal"][0][0], atol=1e-3)


def _refusals(runtime):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longact.models.attention import SDPADotProductAttention

    errors = []
    sdpa = SDPADotProductAttention(_config(), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(4, 4, 1, 4, 2)
    for kwargs in (dict(attention_bias=torch.zeros(1)), dict(packed_seq_params=PackedSeqParams())):
        try:
            sdpa(q, k, v, None, **kwargs)
        except NotImplementedError as e:
            errors.append(str(e))
    try:
        SDPADotProductAttention(_config(window_size=(8, 0)), 1, AttnMaskType.causal, "self")
    except NotImplementedError as e:
        errors.append(str(e))
    return errors


def test_sdpa_attention_refuses_what_it_does_not_implement():
    errors = run_distributed(_refusals, timeout=120)[0]
    assert len(errors) == 3, errors
    assert "attention bias" in errors[0] and "packed" in errors[1] and "sliding-window" in errors[2]


def _model_outputs(runtime):
    from megatron_longact.models.builder import build_model
    from megatron_longact.training.engine import reference_initialize

    base = ModelConfig(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, vocab_size=263, max_position_embeddings=128,
                       qk_layernorm=True, params_dtype="fp32")
    tokens = torch.randint(0, 263, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24)[None].expand(2, -1)
    out = {}
    for kind in ("sdpa", "megatron"):
        model, _ = build_model(dataclasses.replace(base, core_attention=kind), runtime.parallel)
        reference_initialize(model, base, seed=3)
        out[kind] = (type(model.decoder.layers[0].self_attention.core_attention).__name__,
                     model(tokens, pos, None).detach())
    return out


def test_model_core_attention_choice():
    out = run_distributed(_model_outputs, timeout=120)[0]
    assert out["sdpa"][0] == "SDPADotProductAttention" and out["megatron"][0] == "DotProductAttention"
    assert torch.allclose(out["sdpa"][1], out["megatron"][1], atol=1e-5)


def test_core_attention_config_is_checked():
    from megatron_longact.config import ConfigError

    with pytest.raises(ConfigError, match="model.core_attention"):
        ModelConfig(family="qwen3", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=263, max_position_embeddings=128, qk_layernorm=True,
                    core_attention="flash")


def test_cached_forwards_on_cuda_leave_out_cudnn_attention():
    """cuDNN builds an execution plan per shape: a decode step (sq != sk) on CUDA must not use it."""
    import contextlib
    from types import SimpleNamespace

    from megatron_longact.models.attention import _backends_for

    cuda_query = SimpleNamespace(is_cuda=True)
    assert isinstance(_backends_for(cuda_query, 4, 4), contextlib.nullcontext)  # training: torch picks
    assert isinstance(_backends_for(torch.zeros(1), 1, 9), contextlib.nullcontext)  # CPU
    with _backends_for(cuda_query, 1, 9):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 9, 8)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        assert out.shape == (1, 4, 1, 8)
