"""Group advantages (GRPO, Dr. GRPO) and RLOO against hand-computed examples."""

import math

import pytest
import torch

from megatron_longact.rl.advantages import (
    advantage_estimator_names,
    compute_advantages,
    group_advantages,
    rloo_advantages,
    token_advantages,
)

# Two groups of four: a mixed group and a group whose rewards are all equal.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_grpo_hand_example_uses_unbiased_std():
    # Group 0: mean 0.5, deviations +-0.5, sum of squares 1.0; unbiased variance 1.0 / (4 - 1) = 1/3,
    # std = 0.577350, so A = +-0.5 / (0.577350 + 1e-6) = +-0.866024. (The biased std, 0.5, would give
    # +-1.) Group 1: all equal, mean 1, std 0 -> A = 0 / (0 + eps) = 0.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, group_size=4), expected)
    # eps is added to the std: with eps = 0.5, 0.5 / (0.577350 + 0.5) = 0.464102.
    b = 0.5 / (math.sqrt(1 / 3) + 0.5)
    torch.testing.assert_close(group_advantages(REWARDS, 4, eps=0.5)[:4], torch.tensor([b, -b, -b, b]))


def test_dr_grpo_is_mean_centering_only():
    # Group 0: 1 - 0.5 = 0.5, 0 - 0.5 = -0.5; group 1: 1 - 1 = 0.
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, norm_by_std=False), expected)
    torch.testing.assert_close(compute_advantages("dr_grpo", REWARDS, 4), expected)


def test_rloo_hand_example():
    # Group 0: reward 1 against the others' mean (0 + 0 + 1) / 3 = 1/3 -> 2/3; reward 0 against
    # (1 + 0 + 1) / 3 = 2/3 -> -2/3. Group 1: 1 - 1 = 0.
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rloo_advantages(REWARDS, 4), expected)
    # Direct leave-one-out on random rewards.
    r = torch.randn(12, dtype=torch.float64)
    groups = r.view(4, 3)
    direct = torch.stack([groups[:, i] - (groups.sum(-1) - groups[:, i]) / 2 for i in range(3)], dim=-1)
    torch.testing.assert_close(rloo_advantages(r, 3), direct.reshape(-1))


def test_matches_torch_std_and_registry():
    r = torch.randn(6 * 5, dtype=torch.float64)
    g = r.view(6, 5)
    expected = ((g - g.mean(-1, keepdim=True)) / (torch.std(g, dim=-1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(group_advantages(r, 5), expected)
    torch.testing.assert_close(compute_advantages("grpo", r, 5), expected)
    assert advantage_estimator_names() == ["dr_grpo", "grpo", "rloo"]


def test_low_precision_rewards_and_no_gradient():
    r = REWARDS.clone().bfloat16().requires_grad_()
    a = group_advantages(r, 4)
    assert a.dtype == torch.float32 and not a.requires_grad


def test_token_advantages():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(token_advantages(torch.tensor([2.0, -1.0]), mask),
                               torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="advantages: got shape"):
        token_advantages(torch.ones(3), mask)


def test_errors():
    with pytest.raises(ValueError, match="group_size: got 1"):
        group_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="group_size: got 2.0"):
        group_advantages(REWARDS, 2.0)
    with pytest.raises(ValueError, match="rewards: got 8 rewards, expected a positive multiple of group_size=3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match=r"rewards: got \[2, 4\]"):
        group_advantages(REWARDS.view(2, 4), 4)
    with pytest.raises(ValueError, match="eps: got 0"):
        group_advantages(REWARDS, 4, eps=0)
    with pytest.raises(ValueError, match="name: got 'gae'"):
        compute_advantages("gae", REWARDS, 4)
    with pytest.raises(ValueError, match="unknown keyword 'eps'"):
        compute_advantages("rloo", REWARDS, 4, eps=1e-4)
