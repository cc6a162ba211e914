"""Optimization and batch configuration shared by every training mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_longact.config import ConfigError, check_choice, check_positive, check_range


@dataclass
class TrainConfig:
    """Batch sizes, optimizer and schedule. Batch sizes count sequences."""

    mode: Literal["lm", "sft", "rl"] = "lm"
    """``rl``: GRPO/DAPO-family RL (after ``sft.steps`` of supervised warm start); ``sft``:
    supervised fine-tuning on the task records; ``lm``: next-token loss on synthetic text (the
    engine's smoke test)."""
    steps: int = 10
    seed: int = 1234
    seq_length: int = 128
    """Sequence length of LM training; SFT/RL pad each batch to its own longest sequence instead
    (rounded up to a multiple of 16) and check it against model.max_position_embeddings."""
    micro_batch_size: int = 2
    global_batch_size: int = 8
    """LM mode: sequences per optimizer step over all data-parallel ranks; a multiple of
    micro_batch_size x data_parallel_size (the rest are gradient-accumulation micro-batches).
    SFT and RL size their steps with sft.batch_size and rl.prompts_per_step x rl.group_size."""
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = True
    """megatron-core's DistributedOptimizer (optimizer state sharded over data-parallel ranks)."""
    ddp_bucket_size: int | None = None
    """Elements per gradient-reduction bucket of megatron's DDP; setting it also turns on
    overlap_grad_reduce (megatron buckets only then). None: one bucket, reduced after backward.
    Each bucket is sharded over data-parallel ranks separately."""
    log_interval: int = 1

    max_nonfinite_skips: int = 3
    """Optimizer updates with a NaN/inf loss or gradient are skipped (no parameter, optimizer,
    LongAct or LR-schedule change); this many in a row stop the run with an error (0: never)."""

    def __post_init__(self):
        check_choice("train.mode", self.mode, ("lm", "sft", "rl"))
        check_positive("train.max_nonfinite_skips", self.max_nonfinite_skips, allow_zero=True)
        # steps may be 0: an RL run with only its SFT warm start (sft.steps).
        check_positive("train.steps", self.steps, allow_zero=True)
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "log_interval"):
            check_positive(f"train.{name}", getattr(self, name))
        check_positive("train.lr", self.lr)
        for name in ("min_lr", "weight_decay", "clip_grad", "lr_warmup_steps"):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        check_range("train.adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        check_range("train.adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        check_positive("train.adam_eps", self.adam_eps)
        check_positive("train.ddp_bucket_size", self.ddp_bucket_size)
        if self.mode == "lm" and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x data_parallel_size = {self.micro_batch_size} x "
                f"{data_parallel_size}"
            )
        return self.global_batch_size // per_step
