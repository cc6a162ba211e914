"""Outcome advantages from groups of responses to the same prompt: GRPO, Dr. GRPO, RLOO.

    advantages_B = group_advantages(rewards_B, group_size=8)                     # GRPO
    advantages_B = group_advantages(rewards_B, group_size=8, norm_by_std=False)  # Dr. GRPO
    advantages_B = rloo_advantages(rewards_B, group_size=8)                      # RLOO

Shape legend: ``_B`` is ``[batch]``, one scalar reward per response; ``_BT`` is
``[batch, response_len]``. Layout: the batch is ``batch // group_size`` groups stored contiguously,
responses ``[k * group_size, (k + 1) * group_size)`` answering prompt k (how verl and TRL repeat
prompts with ``repeat_interleave``). A group must be whole on the rank that computes its advantages,
so compute them before splitting the batch over data-parallel ranks (they are cheap).

A group of one response has no baseline; verl then returns the raw reward and TRL refuses
``num_generations=1``. Here ``group_size`` must be at least 2.
"""

from __future__ import annotations

from typing import Callable

import torch


def _check_rewards(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: got {group_size!r}, expected an integer >= 2 "
                         "(a group of one response has no baseline)")
    if not isinstance(rewards_B, torch.Tensor) or rewards_B.dim() != 1:
        shape = list(rewards_B.shape) if isinstance(rewards_B, torch.Tensor) else type(rewards_B).__name__
        raise ValueError(f"rewards: got {shape}, expected a 1-D tensor [batch] with one reward per response "
                         "(sum token-level rewards over the response first)")
    if rewards_B.numel() == 0 or rewards_B.numel() % group_size:
        raise ValueError(f"rewards: got {rewards_B.numel()} rewards, expected a positive multiple of "
                         f"group_size={group_size} (whole groups, stored contiguously)")
    # Group statistics in at least float32: bf16 rewards would lose the small differences.
    dtype = torch.promote_types(rewards_B.dtype, torch.float32)
    return rewards_B.to(dtype).view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO and Dr. GRPO outcome advantages, one per response.

    GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, sec. 4.1.2), ``norm_by_std=True``:

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    Dr. GRPO (Liu et al. 2025, arXiv 2503.20783), ``norm_by_std=False``: the division by the
    standard deviation biases updates towards too easy and too hard prompts, so it is dropped:

        A_i = r_i - mean(r_group)

    Conventions (the paper writes only "std"): the standard deviation is ``torch.std``, the unbiased
    estimator with Bessel's correction (divides by G - 1), as in verl's
    ``compute_grpo_outcome_advantage`` and TRL's ``GRPOTrainer``; ``eps`` is added to the standard
    deviation, not to the variance (verl's default eps is 1e-6, TRL's is 1e-4). A group whose rewards
    are all equal gets advantage 0 (its numerator is 0), which is why DAPO's dynamic sampling drops it.

    Args:
        rewards: ``[batch]`` one scalar reward per response, groups contiguous (module docstring).
        group_size: responses per prompt, >= 2.
        norm_by_std: divide by the group standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation, > 0.

    Returns:
        ``[batch]`` advantages (no gradient); broadcast over tokens with :func:`token_advantages`, or
        pass them to ``policy_loss`` as they are.
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps: got {eps!r}, expected a number > 0")
    rewards_GN = _check_rewards(rewards, group_size).detach()
    centered_GN = rewards_GN - rewards_GN.mean(dim=-1, keepdim=True)
    if norm_by_std:
        centered_GN = centered_GN / (rewards_GN.std(dim=-1, keepdim=True) + eps)
    return centered_GN.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, one per response.

    Ahmadian et al. 2024, "Back to Basics" (arXiv 2402.14740), after Kool et al. 2019: the baseline of
    response i is the mean reward of the other G - 1 responses of its group,

        A_i = r_i - 1/(G - 1) sum_{j != i} r_j = G/(G - 1) * (r_i - mean(r_group))

    the form verl's ``compute_rloo_outcome_advantage`` uses. No standard-deviation normalization.
    Same layout and checks as :func:`group_advantages`.
    """
    rewards_GN = _check_rewards(rewards, group_size).detach()
    centered_GN = rewards_GN - rewards_GN.mean(dim=-1, keepdim=True)
    return (centered_GN * (group_size / (group_size - 1))).reshape(-1)


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast ``[batch]`` advantages over ``[batch, response_len]`` response tokens (0 on padding)."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(f"advantages: got shape {list(advantages.shape)} with response_mask "
                         f"{list(response_mask.shape)}, expected [batch] and [batch, response_len]")
    return advantages[:, None] * response_mask.to(advantages.dtype)


_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": lambda rewards, group_size, eps=1e-6: group_advantages(rewards, group_size, True, eps),
    "dr_grpo": lambda rewards, group_size: group_advantages(rewards, group_size, False),
    "rloo": rloo_advantages,
}


def compute_advantages(name: str, rewards: torch.Tensor, group_size: int, **cfg) -> torch.Tensor:
    """Advantages by estimator name: ``grpo`` (mean and std, accepts ``eps``), ``dr_grpo`` (mean
    only), ``rloo`` (leave-one-out mean)."""
    if name not in _ESTIMATORS:
        raise ValueError(f"name: got {name!r}, expected one of {sorted(_ESTIMATORS)}")
    allowed = ["eps"] if name == "grpo" else []
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"{name} advantages: unknown keyword {unknown[0]!r}, expected one of {allowed}")
    return _ESTIMATORS[name](rewards, group_size, **cfg)


def advantage_estimator_names() -> list[str]:
    return sorted(_ESTIMATORS)
