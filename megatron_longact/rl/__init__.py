"""RL losses and their data-side helpers: GRPO, DAPO, Dr. GRPO, GSPO (and PPO, RLOO).

Pure functions of tensors; the trainer supplies log-probabilities, rewards and the process group.

- :mod:`.losses`: ``policy_loss(name, ...)`` and the aggregation modes, layout-invariant with global
  counts;
- :mod:`.advantages`: group advantages (GRPO, Dr. GRPO) and RLOO;
- :mod:`.kl`: KL to the reference (k1, k2, k3) as loss or reward penalty, entropy;
- :mod:`.dapo`: dynamic sampling, overlong filtering, soft overlong punishment;
- :mod:`.batch_stats`: the whole-batch token and response counts over data-parallel ranks.
"""

from megatron_longact.rl.advantages import (  # noqa: F401
    compute_advantages,
    group_advantages,
    rloo_advantages,
    token_advantages,
)
from megatron_longact.rl.batch_stats import BatchCounts, global_batch_counts, local_batch_counts  # noqa: F401
from megatron_longact.rl.dapo import (  # noqa: F401
    DynamicSampler,
    DynamicSamplingExhausted,
    DynamicSamplingResult,
    dynamic_sample,
    informative_groups,
    overlong_filter,
    soft_overlong_punishment,
)
from megatron_longact.rl.kl import (  # noqa: F401
    entropy_from_logits,
    entropy_loss,
    kl_estimate,
    kl_loss,
    kl_penalty_rewards,
)
from megatron_longact.rl.losses import (  # noqa: F401
    LOSS_AGG_MODES,
    agg_loss,
    get_policy_loss,
    policy_loss,
    policy_loss_names,
    register_policy_loss,
)
