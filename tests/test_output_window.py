"""Logits over a window of the sequence (models/output_window.py): the same loss and gradients as
the full output layer when the loss only reads the window, under TP with and without sequence
parallelism; and the trainer's RL step uses it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_longact.models.config import ModelConfig
from tests.dist_harness import run_distributed

CFG = ModelConfig(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, head_dim=16, vocab_size=263, max_position_embeddings=128,
                  qk_layernorm=True, params_dtype="fp32")


def _grads(runtime, sequence_parallel):
    from megatron_longact.generation import vocab_parallel_log_probs
    from megatron_longact.models.builder import build_model
    from megatron_longact.models.output_window import OutputWindow
    from megatron_longact.training.engine import reference_initialize

    parallel = dataclasses.replace(runtime.parallel, sequence_parallel=sequence_parallel)
    model, _ = build_model(CFG, parallel)
    reference_initialize(model, CFG, seed=5)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 263, (2, 16), generator=gen)
    targets = torch.randint(0, 263, (2, 16), generator=gen)
    pos = torch.arange(16)[None].expand(2, -1)
    mask = torch.zeros(2, 16)
    mask[0, 5:9] = 1.0
    mask[1, 7:11] = torch.rand(4, generator=gen)
    window = OutputWindow(model)
    out = {}
    for name, w in (("full", None), ("window", OutputWindow.of_mask(mask))):
        model.zero_grad(set_to_none=True)
        window.set(w)
        logits = model(tokens, pos, None)
        window.set(None)
        cut = slice(None) if w is None else w
        logp = vocab_parallel_log_probs(logits, targets[:, cut], vocab_size=263)
        loss = (logp * mask[:, cut]).sum()
        loss.backward()
        out[name] = (tuple(logits.shape), float(loss),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def test_window_gives_the_full_loss_and_gradients():
    for rank_out in run_distributed(_grads, tp=2, args=(False,), timeout=180):
        full, win = rank_out["full"], rank_out["window"]
        assert full[0][1] == 16 and win[0][1] == 6  # columns 5..10 hold every nonzero mask entry
        assert win[1] == pytest.approx(full[1], rel=1e-6)
        assert full[2].keys() == win[2].keys() and len(full[2]) > 10
        for name, g in full[2].items():
            torch.testing.assert_close(win[2][name], g, rtol=1e-5, atol=1e-7, msg=name)


def _sequence_parallel_layer(runtime):
    """The output layer alone under sequence parallelism (megatron's torch norms refuse SP, so no
    whole model with SP builds on the CPU): its input is this TP rank's part of the sequence."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longact.models.output_window import OutputWindow

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=tp,
                               sequence_parallel=True, use_cpu_initialization=True, params_dtype=torch.float32)
    torch.manual_seed(0)
    layer = ColumnParallelLinear(32, 64, config=config, init_method=torch.nn.init.normal_, bias=False,
                                 gather_output=False)
    gen = torch.Generator().manual_seed(1)
    hidden_SBH = torch.randn(12, 2, 32, generator=gen)
    coef_SBV = torch.randn(12, 2, 64 // tp, generator=gen)
    window = slice(3, 8)
    holder = type("GPT", (), {"output_layer": layer})()
    hook = OutputWindow(holder)
    out = {}
    for name, w in (("full", None), ("window", window)):
        layer.zero_grad(set_to_none=True)
        local = hidden_SBH.chunk(tp)[rank].clone().requires_grad_()
        hook.set(w)
        logits, _ = layer(local)
        hook.set(None)
        # The full layer returns every position: the loss reads the window's rows of it.
        logits_window = logits if w is not None else logits[window]
        loss = (logits_window * coef_SBV[window]).sum()
        loss.backward()
        out[name] = (tuple(logits.shape), float(loss), local.grad.clone(), layer.weight.grad.clone())
    out["sp_flag_after"] = layer.sequence_parallel
    return out


def test_window_under_sequence_parallelism():
    for rank_out in run_distributed(_sequence_parallel_layer, tp=2, timeout=120):
        full, win = rank_out["full"], rank_out["window"]
        assert full[0][0] == 12 and win[0][0] == 5
        assert win[1] == pytest.approx(full[1], rel=1e-6)
        torch.testing.assert_close(win[2], full[2], rtol=1e-5, atol=1e-6, msg="input gradient")
        torch.testing.assert_close(win[3], full[3], rtol=1e-5, atol=1e-6, msg="weight gradient")
        assert rank_out["sp_flag_after"] is True


def test_window_of_mask():
    from megatron_longact.models.output_window import OutputWindow

    mask = torch.zeros(3, 10)
    assert OutputWindow.of_mask(mask) is None
    mask[1, 4] = 1
    mask[2, 7] = 0.5
    assert OutputWindow.of_mask(mask) == slice(4, 8)


def _rl_logit_columns(runtime, tmp):
    import megatron_longact.models.output_window as ow
    from megatron_longact.training.trainer import Trainer
    from tests.test_trainer import _config

    widths = []
    real = ow.OutputWindow._pre

    def spy(self, module, args, kwargs):
        result = real(self, module, args, kwargs)
        widths.append((args[0].shape[0], None if result is None else result[0][0].shape[0]))
        return result

    ow.OutputWindow._pre = spy
    cfg = _config(tmp, f"{tmp}/out", **{"train.steps": 1, "sft.steps": 0, "evaluation.lengths": "[]",
                                        "longact.enabled": "false"})
    Trainer(cfg, runtime).run()
    return widths


def test_rl_update_computes_logits_over_the_response_columns_only(tmp_path):
    widths = run_distributed(_rl_logit_columns, args=(str(tmp_path),), timeout=240)[0]
    # Generation forwards and update forwards both pass the output layer; update forwards cut the
    # sequence to the response columns (4 new tokens and the prompts' length spread).
    cut = [(s, w) for s, w in widths if w is not None]
    assert cut, widths
    for full, kept in cut:
        assert kept < full and kept <= 4 + 16, (full, kept)
