"""Distributed start-up for megatron_longact.

One entry point, :func:`initialize`, used by the CLI, the tests and the benchmarks:
1. read rank, world size and rendezvous address from torchrun, SLURM, or neither (one process);
2. pick NCCL when CUDA is available and gloo otherwise; on CPU, enable the runtime layer of
   :mod:`megatron_longact.compat` (it refuses to activate when CUDA is available, and
   :mod:`megatron_longact.runtime.gpu_guard` refuses a machine that looks like a GPU node unless
   ``MEGATRON_LONGACT_CPU=1``);
3. build megatron-core's parallel state for (TP, PP, CP, DP); DP is what is left of the world;
4. seed Python, NumPy, torch and megatron's model-parallel RNG tracker.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_longact.config import ConfigError, check_positive


@dataclass
class ParallelConfig:
    """How the world is split. ``world = tp * pp * cp * dp``."""

    tensor_model_parallel_size: int = 1
    """TP: ranks that split each weight matrix (attention heads, MLP columns)."""
    pipeline_model_parallel_size: int = 1
    """PP: ranks that split the layers into stages."""
    context_parallel_size: int = 1
    """CP: ranks that split the sequence (needs Transformer Engine attention to run a model)."""
    data_parallel_size: int | None = None
    """DP: replicas; None derives it from the world size, a number is checked against it."""
    sequence_parallel: bool | None = None
    """Sequence parallelism over the TP group; None turns it on when TP > 1 on CUDA (the
    local torch norms of the CPU path do not support it)."""
    distributed_timeout_minutes: int = 30
    """Timeout of collective operations."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size", "data_parallel_size", "distributed_timeout_minutes"):
            check_positive(f"parallel.{name}", getattr(self, name))

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Return a copy with ``data_parallel_size`` set; raise ConfigError when the layout and
        the world size disagree."""
        mp = self.model_parallel_size
        layout = (
            f"tensor_model_parallel_size={self.tensor_model_parallel_size} x "
            f"pipeline_model_parallel_size={self.pipeline_model_parallel_size} x "
            f"context_parallel_size={self.context_parallel_size}"
        )
        if world_size % mp != 0:
            raise ConfigError(
                f"parallel: {layout} = {mp} does not divide the world size {world_size}"
            )
        dp = world_size // mp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise ConfigError(
                f"parallel.data_parallel_size: got {self.data_parallel_size}, but the world size "
                f"{world_size} / ({layout}) gives {dp}; the product of the layout must equal the "
                "world size"
            )
        return dataclasses.replace(self, data_parallel_size=dp)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-005,009],cpu1`` (no scontrol needed)."""
    match = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the first host")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_dist_env(environ: dict | None = None) -> DistEnv:
    """Read rank and rendezvous from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST) or fall back to a
    single process on 127.0.0.1."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or _first_slurm_host(nodelist)
        port = int(env.get("MASTER_PORT") or 29500 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def seed_everything(seed: int, *, model_parallel: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``model_parallel`` also megatron's RNG tracker
    (distinct streams per TP rank for dropout in TP regions, as megatron does)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if model_parallel:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


@dataclass
class Runtime:
    """What :func:`initialize` set up; pass its groups into the functions that communicate."""

    env: DistEnv
    parallel: ParallelConfig
    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def rank(self) -> int:
        return self.env.rank


def initialize(parallel: ParallelConfig | None = None, *, seed: int = 1234, backend: str | None = None,
               environ: dict | None = None) -> Runtime:
    """Initialize torch.distributed and megatron-core's parallel state; see the module docstring.

    The layout is checked against the world size before any process group is created.
    """
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    env = read_dist_env(environ)
    parallel = parallel.resolve(env.world_size)
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"backend: got {backend!r}, expected 'nccl' or 'gloo'")
    if cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        from megatron_longact.compat import enable_cpu_runtime
        from megatron_longact.runtime.gpu_guard import check_cpu_fallback

        check_cpu_fallback(environ)
        enable_cpu_runtime()
        device = torch.device("cpu")
    if parallel.sequence_parallel is None:
        parallel = dataclasses.replace(
            parallel, sequence_parallel=cuda and parallel.tensor_model_parallel_size > 1
        )
    elif parallel.sequence_parallel and not cuda:
        raise ConfigError(
            "parallel.sequence_parallel: true needs CUDA (megatron's local torch norms used on CPU "
            "do not support sequence parallelism)"
        )

    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    seed_everything(seed)
    return Runtime(env=env, parallel=parallel, device=device, backend=backend)


def destroy() -> None:
    """Tear down megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
