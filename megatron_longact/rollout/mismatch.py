"""Training-inference mismatch: how far the engine's sampling log-probs are from megatron's, and
the truncated importance-sampling (TIS) correction that uses them.

Index space: ``*_BT`` tensors are in prediction space of a padded batch, ``[n, S-1]``, column j
predicting token j+1 (the trainer's ``resp_mask`` / ``old_lp`` space).

Mismatch: over the response tokens, ``|log p_engine(y_t) - log p_megatron(y_t)|``, where
``log p_megatron`` is the teacher-forced log-prob of the same token with the weights the engine
sampled with (the trainer's old log-probs, at the sampling temperature). Its mean and max are
logged every step as ``rollout/mismatch_mean`` / ``rollout/mismatch_max``.

TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training";
verl's ``rollout_is``): the rollouts come from pi_engine, the loss assumes pi_old (megatron's
numerics), so each token's term is weighted by ``w_t = min(pi_old(y_t) / pi_engine(y_t), C)``
(detached). It is applied to the advantages: for the clipped surrogates, ``max(-A w r, -A w
clip(r)) = w max(-A r, -A clip(r))`` because w > 0, so weighting the per-token advantage equals
weighting the per-token loss. Departure for GSPO: per-token weights make the advantage per token
(GSPO-token form, see rl.losses.gspo_loss).
"""

from __future__ import annotations

import torch


def engine_log_probs_BT(gen, prompt_lengths: list[int], width: int) -> torch.Tensor:
    """The engine's log-probs of the response tokens placed in prediction space ``[n, width-1]``
    (0 elsewhere): response token k of row i sits at column ``prompt_len + k - 1``."""
    n = len(prompt_lengths)
    out = torch.zeros(n, width - 1, dtype=torch.float32)
    lp = gen.log_probs.float().cpu()
    for i, p in enumerate(prompt_lengths):
        r = int(gen.response_lengths[i])
        out[i, p - 1:p - 1 + r] = lp[i, :r]
    return out


def mismatch_sums(engine_lp_BT: torch.Tensor, megatron_lp_BT: torch.Tensor,
                  mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, count, max) of |engine - megatron| over the tokens where ``mask_BT`` is set (max 0
    when none is), as 0-d fp32 tensors on ``engine_lp_BT``'s device: no host sync, so the loss
    function can measure it on the update pass."""
    m = mask_BT.bool().to(engine_lp_BT.device)
    diff = (engine_lp_BT.float() - megatron_lp_BT.float().to(engine_lp_BT.device)).abs()
    diff = torch.where(m, diff, torch.zeros_like(diff))
    return diff.sum(), m.sum().float(), diff.amax() if diff.numel() else diff.new_zeros(())


def mismatch_stats(engine_lp_BT: torch.Tensor, megatron_lp_BT: torch.Tensor,
                   mask_BT: torch.Tensor) -> tuple[float, float, float]:
    """:func:`mismatch_sums` as Python floats, for a reduction over data-parallel ranks
    (mean = sum / count)."""
    return tuple(float(t) for t in mismatch_sums(engine_lp_BT, megatron_lp_BT, mask_BT))


def tis_weights(megatron_lp_BT: torch.Tensor, engine_lp_BT: torch.Tensor, mask_BT: torch.Tensor,
                cap: float) -> torch.Tensor:
    """``min(exp(log pi_old - log pi_engine), cap)`` on masked tokens, 1 elsewhere (detached)."""
    log_w = (megatron_lp_BT.float().cpu() - engine_lp_BT.float()).clamp(max=20.0)
    w = torch.exp(log_w).clamp(max=cap)
    return torch.where(mask_BT.bool(), w, torch.ones_like(w)).detach()


def apply_tis(adv: torch.Tensor, weights_BT: torch.Tensor) -> torch.Tensor:
    """Per-token advantages ``A_i * w_it`` from per-response (``[n]``) or per-token advantages."""
    adv_BT = adv[:, None].expand_as(weights_BT) if adv.dim() == 1 else adv
    return adv_BT.float() * weights_BT
