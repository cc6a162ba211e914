"""LongAct configuration (docs/method.md); the defaults are the project's choices
where the paper is silent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_longact.config import ConfigError, check_choice, check_positive, check_range

STATS = ("mean_abs", "rms", "max_abs")
POINTS = ("pre_rope", "post_rope")
TOKENS = ("all", "prompt", "response")
SCOPES = ("layer", "head", "model")
STRATEGIES = ("topk", "bottomk", "random", "none")
SCHEDULES = ("every_step", "every_n", "fixed")
APPLY_TO = ("update", "gradient")


@dataclass
class LongActConfig:
    """Saliency statistics, channel selection and how the mask is applied."""

    enabled: bool = True
    """Collect statistics and mask W_Q/W_K updates. False trains exactly like plain megatron-core."""
    keep_ratio: float = 0.30
    """Fraction of Q channels and of K channels whose W_Q/W_K rows are updated (paper: 30%)."""
    stat: Literal["mean_abs", "rms", "max_abs"] = "mean_abs"
    """Per-channel statistic over tokens: mean |x|, root mean square, or max |x|."""
    point: Literal["pre_rope", "post_rope"] = "pre_rope"
    """pre_rope: the projection output (after QK-norm), i.e. what the masked rows produce.
    post_rope: what attention consumes; RoPE pair norms keep it a per-channel statistic."""
    tokens: Literal["all", "prompt", "response"] = "all"
    """Which non-padding tokens count."""
    ema: float = 0.0
    """Decay of an exponential moving average of the statistic across steps; 0 = this step only."""
    scope: Literal["layer", "head", "model"] = "layer"
    """Top-k within each layer (Q and K separately), within each head / key group, or over all
    layers at once."""
    strategy: Literal["topk", "bottomk", "random", "none"] = "topk"
    """Which channels to keep: highest statistic (LongAct), lowest, a seeded random set of the
    same size (ablations), or all of them (baseline)."""
    schedule: Literal["every_step", "every_n", "fixed"] = "every_step"
    """When the mask is recomputed: each step from that step's statistics, every ``every_n``
    steps, or once at ``warmup_steps`` and then frozen."""
    every_n: int = 10
    """Recompute interval for schedule every_n."""
    warmup_steps: int = 0
    """Steps before the first mask; until then every channel is updated (statistics are still
    collected, so an EMA is warm when masking starts)."""
    seed: int = 0
    """Seed of the random strategy (combined with the step and the layer)."""
    include_bias: bool = True
    """Mask the matching q/k bias entries when the model has a QKV bias."""
    apply_to: Literal["update", "gradient"] = "update"
    """update: masked entries are frozen exactly (gradient, main weight and Adam moments).
    gradient: only the gradient is zeroed (momentum and weight decay still act), for ablation."""
    heatmap_interval: int = 0
    """Render the layers x channels saliency heatmap every this many steps; 0 = never."""

    def __post_init__(self):
        check_range("longact.keep_ratio", self.keep_ratio, 0.0, 1.0, low_open=True)
        check_choice("longact.stat", self.stat, STATS)
        check_choice("longact.point", self.point, POINTS)
        check_choice("longact.tokens", self.tokens, TOKENS)
        check_range("longact.ema", self.ema, 0.0, 1.0, high_open=True)
        check_choice("longact.scope", self.scope, SCOPES)
        check_choice("longact.strategy", self.strategy, STRATEGIES)
        check_choice("longact.schedule", self.schedule, SCHEDULES)
        check_positive("longact.every_n", self.every_n)
        check_positive("longact.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("longact.heatmap_interval", self.heatmap_interval, allow_zero=True)
        check_choice("longact.apply_to", self.apply_to, APPLY_TO)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"longact.seed: got {self.seed!r}, expected an integer")
