"""The whole run's configuration: one YAML file, sections filled into typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from megatron_longact.config import ConfigError, check_choice, deep_merge, from_dict, load_yaml, \
    normalize_aliases, parse_overrides
from megatron_longact.longact.config import LongActConfig
from megatron_longact.models.config import ModelConfig
from megatron_longact.rollout.config import RolloutConfig
from megatron_longact.runtime.distributed import ParallelConfig
from megatron_longact.training.config import TrainConfig
from megatron_longact.training.rl_config import (
    CheckpointConfig,
    DataConfig,
    EvaluationConfig,
    RLConfig,
    SFTConfig,
)


@dataclass
class OutputConfig:
    """Where a run writes."""

    dir: str = "runs/default"
    """Run folder: the resolved config, TensorBoard logs, figures and checkpoints go under it."""
    log_all_ranks: bool = False
    """Log lines from every rank (prefixed ``[rank N]``) instead of rank 0 only."""
    wandb: bool = False
    """Also log to Weights & Biases (rank 0; needs the ``wandb`` extra)."""
    wandb_project: str = "megatron-longact"
    wandb_name: str | None = None
    """Run name in W&B; None lets W&B choose."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"

    def __post_init__(self):
        check_choice("output.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    longact: LongActConfig = field(default_factory=LongActConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def check_layout(self, world_size: int) -> ParallelConfig:
        """Validate the parallel layout against the world size, the model and the batch; returns
        the resolved layout. Raises ConfigError before anything heavy happens."""
        parallel = self.parallel.resolve(world_size)
        self.model.check_layout(parallel.tensor_model_parallel_size,
                                parallel.pipeline_model_parallel_size,
                                parallel.context_parallel_size)
        if self.train.mode == "lm":
            self.train.num_microbatches(parallel.data_parallel_size)
        if self.train.seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_length: {self.train.seq_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        if self.train.mode in ("sft", "rl"):
            dp = parallel.data_parallel_size
            if self.train.mode == "rl" and self.rl.prompts_per_step % dp:
                raise ConfigError(f"rl.prompts_per_step: {self.rl.prompts_per_step} is not a multiple of "
                                  f"the data-parallel size {dp}")
            if self.sft.batch_size % dp:
                raise ConfigError(f"sft.batch_size: {self.sft.batch_size} is not a multiple of the "
                                  f"data-parallel size {dp}")
        if self.train.seq_length % parallel.context_parallel_size:
            raise ConfigError(
                f"train.seq_length: {self.train.seq_length} is not divisible by "
                f"parallel.context_parallel_size={parallel.context_parallel_size}"
            )
        return parallel


def read_run_yaml(path: str | Path) -> dict:
    """The merged YAML mapping of the run config ``path`` names (before validation)."""
    from megatron_longact.config_files import PATH_FIELDS, resolve_config

    return load_yaml(resolve_config(path), PATH_FIELDS, partial(normalize_aliases, RunConfig))


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    data: dict | None = None) -> RunConfig:
    """Read a run config from YAML (or a dict), apply ``key=value`` overrides, validate.

    ``path`` is a file or the name of a bundled example (:mod:`megatron_longact.config_files`);
    relative input paths in the files resolve against the file that sets them."""
    raw = read_run_yaml(path) if path is not None else {}
    if data:
        raw = deep_merge(raw, normalize_aliases(RunConfig, data))
    if overrides:
        raw = deep_merge(raw, normalize_aliases(RunConfig, parse_overrides(overrides)))
    if "model" not in raw:
        raise ConfigError("model: missing; a run config needs a model section (or include: one)")
    return from_dict(RunConfig, raw)
