"""Mask state across steps: EMA of the statistics, the schedule, the current mask, its churn.

The state is global (every rank holds the same tensors) and small, since it is kept between steps
on every rank of a 70B job: the current Q and K masks packed eight channels a byte, the per-layer
Jaccard churn of the last mask change ([L] floats, instead of the previous mask), and the [L, C]
fp32 EMA of the statistics only when ``ema > 0`` (with ``ema = 0`` a mask depends on its own step's
statistics alone, so nothing of them is kept). It is saved in checkpoints so that a resumed run
continues the schedule; checkpoints of the earlier layout (bool masks, previous masks, EMA always)
still load.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_longact.longact.config import LongActConfig
from megatron_longact.longact.layout import QKGeometry
from megatron_longact.longact.selection import select_channels
from megatron_longact.longact.stats import GlobalStats

def pack_mask(mask_LC: torch.Tensor) -> torch.Tensor:
    """[L, C] bool -> [L, ceil(C/8)] uint8 on the host, channel c in bit c % 8 of byte c // 8.
    Host arithmetic in numpy: the masks are small host tensors, packed and unpacked every step."""
    bits = np.packbits(mask_LC.detach().cpu().numpy().astype(bool), axis=1, bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(bits_LB: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: [L, B] uint8 -> [L, channels] bool, on the host."""
    bits = np.unpackbits(bits_LB.detach().cpu().numpy(), axis=1, count=channels, bitorder="little")
    return torch.from_numpy(bits.view(bool))


def jaccard_L(a_LC: torch.Tensor, b_LC: torch.Tensor) -> torch.Tensor:
    """[L] Jaccard similarity of two boolean host masks, per layer (1.0 where both are empty)."""
    a, b = a_LC.cpu().numpy(), b_LC.cpu().numpy()
    inter = (a & b).sum(axis=1).astype(np.float64)
    union = (a | b).sum(axis=1).astype(np.float64)
    return torch.from_numpy(np.where(union > 0, inter / np.maximum(union, 1.0), 1.0))


class MaskState:
    def __init__(self, cfg: LongActConfig, geometry: QKGeometry):
        self.cfg = cfg
        self.geometry = geometry
        self.ema_q_LC: torch.Tensor | None = None  # kept only with ema > 0
        self.ema_k_LC: torch.Tensor | None = None
        self.q_bits_LB: torch.Tensor | None = None  # packed masks; None: no mask yet, all updated
        self.k_bits_LB: torch.Tensor | None = None
        self.churn_q_L: torch.Tensor | None = None  # Jaccard(new mask, previous mask) per layer
        self.churn_k_L: torch.Tensor | None = None
        self.steps_seen = 0
        self.last_mask_step = -1

    @property
    def q_keep_LC(self) -> torch.Tensor | None:
        """The global [L, Cq] bool Q mask (True = update), unpacked on each access."""
        return None if self.q_bits_LB is None else unpack_mask(self.q_bits_LB, self.geometry.q_channels)

    @property
    def k_keep_LC(self) -> torch.Tensor | None:
        return None if self.k_bits_LB is None else unpack_mask(self.k_bits_LB, self.geometry.k_channels)

    def _set_masks(self, q_keep_LC: torch.Tensor, k_keep_LC: torch.Tensor) -> None:
        prev_q, prev_k = self.q_keep_LC, self.k_keep_LC
        if prev_q is not None:
            self.churn_q_L, self.churn_k_L = jaccard_L(q_keep_LC, prev_q), jaccard_L(k_keep_LC, prev_k)
        self.q_bits_LB, self.k_bits_LB = pack_mask(q_keep_LC), pack_mask(k_keep_LC)

    def _due(self, step: int) -> bool:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return False
        if cfg.schedule == "every_step":
            return True
        if cfg.schedule == "every_n":
            return (step - cfg.warmup_steps) % cfg.every_n == 0
        return self.q_bits_LB is None  # fixed: once, then frozen

    def update(self, stats: GlobalStats, step: int) -> bool:
        """Fold in step ``step``'s statistics; recompute the mask when the schedule says so.
        Returns True when a new mask was computed.

        A layer whose statistics saw no token this step (``stats.tokens_L == 0``, e.g. every
        response of the step was empty under ``tokens=response``) carries no information: a
        ranking of its all-zero statistics would just keep the lowest-index channels. Such a layer
        keeps its previous EMA and its previous mask (with ``scope=model`` the whole previous mask
        is kept, since one top-k spans all layers). With no previous mask to keep, the step raises.
        """
        decay = self.cfg.ema
        # The statistics may live on a GPU: the EMA and the selection run there; the host gets
        # the empty-layer flags and the masks (two or three small copies).
        empty_L = stats.tokens_L.to(torch.float64) == 0
        empty = empty_L.cpu().numpy()
        if decay == 0.0:
            # This step's statistics alone rank the channels. An empty layer's all-zero rows are
            # ranked too, but its previous mask replaces the result below.
            sel_q, sel_k = stats.q_LC, stats.k_LC
        else:
            if self.ema_q_LC is None:
                new_q, new_k = stats.q_LC.clone(), stats.k_LC.clone()
            else:  # a loaded EMA is on the host; it moves to the statistics' device once
                old_q, old_k = self.ema_q_LC.to(stats.q_LC.device), self.ema_k_LC.to(stats.k_LC.device)
                new_q = decay * old_q + (1.0 - decay) * stats.q_LC
                new_k = decay * old_k + (1.0 - decay) * stats.k_LC
                if empty.any():
                    new_q[empty_L], new_k[empty_L] = old_q[empty_L], old_k[empty_L]
            self.ema_q_LC, self.ema_k_LC = new_q, new_k
            sel_q, sel_k = new_q, new_k
        self.steps_seen = step + 1
        if not self._due(step):
            return False
        ranked = self.cfg.strategy in ("topk", "bottomk")
        if ranked and empty.any():
            layers = np.flatnonzero(empty).tolist()
            if self.q_bits_LB is None:
                raise RuntimeError(
                    f"LongAct: attention layers {layers} (global index) saw no token in step {step} and "
                    f"there is no previous mask to keep; with longact.tokens={self.cfg.tokens!r} the "
                    "step's batch selected nothing for them (check the response masks, or start the "
                    "mask later with longact.warmup_steps)")
            if self.cfg.scope == "model":
                return False  # the whole previous mask stays
        q_keep, k_keep = select_channels(
            sel_q, sel_k, self.geometry, keep_ratio=self.cfg.keep_ratio,
            scope=self.cfg.scope, strategy=self.cfg.strategy, seed=self.cfg.seed, step=step)
        q_keep, k_keep = q_keep.cpu(), k_keep.cpu()
        if ranked and empty.any():
            host_empty = torch.from_numpy(empty)
            q_keep[host_empty], k_keep[host_empty] = self.q_keep_LC[host_empty], self.k_keep_LC[host_empty]
        self._set_masks(q_keep, k_keep)
        self.last_mask_step = step
        return True

    @property
    def active(self) -> bool:
        return self.q_bits_LB is not None

    _KEYS = ("ema_q_LC", "ema_k_LC", "q_bits_LB", "k_bits_LB", "churn_q_L", "churn_k_L",
             "steps_seen", "last_mask_step")

    def state_dict(self) -> dict:
        """Host tensors (the EMA lives on the statistics' device between steps)."""
        return {"format": 2, **{key: _on_host(getattr(self, key)) for key in self._KEYS}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != 2:
            sd = _from_bool_layout(sd)
        for key in self._KEYS:
            if key not in sd:
                raise KeyError(f"LongAct state: checkpoint lacks {key!r}")
            setattr(self, key, sd[key])
        if self.cfg.ema == 0.0:
            self.ema_q_LC = self.ema_k_LC = None  # not used with ema = 0


def _on_host(value):
    return value.cpu() if torch.is_tensor(value) else value


def _from_bool_layout(sd: dict) -> dict:
    """The first checkpoint layout (bool masks, the previous masks, the EMA always kept)."""
    for key in ("ema_q_LC", "ema_k_LC", "q_keep_LC", "k_keep_LC", "prev_q_keep_LC",
                "prev_k_keep_LC", "steps_seen", "last_mask_step"):
        if key not in sd:
            raise KeyError(f"LongAct state: checkpoint lacks {key!r}")
    q, k, pq, pk = sd["q_keep_LC"], sd["k_keep_LC"], sd["prev_q_keep_LC"], sd["prev_k_keep_LC"]
    return {
        "ema_q_LC": sd["ema_q_LC"], "ema_k_LC": sd["ema_k_LC"],
        "q_bits_LB": None if q is None else pack_mask(q), "k_bits_LB": None if k is None else pack_mask(k),
        "churn_q_L": None if pq is None or q is None else jaccard_L(q, pq),
        "churn_k_L": None if pk is None or k is None else jaccard_L(k, pk),
        "steps_seen": sd["steps_seen"], "last_mask_step": sd["last_mask_step"],
    }
