"""Process start-up: distributed init from torchrun/SLURM, megatron parallel state, seeding."""

from megatron_longact.runtime.distributed import (  # noqa: F401
    DistEnv,
    ParallelConfig,
    Runtime,
    destroy,
    initialize,
    read_dist_env,
    seed_everything,
)
