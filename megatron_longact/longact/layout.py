"""Index spaces of Q/K channels and of the fused QKV weight.

Legend (shape suffixes):  L layers (global), H query heads, G key/value groups, D head dim,
Cq = H*D query channels, Ck = G*D key channels, R rows of linear_qkv (global), P rows per TP rank.

- *Global channel*: query channel ``h*D + d`` of head h, key channel ``g*D + d`` of group g; the
  whole layer, independent of the parallel layout. Masks and statistics live here.
- *Global row*: row of the unsharded fused ``linear_qkv`` weight. megatron groups rows per key
  group, each block ``[q heads of the group..., k, v]`` of ``(H/G + 2) * D`` rows.
- *TP-local row*: row of this tensor-parallel rank's ``linear_qkv`` weight; TP splits the global
  rows into equal contiguous chunks of P.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


def _host_bool(mask) -> np.ndarray:
    """A bool mask (numpy array or tensor on any device) as a host numpy array."""
    if isinstance(mask, np.ndarray):
        return mask.astype(bool, copy=False)
    return mask.detach().cpu().numpy().astype(bool, copy=False)


@dataclass(frozen=True)
class QKGeometry:
    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int

    @property
    def q_channels(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def k_channels(self) -> int:
        return self.num_groups * self.head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_groups) * self.head_dim

    @classmethod
    def from_transformer_config(cls, tconfig) -> "QKGeometry":
        return cls(tconfig.num_layers, tconfig.num_attention_heads,
                   tconfig.num_query_groups or tconfig.num_attention_heads, tconfig.kv_channels)

    @cached_property
    def q_row_index(self) -> torch.Tensor:
        """[Cq] global row of each global query channel (cached)."""
        return self.q_rows()

    @cached_property
    def k_row_index(self) -> torch.Tensor:
        """[Ck] global row of each global key channel (cached)."""
        return self.k_rows()

    @cached_property
    def _q_rows_np(self) -> np.ndarray:
        return self.q_row_index.numpy()

    @cached_property
    def _k_rows_np(self) -> np.ndarray:
        return self.k_row_index.numpy()

    def q_rows(self) -> torch.Tensor:
        """[Cq] global row of each global query channel."""
        D, Gq = self.head_dim, self.heads_per_group
        block = (Gq + 2) * D
        h = torch.arange(self.num_heads).repeat_interleave(D)
        d = torch.arange(D).repeat(self.num_heads)
        return (h // Gq) * block + (h % Gq) * D + d

    def k_rows(self) -> torch.Tensor:
        """[Ck] global row of each global key channel."""
        D, Gq = self.head_dim, self.heads_per_group
        block = (Gq + 2) * D
        g = torch.arange(self.num_groups).repeat_interleave(D)
        d = torch.arange(D).repeat(self.num_groups)
        return g * block + Gq * D + d

    def row_mask(self, q_keep_C: torch.Tensor, k_keep_C: torch.Tensor) -> torch.Tensor:
        """[R] bool global-row mask of one layer: True = the row is updated. V rows are always
        updated; q/k rows follow the channel masks. Also accepts [L, C] masks -> [L, R]. The
        masks may be tensors or numpy arrays; the result is a host tensor."""
        rows = np.ones((*q_keep_C.shape[:-1], self.qkv_rows), dtype=bool)  # host arithmetic
        rows[..., self._q_rows_np] = _host_bool(q_keep_C)
        rows[..., self._k_rows_np] = _host_bool(k_keep_C)
        return torch.from_numpy(rows)

    def local_row_mask(self, q_keep_C, k_keep_C, tp_rank: int, tp_size: int) -> torch.Tensor:
        """[P] (or [L, P]) bool TP-local row mask of ``linear_qkv`` on ``tp_rank``."""
        rows = self.row_mask(q_keep_C, k_keep_C)
        per_rank = self.qkv_rows // tp_size
        return rows[..., tp_rank * per_rank:(tp_rank + 1) * per_rank]

    def local_v_rows(self, tp_rank: int, tp_size: int) -> torch.Tensor:
        """[P] bool: the V rows of ``linear_qkv`` on ``tp_rank`` (never masked)."""
        return self.local_row_mask(torch.zeros(self.q_channels, dtype=torch.bool),
                                   torch.zeros(self.k_channels, dtype=torch.bool), tp_rank, tp_size)

    def local_heads(self, tp_rank: int, tp_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which global query heads and key groups this TP rank's attention computes, and whether
        it is the owner that reports each key group's statistics.

        With G >= TP each rank computes whole groups. With G < TP megatron all-gathers the fused
        projection and several ranks compute the same key group; only the first of them reports it
        so the group is not counted twice.
        """
        heads_per_rank = self.num_heads // tp_size
        heads = torch.arange(tp_rank * heads_per_rank, (tp_rank + 1) * heads_per_rank)
        if self.num_groups >= tp_size:
            per = self.num_groups // tp_size
            groups = torch.arange(tp_rank * per, (tp_rank + 1) * per)
            owner = torch.ones(per, dtype=torch.bool)
        else:
            ranks_per_group = tp_size // self.num_groups
            groups = torch.tensor([tp_rank // ranks_per_group])
            owner = torch.tensor([tp_rank % ranks_per_group == 0])
        return heads, groups, owner
