"""The LongAct controller: statistics hooks, global reduction, mask schedule and metrics for one
model. The optimizer side (applying the masks) builds on :meth:`LongAct.local_qkv_row_masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_longact.longact.config import LongActConfig
from megatron_longact.longact.layout import QKGeometry
from megatron_longact.longact.metrics import saliency_heatmap, stat_extremes, step_metrics
from megatron_longact.longact.state import MaskState
from megatron_longact.longact.stats import GlobalStats, StatsCollector
from megatron_longact.models.builder import unwrap


@dataclass
class LongActGroups:
    """The process groups LongAct talks over (None where that dimension has size 1)."""

    dp_cp: object = None
    """Data- and context-parallel ranks: their tokens are summed."""
    tp: object = None
    """Tensor-parallel ranks of one model replica: their channels are assembled."""
    pp: object = None
    """Pipeline stages: their layers are assembled."""
    tp_rank: int = 0
    tp_size: int = 1


def megatron_groups() -> LongActGroups:
    """The groups of megatron-core's initialized parallel state."""
    from megatron.core import parallel_state as ps

    return LongActGroups(
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
    )



class LongAct:
    """Per-model LongAct state and hooks.

    One optimizer step::

        for each micro-batch: longact.begin_microbatch(valid_BS, response_BS); forward/backward
        longact.end_step(step)                # global statistics -> masks (every rank alike)
        metrics = longact.metrics()           # when logging
        row_masks = longact.local_qkv_row_masks()
    """

    def __init__(self, cfg: LongActConfig, model_chunks: list, tconfig, groups: LongActGroups):
        self.cfg = cfg
        self.groups = groups
        self.geometry = QKGeometry.from_transformer_config(tconfig)
        self.gpt_models = [unwrap(m) for m in model_chunks]
        self.state = MaskState(cfg, self.geometry)
        self.retain_stats = True
        """Keep the last step's full [L, C] statistics (for :meth:`heatmap` and figures). The
        trainer turns it on only for steps that draw a heatmap: at 70B they are ~3 MB a rank."""
        self.last_stats: GlobalStats | None = None
        self._last_extremes: dict | None = None
        self.last_tokens_L: torch.Tensor | None = None
        self.collector = None
        if cfg.enabled:
            self.collector = StatsCollector(self.gpt_models, self.geometry, stat=cfg.stat,
                                            point=cfg.point, tp_rank=groups.tp_rank,
                                            tp_size=groups.tp_size)

    def begin_microbatch(self, valid_BS: torch.Tensor | None = None,
                         response_BS: torch.Tensor | None = None) -> None:
        """Announce the next micro-batch: ``valid_BS`` [batch, seq] marks non-padding tokens
        (None: all), ``response_BS`` marks response tokens (needed for tokens=prompt/response)."""
        if self.collector is None:
            return
        tokens = self.cfg.tokens
        if tokens != "all" and response_BS is None:
            raise ValueError(f"longact.tokens={tokens!r} needs a response mask for each micro-batch")
        mask = None if valid_BS is None else valid_BS.bool()
        if tokens != "all":
            sel = response_BS.bool() if tokens == "response" else ~response_BS.bool()
            mask = sel if mask is None else mask & sel
        self.collector.begin_microbatch(None if mask is None else mask.t().contiguous())

    def set_collecting(self, on: bool) -> None:
        """Turn statistics on (update passes) or off (rollout and evaluation forwards)."""
        if self.collector is not None:
            self.collector.enabled = on

    def end_step(self, step: int) -> bool:
        """Reduce this step's statistics over all ranks, update the EMA and, when the schedule says
        so, the masks. Returns whether a new mask was computed."""
        if self.collector is None:
            return False
        g = self.groups
        # On the accumulators' device: the EMA and the top-k run there (on a GPU node a few
        # kernels), and only the masks come back to the host (docs/method.md, "The mask").
        stats = self.collector.reduce(dp_cp_group=g.dp_cp, tp_group=g.tp, pp_group=g.pp, on_host=False)
        self._last_extremes = stat_extremes(stats)
        self.last_tokens_L = stats.tokens_L  # [L] tokens each layer counted this step
        self.last_stats = stats if self.retain_stats else None
        return self.state.update(stats, step)

    def metrics(self) -> dict[str, float]:
        """The last step's metrics (docs/method.md, "What is logged"); no communication."""
        if self._last_extremes is None:
            return {}
        return step_metrics(self.state, self._last_extremes)

    def heatmap(self):
        """RGB [H, W, 3] uint8 saliency heatmap of the last step's statistics (or None)."""
        if self.last_stats is None:
            return None
        return saliency_heatmap(self.last_stats.q_LC, self.last_stats.k_LC)

    def local_qkv_rows_LP(self) -> np.ndarray | None:
        """[L, P] bool TP-local row masks of this rank's attention layers' ``linear_qkv`` (True =
        update), in the order of ``gpt_models``' decoder layers; None while no mask is active."""
        if not self.state.active:
            return None
        idx = np.array([layer.layer_number - 1 for model in self.gpt_models
                        for layer in model.decoder.layers], dtype=np.int64)
        # host arithmetic in numpy (small arrays every step; no torch CPU kernels on a GPU node)
        return self.geometry.local_row_mask(self.state.q_keep_LC.numpy()[idx],
                                            self.state.k_keep_LC.numpy()[idx],
                                            self.groups.tp_rank, self.groups.tp_size).numpy()

    def local_qkv_row_masks(self) -> list[tuple[torch.nn.Module, torch.Tensor]]:
        """For each of this rank's attention layers: (its linear_qkv module, the [P] bool TP-local
        row mask, True = update). Empty while no mask is active."""
        rows_LP = self.local_qkv_rows_LP()
        if rows_LP is None:
            return []
        layers = [layer for model in self.gpt_models for layer in model.decoder.layers]
        return [(layer.self_attention.linear_qkv, torch.from_numpy(rows_LP[i]))
                for i, layer in enumerate(layers)]

    def persistent_bytes(self) -> int:
        """Bytes this controller keeps between steps: the mask state (packed masks, churn, EMA),
        the last step's per-layer metrics (top and median statistic, token counts) and this
        rank's statistics accumulators. The full statistics of ``last_stats`` are not counted:
        the trainer keeps them only for heatmap steps."""
        return _kept_bytes(self.state, self._last_extremes, self.last_tokens_L, self.collector)

    def remove(self) -> None:
        if self.collector is not None:
            self.collector.remove_hooks()


def persistent_state_bytes(cfg: LongActConfig, geometry: QKGeometry, local_layers: int) -> int:
    """:meth:`LongAct.persistent_bytes` of a rank with ``local_layers`` attention layers once
    masking runs, measured on the real objects rather than by formula: a :class:`MaskState`
    after the steps that give it its current and previous mask (as the schedule computes them),
    the last step's metrics, and a :class:`StatsCollector`'s accumulators for that many layers.
    For the memory planner and ``benchmarks/optimizer_overhead.py``."""
    L = geometry.num_layers
    gen = torch.Generator().manual_seed(0)
    stats = GlobalStats(torch.rand(L, geometry.q_channels, generator=gen),
                        torch.rand(L, geometry.k_channels, generator=gen),
                        torch.ones(L, dtype=torch.float64))
    state = MaskState(cfg, geometry)
    last = cfg.warmup_steps + (cfg.every_n if cfg.schedule == "every_n" else 1)
    for step in range(last + 1):
        state.update(stats, step)
    collector = StatsCollector([], geometry, stat=cfg.stat, point=cfg.point)
    collector.set_layer_slots(list(range(local_layers)))
    return _kept_bytes(state, stat_extremes(stats), stats.tokens_L, collector)


def _kept_bytes(state: MaskState, extremes: dict | None, tokens_L: torch.Tensor | None,
                collector: StatsCollector | None) -> int:
    """Bytes of what a controller keeps between steps (one count for the live controller and for
    the planner's estimate)."""
    tensors = [t for t in (getattr(state, key) for key in state._KEYS) if torch.is_tensor(t)]
    if extremes is not None:
        tensors += [t for pair in extremes.values() for t in pair]
    if tokens_L is not None:
        tensors.append(tokens_L)
    if collector is not None:
        tensors += collector.accumulators()
    return sum(t.numel() * t.element_size() for t in tensors)
