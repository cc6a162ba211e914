"""The package's only door to torch.distributed collectives.

Why one module: NCCL refuses tensors that are not on the current CUDA device, gloo accepts CPU
tensors. Code that builds a small tensor for a reduction (a token count, a stop flag, a metric)
naturally builds it on the CPU, which passes every gloo test and crashes the first step on a GPU
cluster. Every collective in megatron_longact therefore goes through the functions below: each
one asks the group's backend which device it needs (:func:`comm_device`), moves the tensor there
for the call and gives the result back on the tensor's own device. ``tests/test_collectives.py``
fails on a raw collective anywhere else in the package (AST check) and checks, with every
torch.distributed collective wrapped, that the trainer hands each one a tensor on the device the
backend needs.

Groups are passed in (None is torch's default group, i.e. the whole world). Every function is a
no-op returning its input when torch.distributed is not initialized, so single-process code and
tests need no special case.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def size(group=None) -> int:
    """Ranks in ``group`` (None: the world); 1 when torch.distributed is not initialized."""
    return dist.get_world_size(group) if initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (None: the world); 0 when not initialized."""
    return dist.get_rank(group) if initialized() else 0


def comm_device(group=None) -> torch.device:
    """The device a tensor must live on to enter a collective over ``group``.

    CUDA (this process's current device) for NCCL, the CPU for gloo. A group created with a
    per-device backend map (``"cpu:gloo,cuda:nccl"``) can take CPU tensors, so the CPU is used.
    """
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo" or "cpu:" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    # Other backends (ucc, mpi) take tensors where the computation runs.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _op(op: str):
    if op not in _OPS:
        raise ValueError(f"op: got {op!r}, expected one of {sorted(_OPS)}")
    return _OPS[op]


def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (``op`` in sum/max/min) and return it.

    The reduction runs on :func:`comm_device`; a tensor elsewhere is copied there and back.
    """
    if not initialized() or size(group) == 1:
        return tensor
    device = comm_device(group)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=_op(op), group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_values(values: Sequence[float], group=None, op: str = "sum",
                      dtype: torch.dtype = torch.float64) -> list[float]:
    """Reduce host scalars over ``group`` in one collective; returns Python floats."""
    if not initialized() or size(group) == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=dtype, device=comm_device(group))
    dist.all_reduce(t, op=_op(op), group=group)
    return [float(v) for v in t.tolist()]


def broadcast(tensor: torch.Tensor, src_group_rank: int, group=None) -> torch.Tensor:
    """Broadcast ``tensor`` in place from rank ``src_group_rank`` *of the group* and return it."""
    if not initialized() or size(group) == 1:
        return tensor
    device = comm_device(group)
    work = tensor if tensor.device == device else tensor.to(device)
    src = dist.get_global_rank(group, src_group_rank) if group is not None else src_group_rank
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in group-rank order, on the
    tensor's own device."""
    if not initialized() or size(group) == 1:
        return [tensor]
    device = comm_device(group)
    work = tensor.contiguous() if tensor.device == device else tensor.to(device).contiguous()
    parts = [torch.empty_like(work) for _ in range(size(group))]
    dist.all_gather(parts, work, group=group)
    return [p if p.device == tensor.device else p.to(tensor.device) for p in parts]


def all_gather_object(obj: Any, group=None) -> list:
    """Each rank's ``obj`` (picklable), in group-rank order."""
    if not initialized() or size(group) == 1:
        return [obj]
    parts = [None] * size(group)
    # torch pickles into a tensor on the current CUDA device under NCCL by itself.
    dist.all_gather_object(parts, obj, group=group)
    return parts


def broadcast_object(obj: Any, src_group_rank: int, group=None) -> Any:
    """``obj`` of rank ``src_group_rank`` of the group, on every rank of the group."""
    if not initialized() or size(group) == 1:
        return obj
    box = [obj]
    src = dist.get_global_rank(group, src_group_rank) if group is not None else src_group_rank
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    if initialized() and size(group) > 1:
        dist.barrier(group=group)
