"""KL divergence to a reference policy, and the entropy of the current policy.

Shape legend: ``_BT`` is ``[batch, response_len]``, ``_BTV`` adds the vocabulary, ``_B`` is
``[batch]``. Log-probabilities are those of the sampled response tokens.

KL estimators (Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html),
per token, for KL(pi || pi_ref) with y ~ pi and log-ratio d = log pi(y) - log pi_ref(y):

    k1 = d                              unbiased, high variance, can be negative
    k2 = d^2 / 2                        biased, low variance, >= 0
    k3 = exp(-d) - 1 + d                unbiased, low variance, >= 0 (GRPO's estimator, eq. 4 of
                                        DeepSeekMath, arXiv 2402.03300; verl's ``low_var_kl``)

Used as a loss (GRPO), what matters is the gradient, not the value: with on-policy samples the
gradient of k2 is an unbiased estimate of the gradient of KL(pi || pi_ref); the gradient of k1 has
expectation zero; the gradient of k3 estimates that of the reverse direction KL(pi_ref || pi). The
estimators are implemented exactly as written; choose by that. Used as a reward penalty (PPO-style,
:func:`kl_penalty_rewards`) the value is what matters, and k1 is the usual choice.
"""

from __future__ import annotations

import torch

from megatron_longact.rl.losses import LOSS_AGG_MODES, agg_loss, check_response_tensors

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str = "k3",
                clamp: float | None = None) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate of ``kind`` (module docstring), same shape as the inputs.

    ``clamp``: when set, the estimate is clamped to [-clamp, clamp] (verl clamps ``low_var_kl`` at
    10 against outliers from tokens the reference finds very unlikely); None (default) keeps the
    exact estimator.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind: got {kind!r}, expected one of {list(KL_ESTIMATORS)}")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(f"ref_log_probs: got shape {list(ref_log_probs.shape)}, expected "
                         f"{list(log_probs.shape)} (the shape of log_probs)")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0):
        raise ValueError(f"clamp: got {clamp!r}, expected a number > 0 or None")
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    d = log_probs.to(dtype) - ref_log_probs.to(dtype)
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d.square()
    else:
        # expm1 keeps the precision of exp(-d) - 1 for the small d of a policy near its reference.
        kl = torch.expm1(-d) + d
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def kl_loss(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, response_mask: torch.Tensor,
            kind: str = "k3", loss_agg_mode: str = "token-mean", *, clamp: float | None = None,
            loss_scale_factor: float | None = None, global_num_tokens=None, global_num_seqs=None,
            cp_group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL to the reference as a loss term, aggregated like the policy loss (``cp_group`` too).

    GRPO (arXiv 2402.03300) subtracts beta * KL inside its per-token average, so its total loss is
    ``policy_loss("grpo", ...)[0] + beta * kl_loss(..., kind="k3", loss_agg_mode="seq-mean-token-mean")[0]``;
    pass the same ``loss_agg_mode`` and global counts as the policy loss so the two terms share one
    normalization (see :mod:`megatron_longact.rl.losses` for the modes and layout invariance).

    Returns ``(loss, metrics)``; metrics: ``kl`` (detached float32 token mean of the estimate over this
    micro-batch) and ``num_tokens``.
    """
    check_response_tensors(response_mask, log_probs=log_probs, ref_log_probs=ref_log_probs)
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: got {loss_agg_mode!r}, expected one of {list(LOSS_AGG_MODES)}")
    kl_BT = kl_estimate(log_probs, ref_log_probs, kind, clamp)
    loss = agg_loss(kl_BT, response_mask, loss_agg_mode, loss_scale_factor=loss_scale_factor,
                    global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                    cp_group=cp_group)
    return loss, _token_mean_metric("kl", kl_BT, response_mask)


def kl_penalty_rewards(scores: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                       response_mask: torch.Tensor, kl_coef: float, kind: str = "k1"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL to the reference as a reward penalty (InstructGPT, arXiv 2203.02155; verl's ``apply_kl_penalty``).

        reward_t = score * [t is the last response token] - kl_coef * kl_t      on response tokens

    ``scores`` is ``[batch]`` (one outcome score per response, placed on its last response token) or
    ``[batch, response_len]`` (already token-level). The penalty is computed without gradient: it is
    part of the reward. For group advantages, sum the result over tokens:
    ``group_advantages(rewards_BT.sum(-1), ...)``.

    Returns ``(rewards_BT, metrics)``; metrics: ``kl`` (token mean over this micro-batch) and
    ``num_tokens``.
    """
    check_response_tensors(response_mask, log_probs=log_probs, ref_log_probs=ref_log_probs)
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or kl_coef < 0:
        raise ValueError(f"kl_coef: got {kl_coef!r}, expected a number >= 0")
    with torch.no_grad():
        mask_BT = response_mask.to(torch.promote_types(log_probs.dtype, torch.float32))
        if scores.shape == response_mask.shape:
            token_scores_BT = scores.to(mask_BT.dtype) * mask_BT
        elif scores.dim() == 1 and scores.shape[0] == response_mask.shape[0]:
            # Last response token: the rightmost masked position (right padding).
            positions_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
            last_B = torch.where(mask_BT > 0, positions_BT, -1).max(dim=-1).values
            token_scores_BT = torch.zeros_like(mask_BT)
            has_tokens_B = last_B >= 0
            rows_B = torch.arange(mask_BT.shape[0], device=mask_BT.device)[has_tokens_B]
            token_scores_BT[rows_B, last_B[has_tokens_B]] = scores.to(mask_BT.dtype)[has_tokens_B]
        else:
            raise ValueError(f"scores: got shape {list(scores.shape)}, expected [batch] or "
                             f"{list(response_mask.shape)} (the shape of response_mask)")
        kl_BT = kl_estimate(log_probs.detach(), ref_log_probs.detach(), kind) * mask_BT
        rewards_BT = token_scores_BT - kl_coef * kl_BT
    return rewards_BT, _token_mean_metric("kl", kl_BT, response_mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits) over the last dimension.

        H = logsumexp(z) - sum_v softmax(z)_v z_v

    ``logits`` is ``[..., vocab]`` over the full vocabulary (gather vocab-parallel logits over the
    tensor-parallel group first); computed in at least float32; differentiable.
    """
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits: got dtype {logits.dtype} and shape {list(logits.shape)}, "
                         "expected a floating-point tensor [..., vocab]")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_loss(logits: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                 loss_scale_factor: float | None = None, global_num_tokens=None, global_num_seqs=None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregated entropy of the current policy over response tokens, ``logits`` ``[batch, T, vocab]``.

    As a bonus, subtract ``entropy_coef * entropy`` from the loss (PPO's entropy term, arXiv
    1707.06347 eq. 9); as a metric, read ``metrics["entropy"]`` (detached token mean over this
    micro-batch). Aggregation and global counts as in :func:`megatron_longact.rl.losses.agg_loss`.
    """
    check_response_tensors(response_mask)
    if logits.dim() != 3 or logits.shape[:2] != response_mask.shape:
        raise ValueError(f"logits: got shape {list(logits.shape)}, expected [batch, response_len, vocab] "
                         f"with [batch, response_len] = {list(response_mask.shape)} (response_mask)")
    entropy_BT = entropy_from_logits(logits)
    loss = agg_loss(entropy_BT, response_mask, loss_agg_mode, loss_scale_factor=loss_scale_factor,
                    global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
    return loss, _token_mean_metric("entropy", entropy_BT, response_mask)


@torch.no_grad()
def _token_mean_metric(key: str, value_BT: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    mask_BT = response_mask.float()
    num_tokens = mask_BT.sum()
    return {key: (value_BT.detach().float() * mask_BT).sum() / num_tokens.clamp(min=1), "num_tokens": num_tokens}
