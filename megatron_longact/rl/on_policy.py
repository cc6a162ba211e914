"""When the old-policy log-probs of the policy ratio need their own forward pass.

In a PPO-style update the ratio is pi_theta / pi_old, with pi_old the policy that produced the
rollouts. When the rollout batch is used for exactly one optimizer step (one epoch, one
mini-batch) and the rollouts were sampled by this same model, the parameters at the update's
forward are those of pi_old, so log pi_old equals the detached log-probs of that forward, bit for
bit up to the forward's own determinism: the ratio is 1 and only its gradient matters. A separate
no-grad forward would compute the same numbers again; it is skipped (TRL's GRPOTrainer does the
same). With several epochs or mini-batches the parameters move between steps, so the old
log-probs are recomputed once, before the first step.
"""

from __future__ import annotations


def needs_old_log_prob_forward(ppo_epochs: int, mini_batches: int, mode: str = "auto") -> bool:
    """True when the trainer must run a forward pass for the old log-probs (see module doc);
    ``mode`` is ``rl.old_log_probs`` (``auto`` or ``recompute``)."""
    if mode not in ("auto", "recompute"):
        raise ValueError(f"rl.old_log_probs: got {mode!r}, expected 'auto' or 'recompute'")
    return mode == "recompute" or ppo_epochs > 1 or mini_batches > 1
