"""Selection, statistics knobs and metrics, checked on chosen tensors (single process)."""

import numpy as np
import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.longact import LongActConfig, QKGeometry, keep_count, select_channels
from megatron_longact.longact.metrics import saliency_heatmap, step_metrics
from megatron_longact.longact.state import MaskState, jaccard_L
from megatron_longact.longact.stats import GlobalStats, StatsCollector
from tests.longact_fakes import fake_model, run_layers

GEO = QKGeometry(num_layers=2, num_heads=4, num_groups=2, head_dim=4)


def test_keep_count_rounds_and_clamps():
    assert keep_count(10, 0.3) == 3
    assert keep_count(16, 0.3) == 5  # 4.8 -> 5
    assert keep_count(3, 0.01) == 1
    assert keep_count(4, 1.0) == 4


def test_topk_layer_scope_and_ties():
    q = torch.zeros(2, 16)
    q[0, [3, 7, 9]] = 5.0
    q[1, :] = 1.0  # all tied: the lowest indices win
    k = torch.arange(16.0).repeat(2, 1).flip(1)[:, :8]
    qm, km = select_channels(q, k, GEO, keep_ratio=0.3, scope="layer", strategy="topk")
    assert qm.sum(1).tolist() == [5, 5]
    assert set(torch.nonzero(qm[0]).flatten().tolist()) >= {3, 7, 9}
    assert torch.nonzero(qm[1]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.nonzero(km[0]).flatten().tolist() == [0, 1]  # k = [15..8], highest first


def test_bottomk_random_none_keep_the_same_count():
    torch.manual_seed(0)
    q, k = torch.rand(2, 16), torch.rand(2, 8)
    top, _ = select_channels(q, k, GEO, keep_ratio=0.25, scope="layer", strategy="topk")
    bottom, _ = select_channels(q, k, GEO, keep_ratio=0.25, scope="layer", strategy="bottomk")
    rnd1, _ = select_channels(q, k, GEO, keep_ratio=0.25, scope="layer", strategy="random", seed=1)
    rnd2, _ = select_channels(q, k, GEO, keep_ratio=0.25, scope="layer", strategy="random", seed=1)
    rnd3, _ = select_channels(q, k, GEO, keep_ratio=0.25, scope="layer", strategy="random", seed=2)
    none, knone = select_channels(q, k, GEO, keep_ratio=0.25, scope="layer", strategy="none")
    for m in (top, bottom, rnd1):
        assert m.sum(1).tolist() == [4, 4]
    assert not (top & bottom).any()
    for layer in range(2):
        assert q[layer][bottom[layer]].max() < q[layer][top[layer]].min()
    assert torch.equal(rnd1, rnd2) and not torch.equal(rnd1, rnd3)
    assert none.all() and knone.all()


def test_head_and_model_scope():
    torch.manual_seed(1)
    q, k = torch.rand(2, 16), torch.rand(2, 8)
    qm, km = select_channels(q, k, GEO, keep_ratio=0.5, scope="head", strategy="topk")
    assert qm.reshape(2, 4, 4).sum(-1).eq(2).all() and km.reshape(2, 2, 4).sum(-1).eq(2).all()
    q[1] += 10.0  # layer 1 dominates a model-wide selection
    qm, _ = select_channels(q, k, GEO, keep_ratio=0.5, scope="model", strategy="topk")
    assert qm.sum() == 16 and qm[1].all() and not qm[0].any()


def test_select_rejects_bad_input():
    with pytest.raises(ValueError, match=r"q statistics: shape \(2, 15\)"):
        select_channels(torch.zeros(2, 15), torch.zeros(2, 8), GEO, keep_ratio=0.3, scope="layer", strategy="topk")
    bad = torch.zeros(2, 16)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite in layers \[1\]"):
        select_channels(bad, torch.zeros(2, 8), GEO, keep_ratio=0.3, scope="layer", strategy="topk")


@pytest.mark.parametrize("field,value,message", [
    ("keep_ratio", 0.0, "longact.keep_ratio"), ("keep_ratio", 1.5, "longact.keep_ratio"),
    ("stat", "mean", "longact.stat"), ("point", "mid_rope", "longact.point"),
    ("tokens", "some", "longact.tokens"), ("ema", 1.0, "longact.ema"),
    ("scope", "block", "longact.scope"), ("strategy", "top", "longact.strategy"),
    ("schedule", "sometimes", "longact.schedule"), ("every_n", 0, "longact.every_n"),
    ("apply_to", "weights", "longact.apply_to")])
def test_invalid_config_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LongActConfig(**{field: value})
    assert issubclass(ConfigError, ValueError)


def _collector(stat="mean_abs", point="pre_rope"):
    model = fake_model(1, 2)
    return model, StatsCollector([model], GEO, stat=stat, point=point)


def _qk(seed=0, S=6, B=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, S, B, 4, 4, generator=gen), torch.randn(2, S, B, 2, 4, generator=gen))


@pytest.mark.parametrize("stat", ["mean_abs", "rms", "max_abs"])
def test_statistics_formulas(stat):
    model, col = _collector(stat)
    q, k = _qk()
    col.begin_microbatch()
    run_layers(model, q, k)
    got = col.reduce()
    ref = {"mean_abs": lambda x: x.abs().mean((1, 2)),
           "rms": lambda x: x.pow(2).mean((1, 2)).sqrt(),
           "max_abs": lambda x: x.abs().amax((1, 2))}[stat]
    torch.testing.assert_close(got.q_LC, ref(q).reshape(2, 16))
    torch.testing.assert_close(got.k_LC, ref(k).reshape(2, 8))


def test_post_rope_uses_pair_norms():
    model, col = _collector(point="post_rope")
    q, k = _qk()
    col.begin_microbatch()
    run_layers(model, q, k)
    got = col.reduce()
    pair = torch.sqrt(q[..., :2] ** 2 + q[..., 2:] ** 2).mean((1, 2))
    torch.testing.assert_close(got.q_LC, torch.cat([pair, pair], -1).reshape(2, 16))


def test_token_mask_and_microbatch_accumulation():
    model, col = _collector()
    q, k = _qk(S=6, B=2)
    mask_SB = torch.zeros(6, 2, dtype=torch.bool)
    mask_SB[:4, 0] = True
    mask_SB[2:, 1] = True
    # two micro-batches: the same tokens split in two halves of the batch
    for b in range(2):
        col.begin_microbatch(mask_SB[:, b:b + 1])
        run_layers(model, q[:, :, b:b + 1], k[:, :, b:b + 1])
    got = col.reduce()
    sel = mask_SB[None, :, :, None, None]
    ref = (q.abs() * sel).sum((1, 2)) / mask_SB.sum()
    torch.testing.assert_close(got.q_LC, ref.reshape(2, 16))
    assert got.tokens_L.tolist() == [8.0, 8.0]


def test_recomputation_is_not_counted_twice():
    model, col = _collector()
    q, k = _qk()
    col.begin_microbatch()
    run_layers(model, q, k)
    run_layers(model, q * 100, k * 100)  # a recomputed forward of the same micro-batch
    torch.testing.assert_close(col.reduce().q_LC, q.abs().mean((1, 2)).reshape(2, 16))


def test_statistics_keep_no_graph():
    model, col = _collector()
    q, k = _qk()
    q.requires_grad_(True)
    col.begin_microbatch()
    run_layers(model, q, k)
    assert not col._q.requires_grad and col._q.dtype == torch.float32


def test_ema_and_schedules():
    s1 = GlobalStats(torch.ones(2, 16), torch.ones(2, 8), torch.ones(2))
    s2 = GlobalStats(torch.full((2, 16), 3.0), torch.full((2, 8), 3.0), torch.ones(2))
    st = MaskState(LongActConfig(ema=0.5), GEO)
    st.update(s1, 0)
    st.update(s2, 1)
    assert torch.allclose(st.ema_q_LC, torch.full((2, 16), 2.0))

    st = MaskState(LongActConfig(schedule="every_n", every_n=2, warmup_steps=1), GEO)
    assert [st.update(s1, t) for t in range(6)] == [False, True, False, True, False, True]
    st = MaskState(LongActConfig(schedule="fixed", warmup_steps=2), GEO)
    assert [st.update(s1, t) for t in range(5)] == [False, False, True, False, False]
    assert st.last_mask_step == 2


def test_metrics_and_heatmap():
    torch.manual_seed(0)
    st = MaskState(LongActConfig(), GEO)
    s = GlobalStats(torch.rand(2, 16), torch.rand(2, 8), torch.ones(2))
    m0 = step_metrics(st, s)
    assert m0["longact/kept_fraction_q"] == 1.0 and m0["longact/mask_active"] == 0.0
    st.update(s, 0)
    st.update(GlobalStats(torch.rand(2, 16), torch.rand(2, 8), torch.ones(2)), 1)
    m = step_metrics(st, s)
    assert abs(m["longact/kept_fraction_q"] - 5 / 16) < 1e-9
    assert 0.0 <= m["longact/churn_q_mean"] <= 1.0
    assert m["longact/stat_top_q/layer_1"] == float(s.q_LC[1].max())
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert jaccard_L(a, b).tolist() == [1 / 3]
    img = saliency_heatmap(torch.rand(3, 5000), torch.rand(3, 700), max_cols=1024, row_px=4)
    assert img.dtype == np.uint8 and img.shape == (12, 1024 + 1 + 700, 3)


def test_tokens_knob_selects_prompt_or_response():
    from megatron_longact.longact import LongAct, LongActGroups
    from types import SimpleNamespace

    tconfig = SimpleNamespace(num_layers=2, num_attention_heads=4, num_query_groups=2, kv_channels=4)
    q, k = _qk(S=6, B=2)
    resp_BS = torch.zeros(2, 6, dtype=torch.bool)
    resp_BS[:, 3:] = True
    results = {}
    for tokens in ("all", "prompt", "response"):
        model = fake_model(1, 2)
        la = LongAct(LongActConfig(tokens=tokens), [model], tconfig, LongActGroups())
        la.begin_microbatch(None, resp_BS)
        run_layers(model, q, k)
        la.end_step(0)
        results[tokens] = la.last_stats
    torch.testing.assert_close(results["prompt"].q_LC, q[:, :3].abs().mean((1, 2)).reshape(2, 16))
    torch.testing.assert_close(results["response"].q_LC, q[:, 3:].abs().mean((1, 2)).reshape(2, 16))
    assert results["all"].tokens_L.tolist() == [12.0, 12.0]
    la = LongAct(LongActConfig(tokens="response"), [fake_model(1, 2)], tconfig, LongActGroups())
    with pytest.raises(ValueError, match="needs a response mask"):
        la.begin_microbatch(None, None)


def test_row_mapping_matches_the_fused_qkv_layout():
    """q head h dim d -> (h//G)*R + (h%G)*D + d; k of group g -> g*R + G*D + d (docs/megatron_internals.md)."""
    geo = QKGeometry(num_layers=1, num_heads=4, num_groups=2, head_dim=3)  # G = 2, R = 12
    assert geo.q_rows().tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
    assert geo.k_rows().tolist() == [6, 7, 8, 18, 19, 20]
    q = torch.zeros(12, dtype=torch.bool)
    q[[0, 7]] = True  # head 0 dim 0, head 2 dim 1
    k = torch.zeros(6, dtype=torch.bool)
    k[5] = True  # group 1 dim 2
    rows = geo.row_mask(q, k)
    v_rows = [9, 10, 11, 21, 22, 23]
    assert torch.nonzero(rows).flatten().tolist() == sorted([0, 13, 20] + v_rows)
    assert torch.equal(geo.local_row_mask(q, k, 1, 2), rows[12:])
    both = geo.local_row_mask(torch.stack([q, ~q]), torch.stack([k, ~k]), 0, 2)
    assert torch.equal(both[0], rows[:12]) and both.shape == (2, 12)
    # fewer key groups than TP ranks: ranks 0,1 share group 0, rank 0 reports it
    heads, groups, owner = QKGeometry(1, 4, 1, 3).local_heads(1, 2)
    assert heads.tolist() == [2, 3] and groups.tolist() == [0] and owner.tolist() == [False]


@pytest.mark.parametrize("channels", [16, 13, 8192])
def test_masks_are_packed_eight_channels_a_byte(channels):
    from megatron_longact.longact.state import pack_mask, unpack_mask

    gen = torch.Generator().manual_seed(channels)
    mask = torch.rand(3, channels, generator=gen) < 0.3
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (3, -(-channels // 8))
    assert torch.equal(unpack_mask(bits, channels), mask)


def test_mask_state_keeps_churn_not_the_previous_mask_and_loads_the_bool_layout():
    gen = torch.Generator().manual_seed(0)
    stats = [GlobalStats(torch.rand(2, 16, generator=gen), torch.rand(2, 8, generator=gen), torch.ones(2))
             for _ in range(3)]
    st = MaskState(LongActConfig(), GEO)
    masks = []
    for t, s in enumerate(stats):
        st.update(s, t)
        masks.append((st.q_keep_LC.clone(), st.k_keep_LC.clone()))
    assert torch.equal(st.churn_q_L, jaccard_L(masks[2][0], masks[1][0]))
    assert torch.equal(st.churn_k_L, jaccard_L(masks[2][1], masks[1][1]))
    assert set(st.state_dict()) == {"format", "ema_q_LC", "ema_k_LC", "q_bits_LB", "k_bits_LB",
                                    "churn_q_L", "churn_k_L", "steps_seen", "last_mask_step"}
    # A checkpoint of the earlier layout (bool masks and the previous masks) loads to the same state.
    old = {"ema_q_LC": stats[2].q_LC, "ema_k_LC": stats[2].k_LC, "q_keep_LC": masks[2][0],
           "k_keep_LC": masks[2][1], "prev_q_keep_LC": masks[1][0], "prev_k_keep_LC": masks[1][1],
           "steps_seen": 3, "last_mask_step": 2}
    again = MaskState(LongActConfig(), GEO)
    again.load_state_dict(old)
    assert torch.equal(again.q_keep_LC, masks[2][0]) and torch.equal(again.k_keep_LC, masks[2][1])
    assert torch.equal(again.churn_q_L, st.churn_q_L) and again.last_mask_step == 2
    assert step_metrics(again, stats[2]) == step_metrics(st, stats[2])
    again.load_state_dict(st.state_dict())
    assert torch.equal(again.q_keep_LC, masks[2][0])


def test_llama70b_mask_state_is_small():
    """What every rank keeps between steps at the Llama-3-70B shape (80 layers, 64 heads, 8 KV
    groups, head dim 128) with the default ema=0: two packed masks and the churn vectors."""
    geo = QKGeometry(num_layers=80, num_heads=64, num_groups=8, head_dim=128)
    st = MaskState(LongActConfig(), geo)
    for t in range(2):
        st.update(GlobalStats(torch.rand(80, geo.q_channels), torch.rand(80, geo.k_channels),
                              torch.ones(80)), t)
    held = sum(v.numel() * v.element_size() for v in st.state_dict().values() if torch.is_tensor(v))
    assert held == 80 * (8192 + 1024) // 8 + 2 * 80 * 8


def test_statistics_hooks_issue_few_kernels_per_tensor():
    """On a GPU every operation of the hooks is a kernel launch, for q and k of every layer of every
    micro-batch: the default statistic takes the fp32 copy, |x| and one product that adds into the
    accumulator (plus the token count once per layer), and every other torch call costs host time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_longact.longact.stats import StatsCollector

    free = {"aten.view", "aten.slice", "aten.select", "aten.detach", "aten.alias", "aten._reshape_alias",
            "aten.empty", "aten.expand", "aten.t", "aten.transpose", "aten.as_strided", "aten.unsqueeze"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.all = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.all.append(str(func.overloadpacket))
            if str(func.overloadpacket) not in free:
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    geo = QKGeometry(2, 4, 2, 16)
    collector = StatsCollector([], geo)
    collector.set_layer_slots([0, 1])
    q = torch.randn(32, 2, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(32, 2, 2, 16, dtype=torch.bfloat16)
    collector.begin_microbatch(torch.rand(32, 2) > 0.3)
    collector._observe(0, "q", q)  # the micro-batch's mask is made once
    with Count() as counted:
        collector._observe(1, "q", q)
        collector._observe(1, "k", k)
    assert len(counted.ops) <= 7, counted.ops
    # and little host work around them: the accumulator views are made once, not per call (each
    # torch call costs host time on a GPU node too); 18 operations in all before that
    assert len(counted.all) <= 11, counted.all
    # and the sums are the masked sums of |x|
    mask = collector._mask(32, 2, q)[0].view(32, 2)
    want_q = (q.float().abs() * mask[:, :, None, None]).sum(dim=(0, 1)).reshape(-1)
    want_k = (k.float().abs() * mask[:, :, None, None]).sum(dim=(0, 1)).reshape(-1)
    torch.testing.assert_close(collector._q[1], want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collector._k[1], want_k, rtol=1e-5, atol=1e-5)
    assert collector._count[1].item() == mask.sum().item()
