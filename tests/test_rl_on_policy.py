"""The old-log-prob forward: skipped when the update is exactly on-policy (one epoch, one
mini-batch), where the update's own detached log-probs give the same loss and gradients as the
recomputed ones; still run with several epochs or mini-batches, or when asked to."""

from unittest import mock

import pytest
import torch

from megatron_longact.rl.on_policy import needs_old_log_prob_forward
from tests.dist_harness import run_distributed
from tests.test_trainer import _config


def test_needs_old_log_prob_forward():
    assert not needs_old_log_prob_forward(1, 1)
    assert needs_old_log_prob_forward(2, 1) and needs_old_log_prob_forward(1, 2)
    assert needs_old_log_prob_forward(1, 1, "recompute")
    with pytest.raises(ValueError, match="rl.old_log_probs"):
        needs_old_log_prob_forward(1, 1, "never")


def _one_rl_step(runtime, tmp, out, over, sampler_lp_offset=0.0):
    """One RL step; ``sampler_lp_offset`` is added to the log-probs the rollout engine reports (an
    engine whose log-probs are not the policy's full distribution at the sampling temperature,
    as vLLM's after top-k/top-p)."""
    import dataclasses

    import megatron_longact.generation as generation
    from megatron_longact.rollout.base import MegatronEngine
    from megatron_longact.training.trainer import Trainer

    cfg = _config(tmp, out, **{"train.steps": 1, "sft.steps": 0, **over})
    trainer = Trainer(cfg, runtime)
    calls = []
    real = generation.sequence_log_probs
    real_generate = MegatronEngine.generate

    def counting(model, *args, **kwargs):
        calls.append(model is trainer.engine.model[0])
        return real(model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)
        return dataclasses.replace(out, log_probs=out.log_probs + sampler_lp_offset)

    with mock.patch.object(generation, "sequence_log_probs", counting), \
            mock.patch.object(MegatronEngine, "generate", generate):
        history = trainer.run()
    params = {n: p.detach().clone() for n, p in trainer.engine.gpt_models[0].named_parameters()}
    return sum(calls), history[-1], params


def test_on_policy_update_skips_the_old_log_prob_forward(tmp_path):
    # strategy=none: the extra no-grad forward of the recomputing run may feed LongAct's
    # statistics (and so move the mask); this test is about the policy loss only. The engine's
    # log-probs are off by 0.5 nats: neither run may use them for its metrics (rl/entropy is
    # measured on the update pass when no old-log-prob forward runs).
    full = {"longact.strategy": "none"}
    auto = run_distributed(_one_rl_step, args=(str(tmp_path), str(tmp_path / "a"), full, 0.5))[0]
    recomputed = run_distributed(_one_rl_step, args=(str(tmp_path), str(tmp_path / "b"),
                                                     {**full, "rl.old_log_probs": "recompute"}, 0.5))[0]
    assert auto[0] == 0, "an on-policy update ran a forward pass for the old log-probs"
    assert recomputed[0] == 1
    # Same rollouts (same seed), same loss and the same update as with recomputed old log-probs.
    assert auto[1]["rl/reward"] == recomputed[1]["rl/reward"]
    assert "train/grad_norm" in auto[1] and any("pg_loss" in k for k in auto[1])
    for key, value in auto[1].items():  # losses, ratios, grad norm, entropy, LongAct metrics
        # (rl/entropy: measured on the update pass when no old-log-prob forward runs)
        if not key.startswith(("perf/", "longact/")):
            assert value == pytest.approx(recomputed[1][key], rel=1e-5, abs=1e-7), key
    for name, p in auto[2].items():
        torch.testing.assert_close(p, recomputed[2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_several_epochs_still_recompute_the_old_log_probs(tmp_path):
    calls = run_distributed(_one_rl_step, args=(str(tmp_path), str(tmp_path / "c"),
                                                {"rl.ppo_epochs": 2}))[0][0]
    assert calls == 1
