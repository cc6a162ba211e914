"""The data-side parts of DAPO (Yu et al. 2025, arXiv 2503.14476): dynamic sampling, overlong
filtering and soft overlong punishment. The loss side (clip-higher, token-level loss) is
``policy_loss("dapo", ...)`` in :mod:`megatron_longact.rl.losses`.

Shape legend: ``_B`` is ``[batch]`` (one entry per response), ``_BT`` is ``[batch, response_len]``,
``_GN`` is ``[num_groups, group_size]`` (responses to the same prompt in one row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# Overlong reward shaping
# ---------------------------------------------------------------------------------------------------


def overlong_filter(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering: mask out every token of the truncated responses.

    DAPO masks the loss of responses cut at the length limit, whose reward says nothing about their
    quality. ``truncated`` is ``[batch]`` bool (True where generation stopped at the limit, e.g. the
    engine's ``finish_reason == "length"``); the returned mask has ``response_mask``'s shape and dtype.
    Filtered responses select no token, so they drop out of the counts of
    :func:`megatron_longact.rl.batch_stats.global_batch_counts`; compute those after filtering.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask: got shape {list(response_mask.shape)}, expected [batch, response_len]")
    if truncated.shape != response_mask.shape[:1] or truncated.dtype != torch.bool:
        raise ValueError(f"truncated: got shape {list(truncated.shape)} and dtype {truncated.dtype}, "
                         f"expected a bool tensor [{response_mask.shape[0]}] (one flag per response)")
    keep_B1 = (~truncated.to(response_mask.device))[:, None]
    if response_mask.dtype == torch.bool:
        return response_mask & keep_B1
    return response_mask * keep_B1.to(response_mask.dtype)


def soft_overlong_punishment(response_lengths: torch.Tensor, max_len: int, cache_len: int,
                             penalty_factor: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment, a length-aware reward added to the task reward (DAPO, sec. 3.4):

        R_length(y) = 0                                     if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                    = -1                                    if L_max < |y|

    with L_max = ``max_len`` (the generation limit; the paper uses 20480) and L_cache =
    ``cache_len`` (the punishment interval; 4096). The penalty grows linearly from 0 to -1 over the
    last ``cache_len`` tokens. ``penalty_factor`` scales it (verl's ``overlong_buffer.penalty_factor``;
    1.0 is the paper).

    Returns ``[batch]`` float32 penalties (<= 0) for the ``[batch]`` response lengths in tokens.
    """
    for name, value in (("max_len", max_len), ("cache_len", cache_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: got {value!r}, expected an integer > 0")
    if cache_len > max_len:
        raise ValueError(f"cache_len: got {cache_len}, expected at most max_len={max_len} "
                         "(the punishment interval is the last cache_len tokens before max_len)")
    if isinstance(penalty_factor, bool) or not isinstance(penalty_factor, (int, float)) or penalty_factor < 0:
        raise ValueError(f"penalty_factor: got {penalty_factor!r}, expected a number >= 0")
    if response_lengths.dim() != 1:
        raise ValueError(f"response_lengths: got shape {list(response_lengths.shape)}, expected [batch]")
    lengths_B = response_lengths.to(torch.float32)
    expected_len = max_len - cache_len
    # Clamping at -1 gives the third case (|y| > L_max) from the second's formula.
    penalty_B = ((expected_len - lengths_B) / cache_len).clamp(min=-1.0, max=0.0)
    return penalty_B * penalty_factor


# ---------------------------------------------------------------------------------------------------
# Dynamic sampling
# ---------------------------------------------------------------------------------------------------


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[num_groups]`` bool: True where a group's rewards are not all equal.

    A group whose rewards are all equal has advantage 0 for every response under GRPO, Dr. GRPO and
    RLOO and contributes no gradient; DAPO's dynamic sampling drops it (its constraint
    0 < |{o_i : is_equivalent(a, o_i)}| < G, generalized to any reward). Equality is exact.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards: got shape {list(rewards.shape)}, expected [num_groups, group_size]")
    return (rewards != rewards[:, :1]).any(dim=-1)


class DynamicSamplingExhausted(RuntimeError):
    """Dynamic sampling hit ``max_tries`` before the batch was full."""

    def __init__(self, message: str, result: "DynamicSamplingResult"):
        super().__init__(message)
        self.result = result


@dataclass
class DynamicSamplingResult:
    """What one :meth:`DynamicSampler.sample` call kept and how it got there."""

    groups: list
    """The kept groups, in generation order; ``num_groups`` of them unless ``exhausted``."""
    rewards: torch.Tensor
    """``[len(groups), group_size]`` their rewards (the tensor sample_fn returned, rows kept)."""
    num_tries: int
    """Calls of sample_fn."""
    num_generated: int
    """Groups generated over all tries."""
    num_dropped: int
    """Groups dropped because their rewards were all equal."""
    num_surplus: int
    """Informative groups generated beyond ``num_groups`` and discarded (from the last try)."""
    exhausted: bool = False
    """True when ``max_tries`` was hit with fewer than ``num_groups`` groups (``allow_partial``)."""
    history: list[int] = field(default_factory=list)
    """Informative groups per try, for logging."""


class DynamicSampler:
    """DAPO's dynamic sampling: generate until the batch holds ``num_groups`` informative groups.

    ``sample_fn()`` generates one batch of groups and returns ``(groups, rewards)``: a sequence of
    ``n`` groups (any objects: prompts with their responses) and a ``[n, group_size]`` tensor of the
    rewards to filter on (verl lets this be accuracy rather than the shaped score, since an overlong
    penalty makes otherwise equal rewards differ). Each call of :meth:`sample` calls it until
    ``num_groups`` groups with unequal rewards were collected, keeps the first ``num_groups`` in
    generation order (the surplus of the last try is discarded, as in verl), and returns them.

    When ``max_tries`` calls did not fill the batch, :meth:`sample` raises
    :class:`DynamicSamplingExhausted` with a message giving the counts, or, with
    ``allow_partial=True``, returns the partial batch with ``exhausted=True``.

    In a data-parallel job, either call ``sample`` on one rank and scatter the result, or make
    ``sample_fn`` return the same rewards on every rank: the decisions depend only on the rewards,
    so every rank then keeps the same groups.
    """

    def __init__(self, sample_fn: Callable[[], tuple[Sequence[Any], torch.Tensor]], num_groups: int,
                 max_tries: int, allow_partial: bool = False):
        if not callable(sample_fn):
            raise ValueError(f"sample_fn: got {type(sample_fn).__name__}, expected a callable returning "
                             "(groups, rewards[num_groups, group_size])")
        for name, value in (("num_groups", num_groups), ("max_tries", max_tries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}, expected an integer >= 1")
        self.sample_fn = sample_fn
        self.num_groups = num_groups
        self.max_tries = max_tries
        self.allow_partial = allow_partial

    def _call_sample_fn(self, attempt: int) -> tuple[list, torch.Tensor]:
        out = self.sample_fn()
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"sample_fn: try {attempt} returned {type(out).__name__}, expected a tuple "
                             "(groups, rewards[num_groups, group_size])")
        groups, rewards = list(out[0]), out[1]
        if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[0] != len(groups):
            shape = list(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
            raise ValueError(f"sample_fn: try {attempt} returned {len(groups)} groups and rewards {shape}, "
                             f"expected rewards of shape [{len(groups)}, group_size]")
        return groups, rewards

    def sample(self) -> DynamicSamplingResult:
        kept_groups: list = []
        kept_rewards: list[torch.Tensor] = []
        num_generated = num_dropped = num_surplus = 0
        history: list[int] = []
        group_size = None
        attempt = 0
        while len(kept_groups) < self.num_groups and attempt < self.max_tries:
            attempt += 1
            groups, rewards = self._call_sample_fn(attempt)
            if group_size is not None and rewards.shape[1] != group_size:
                raise ValueError(f"sample_fn: try {attempt} returned groups of {rewards.shape[1]} responses, "
                                 f"expected {group_size} like the first try")
            group_size = rewards.shape[1]
            keep = informative_groups(rewards).tolist()
            num_generated += len(groups)
            num_dropped += len(groups) - sum(keep)
            history.append(sum(keep))
            for group, reward_row, is_kept in zip(groups, rewards, keep):
                if not is_kept:
                    continue
                if len(kept_groups) < self.num_groups:
                    kept_groups.append(group)
                    kept_rewards.append(reward_row)
                else:
                    num_surplus += 1
        if kept_rewards:
            rewards_out = torch.stack(kept_rewards)
        else:
            rewards_out = torch.empty(0, group_size or 0)
        result = DynamicSamplingResult(kept_groups, rewards_out, attempt, num_generated, num_dropped,
                                       num_surplus, exhausted=len(kept_groups) < self.num_groups,
                                       history=history)
        if result.exhausted and not self.allow_partial:
            raise DynamicSamplingExhausted(
                f"dynamic sampling: {len(kept_groups)} of num_groups={self.num_groups} groups after "
                f"max_tries={self.max_tries} calls of sample_fn ({num_generated} groups generated, "
                f"{num_dropped} dropped because all their rewards were equal); raise max_tries, use "
                "allow_partial=True, or check that the prompts are neither all solved nor all failed",
                result)
        return result

    __call__ = sample


def dynamic_sample(sample_fn: Callable[[], tuple[Sequence[Any], torch.Tensor]], num_groups: int,
                   max_tries: int, allow_partial: bool = False) -> DynamicSamplingResult:
    """One-shot form of :class:`DynamicSampler`."""
    return DynamicSampler(sample_fn, num_groups, max_tries, allow_partial).sample()
