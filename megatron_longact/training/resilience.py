"""Non-finite steps: detect them before the optimizer update, skip them, stop after too many.

Detection is one reduction per gradient buffer (the sum of a buffer is finite exactly when every
entry is, short of an fp32 overflow that only an exploding gradient reaches, which is worth
skipping too) plus the step's loss values, and one all-reduce of a flag over the world, so every
rank takes the same decision. It runs after megatron's gradient reduction, so a NaN on any rank
has reached every rank's buffer or is caught by the flag.
"""

from __future__ import annotations

import math

import torch

from megatron_longact.runtime import collectives


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); nothing was published."""


def _grad_buffers(chunk) -> list:
    return list(getattr(chunk, "buffers", None) or []) + \
        list(getattr(chunk, "expert_parallel_buffers", None) or [])


def step_is_finite(model_chunks, losses) -> bool:
    """True when every loss value and every gradient of this step is finite on every rank."""
    sums = []
    for chunk in model_chunks:
        buffers = _grad_buffers(chunk)
        if buffers:
            sums.extend(b.grad_data.sum(dtype=torch.float32) for b in buffers)
        else:  # not DDP-wrapped: plain .grad / .main_grad tensors
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    sums.append(g.sum(dtype=torch.float32))
    bad = 0.0
    if sums:  # one host sync for all buffers
        bad = 0.0 if bool(torch.isfinite(torch.stack(sums)).all()) else 1.0
    for d in losses or []:
        for v in (d.values() if isinstance(d, dict) else [d]):
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad = 1.0
    flag = collectives.all_reduce(torch.tensor([bad]), op="max")
    return float(flag.item()) == 0.0


class SkipGuard:
    """Counts skipped optimizer updates; raises TrainingStopped after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def record(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.limit and self.consecutive >= self.limit:
            raise TrainingStopped(
                f"stopping at step {step}: {self.consecutive} optimizer updates in a row had a "
                f"non-finite loss or gradient (train.max_nonfinite_skips={self.limit}); nothing was "
                f"saved after the last finite checkpoint")


def discard_step_statistics(handle) -> None:
    """Forget the LongAct statistics a skipped step collected (they would leak into the next)."""
    collector = getattr(getattr(handle, "longact", None), "collector", None)
    if collector is not None:
        collector.reset()


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def prepare_resume(cfg, ckpt_dir, parallel, rank0: bool):
    """Before any model is built: repair the checkpoint root after a crash (rank 0, then a
    barrier), then pick the checkpoint to resume from and check that it fits this run. Returns
    its folder or None (fresh start); raises CheckpointError in one line otherwise."""
    from pathlib import Path

    from megatron_longact import checkpoint

    how = cfg.checkpoint.resume
    if rank0:
        for line in checkpoint.recover(ckpt_dir):
            print(f"checkpoint: {line}", flush=True)
    collectives.barrier()
    if how == "none":
        return None
    folder = checkpoint.resolve_auto(ckpt_dir) if how == "auto" else Path(how)
    if folder is None:
        return None
    checkpoint.check_layout(folder, parallel.tensor_model_parallel_size,
                            parallel.pipeline_model_parallel_size, checkpoint.model_shape(cfg.model))
    return folder
