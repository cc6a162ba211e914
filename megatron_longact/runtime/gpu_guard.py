"""Refuse to fall back to the CPU on a machine that looks like a GPU node.

When torch cannot see CUDA, :func:`megatron_longact.runtime.initialize` runs megatron-core through
the CPU runtime layer with gloo. On a laptop or a CPU CI runner that is what the user wants. On a
GPU node it almost always means something is broken (a CPU build of torch, a driver mismatch, a
container without the devices), and a 70B job would crawl on the CPU instead of failing. So the
CPU path needs an explicit opt-in (``MEGATRON_LONGACT_CPU=1``) whenever any GPU evidence is
present. Any single sign counts: the cost of a false alarm is one environment variable, the cost
of a silent CPU run on a GPU allocation is the allocation. The test suite and the CPU demo set the
variable themselves, so they need no extra step.
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Callable, Mapping

from megatron_longact.config import ConfigError

OPT_IN = "MEGATRON_LONGACT_CPU"
SLURM_GPU_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_ON_NODE",
                  "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")


def gpu_evidence(environ: Mapping[str, str] | None = None, *,
                 which: Callable[[str], str | None] = shutil.which,
                 devices: Callable[[str], list] = glob.glob) -> list[str]:
    """Signs that this machine has NVIDIA GPUs, as short human-readable strings."""
    env = os.environ if environ is None else environ
    found = [f"{name}={env[name]}" for name in SLURM_GPU_VARS if env.get(name, "").strip()]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    # An empty value or -1 hides every GPU on purpose: that is a request for the CPU.
    if visible is not None and visible.strip() not in ("", "-1"):
        found.append(f"CUDA_VISIBLE_DEVICES={visible}")
    smi = which("nvidia-smi")
    if smi:
        found.append(f"nvidia-smi at {smi}")
    nodes = devices("/dev/nvidia[0-9]*")
    if nodes:
        found.append(f"device nodes {', '.join(sorted(nodes)[:2])}")
    return found


def check_cpu_fallback(environ: Mapping[str, str] | None = None, **probes) -> None:
    """Raise ConfigError when the CPU path would start on a machine with GPU evidence and the
    user has not opted in with ``MEGATRON_LONGACT_CPU=1``."""
    env = os.environ if environ is None else environ
    # The opt-in may come from the given launcher environment or from this process's own.
    if any(e.get(OPT_IN, "").strip().lower() in ("1", "true", "yes") for e in (env, os.environ)):
        return
    evidence = gpu_evidence(env, **probes)
    if not evidence:
        return
    import torch

    raise ConfigError(
        f"CUDA is not available to torch (torch {torch.__version__}, built for CUDA "
        f"{torch.version.cuda}), but this looks like a GPU node ({'; '.join(evidence)}). Check that "
        "torch is a CUDA build, that `nvidia-smi` works and the driver matches, and that the job "
        f"was given the GPUs; to run on the CPU anyway set {OPT_IN}=1"
    )
