"""Whole-batch token and response counts, the normalizers of the layout-invariant losses.

    counts = global_batch_counts(micro_batch_masks, group=parallel_state.get_data_parallel_group())
    loss, metrics = policy_loss("dapo", ..., **counts.loss_kwargs())

Index space: each mask is shard-local (this data-parallel rank's rows of the global batch), one per
micro-batch, ``[batch, response_len]``; the counts are global (the whole batch over the group). Call
it once per optimizer step, after every filter that changes the masks (overlong filtering, dynamic
sampling), and before the first micro-batch: every rank of the group must call it (it is one
all-reduce of two integers).

A response counts when its mask selects at least one token, the definition the seq-mean-* modes of
:func:`megatron_longact.rl.losses.agg_loss` use. With context parallelism a response's tokens are
spread over the CP ranks; pass masks of whole responses (before the CP split) and the DP group, not
the CP-local slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_longact.runtime import collectives


@dataclass(frozen=True)
class BatchCounts:
    """Response tokens and non-empty responses of a batch."""

    num_tokens: int
    """Response tokens selected by the masks (normalizer of token-mean)."""
    num_seqs: int
    """Responses with at least one selected token (normalizer of the seq-mean-* modes)."""

    def loss_kwargs(self) -> dict[str, int]:
        """The ``global_num_tokens`` / ``global_num_seqs`` keywords of the loss functions."""
        return {"global_num_tokens": self.num_tokens, "global_num_seqs": self.num_seqs}


def _as_list(response_masks) -> list[torch.Tensor]:
    masks = [response_masks] if isinstance(response_masks, torch.Tensor) else list(response_masks)
    if not masks:
        raise ValueError("response_masks: got an empty sequence, expected a [batch, response_len] "
                         "tensor or one per micro-batch")
    for i, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"response_masks[{i}]: got {shape}, expected a [batch, response_len] tensor")
    return masks


def _local_counts_tensor(masks: list[torch.Tensor]) -> torch.Tensor:
    counts = torch.zeros(2, dtype=torch.int64, device=masks[0].device)
    for mask in masks:
        selected = mask.to(device=counts.device) != 0
        counts[0] += selected.sum()
        counts[1] += selected.any(dim=-1).sum()
    return counts


def local_batch_counts(response_masks: torch.Tensor | Sequence[torch.Tensor]) -> BatchCounts:
    """Counts over this process's masks only (no communication)."""
    num_tokens, num_seqs = _local_counts_tensor(_as_list(response_masks)).tolist()
    return BatchCounts(num_tokens=num_tokens, num_seqs=num_seqs)


def global_batch_counts(response_masks: torch.Tensor | Sequence[torch.Tensor], group) -> BatchCounts:
    """Counts over all micro-batches of all ranks of ``group``.

    Args:
        response_masks: this rank's masks, one tensor or one per micro-batch (shard-local); on the
            device the group's backend expects (CUDA for NCCL).
        group: the data-parallel process group (``parallel_state.get_data_parallel_group()``), always
            passed explicitly. None means "no communication" and is only accepted when
            torch.distributed is not initialized or has one rank, so that forgetting the group cannot
            silently give per-rank counts.
    """
    masks = _as_list(response_masks)
    counts = _local_counts_tensor(masks)
    if group is None:
        if collectives.size() > 1:
            raise ValueError(f"group: got None with torch.distributed running on {collectives.size()} "
                             "ranks, expected the data-parallel process group "
                             "(parallel_state.get_data_parallel_group())")
    else:
        # The masks may live on the CPU; the collective runs on the group's device.
        collectives.all_reduce(counts, group)
    num_tokens, num_seqs = counts.tolist()
    return BatchCounts(num_tokens=num_tokens, num_seqs=num_seqs)
