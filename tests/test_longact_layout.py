"""LongAct statistics and masks on real megatron-core models across ranks.

(a) Layout invariance: one global batch, statistics equal (fp32 reduction tolerance) and masks
    identical for (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2), (2,2,1); every rank of a run
    holds the same masks. The CP reduction is checked on 2 gloo ranks that split the tokens.
(b) Independent reference: q and k recomputed from each layer's weights and inputs in plain PyTorch.
"""

import pytest
import torch

from megatron_longact.longact import LongActConfig, select_channels
from megatron_longact.models.config import ModelConfig
from megatron_longact.training.config import TrainConfig
from tests.dist_harness import run_distributed
from tests.longact_fakes import fake_model, run_layers

SCOPES = ("layer", "head", "model")


def _tiny(**kw):
    base = dict(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=260,
                max_position_embeddings=512, qk_layernorm=True, params_dtype="fp32")
    base.update(kw)
    return ModelConfig(**base)


def _train_with_longact(runtime, steps, point, model_kw=None, recompute="none"):
    from megatron_longact.training.lm import train_lm

    per_step = []

    def on_step(step, loss, out):
        la = out["longact"].longact
        st = la.last_stats
        masks = {scope: select_channels(st.q_LC, st.k_LC, la.geometry, keep_ratio=0.3, scope=scope,
                                        strategy="topk") for scope in SCOPES}
        per_step.append(dict(q=st.q_LC, k=st.k_LC, tokens=st.tokens_L, masks=masks,
                             state_q=la.state.q_keep_LC.clone(), loss=loss))

    train = TrainConfig(steps=steps, seq_length=64, micro_batch_size=2, global_batch_size=8, lr=3e-3)
    model = _tiny(recompute=recompute, **(model_kw or {}))
    train_lm(model, train, runtime.parallel, runtime.device, on_step=on_step,
             longact_cfg=LongActConfig(point=point))
    return per_step


@pytest.fixture(scope="module")
def single():
    return run_distributed(_train_with_longact, args=(2, "pre_rope"))[0]


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_statistics_and_masks_are_layout_invariant(single, tp, pp, dp):
    runs = run_distributed(_train_with_longact, tp=tp, pp=pp, dp=dp, args=(2, "pre_rope"))
    for rank, steps in enumerate(runs):
        for t, (got, ref) in enumerate(zip(steps, single)):
            where = f"tp={tp} pp={pp} dp={dp} rank {rank} step {t}"
            assert torch.equal(got["tokens"], ref["tokens"]), where
            torch.testing.assert_close(got["q"], ref["q"], rtol=2e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(got["k"], ref["k"], rtol=2e-5, atol=1e-6, msg=where)
            for scope in SCOPES:
                for a, b in zip(got["masks"][scope], ref["masks"][scope]):
                    assert torch.equal(a, b), f"{where}: {scope} mask differs"
            assert torch.equal(got["state_q"], ref["state_q"]), where
            # every rank of this run holds exactly what rank 0 holds
            assert torch.equal(got["q"], runs[0][t]["q"]), where


def _cp_reduction(runtime):
    """Each CP rank sees half of the sequence; the reduced statistic is that of the whole."""
    from megatron.core import parallel_state as ps

    from megatron_longact.longact import QKGeometry
    from megatron_longact.longact.stats import StatsCollector

    geo = QKGeometry(num_layers=2, num_heads=4, num_groups=2, head_dim=4)
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 10, 3, 4, 4, generator=gen), torch.randn(2, 10, 3, 2, 4, generator=gen)
    r = ps.get_context_parallel_rank()
    out = {}
    for stat in ("mean_abs", "rms", "max_abs"):
        model = fake_model(1, 2)
        col = StatsCollector([model], geo, stat=stat)
        col.begin_microbatch()
        run_layers(model, q[:, r * 5:(r + 1) * 5], k[:, r * 5:(r + 1) * 5])
        got = col.reduce(dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))
        whole_model = fake_model(1, 2)
        whole = StatsCollector([whole_model], geo, stat=stat)
        whole.begin_microbatch()
        run_layers(whole_model, q, k)
        ref = whole.reduce()
        out[stat] = (got.q_LC, ref.q_LC, got.k_LC, ref.k_LC, got.tokens_L)
    return out


def test_context_parallel_reduction():
    for rank_out in run_distributed(_cp_reduction, cp=2):
        for stat, (gq, rq, gk, rk, tokens) in rank_out.items():
            torch.testing.assert_close(gq, rq, msg=stat)
            torch.testing.assert_close(gk, rk, msg=stat)
            assert tokens.tolist() == [30.0, 30.0]


def _reference_check(runtime):
    """Statistics from the hooks versus q/k recomputed from weights and layer inputs."""
    from megatron_longact.longact import LongAct, LongActGroups
    from megatron_longact.models.builder import build_model
    from megatron_longact.training.engine import reference_initialize

    results = {}
    for variant, kw in (("qwen3", {}), ("qwen2", dict(family="qwen2", qk_layernorm=False,
                                                        add_qkv_bias=True))):
        cfg = _tiny(**kw)
        model, tconfig = build_model(cfg, runtime.parallel)
        reference_initialize(model, cfg, seed=3)
        if cfg.add_qkv_bias:  # give the bias non-zero values so it matters
            with torch.no_grad():
                for layer in model.decoder.layers:
                    layer.self_attention.linear_qkv.bias.normal_(0, 0.5)
        inputs = {}
        for layer in model.decoder.layers:
            layer.register_forward_pre_hook(
                lambda mod, args, kwargs, i=layer.layer_number - 1: inputs.__setitem__(
                    i, (kwargs.get("hidden_states", args[0] if args else None)).detach().clone()),
                with_kwargs=True)
        tokens = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(5))
        pos = torch.arange(32).unsqueeze(0).expand(2, 32)
        for stat in ("mean_abs", "rms", "max_abs"):
            for point in ("pre_rope", "post_rope"):
                la = LongAct(LongActConfig(stat=stat, point=point), [model], tconfig, LongActGroups())
                la.begin_microbatch()
                # A forward that builds a graph: statistics only count update passes.
                model(tokens, pos, None)
                la.end_step(0)
                la.remove()
                ref_q, ref_k = _reference_qk(model, inputs, cfg)
                results[(variant, stat, point)] = (la.last_stats, _stat(ref_q, stat, point),
                                                   _stat(ref_k, stat, point), la.state.q_keep_LC)
    return results


def _reference_qk(model, inputs, cfg):
    """Plain-PyTorch q, k per layer: RMSNorm, fused projection in megatron's grouped row order,
    optional bias, optional QK RMSNorm."""
    H, G, D = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    qs, ks = [], []
    for layer in model.decoder.layers:
        x = inputs[layer.layer_number - 1].float()  # [S, B, h]
        ln = layer.input_layernorm
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight
        lin = layer.self_attention.linear_qkv
        y = x @ lin.weight.t()
        if cfg.add_qkv_bias:
            y = y + lin.bias
        y = y.reshape(*y.shape[:2], G, (H // G + 2) * D)
        q = y[..., : (H // G) * D].reshape(*y.shape[:2], H, D)
        k = y[..., (H // G) * D:(H // G + 1) * D]
        if cfg.qk_layernorm:
            for t, norm in ((q, layer.self_attention.q_layernorm), (k, layer.self_attention.k_layernorm)):
                t.copy_(t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight)
        qs.append(q)
        ks.append(k)
    return qs, ks


def _stat(per_layer, stat, point):
    out = []
    for x in per_layer:
        if point == "post_rope":
            half = x.shape[-1] // 2
            p = torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
            x = torch.cat([p, p], -1)
        x = x.abs()
        v = {"mean_abs": lambda t: t.mean((0, 1)), "rms": lambda t: t.pow(2).mean((0, 1)).sqrt(),
             "max_abs": lambda t: t.amax((0, 1))}[stat](x)
        out.append(v.reshape(-1))
    return torch.stack(out)


def _python_topk(row, k):
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    return set(order[:k])


def test_statistics_match_an_independent_reference():
    results = run_distributed(_reference_check)[0]
    assert len(results) == 12
    for key, (got, ref_q, ref_k, q_keep) in results.items():
        torch.testing.assert_close(got.q_LC, ref_q, rtol=1e-4, atol=1e-5, msg=str(key))
        torch.testing.assert_close(got.k_LC, ref_k, rtol=1e-4, atol=1e-5, msg=str(key))
        for layer in range(ref_q.shape[0]):
            kept = set(torch.nonzero(q_keep[layer]).flatten().tolist())
            assert kept == _python_topk(ref_q[layer].tolist(), 19), key  # round(0.3 * 64) = 19


def _recompute_run(runtime):
    return [_train_with_longact(runtime, 1, "pre_rope", recompute=r)[0] for r in ("none", "full")]


def test_activation_recomputation_counts_each_microbatch_once():
    plain, recomputed = run_distributed(_recompute_run)[0]
    assert torch.equal(plain["tokens"], recomputed["tokens"])
    torch.testing.assert_close(plain["q"], recomputed["q"])
