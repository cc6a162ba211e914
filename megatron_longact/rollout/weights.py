"""The policy's current weights in Hugging Face layout, for an inference engine.

Index spaces: each rank holds *local* shards of its pipeline stage (megatron's TP cut); an engine
loads *HF* tensors (whole, under ``transformers`` names). :func:`gather_hf_weights` goes from one
to the other through the project's own mapping (:mod:`megatron_longact.convert.hf`): global name
per parameter (:mod:`megatron_longact.models.sharding`), the TP shards all-gathered over the
tensor-parallel group and un-cut, the fused QKV / SwiGLU tensors split into their HF tensors, and
the stages' tensors collected over the pipeline group on the destination ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longact.runtime import collectives


@dataclass(frozen=True)
class EngineGroups:
    """The process groups a rollout engine talks to, and this rank's place in them.

    ``tp`` / ``pp`` / ``cp``: megatron's tensor-, pipeline- and context-parallel groups of this
    rank; ``mp``: the model-parallel group (TP x PP). The *host* of a data-parallel replica is its
    rank with TP, PP and CP rank 0: the first rank of ``mp`` (megatron orders ranks TP fastest)."""

    tp: object
    pp: object
    cp: object
    mp: object
    dp_rank: int

    @classmethod
    def from_parallel_state(cls) -> "EngineGroups":
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                   cp=ps.get_context_parallel_group(), mp=ps.get_model_parallel_group(),
                   dp_rank=ps.get_data_parallel_rank())

    @property
    def is_host(self) -> bool:
        return (collectives.rank(self.tp) == 0 and collectives.rank(self.pp) == 0
                and collectives.rank(self.cp) == 0)

    def check(self) -> None:
        """The host is group rank 0 of ``mp`` (what :meth:`share` broadcasts from)."""
        host_in_mp = collectives.rank(self.tp) == 0 and collectives.rank(self.pp) == 0
        if host_in_mp != (collectives.rank(self.mp) == 0):
            raise RuntimeError("rollout: the first rank of the model-parallel group is not TP rank 0 "
                               "of pipeline stage 0; megatron's rank order changed")

    def share(self, obj):
        """``obj`` of the host on every rank of its replica (model-parallel group, then CP)."""
        obj = collectives.broadcast_object(obj, 0, self.mp)
        return collectives.broadcast_object(obj, 0, self.cp)


@torch.no_grad()
def gather_hf_weights(model, model_cfg, groups: EngineGroups, *,
                      into: dict[str, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]] | None:
    """HF ``(name, tensor)`` pairs of the whole model, in host memory, on the host of each
    replica; None on the other ranks. Every rank of the replica calls this.

    Memory: the weights never gather on one GPU. Each parameter is all-gathered over the
    tensor-parallel group (one full parameter on the device at a time), mapped to its HF tensors
    and copied to host memory at once; the other pipeline stages then stream theirs to the host
    one tensor at a time (:func:`_stream_to_first_stage`). So a sync adds at most one full
    parameter to any GPU (a 70B model in bf16 would be 141 GB on the host's GPU otherwise), and
    only the host holds the whole model, in host memory.

    Tensors keep the model's parameter dtype (bf16 models give bf16 weights; the optimizer's fp32
    main weights are not what the policy computes with). They are copies: the caller may keep them
    while the model trains. ``into`` (host only): host tensors by HF name, e.g. those of the
    previous call; each HF tensor whose shape and dtype match is written into it and returned as
    that very tensor, instead of a new copy, so the host never holds the model twice."""
    from megatron_longact.convert import hf as hfmap
    from megatron_longact.models.builder import unwrap
    from megatron_longact.models.sharding import global_name, layer_offset, tp_info, unshard

    gpt = unwrap(model[0] if isinstance(model, (list, tuple)) else model)
    offset = layer_offset(gpt)
    tp_size = collectives.size(groups.tp)
    # The ranks whose pipeline group holds the host: TP rank 0 and CP rank 0 of every stage.
    column = collectives.rank(groups.tp) == 0 and collectives.rank(groups.cp) == 0
    stage: list[tuple[str, torch.Tensor]] = []
    for local, param in gpt.named_parameters():
        name = global_name(local, offset)
        is_tp, _, _ = tp_info(param)
        full = unshard(collectives.all_gather(param.detach(), groups.tp), param) \
            if is_tp and tp_size > 1 else param.detach()
        if column:
            for hf_name, t in hfmap.hf_tensors_from_global(name, full, model_cfg).items():
                stage.append((hf_name, _host_copy(hf_name, t, into)))
    if not column:
        return None
    items = _stream_to_first_stage(stage, groups.pp, into)
    if not groups.is_host:
        return None
    order = {n: i for i, n in enumerate(hfmap.hf_names(model_cfg))}
    names = {n for n, _ in items}
    missing = sorted(set(order) - names)
    if missing:
        raise RuntimeError(f"rollout: the model has no parameter for HF tensor {missing[0]}")
    return sorted(items, key=lambda kv: order[kv[0]])


def _host_copy(name: str, t: torch.Tensor, into: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """``t`` copied to host memory: into ``into[name]`` when it matches, else a new tensor."""
    dst = into.get(name) if into else None
    if dst is not None and dst.shape == t.shape and dst.dtype == t.dtype:
        return dst.copy_(t)
    return t.to("cpu", copy=True).contiguous()


def _stream_to_first_stage(stage: list[tuple[str, torch.Tensor]], pp_group,
                           into: dict[str, torch.Tensor] | None = None
                           ) -> list[tuple[str, torch.Tensor]]:
    """Every stage's host-memory ``(name, tensor)`` pairs on pipeline rank 0 (this rank's own
    list elsewhere). Names, shapes and dtypes travel as one small object; each tensor then goes
    alone, as a broadcast from its stage on the group's communication device (CUDA under NCCL),
    and returns to host memory before the next one is sent."""
    pp = collectives.size(pp_group)
    if pp == 1:
        return stage
    me = collectives.rank(pp_group)
    metas = collectives.all_gather_object([(n, tuple(t.shape), t.dtype) for n, t in stage], pp_group)
    device = collectives.comm_device(pp_group)
    out = list(stage)
    for src in range(1, pp):
        for i, (name, shape, dtype) in enumerate(metas[src]):
            buf = stage[i][1].to(device) if me == src else torch.empty(shape, dtype=dtype, device=device)
            buf = collectives.broadcast(buf, src, pp_group)
            if me == 0:
                out.append((name, _host_copy(name, buf, into)))
    return out
