"""LongAct statistics count update passes only; empty layers keep their mask; one model chunk."""

import pytest
import torch

from megatron_longact.longact import LongActConfig, QKGeometry
from megatron_longact.longact.state import MaskState
from megatron_longact.longact.stats import GlobalStats, StatsCollector
from tests.dist_harness import run_distributed
from tests.longact_fakes import fake_model, run_layers

GEO = QKGeometry(num_layers=2, num_heads=4, num_groups=2, head_dim=4)


def test_no_grad_forward_is_never_counted():
    model = fake_model(1, 2)
    col = StatsCollector([model], GEO)
    q, k = torch.randn(2, 3, 1, 4, 4), torch.randn(2, 3, 1, 2, 4)
    with torch.no_grad():  # collecting is on: the caller "forgot" set_collecting(False)
        col.begin_microbatch()
        run_layers(model, q, k)
    assert col._count.sum() == 0 and col._q.abs().sum() == 0
    col.begin_microbatch()
    run_layers(model, q, k)
    assert col._count.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_layer_without_tokens_keeps_its_previous_mask(ema):
    st = MaskState(LongActConfig(ema=ema), GEO)
    first = GlobalStats(torch.arange(32.0).reshape(2, 16), torch.arange(16.0).reshape(2, 8), torch.ones(2))
    st.update(first, 0)
    q0, k0 = st.q_keep_LC.clone(), st.k_keep_LC.clone()
    # Layer 1 saw no token: all-zero statistics would keep channels 0..4; layer 0 moves on.
    second = GlobalStats(torch.arange(32.0).flip(0).reshape(2, 16) * torch.tensor([[1.0], [0.0]]),
                         torch.arange(16.0).flip(0).reshape(2, 8) * torch.tensor([[1.0], [0.0]]),
                         torch.tensor([5.0, 0.0]))
    assert st.update(second, 1)
    assert torch.equal(st.q_keep_LC[1], q0[1]) and torch.equal(st.k_keep_LC[1], k0[1])
    assert not torch.equal(st.q_keep_LC[0], q0[0])
    if ema:
        assert torch.equal(st.ema_q_LC[1], first.q_LC[1])  # the EMA of the empty layer is kept too
    else:
        assert st.ema_q_LC is None  # with ema=0 no statistics are kept between steps


def test_layer_without_tokens_and_no_previous_mask_raises():
    st = MaskState(LongActConfig(), GEO)
    with pytest.raises(RuntimeError, match=r"layers \[1\].*saw no token in step 0"):
        st.update(GlobalStats(torch.rand(2, 16), torch.rand(2, 8), torch.tensor([3.0, 0.0])), 0)


def test_model_scope_keeps_the_whole_previous_mask():
    st = MaskState(LongActConfig(scope="model"), GEO)
    st.update(GlobalStats(torch.rand(2, 16), torch.rand(2, 8), torch.ones(2)), 0)
    q0 = st.q_keep_LC.clone()
    assert not st.update(GlobalStats(torch.rand(2, 16), torch.rand(2, 8), torch.tensor([1.0, 0.0])), 1)
    assert torch.equal(st.q_keep_LC, q0)


def test_install_rejects_virtual_pipeline_chunks():
    from megatron_longact.longact.optimizer import install

    with pytest.raises(NotImplementedError, match="2 model chunks; virtual pipeline"):
        install([object(), object()], optimizer=None)


def _rl_token_counts(runtime, tmp, tokens):
    from tests.test_trainer import _config

    from megatron_longact.training.trainer import Trainer

    cfg = _config(tmp, f"{tmp}/out", **{"sft.steps": 0, "train.steps": 1, "rl.kl_coef": 0.05,
                                        "longact.tokens": tokens})
    trainer = Trainer(cfg, runtime)
    seen = {}
    original = trainer._collect

    def collect():
        batch = original()
        seen["response_tokens"] = int(batch["gen"].response_lengths.sum())
        seen["prompt_tokens"] = sum(len(p) for p in batch["prompts"])
        return batch

    trainer._collect = collect
    trainer.run()
    return seen, trainer.handle.longact.last_tokens_L.tolist()


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_rl_step_counts_only_the_update_pass_tokens(tmp_path, tokens):
    seen, tokens_L = run_distributed(_rl_token_counts, args=(str(tmp_path), tokens))[0]
    expected = seen["response_tokens"] + (seen["prompt_tokens"] if tokens == "all" else 0)
    assert seen["response_tokens"] > 0
    # The rollout, old-policy and reference log-prob forwards of the step do not count.
    assert tokens_L == [float(expected)] * len(tokens_L)
