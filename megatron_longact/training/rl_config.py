"""Configuration sections of the SFT and RL trainer: data, rl, sft, checkpoint, evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_longact.config import ConfigError, check_choice, check_positive, check_range
from megatron_longact.data.tokenizer import PromptConfig, TokenizerConfig
from megatron_longact.tasks.rewards import RewardConfig
from megatron_longact.tasks.ruler import RulerConfig

ALGORITHMS = ("grpo", "dapo", "dr_grpo", "gspo", "ppo")


@dataclass
class DataConfig:
    """Where prompts come from. Records follow ``data.jsonl.TASK_RECORD_FIELDS``."""

    source: Literal["ruler", "jsonl", "parquet"] = "ruler"
    """``ruler``: generated on the fly by the RULER-style generator; ``jsonl``/``parquet``: a local
    file of task records (read through ``datasets`` for parquet)."""
    path: str | None = None
    """Local file for jsonl/parquet."""
    ruler: RulerConfig = field(default_factory=RulerConfig)
    """Generator settings for source ruler (and the task template of the final evaluation)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    shuffle_seed: int = 0
    """Seed of the record order; the order is a function of (seed, epoch), so a resumed run sees
    the same prompts in the same steps."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens (after the template); None: no limit. Records over it are handled
    by ``prompt_overflow``; the number is reported at start-up and logged as data/*."""
    prompt_overflow: Literal["filter", "truncate", "error"] = "filter"
    """``filter``: drop records whose prompt is too long; ``truncate``: keep the last
    ``max_prompt_length`` prompt tokens (the question and the answer cue sit at the end of the
    task prompts); ``error``: refuse to start, naming the first record over the limit."""

    def __post_init__(self):
        check_choice("data.source", self.source, ("ruler", "jsonl", "parquet"))
        check_positive("data.max_prompt_length", self.max_prompt_length)
        check_choice("data.prompt_overflow", self.prompt_overflow, ("filter", "truncate", "error"))
        if self.source != "ruler" and not self.path:
            raise ConfigError(f"data.path: required for data.source={self.source!r}")


@dataclass
class RLConfig:
    """Rollouts, rewards and the policy loss.

    The names verl and TRL users type are accepted where the concept is the same and saved under
    ours (``ALIASES``): verl ``clip_ratio_low``/``clip_ratio_high``, ``kl_loss_coef``, ``n``
    (``rollout.n``), ``max_response_length``; TRL ``epsilon``/``epsilon_high``, ``beta``,
    ``num_generations``, ``max_completion_length``, ``num_iterations``."""

    ALIASES: ClassVar[dict[str, str]] = {
        "clip_ratio_low": "clip_low", "clip_ratio_high": "clip_high", "epsilon": "clip_ratio",
        "epsilon_high": "clip_high", "kl_loss_coef": "kl_coef", "beta": "kl_coef", "n": "group_size",
        "num_generations": "group_size", "max_response_length": "max_new_tokens",
        "max_completion_length": "max_new_tokens", "num_iterations": "ppo_epochs",
    }

    algorithm: Literal["grpo", "dapo", "dr_grpo", "gspo", "ppo"] = "grpo"
    """Policy loss by name (megatron_longact.rl.losses), with that algorithm's defaults."""
    group_size: int = 4
    """Responses sampled per prompt."""
    prompts_per_step: int = 8
    """Prompts per optimizer step over all data-parallel ranks (a multiple of the DP size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    ignore_eos: bool = False
    """Every response runs to max_new_tokens: EOS does not end it (and it counts as truncated).
    For throughput measurements, where the work must not depend on what is sampled; a run that
    learns leaves it off."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per pass (the rollout batch split into this many mini-batches)."""
    old_log_probs: Literal["auto", "recompute"] = "auto"
    """Where the old-policy log-probs of the ratio come from. ``auto``: when the update is exactly
    on-policy (ppo_epochs = mini_batches = 1) they are the detached log-probs of the update's own
    forward (the ratio is 1 by construction; no extra forward pass); otherwise one no-grad forward
    recomputes them before the update. ``recompute``: always run that forward (e.g. for rollouts
    whose sampler's log-probs differ from the trainer's)."""
    clip_ratio: float | None = None
    clip_low: float | None = None
    clip_high: float | None = None
    clip_ratio_c: float | None = None
    loss_agg_mode: str | None = None
    """None: the algorithm's default aggregation."""
    loss_scale_factor: float | None = None
    advantage: Literal["grpo", "dr_grpo", "rloo"] | None = None
    """None: dr_grpo for algorithm dr_grpo, grpo otherwise."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference loss term (GRPO's beta). The reference is a frozen copy of the
    policy taken when RL starts (after the SFT warm start or the loaded weights); 0 = no reference
    model (DAPO and Dr. GRPO train without KL)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator of the loss term (k3: GRPO's low-variance estimator)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more until the batch is full."""
    max_sampling_tries: int = 4
    overlong_filter: bool = False
    """DAPO: responses that hit max_new_tokens without EOS do not count in the loss."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: length of the penalty zone before max_new_tokens; 0 = off."""

    def __post_init__(self):
        check_choice("rl.algorithm", self.algorithm, ALGORITHMS)
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "ppo_epochs", "mini_batches",
                     "max_sampling_tries"):
            check_positive(f"rl.{name}", getattr(self, name))
        check_range("rl.max_sampling_tries", self.max_sampling_tries, 1, 64)
        if self.group_size < 2:
            raise ConfigError("rl.group_size: got 1, expected >= 2 (group advantages need a group)")
        check_positive("rl.temperature", self.temperature)
        check_range("rl.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_positive("rl.top_k", self.top_k, allow_zero=True)
        check_positive("rl.overlong_buffer", self.overlong_buffer, allow_zero=True)
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"rl.overlong_buffer: {self.overlong_buffer} must be smaller than "
                              f"rl.max_new_tokens={self.max_new_tokens}")
        if self.ignore_eos and (self.overlong_filter or self.overlong_buffer):
            # Every response would be overlong: the filter would drop all of them from the loss,
            # the buffer would give all of them the full penalty.
            raise ConfigError("rl.ignore_eos: every response runs to rl.max_new_tokens, so "
                              + ("rl.overlong_filter would drop all of them from the loss"
                                 if self.overlong_filter else
                                 "rl.overlong_buffer would give all of them the full penalty")
                              + "; set rl.ignore_eos=false for a run that learns")
        check_positive("rl.kl_coef", self.kl_coef, allow_zero=True)
        check_choice("rl.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        check_choice("rl.old_log_probs", self.old_log_probs, ("auto", "recompute"))
        if self.prompts_per_step * self.group_size % self.mini_batches:
            raise ConfigError(f"rl.mini_batches: {self.mini_batches} does not divide the "
                              f"{self.prompts_per_step * self.group_size} responses of a step")


@dataclass
class SFTConfig:
    """Supervised warm start on the same task records (answer tokens only)."""

    steps: int = 0
    """SFT steps before RL (mode rl) or the whole run (mode sft uses train.steps instead)."""
    batch_size: int = 16
    """Records per SFT step over all data-parallel ranks."""
    lr: float | None = None
    """Learning rate of the SFT steps; None follows train.lr and its schedule."""

    def __post_init__(self):
        check_positive("sft.steps", self.steps, allow_zero=True)
        check_positive("sft.batch_size", self.batch_size)
        check_positive("sft.lr", self.lr)


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint root; None: <output.dir>/checkpoints."""
    interval: int = 0
    """Save every this many steps (0: only at the end and on preemption)."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted after a new one is published)."""
    resume: str = "auto"
    """``auto``: continue from the newest valid checkpoint under dir if there is one; ``none``: start
    fresh; or a checkpoint folder."""
    checksum: bool = False
    """Record CRC32s in the manifest and check them on load (reads every file once more)."""
    load_weights: str | None = None
    """Initial weights: a folder written by ``longact-convert hf-to-mcore`` (any TP/PP layout).
    Used when the run starts fresh; a resumed run takes everything from its checkpoint."""

    async_save: bool = False
    """Write checkpoints in a background process (megatron dist-checkpointing async save); a
    checkpoint is published (renamed into place, tracker updated) only after the write completed
    on every rank."""

    def __post_init__(self):
        check_positive("checkpoint.interval", self.interval, allow_zero=True)
        check_positive("checkpoint.keep", self.keep)
        if self.resume.strip().lower() in ("auto", "none") and self.resume not in ("auto", "none"):
            raise ConfigError(f"checkpoint.resume: got {self.resume!r}; did you mean "
                              f"{self.resume.strip().lower()!r}? (the values are lower case; anything "
                              f"else is taken as a checkpoint folder)")


@dataclass
class EvaluationConfig:
    """Evaluation at the end of training (RULER-style tasks at several lengths)."""

    lengths: list[int] = field(default_factory=list)
    """Target lengths; empty: no evaluation."""
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    num_samples: int = 16
    seed: int = 9999
    """Generator seed, different from the training data's."""

    def __post_init__(self):
        for i, length in enumerate(self.lengths):
            check_positive(f"evaluation.lengths[{i}]", length)
        check_positive("evaluation.num_samples", self.num_samples)
