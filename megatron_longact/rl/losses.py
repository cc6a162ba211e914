"""Policy-gradient losses for RL post-training, as pure functions registered by name.

    loss, metrics = policy_loss("grpo", log_probs, old_log_probs, advantages, response_mask)

Shape legend: ``_BT`` is ``[batch, response_len]`` (one row per response, one column per response
token, right-padded), ``_B`` is ``[batch]``. Every tensor of one call is local to this rank's
micro-batch; the optional global counts (below) are what tie micro-batches and ranks together.

All five losses are the clipped surrogate of PPO (Schulman et al. 2017, arXiv 1707.06347) per token t
of response i, with advantage A, importance ratio r and clip range (eps_low, eps_high):

    l_it = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))

and, when ``clip_ratio_c`` (c > 1) is set, the dual clip of Ye et al. 2020 (arXiv 1912.09729) for
negative advantages only, which bounds the loss of a very off-policy token:

    l_it = min(l_it, -A c)    if A < 0

The names differ in the ratio, the default clip range and the default aggregation:

    name     ratio r                                  eps_low, high  default loss_agg_mode    paper
    ppo      pi(y_t)/pi_old(y_t), per token           0.2, 0.2       token-mean               1707.06347
    grpo     pi(y_t)/pi_old(y_t), per token           0.2, 0.2       seq-mean-token-mean      2402.03300
    dapo     pi(y_t)/pi_old(y_t), per token           0.2, 0.28      token-mean               2503.14476
    dr_grpo  pi(y_t)/pi_old(y_t), per token           0.2, 0.2       seq-mean-token-sum-norm  2503.20783
    gspo     (pi(y)/pi_old(y))^(1/|y|), per response  3e-4, 4e-4     seq-mean-token-mean      2507.18071

Each default is the one of the paper the name comes from; the docstrings of the registered functions
say where and how the implementation departs from it. GRPO's KL term to the reference policy is not
part of these losses: add :func:`megatron_longact.rl.kl.kl_loss` times its coefficient.

Aggregation over the masked tokens (M the 0/1 response mask, n_i = sum_t M_it the length of response
i, S the responses with n_i > 0; responses with no token are not counted):

    token-mean               sum_it M_it l_it / sum_it M_it
    seq-mean-token-mean      1/|S| sum_i (sum_t M_it l_it / n_i)
    seq-mean-token-sum       1/|S| sum_i  sum_t M_it l_it
    seq-mean-token-sum-norm  sum_it M_it l_it / loss_scale_factor    (default: response_len)

These are verl's ``agg_loss`` conventions (``verl/trainer/ppo/core_algos.py``), which users know.

Layout invariance. When the global batch is split over data-parallel ranks and micro-batches, pass
the whole batch's counts as ``global_num_tokens`` (token-mean) and ``global_num_seqs`` (seq-mean-*),
computed once per step by :func:`megatron_longact.rl.batch_stats.global_batch_counts`. The loss is
then this micro-batch's sum divided by the global count, so that the sum of the returned losses over
micro-batches and DP ranks equals the whole-batch loss, and so do the gradients. The trainer must
therefore sum, not average, over micro-batches and DP ranks (megatron-core averages gradients over
DP, so it multiplies the loss by the DP size, or configures the DDP wrapper not to average).
``seq-mean-token-sum-norm`` needs no count, but its constant must be the same for every micro-batch,
so it must be given explicitly in that case.

Context parallelism. Under CP each row's tokens are split over the CP ranks (load-balanced chunks,
:mod:`megatron_longact.training.batching`), so a response's tokens sit on several ranks. Pass the
CP group as ``cp_group``: the per-response quantities that span the whole response (its length n_i
in seq-mean-token-mean, GSPO's sequence log-ratio) are then summed over the group (detached; one
small all-reduce per call), and the returned loss is this rank's share, so that the sum over CP
ranks, micro-batches and DP ranks is the whole-batch loss. The global counts stay those of whole
responses (count them on the full masks, before the CP split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Keyword arguments that policy_loss accepts; anything else is a typo and an error.
POLICY_LOSS_KEYS = ("clip_ratio", "clip_low", "clip_high", "clip_ratio_c", "loss_agg_mode",
                    "loss_scale_factor", "global_num_tokens", "global_num_seqs", "cp_group")

# exp() of a log-ratio past this bound overflows fp32 soon after; beyond it the ratio is treated as
# a constant (no gradient). verl clamps the token log-ratio at +-20 for the same reason.
_MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_count(field: str, value) -> None:
    """A global count is a positive number or a tensor (not checked, to avoid a device sync)."""
    if value is None or isinstance(value, torch.Tensor):
        return
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{field}: got {value!r}, expected a number > 0 (the count over the whole "
                         "batch on all data-parallel ranks; 0 means the response mask selects nothing)")


def check_response_tensors(response_mask_BT: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless ``response_mask_BT`` is 2-D and each named tensor has its shape.

    A tensor named ``advantages`` may also be ``[batch]`` (one advantage per response).
    """
    if not isinstance(response_mask_BT, torch.Tensor) or response_mask_BT.dim() != 2:
        shape = tuple(response_mask_BT.shape) if isinstance(response_mask_BT, torch.Tensor) else None
        raise ValueError(f"response_mask: got shape {shape}, expected [batch, response_len]")
    shape = tuple(response_mask_BT.shape)
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: got {type(tensor).__name__}, expected a tensor of shape {list(shape)}")
        allowed = [shape, shape[:1]] if name == "advantages" else [shape]
        if tuple(tensor.shape) not in allowed:
            expected = " or ".join(str(list(s)) for s in allowed)
            raise ValueError(f"{name}: got shape {list(tensor.shape)}, expected {expected} "
                             "(the shape of response_mask)")


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------

def agg_loss(loss_BT: torch.Tensor, response_mask_BT: torch.Tensor, loss_agg_mode: str, *,
             loss_scale_factor: float | None = None, global_num_tokens=None,
             global_num_seqs=None, cp_group=None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar; see the module docstring for the four modes.

    Without global counts the normalizer is this micro-batch's own count, and a mask that selects no
    token is an error. With either global count given (layout-invariant mode) the mode's count must be
    given, the result is this micro-batch's share of the whole-batch loss, and an empty micro-batch
    contributes 0. ``loss_scale_factor`` is read by ``seq-mean-token-sum-norm`` only.
    ``cp_group``: the context-parallel group when the rows are CP-local parts of whole responses
    (module docstring); it needs the global counts.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: got {loss_agg_mode!r}, expected one of {list(LOSS_AGG_MODES)}")
    check_response_tensors(response_mask_BT, loss=loss_BT)
    _check_count("global_num_tokens", global_num_tokens)
    _check_count("global_num_seqs", global_num_seqs)
    if loss_scale_factor is not None and (not _is_number(loss_scale_factor) or not loss_scale_factor > 0):
        raise ValueError(f"loss_scale_factor: got {loss_scale_factor!r}, expected a number > 0 or None")
    global_mode = global_num_tokens is not None or global_num_seqs is not None
    split = _cp_size(cp_group) > 1
    if split and not global_mode and not (loss_agg_mode == "seq-mean-token-sum-norm"
                                          and loss_scale_factor is not None):
        raise ValueError("cp_group: a context-parallel split needs global_num_tokens/global_num_seqs "
                         "(counts of whole responses; a CP rank sees only part of each response)")

    mask_BT = response_mask_BT.to(loss_BT.dtype)
    masked_BT = loss_BT * mask_BT

    if loss_agg_mode == "seq-mean-token-sum-norm":
        if loss_scale_factor is None:
            if global_mode:
                # The default depends on this micro-batch's padding, so shares would not add up.
                raise ValueError("loss_scale_factor: got None with global counts, expected a number > 0 "
                                 "(seq-mean-token-sum-norm needs one constant for every micro-batch, "
                                 "e.g. the maximum response length)")
            _require_tokens(mask_BT.sum())
            loss_scale_factor = loss_BT.shape[-1]
        return masked_BT.sum() / loss_scale_factor

    if loss_agg_mode == "token-mean":
        if global_mode:
            if global_num_tokens is None:
                raise ValueError("global_num_tokens: got None while global_num_seqs is set, expected the "
                                 "number of response tokens of the whole batch (token-mean)")
            return masked_BT.sum() / global_num_tokens
        return masked_BT.sum() / _require_tokens(mask_BT.sum())

    seq_len_B = mask_BT.sum(-1)
    seq_sum_B = masked_BT.sum(-1)
    if split and loss_agg_mode == "seq-mean-token-mean":
        seq_len_B = _cp_sum(seq_len_B.detach(), cp_group)  # n_i of the whole response
    if loss_agg_mode == "seq-mean-token-mean":
        # Responses with no token have seq_sum 0; the clamp only avoids 0/0.
        seq_B = seq_sum_B / seq_len_B.clamp(min=1)
    else:
        seq_B = seq_sum_B
    if global_mode:
        if global_num_seqs is None:
            raise ValueError(f"global_num_seqs: got None while global_num_tokens is set, expected the "
                             f"number of non-empty responses of the whole batch ({loss_agg_mode})")
        return seq_B.sum() / global_num_seqs
    num_seqs = (seq_len_B > 0).sum()
    _require_tokens(num_seqs)
    return seq_B.sum() / num_seqs


def _cp_size(cp_group) -> int:
    from megatron_longact.runtime import collectives

    return 1 if cp_group is None else collectives.size(cp_group)


def _cp_sum(x: torch.Tensor, cp_group) -> torch.Tensor:
    """Sum of a detached per-response tensor over the CP ranks (a fresh tensor)."""
    from megatron_longact.runtime import collectives

    return collectives.all_reduce(x.detach().clone(), cp_group)


def _require_tokens(count: torch.Tensor) -> torch.Tensor:
    # One host sync per call: the price of a clear error instead of a silent NaN loss.
    if float(count) <= 0:
        raise ValueError("response_mask: selects no tokens, expected at least one response token "
                         "(or pass global_num_tokens/global_num_seqs when a micro-batch may be empty)")
    return count


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyLossSettings:
    """The resolved keyword arguments of one :func:`policy_loss` call."""

    clip_low: float
    """eps_low: the ratio is clipped below at 1 - clip_low, in (0, 1)."""
    clip_high: float
    """eps_high: the ratio is clipped above at 1 + clip_high, > 0."""
    clip_ratio_c: float | None
    """Dual-clip constant c > 1 for negative advantages; None turns the dual clip off."""
    loss_agg_mode: str
    """One of LOSS_AGG_MODES."""
    loss_scale_factor: float | None
    """Constant divisor of seq-mean-token-sum-norm; None means response_len (single batch only)."""
    global_num_tokens: float | torch.Tensor | None
    """Response tokens of the whole batch over all DP ranks and micro-batches (token-mean)."""
    global_num_seqs: float | torch.Tensor | None
    """Non-empty responses of the whole batch over all DP ranks and micro-batches (seq-mean-*)."""
    cp_group: object = None
    """Context-parallel group over which each response's tokens are split (None: not split)."""

    def __post_init__(self):
        if not _is_number(self.clip_low) or not 0 < self.clip_low < 1:
            raise ValueError(f"clip_low: got {self.clip_low!r}, expected a value in (0, 1) "
                             "(the ratio is clipped below at 1 - clip_low)")
        if not _is_number(self.clip_high) or not self.clip_high > 0 or math.isinf(self.clip_high):
            raise ValueError(f"clip_high: got {self.clip_high!r}, expected a finite value > 0 "
                             "(the ratio is clipped above at 1 + clip_high)")
        if self.clip_ratio_c is not None and (not _is_number(self.clip_ratio_c) or not self.clip_ratio_c > 1):
            raise ValueError(f"clip_ratio_c: got {self.clip_ratio_c!r}, expected a value > 1 "
                             "(dual-clip bound of the ratio for negative advantages) or None (off)")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode: got {self.loss_agg_mode!r}, expected one of {list(LOSS_AGG_MODES)}")


# A registered loss maps (log_probs, old_log_probs, advantages, mask, settings), all [B, T] and already
# validated, to (loss_BT, token_stats): the per-token loss before aggregation, and per-token tensors
# whose masked mean is reported as a metric. token_stats["ratio"] is also reported as min/max.
TokenLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossSettings],
                       "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: its per-token function and its defaults."""

    name: str
    fn: TokenLossFn
    clip_low: float
    clip_high: float
    loss_agg_mode: str


_POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, *, clip_low: float, clip_high: float, loss_agg_mode: str):
    """Decorator registering ``fn`` under ``name`` with its default clip range and aggregation."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: got {loss_agg_mode!r}, expected one of {list(LOSS_AGG_MODES)}")

    def decorator(fn: TokenLossFn) -> TokenLossFn:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        _POLICY_LOSSES[name] = PolicyLoss(name, fn, clip_low, clip_high, loss_agg_mode)
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered loss called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _POLICY_LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"name: got {name!r}, expected one of {sorted(_POLICY_LOSSES)}") from None


def policy_loss_names() -> list[str]:
    return sorted(_POLICY_LOSSES)


def resolve_settings(name: str, **cfg) -> PolicyLossSettings:
    """Fill ``cfg`` with the defaults of ``name``.

    A value given by the caller wins over a default of the name; among given values ``clip_low`` and
    ``clip_high`` win over the symmetric ``clip_ratio``. So ``dapo`` with ``clip_ratio=0.1`` clips at
    (0.9, 1.1), and with ``clip_high=0.3`` at (0.8, 1.3).
    """
    spec = get_policy_loss(name)
    unknown = sorted(set(cfg) - set(POLICY_LOSS_KEYS))
    if unknown:
        raise ValueError(f"policy_loss: unknown keyword {unknown[0]!r}, expected one of {list(POLICY_LOSS_KEYS)}")
    clip_ratio = cfg.get("clip_ratio")
    if clip_ratio is not None and (not _is_number(clip_ratio) or not 0 < clip_ratio < 1):
        raise ValueError(f"clip_ratio: got {clip_ratio!r}, expected a value in (0, 1) "
                         "(the ratio is clipped to [1 - clip_ratio, 1 + clip_ratio])")

    def pick(key, default):
        if cfg.get(key) is not None:
            return cfg[key]
        return clip_ratio if clip_ratio is not None else default

    return PolicyLossSettings(
        clip_low=pick("clip_low", spec.clip_low),
        clip_high=pick("clip_high", spec.clip_high),
        clip_ratio_c=cfg.get("clip_ratio_c"),
        loss_agg_mode=cfg.get("loss_agg_mode") or spec.loss_agg_mode,
        loss_scale_factor=cfg.get("loss_scale_factor"),
        global_num_tokens=cfg.get("global_num_tokens"),
        global_num_seqs=cfg.get("global_num_seqs"),
        cp_group=cfg.get("cp_group"),
    )


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------

def policy_loss(name: str, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, **cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss ``name`` of one micro-batch and its metrics.

    Args:
        name: a registered loss: ``ppo``, ``grpo``, ``dapo``, ``dr_grpo``, ``gspo``.
        log_probs: ``[B, T]`` log pi(y_t) of the current policy (carries the gradient).
        old_log_probs: ``[B, T]`` log pi_old(y_t) of the policy that generated the responses.
        advantages: ``[B, T]`` per-token advantages, or ``[B]`` one per response.
        response_mask: ``[B, T]`` 1 for response tokens, 0 for padding (bool or 0/1 numbers).
        **cfg: ``clip_ratio`` (symmetric), ``clip_low`` / ``clip_high`` (asymmetric, override
            ``clip_ratio``), ``clip_ratio_c`` (dual clip, off when None), ``loss_agg_mode``,
            ``loss_scale_factor``, ``global_num_tokens``, ``global_num_seqs``, ``cp_group`` (context
            parallelism, module docstring); unset or None means the default of ``name``.

    Returns:
        ``(loss, metrics)``: a scalar (in float32 at least: log-ratios of bf16 inputs are exponentiated
        in float32) and a dict of detached float32 scalars over this micro-batch's tokens:
        ``pg_loss``; ``clip_frac_low`` / ``clip_frac_high`` (tokens whose lower / upper clip is active:
        A < 0 and r < 1 - eps_low / A > 0 and r > 1 + eps_high, so their gradient is zero);
        ``clip_frac`` (their sum); ``clip_frac_dual`` (A < 0 and r > c); ``approx_kl`` (k3 estimate of
        KL(pi_old || pi), ``(r - 1) - log r`` with r = pi/pi_old per token) and ``approx_kl_k1``
        (``-log r``); ``ratio_mean``, ``ratio_min``, ``ratio_max`` (with an empty micro-batch these two
        are +inf and -inf, the identities of a min/max reduction); ``num_tokens`` and ``num_seqs``
        (this micro-batch's counts, the weights to average the means over micro-batches and ranks).
    """
    spec = get_policy_loss(name)
    settings = resolve_settings(name, **cfg)
    check_response_tensors(response_mask, log_probs=log_probs, old_log_probs=old_log_probs,
                           advantages=advantages)
    for field, tensor in (("log_probs", log_probs), ("old_log_probs", old_log_probs),
                          ("advantages", advantages)):
        if not tensor.is_floating_point():
            raise ValueError(f"{field}: got dtype {tensor.dtype}, expected a floating-point tensor")

    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    log_probs_BT = log_probs.to(dtype)
    old_log_probs_BT = old_log_probs.to(dtype)
    advantages_BT = advantages.to(dtype)
    if advantages_BT.dim() == 1:
        advantages_BT = advantages_BT[:, None].expand_as(log_probs_BT)
    mask_BT = response_mask.to(dtype)

    loss_BT, token_stats = spec.fn(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, settings)
    loss = agg_loss(loss_BT, mask_BT, settings.loss_agg_mode, loss_scale_factor=settings.loss_scale_factor,
                    global_num_tokens=settings.global_num_tokens, global_num_seqs=settings.global_num_seqs,
                    cp_group=settings.cp_group)
    metrics = _metrics(loss, log_probs_BT, old_log_probs_BT, mask_BT, token_stats)
    return loss, metrics


@torch.no_grad()
def _metrics(loss, log_probs_BT, old_log_probs_BT, mask_BT, token_stats) -> dict[str, torch.Tensor]:
    mask_BT = mask_BT.float()
    num_tokens = mask_BT.sum()
    denom = num_tokens.clamp(min=1)

    def masked_mean(x_BT):
        return (x_BT.float() * mask_BT).sum() / denom

    log_ratio_BT = (log_probs_BT - old_log_probs_BT).float().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    metrics = {
        "pg_loss": loss.detach().float(),
        "approx_kl": masked_mean(torch.expm1(log_ratio_BT) - log_ratio_BT),
        "approx_kl_k1": masked_mean(-log_ratio_BT),
        "num_tokens": num_tokens,
        "num_seqs": (mask_BT.sum(-1) > 0).sum().float(),
    }
    for key, value_BT in token_stats.items():
        metrics[key if key != "ratio" else "ratio_mean"] = masked_mean(value_BT)
    if "ratio" in token_stats:
        ratio_BT = token_stats["ratio"].float()
        selected_BT = mask_BT > 0
        metrics["ratio_min"] = torch.where(selected_BT, ratio_BT, torch.inf).min()
        metrics["ratio_max"] = torch.where(selected_BT, ratio_BT, -torch.inf).max()
    return metrics


# ---------------------------------------------------------------------------------------------------
# The clipped surrogate and the registered losses
# ---------------------------------------------------------------------------------------------------

def clipped_surrogate(ratio_BT: torch.Tensor, advantages_BT: torch.Tensor, settings: PolicyLossSettings
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped loss with optional dual clip; see the module docstring for the formula."""
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * ratio_BT.clamp(1 - settings.clip_low, 1 + settings.clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    with torch.no_grad():
        negative_BT = advantages_BT < 0
        stats = {
            "clip_frac_low": negative_BT & (ratio_BT < 1 - settings.clip_low),
            "clip_frac_high": (advantages_BT > 0) & (ratio_BT > 1 + settings.clip_high),
        }
        stats["clip_frac"] = stats["clip_frac_low"] | stats["clip_frac_high"]
    if settings.clip_ratio_c is not None:
        dual_BT = -advantages_BT * settings.clip_ratio_c
        loss_BT = torch.where(negative_BT, torch.minimum(loss_BT, dual_BT), loss_BT)
        with torch.no_grad():
            stats["clip_frac_dual"] = negative_BT & (ratio_BT > settings.clip_ratio_c)
    else:
        stats["clip_frac_dual"] = torch.zeros_like(negative_BT)
    stats["ratio"] = ratio_BT.detach()
    return loss_BT, stats


def token_ratio(log_probs_BT: torch.Tensor, old_log_probs_BT: torch.Tensor) -> torch.Tensor:
    """r_t = pi(y_t) / pi_old(y_t), with the log-ratio clamped at +-20 against overflow."""
    return torch.exp((log_probs_BT - old_log_probs_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


@register_policy_loss("ppo", clip_low=0.2, clip_high=0.2, loss_agg_mode="token-mean")
def ppo_loss(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, settings):
    """PPO clipped surrogate, Schulman et al. 2017 (arXiv 1707.06347), eq. 7, per token.

    l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)), r_t = pi(y_t) / pi_old(y_t), eps = 0.2 (the
    paper's value), averaged over all response tokens of the batch (token-mean, as verl does for PPO).
    Departure: log r_t is clamped at +-20 (no gradient beyond) so that exp cannot overflow.
    """
    return clipped_surrogate(token_ratio(log_probs_BT, old_log_probs_BT), advantages_BT, settings)


@register_policy_loss("grpo", clip_low=0.2, clip_high=0.2, loss_agg_mode="seq-mean-token-mean")
def grpo_loss(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, settings):
    """GRPO policy term, Shao et al. 2024, DeepSeekMath (arXiv 2402.03300), the GRPO objective.

    J = 1/G sum_i 1/|o_i| sum_t min(r_it A_it, clip(r_it, 1 - eps, 1 + eps) A_it) - beta KL(pi || pi_ref)

    The loss is -J without the KL term: per-token clipped surrogate, mean over the tokens of each
    response, then over responses (seq-mean-token-mean, the paper's 1/G sum_i 1/|o_i|), eps = 0.2.
    The advantages are the group-normalized rewards of
    :func:`megatron_longact.rl.advantages.group_advantages`. Departures: the KL term is separate
    (:func:`megatron_longact.rl.kl.kl_loss`, add ``beta *`` it, with the same aggregation); 1/G runs
    over all non-empty responses of the batch, not one group (the same for equal-size groups); log r
    is clamped at +-20.
    """
    return clipped_surrogate(token_ratio(log_probs_BT, old_log_probs_BT), advantages_BT, settings)


@register_policy_loss("dapo", clip_low=0.2, clip_high=0.28, loss_agg_mode="token-mean")
def dapo_loss(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, settings):
    """DAPO policy loss, Yu et al. 2025 (arXiv 2503.14476), the DAPO objective.

    J = 1/sum_i |o_i| sum_i sum_t min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it)

    Clip-higher (eps_low = 0.2, eps_high = 0.28, the paper's values) and the token-level loss
    (token-mean over the whole batch), no KL term. The data-side parts of DAPO (dynamic sampling,
    overlong filtering and soft punishment) are in :mod:`megatron_longact.rl.dapo`. Departure: log r is
    clamped at +-20.
    """
    return clipped_surrogate(token_ratio(log_probs_BT, old_log_probs_BT), advantages_BT, settings)


@register_policy_loss("dr_grpo", clip_low=0.2, clip_high=0.2, loss_agg_mode="seq-mean-token-sum-norm")
def dr_grpo_loss(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, settings):
    """Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv 2503.20783), the Dr. GRPO objective.

    GRPO without the length normalization 1/|o_i| and without the std normalization of the
    advantages (use ``group_advantages(..., norm_by_std=False)``): the token losses are summed and
    divided by a constant (seq-mean-token-sum-norm), eps = 0.2.

    Departure: as in verl, the constant divides the sum over the whole batch and defaults to
    response_len; the paper divides by the generation budget per response and averages over the G
    responses. Both are constants, so they differ by a fixed scale only; pass
    ``loss_scale_factor = max_response_len * num_responses`` to get the paper's scale exactly, and
    always pass it when training, since response_len changes with padding. log r is clamped at +-20.
    """
    return clipped_surrogate(token_ratio(log_probs_BT, old_log_probs_BT), advantages_BT, settings)


@register_policy_loss("gspo", clip_low=3e-4, clip_high=4e-4, loss_agg_mode="seq-mean-token-mean")
def gspo_loss(log_probs_BT, old_log_probs_BT, advantages_BT, mask_BT, settings):
    """GSPO, Zheng et al. 2025, Group Sequence Policy Optimization (arXiv 2507.18071), the GSPO objective.

    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp(1/|y_i| sum_t log(pi(y_it) / pi_old(y_it)))
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    with eps_low = 3e-4 and eps_high = 4e-4 (the paper's values) and seq-mean-token-mean aggregation.
    Implemented in the paper's GSPO-token form: per token the ratio
    s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)], whose value is s_i and whose gradient is that of s_i
    spread over the tokens. With one advantage per response (the GSPO setting) its value and gradient
    equal GSPO's for every aggregation mode; with per-token advantages it is GSPO-token. Departure:
    log s_i is clamped at +-20 (verl clamps it at 10 above).
    """
    log_ratio_BT = log_probs_BT - old_log_probs_BT
    seq_len_B = mask_BT.sum(-1)
    log_ratio_sum_B = (log_ratio_BT * mask_BT).sum(-1)
    if _cp_size(settings.cp_group) > 1:
        # Under context parallelism a response's tokens sit on several ranks: s_i is over all of them.
        seq_len_B = _cp_sum(seq_len_B, settings.cp_group)
        log_ratio_sum_B = _cp_sum(log_ratio_sum_B, settings.cp_group)
    log_seq_ratio_B = log_ratio_sum_B / seq_len_B.clamp(min=1)
    # Value: log s_i on every token; gradient: d log pi(y_it), as in GSPO-token.
    log_ratio_BT = log_probs_BT - log_probs_BT.detach() + log_seq_ratio_B.detach()[:, None]
    ratio_BT = torch.exp(log_ratio_BT.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return clipped_surrogate(ratio_BT, advantages_BT, settings)
