"""The rollout section and the pure parts of the rollout room, without vLLM: config validation,
the one-line error when the vLLM extra is missing (before any model), the mismatch metric and the
truncated importance-sampling correction."""

from pathlib import Path

import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.rollout import RolloutConfig
from megatron_longact.rollout import mismatch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kwargs, message", [
    (dict(engine="sglang"), "rollout.engine: got 'sglang'"),
    (dict(engine="vllm_server"), "rollout.server_urls: required"),
    (dict(engine="vllm_server", server_urls=["127.0.0.1:8000"]), "rollout.server_urls[0]"),
    (dict(engine="vllm", server_urls=["http://a:1"]), "rollout.server_urls: only used"),
    (dict(sync_interval=0), "rollout.sync_interval"),
    (dict(engine="vllm", is_cap=0.5, is_correction="tis"), "rollout.is_cap"),
    (dict(is_correction="tis"), "rollout.is_correction: the megatron engine"),
    (dict(gpu_memory_utilization=1.5), "rollout.gpu_memory_utilization"),
])
def test_bad_rollout_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as exc:
        RolloutConfig(**kwargs)
    assert message in str(exc.value)


def _forbid_initialize(monkeypatch):
    from megatron_longact.cli import train as train_cli

    monkeypatch.setattr(train_cli, "initialize", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("initialize() ran although the rollout engine cannot run")))
    return train_cli


def test_vllm_engine_without_vllm_is_one_error_naming_the_extra(monkeypatch, capsys, tmp_path):
    import megatron_longact.rollout.base as base

    train_cli = _forbid_initialize(monkeypatch)
    monkeypatch.setattr(base, "vllm_available", lambda: False)
    for engine in ("vllm", "vllm_server"):
        extra = ["rollout.server_urls=[http://127.0.0.1:9]"] if engine == "vllm_server" else []
        rc = train_cli.main(["--config", str(ROOT / "configs/demo_cpu_vllm.yaml"),
                             f"rollout.engine={engine}", f"output.dir={tmp_path}/o", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "megatron-longact[vllm]" in err and f"rollout.engine: '{engine}'" in err


def test_vllm_on_cpu_refuses_head_sizes_its_attention_lacks(monkeypatch, capsys, tmp_path):
    import megatron_longact.rollout.base as base

    train_cli = _forbid_initialize(monkeypatch)
    monkeypatch.setattr(base, "vllm_available", lambda: True)
    # The native demo's tiny model has head_dim 16.
    rc = train_cli.main(["--config", str(ROOT / "configs/demo_cpu.yaml"), "rollout.engine=vllm",
                         f"output.dir={tmp_path}/o"])
    assert rc == 2 and "model.head_dim: 16 is not a head size" in capsys.readouterr().err


class _Gen:
    def __init__(self, log_probs, lengths):
        self.log_probs, self.response_lengths = log_probs, torch.tensor(lengths)


def test_engine_log_probs_land_in_prediction_space_and_mismatch_is_measured():
    gen = _Gen(torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]]), [3, 2])
    eng = mismatch.engine_log_probs_BT(gen, [2, 4], width=8)
    assert eng.tolist() == [[0, -1, -2, -3, 0, 0, 0], [0, 0, 0, -0.5, -0.25, 0, 0]]
    mask = (eng != 0).float()
    meg = eng + mask * torch.tensor([[0, 0.1, -0.2, 0.0, 0, 0, 0], [0, 0, 0, 0.3, 0.0, 0, 0]])
    total, count, top = mismatch.mismatch_stats(eng, meg, mask)
    assert count == 5 and total == pytest.approx(0.6) and top == pytest.approx(0.3)


def test_tis_weights_are_truncated_ratios_and_weight_each_token_loss():
    from megatron_longact.rl.losses import policy_loss

    torch.manual_seed(0)
    meg = -torch.rand(3, 5) * 3
    eng = meg + torch.randn(3, 5)  # engine and trainer disagree
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    w = mismatch.tis_weights(meg, eng, mask, cap=2.0)
    expect = torch.exp(meg - eng).clamp(max=2.0)
    assert torch.allclose(w[mask.bool()], expect[mask.bool()]) and (w[~mask.bool()] == 1).all()
    assert (w <= 2.0).all() and (w == 2.0).any()
    # Weighting the advantages equals weighting each token's clipped-surrogate loss, off the
    # trust region too (log-probs of the update differ from the old ones).
    adv = torch.tensor([1.0, -0.5, 2.0])
    logp = (meg + 0.3 * torch.randn(3, 5)).requires_grad_()
    weighted, _ = policy_loss("dapo", logp, meg, mismatch.apply_tis(adv, w), mask)
    grad_weighted = torch.autograd.grad(weighted, logp)[0]
    plain_BT = []
    for t in range(5):  # per-token losses via one-hot masks: loss of token (i, t) alone
        for i in range(3):
            if mask[i, t]:
                one = torch.zeros_like(mask)
                one[i, t] = 1
                loss, _ = policy_loss("dapo", logp, meg, adv, one, global_num_tokens=mask.sum())
                plain_BT.append(w[i, t] * loss)
    grad_plain = torch.autograd.grad(sum(plain_BT), logp)[0]
    assert torch.allclose(grad_weighted, grad_plain, atol=1e-6)
    # Off: no correction means the advantages are untouched.
    unweighted, _ = policy_loss("dapo", logp, meg, adv, mask)
    assert not torch.allclose(weighted, unweighted)


def test_vllm_sampling_stops_at_our_eos_unless_ignore_eos():
    from megatron_longact.generation import SamplingConfig
    from megatron_longact.rollout.vllm_engine import sampling_params_kwargs

    stop = sampling_params_kwargs(SamplingConfig(temperature=1.0), eos_id=258, sample_ids=[0, 1])
    run_on = sampling_params_kwargs(SamplingConfig(temperature=1.0, ignore_eos=True), eos_id=258,
                                    sample_ids=[0, 1])
    assert [k["stop_token_ids"] for k in stop] == [[258], [258]]
    assert [k["stop_token_ids"] for k in run_on] == [[], []]
    # vLLM's own EOS handling stays off either way (the model config's EOS is not ours).
    assert all(k["ignore_eos"] for k in stop + run_on)
    assert [k["seed"] for k in stop] == [k["seed"] for k in run_on]
