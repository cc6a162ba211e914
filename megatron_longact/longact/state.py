"""Mask state across steps: EMA of the statistics, the schedule, the current and previous masks.

The state is global (every rank holds the same tensors) and small: two [L, C] fp32 EMA tensors and
two [L, C] bool masks. It is saved in checkpoints so that a resumed run continues the schedule.
"""

from __future__ import annotations

import torch

from megatron_longact.longact.config import LongActConfig
from megatron_longact.longact.layout import QKGeometry
from megatron_longact.longact.selection import select_channels
from megatron_longact.longact.stats import GlobalStats


class MaskState:
    def __init__(self, cfg: LongActConfig, geometry: QKGeometry):
        self.cfg = cfg
        self.geometry = geometry
        self.ema_q_LC: torch.Tensor | None = None
        self.ema_k_LC: torch.Tensor | None = None
        self.q_keep_LC: torch.Tensor | None = None  # None: no mask yet, every channel updated
        self.k_keep_LC: torch.Tensor | None = None
        self.prev_q_keep_LC: torch.Tensor | None = None
        self.prev_k_keep_LC: torch.Tensor | None = None
        self.steps_seen = 0
        self.last_mask_step = -1

    def _due(self, step: int) -> bool:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return False
        if cfg.schedule == "every_step":
            return True
        if cfg.schedule == "every_n":
            return (step - cfg.warmup_steps) % cfg.every_n == 0
        return self.q_keep_LC is None  # fixed: once, then frozen

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
        empty_L = stats.tokens_L.to(torch.float64) == 0
        if self.ema_q_LC is None or decay == 0.0:
            new_q, new_k = stats.q_LC.clone(), stats.k_LC.clone()
        else:
            new_q = decay * self.ema_q_LC + (1.0 - decay) * stats.q_LC
            new_k = decay * self.ema_k_LC + (1.0 - decay) * stats.k_LC
        if self.ema_q_LC is not None and bool(empty_L.any()):
            new_q[empty_L], new_k[empty_L] = self.ema_q_LC[empty_L], self.ema_k_LC[empty_L]
        self.ema_q_LC, self.ema_k_LC = new_q, new_k
        self.steps_seen = step + 1
        if not self._due(step):
            return False
        ranked = self.cfg.strategy in ("topk", "bottomk")
        if ranked and bool(empty_L.any()):
            layers = empty_L.nonzero().flatten().tolist()
            if self.q_keep_LC is None:
                raise RuntimeError(
                    f"LongAct: attention layers {layers} (global index) saw no token in step {step} and "
                    f"there is no previous mask to keep; with longact.tokens={self.cfg.tokens!r} the "
                    "step's batch selected nothing for them (check the response masks, or start the "
                    "mask later with longact.warmup_steps)")
            if self.cfg.scope == "model":
                return False  # the whole previous mask stays
        q_keep, k_keep = select_channels(
            self.ema_q_LC, self.ema_k_LC, self.geometry, keep_ratio=self.cfg.keep_ratio,
            scope=self.cfg.scope, strategy=self.cfg.strategy, seed=self.cfg.seed, step=step)
        if ranked and bool(empty_L.any()):
            q_keep[empty_L], k_keep[empty_L] = self.q_keep_LC[empty_L], self.k_keep_LC[empty_L]
        self.prev_q_keep_LC, self.prev_k_keep_LC = self.q_keep_LC, self.k_keep_LC
        self.q_keep_LC, self.k_keep_LC = q_keep, k_keep
        self.last_mask_step = step
        return True

    @property
    def active(self) -> bool:
        return self.q_keep_LC is not None

    def state_dict(self) -> dict:
        return {
            "ema_q_LC": self.ema_q_LC, "ema_k_LC": self.ema_k_LC,
            "q_keep_LC": self.q_keep_LC, "k_keep_LC": self.k_keep_LC,
            "prev_q_keep_LC": self.prev_q_keep_LC, "prev_k_keep_LC": self.prev_k_keep_LC,
            "steps_seen": self.steps_seen, "last_mask_step": self.last_mask_step,
        }

    def load_state_dict(self, sd: dict) -> None:
        for key in ("ema_q_LC", "ema_k_LC", "q_keep_LC", "k_keep_LC", "prev_q_keep_LC",
                    "prev_k_keep_LC", "steps_seen", "last_mask_step"):
            if key not in sd:
                raise KeyError(f"LongAct state: checkpoint lacks {key!r}")
            setattr(self, key, sd[key])
