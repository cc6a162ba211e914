"""Apply LongAct masks inside megatron-core's optimizers (docs/method.md, "Where the mask acts").

:func:`install` wraps one megatron optimizer (usually a ChainedOptimizer) so that each ``step()``:
1. reduces the step's Q/K statistics and updates the masks (``LongAct.end_step``);
2. zeroes the gradients of frozen W_Q/W_K rows (and q/k bias entries with ``include_bias``) in the
   model's gradient buffers, before megatron copies them to the main gradients, computes the
   gradient norm and clips;
3. with ``apply_to=update``, hands the torch optimizer only the kept rows: right before it steps,
   each linear_qkv main shard in its param list is replaced by its kept rows (views of long kept
   runs, one strided view of the V rows where the optimizer takes strided tensors, and one compact
   tensor of the other kept rows with their gathered values and gradients and their moments,
   which stay compact between steps), and right after it the compact values
   are scattered back, before megatron copies main parameters to the model parameters. Frozen
   entries are never read or written by the optimizer, so they keep their main value and moments
   exactly, whatever the learning rate and weight decay, the bf16 model copy stays the cast of
   that value, and the optimizer does no work on them. Anything else that reads or writes the
   optimizer state (checkpoints, megatron) sees the normal full layout: the compact moments are
   written back first (:mod:`compact_state`). See docs/optimizer_freeze.md.

Index spaces: row masks are TP-local (rows of this rank's ``linear_qkv``); element masks are
shard-local (elements of the main parameter this DP rank owns, which may start and end mid-row).
Between steps LongAct keeps the per-channel masks and, as a cache of optimizer state, the compact
moments; row plans are rebuilt when the mask changes.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import numpy as np
import torch

from megatron_longact.compat import MainParamRef, inner_optimizers, main_param_refs
from megatron_longact.longact.compact_state import CompactRows, SyncedState, compact_rows_bytes, to_device
from megatron_longact.longact.config import LongActConfig
from megatron_longact.longact.controller import LongAct, LongActGroups, megatron_groups
from megatron_longact.longact.layout import QKGeometry
from megatron_longact.longact.selection import keep_count
from megatron_longact.longact.timing import PhaseTimes
from megatron_longact.runtime import collectives


# Runs of consecutive kept rows at least this many elements long (1 MiB of fp32) are stepped in
# place (as views of the main shard, its gradient and its moments) instead of being gathered: a
# copy of a long run costs more than the optimizer's fixed per-tensor cost (about a dozen kernel
# launches, or one multi-tensor chunk on GPU). The V rows of a query group (always kept) are such
# a run from head_dim x hidden = 128 x 2048 up. Below that, measured on the CPU
# (benchmarks/optimizer_overhead.py, 30 M model, V runs of 64 x 512): gathering them too made the
# step 1.18x the plain one instead of 1.27x. Partial edge rows are always stepped in place. This
# is the policy for multi-tensor optimizers (GPU); an optimizer that takes strided tensors gets the
# V rows of a shard as one strided view once they hold MIN_STRIDED_VIEW elements
# (:func:`takes_strided_params`).
MIN_IN_PLACE_RUN = 262144

# V rows of a shard holding at least this many elements (256 KiB of fp32) are stepped as one
# strided view by optimizers that take strided tensors; fewer are gathered with the other kept
# rows, since an extra tensor costs the single-tensor Adam and the hooks a fixed dozen operations.
# Measured on the CPU (benchmarks/optimizer_overhead.py): the 30 M model's 4 x 64 x 512 V elements
# per layer take the same time either way and the view halves the compact state (30.4 -> 14.4
# MiB); the tiny model's 2 x 16 x 64 were 0.02-0.15 slower as views (1.45-1.51 against 1.36-1.43).
MIN_STRIDED_VIEW = 65536


def takes_strided_params(torch_opt) -> bool:
    """Whether ``torch_opt`` steps each parameter with elementwise torch operations that accept any
    strides: torch's Adam/AdamW on their single-tensor path (their default for CPU tensors, or
    ``foreach=False``). Then the V rows of all query groups of a shard are handed over as one
    strided view (:class:`_KeepPlan`), instead of a copy or a tensor per group. Multi-tensor
    kernels (TE's and apex's FusedAdam, torch's foreach and fused paths) address each tensor as
    one contiguous block, so they get contiguous pieces only."""
    if type(torch_opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    for group in torch_opt.param_groups:
        if group.get("fused") or group.get("foreach"):
            return False
        if group.get("foreach") is None and any(p.device.type != "cpu" for p in group["params"]):
            return False  # torch picks the foreach path for CUDA tensors
    return True


def _nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D array (row-major order), about twice as fast on small arrays."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _columns_per_row(mask: np.ndarray) -> list[np.ndarray]:
    """The indices of the True entries of each row of a 2-D bool array."""
    return np.split(_nonzero_2d(mask)[1], np.cumsum(mask.sum(axis=1))[:-1])


def _runs_per_row(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of True along each row of a 2-D bool array: their row, start and end (exclusive)
    indices, in row-major order."""
    edges = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)
    which, starts = _nonzero_2d(edges == 1)
    return which, starts, _nonzero_2d(edges == -1)[1]  # row-major order pairs starts and ends


def _regular_runs(rows: np.ndarray) -> tuple[int, int, int, int] | None:
    """The whole runs of True in ``rows`` as (first, period, length, count) when they are equally
    long and equally spaced (the V rows of consecutive query groups); an edge run shorter than the
    others (cut by that end of ``rows``) is left out, a lone run is taken as it is. None when there
    is no such run or they are irregular."""
    _, starts, ends = _runs_per_row(rows[None])
    if starts.size == 0:
        return None
    lengths = ends - starts
    whole = np.ones(starts.size, dtype=bool)
    if starts.size > 1:  # the edge runs may be cut by the region's ends
        whole[0] = lengths[0] == lengths.max()
        whole[-1] = lengths[-1] == lengths.max()
    starts, lengths = starts[whole], lengths[whole]
    if starts.size == 0 or (lengths != lengths[0]).any():
        return None
    period = int(starts[1] - starts[0]) if starts.size > 1 else int(lengths[0])
    if starts.size > 2 and (np.diff(starts) != period).any():
        return None
    return int(starts[0]), period, int(lengths[0]), int(starts.size)


def compact_state_bound(cfg: LongActConfig, geometry: QKGeometry, width: int, *, tp_size: int = 1,
                        local_layers: int | None = None, bias: bool = False) -> int:
    """An upper bound of :meth:`LongActHandle.compact_state_bytes` on one TP rank, summed over the
    data-parallel shards of its ``local_layers`` linear_qkv weights (``width`` = hidden size) and,
    with ``bias``, their q/k/v biases. The memory planner divides it by the shard count.

    Each layer's compact set holds its kept q/k rows, and the V rows when a V run (``head_dim``
    rows) is shorter than :data:`MIN_IN_PLACE_RUN` (the multi-tensor optimizers of a GPU; torch's
    single-tensor Adam steps them as a strided view, which only lowers the real figure). Kept rows per TP rank: exact with
    ``scope=head``; with ``scope=layer`` (``model``) the top-k of the layer (of the model) may fall
    on one rank's heads, so at most min(local channels, k). Long kept runs and partial edge rows of
    DP shards are stepped in place and only lower the real figure.
    """
    if not cfg.enabled or cfg.apply_to != "update" or cfg.strategy == "none":
        return 0
    g, r = geometry, cfg.keep_ratio
    q_local, k_local = g.q_channels // tp_size, g.k_channels // tp_size
    if cfg.scope == "head":
        q_keep = g.num_heads // tp_size * keep_count(g.head_dim, r)
        k_keep = g.num_groups // tp_size * keep_count(g.head_dim, r)
    else:
        layers = g.num_layers if cfg.scope == "model" else 1
        q_keep = min(q_local, keep_count(layers * g.q_channels, r))
        k_keep = min(k_local, keep_count(layers * g.k_channels, r))
    v_rows = k_local if g.head_dim * width < MIN_IN_PLACE_RUN else 0
    per_layer = compact_rows_bytes(q_keep + k_keep + v_rows, width)
    if bias:  # one element per row: every V run is short
        per_layer += compact_rows_bytes(q_keep + k_keep + k_local, 1)
    return (g.num_layers if local_layers is None else local_layers) * per_layer


class _ShardRows:
    """Where one shard-local main tensor lies in the rows of its TP-local weight: what its keep
    plans share whatever the mask (made once per target; :class:`_PlanBatch` makes the plans).

    A shard covers elements [start, start + n) of the flattened TP-local weight of ``rows`` rows
    of ``width`` elements: a partial head row, whole rows (the whole-row region ``mid``: offset in
    the flat shard and row count) and a partial tail row; under the distributed optimizer a shard
    may start and end mid-row, or lie inside one row (then all of it is the tail piece). When
    ``strided_rows`` is given (rows never masked, the V rows; only for optimizers that
    :func:`takes_strided_params`), those of its rows inside the whole-row region that form equally
    long, equally spaced runs are stepped as one strided view (``strided``: element offset, size,
    stride) if they hold at least ``min_view`` elements. Runs of kept whole rows of at least
    ``min_run`` elements are stepped in place.
    """

    def __init__(self, start: int, n: int, width: int, rows: int, *, min_run: int | None = None,
                 strided_rows: np.ndarray | None = None, min_view: int | None = None):
        min_run = MIN_IN_PLACE_RUN if min_run is None else min_run
        min_view = MIN_STRIDED_VIEW if min_view is None else min_view
        self.start, self.n, self.width, self.rows = start, n, width, rows
        first_full, end = -(-start // width), start + n
        last_full = end // width
        self.first_full = first_full
        self.region = np.zeros(rows, dtype=bool)  # the whole rows
        self.in_view = np.zeros(rows, dtype=bool)  # the rows of the strided view
        self.strided: tuple[int, tuple[int, int], tuple[int, int]] | None = None
        self.head_row = self.tail_row = None  # the rows of the partial pieces
        if first_full <= last_full:
            off = first_full * width - start
            self.mid = (off, last_full - first_full)
            self.region[first_full:last_full] = True
            if start < first_full * width:
                self.head_row = first_full - 1
            if last_full * width < end:
                self.tail_row = last_full
            regular = None if strided_rows is None else _regular_runs(strided_rows[first_full:last_full])
            if regular is not None and regular[2] * regular[3] * width >= min_view:
                first, period, length, count = regular
                for i in range(count):
                    a = first_full + first + i * period
                    self.in_view[a:a + length] = True
                self.strided = (off + first * width, (count, length * width), (period * width, 1))
        else:  # inside one row
            self.mid = (0, 0)
            self.tail_row = start // width
        self.has_head, self.has_tail = self.head_row is not None, self.tail_row is not None
        self.tail_offset = self.mid[0] + self.mid[1] * width  # where the tail piece starts
        # The pieces of row_norms (head row, whole rows, tail row) in row order.
        self.pieces = self.region.copy()
        for r in (self.head_row, self.tail_row):
            if r is not None:
                self.pieces[r] = True
        self.min_run_rows = -(-min_run // width)  # a kept run this long is stepped in place

    def _mid(self, flat: torch.Tensor) -> torch.Tensor:
        off, rows = self.mid
        return flat[off:off + rows * self.width].view(rows, self.width)

    def row_norms(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The 2-norms of the shard's pieces in one read of ``flat``, in row order (the order of a
        plan's ``frozen_weights``): the partial head row, each whole row, the partial tail row.

        ``flat`` stays in its own dtype: each row's norm is accumulated in fp32 by the reduction
        and rounded to that dtype (for bf16 gradients, 2^-8 relative per row; the sums, and the
        logged fraction, are good to about 1e-4). Casting the whole gradient to fp32 first would
        read it once more and write a copy twice its size, for a logged metric."""
        off = self.mid[0]
        norms = [torch.linalg.vector_norm(self._mid(flat), dim=1)]
        if self.has_head:  # at most two partial rows, in fp32
            norms.insert(0, torch.linalg.vector_norm(flat[:off].float()).reshape(1))
        if self.has_tail:
            norms.append(torch.linalg.vector_norm(flat[self.tail_offset:].float()).reshape(1))
        return norms


class _KeepPlan:
    """The kept (updated) entries of one shard-local main tensor under one mask, as the inner
    optimizer sees them: contiguous element ranges of the flat shard stepped in place (``runs``:
    long runs of kept whole rows, kept partial edge rows), the shard's strided view of the V rows
    if it has one, and the other kept whole rows, gathered into one compact [rows, width] tensor
    (``gather_rows``, row indices in the whole-row region). ``frozen_weights`` holds 1.0 for each
    frozen piece of :meth:`_ShardRows.row_norms`, for the logged norm."""

    def __init__(self, shard: _ShardRows, runs: list[tuple[int, int]], gather_rows: np.ndarray,
                 frozen_weights: torch.Tensor):
        self.shard = shard
        self.width, self.mid, self.strided = shard.width, shard.mid, shard.strided
        self.runs = runs  # [a, b) element ranges of the flat shard
        self.gather_rows = gather_rows
        self.gather_rows_dev: torch.Tensor | None = None  # the same on the device, set by the handle
        # on the host until the handle moves all targets' weights to the device in one copy
        # (:func:`to_device`)
        self.frozen_weights = frozen_weights

    def _mid(self, flat: torch.Tensor) -> torch.Tensor:
        return self.shard._mid(flat)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The entries stepped in place, as views of ``flat``: the runs, then the strided view."""
        views = [flat[a:b] for a, b in self.runs]
        if self.strided is not None:
            offset, size, stride = self.strided
            views.append(flat[offset:].as_strided(size, stride))
        return views

    def row_norms(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return self.shard.row_norms(flat)


class _PlanBatch:
    """Keep plans of several shards at once (every linear_qkv target of a rank, whose TP-local
    weights have the same row count): the host work of a mask change is a few numpy operations
    on [shards, rows] arrays instead of a dozen per shard, which on a GPU node's host cost about
    0.1 ms a layer (docs/performance.md)."""

    def __init__(self, shards: list[_ShardRows]):
        if len({s.rows for s in shards}) > 1:
            raise ValueError("LongAct: keep plans batch shards of weights with the same row count")
        self.shards = shards
        shape = (len(shards), shards[0].rows if shards else 0)
        self.region = np.array([s.region for s in shards], dtype=bool).reshape(shape)
        self.in_view = np.array([s.in_view for s in shards], dtype=bool).reshape(shape)
        self.pieces = np.array([s.pieces for s in shards], dtype=bool).reshape(shape)
        self.piece_ends = np.cumsum(self.pieces.sum(axis=1))[:-1]
        self.first_full = np.array([s.first_full for s in shards], dtype=np.int64)
        self.min_run_rows = np.array([s.min_run_rows for s in shards], dtype=np.int64)
        # Only shards whose whole-row region can hold a long run need the search for them.
        self.runs_possible = any(s.mid[1] >= s.min_run_rows for s in shards)

    def plans(self, keep_TP: np.ndarray) -> list[_KeepPlan]:
        """One plan per shard; ``keep_TP``: [shards, rows] bool, True = the row is updated."""
        keep = np.asarray(keep_TP, dtype=bool)
        if (self.in_view & ~keep).any():
            raise AssertionError("LongAct: rows to step as a strided view are not all kept")
        gathered = keep & self.region & ~self.in_view
        long_runs: list[list[tuple[int, int]]] = [[] for _ in self.shards]
        if self.runs_possible:
            which, starts, ends = _runs_per_row(gathered)
            long = ends - starts >= self.min_run_rows[which]
            for t, a, b in zip(which[long].tolist(), starts[long].tolist(), ends[long].tolist()):
                gathered[t, a:b] = False
                long_runs[t].append((a, b))
        gather_rows = _columns_per_row(gathered)
        frozen = np.split((~keep)[self.pieces].astype(np.float64), self.piece_ends)
        plans = []
        for t, s in enumerate(self.shards):
            off, width = s.mid[0], s.width
            runs = [(0, off)] if s.has_head and keep[t, s.head_row] else []
            runs += [(off + (a - s.first_full) * width, off + (b - s.first_full) * width)
                     for a, b in long_runs[t]]
            if s.has_tail and keep[t, s.tail_row]:
                runs.append((s.tail_offset, s.n))
            plans.append(_KeepPlan(s, runs, gather_rows[t] - s.first_full, torch.from_numpy(frozen[t])))
        return plans


def squared_norm_sums(norms: list[torch.Tensor], frozen_weights: list[torch.Tensor]) -> torch.Tensor:
    """[total, frozen part] (fp64) of the squares of ``norms`` (the pieces' norms of one or more
    shards, :meth:`_KeepPlan.row_norms`) weighted by the concatenated ``frozen_weights``: a
    handful of operations for all shards together, and no host sync on the mask."""
    sq = torch.cat(norms).double().square()
    return torch.stack([sq.sum(), torch.dot(sq, torch.cat(frozen_weights))])


class _Target:
    """A linear_qkv weight or bias with its main-parameter reference."""

    def __init__(self, ref: MainParamRef, row_slot: int, row_width: int, v_rows_P: np.ndarray):
        self.ref = ref
        self.row_slot = row_slot  # index into LongAct.local_qkv_rows_LP()
        self.row_width = row_width  # elements per row (hidden size for the weight, 1 for the bias)
        # TP-local V rows, stepped as one strided view when the torch optimizer takes it
        self.strided_rows = v_rows_P if takes_strided_params(ref.torch_optimizer) else None
        self.shard = _ShardRows(ref.flat_start, ref.main_param.numel(), row_width, v_rows_P.size,
                                strided_rows=self.strided_rows)
        self.plan: _KeepPlan | None = None  # kept entries of the main shard, this step only
        self.frozen_rows: torch.Tensor | None = None  # TP-local indices of the frozen rows


def _plain_state(torch_opt, state_dict: dict) -> dict:
    """torch ``Optimizer.state_dict`` post-hook: per-parameter states as plain dicts (written back
    first), so a saved optimizer state never contains :class:`SyncedState` and loads with
    ``torch.load(weights_only=True)``."""
    state = state_dict.get("state", {})
    for k, v in state.items():
        if isinstance(v, SyncedState):
            state[k] = dict(v)
    return state_dict


class LongActHandle:
    """What :func:`install` returns: the controller plus the optimizer integration."""

    def __init__(self, longact: LongAct, optimizer, cfg: LongActConfig):
        self.longact = longact
        self.optimizer = optimizer
        self.cfg = cfg
        self.step_count = 0
        self._removed_fraction: torch.Tensor | None = None
        self._freeze_plans: dict[int, tuple] = {}
        self._plans_step = None
        self._targets = self._find_targets(main_param_refs(optimizer)) if cfg.enabled else []
        self._row_slots = np.array([t.row_slot for t in self._targets], dtype=np.int64)
        self._norm_groups = self._find_norm_groups() if cfg.enabled and cfg.strategy != "none" else []
        self._plan_batch = _PlanBatch([t.shard for t in self._targets])
        self._orig_step = optimizer.step
        self._hook_handles = []
        if cfg.enabled:
            optimizer.step = self._step
            if cfg.apply_to == "update":
                for torch_opt in {id(t.ref.torch_optimizer): t.ref.torch_optimizer
                                  for t in self._targets}.values():
                    self._hook_handles.append(torch_opt.register_step_pre_hook(self._compact))
                    self._hook_handles.append(torch_opt.register_step_post_hook(self._expand))
                    self._hook_handles.append(torch_opt.register_state_dict_post_hook(_plain_state))
        # While one torch optimizer steps: (target, its compact pieces, whether it had state) and
        # the param lists the pieces stand in for.
        self._swapped: list[tuple[_Target, list[torch.Tensor], CompactRows, bool]] = []
        self._saved_params: list[tuple[dict, list]] = []
        self._compact_rows: dict[int, CompactRows] = {}  # per target, kept across steps
        self.phase_times: PhaseTimes | None = None  # see enable_timing()

    # -- wiring ------------------------------------------------------------------------------
    def _find_targets(self, refs: list[MainParamRef]) -> list[_Target]:
        by_param = {id(r.model_param): r for r in refs}
        g = self.longact.groups
        v_rows = self.longact.geometry.local_v_rows(g.tp_rank, g.tp_size).numpy()
        targets = []
        slot = 0
        for model in self.longact.gpt_models:
            for layer in model.decoder.layers:
                qkv = layer.self_attention.linear_qkv
                weight = qkv.weight
                # Under the distributed optimizer a DP rank may own no part of a weight at all.
                if id(weight) in by_param:
                    targets.append(_Target(by_param[id(weight)], slot, weight.shape[1], v_rows))
                bias = getattr(qkv, "bias", None)
                if self.cfg.include_bias and isinstance(bias, torch.nn.Parameter) and id(bias) in by_param:
                    targets.append(_Target(by_param[id(bias)], slot, 1, v_rows))
                slot += 1
        return targets

    def uninstall(self) -> None:
        """Remove the optimizer wrapper, the optimizer hooks and the statistics hooks."""
        self.optimizer.step = self._orig_step
        self.flush_optimizer_state()
        for t in self._targets:  # plain dicts again
            state = t.ref.torch_optimizer.state.get(t.ref.main_param)
            if isinstance(state, SyncedState):
                t.ref.torch_optimizer.state[t.ref.main_param] = dict(dict.items(state))
        self._compact_rows.clear()
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
        self.longact.remove()

    def enable_timing(self) -> PhaseTimes:
        """Time this handle's phases of every later step (:mod:`~megatron_longact.longact.timing`):
        ``end_step`` (statistics and top-k, with the row masks), ``plans`` (keep plans, at a mask
        change), ``zero`` (frozen gradient rows and the logged norm), ``gather`` (the torch
        optimizer's pre-hook), ``torch step`` (the torch optimizer's own work), ``scatter`` (its
        post-hook). On a GPU each boundary synchronises the device, which slows the step."""
        self.phase_times = PhaseTimes()
        return self.phase_times

    def _timed(self, label: str):
        return self.phase_times.time(label) if self.phase_times is not None else contextlib.nullcontext()

    # -- the step ----------------------------------------------------------------------------
    def begin_microbatch(self, valid_BS=None, response_BS=None) -> None:
        self.longact.begin_microbatch(valid_BS, response_BS)

    def set_collecting(self, on: bool) -> None:
        self.longact.set_collecting(on)

    @property
    def metrics(self) -> dict[str, float]:
        """Metrics of the last step (computed on demand): the controller's, plus the fraction of
        the linear_qkv gradient norm that the mask removed."""
        out = self.longact.metrics()
        if self._removed_fraction is not None:
            total, removed = self._removed_fraction.tolist()
            out["longact/grad_norm_removed_fraction_qkv"] = math.sqrt(removed / total) if total > 0 else 0.0
        return out

    @torch.no_grad()
    def _step(self, *args, **kwargs):
        with self._timed("end_step"):
            self.longact.end_step(self.step_count)
            rows_LP = self.longact.local_qkv_rows_LP()
        freezing = self.cfg.strategy != "none" and rows_LP is not None
        if freezing and self._plans_step != self.longact.state.last_mask_step:
            with self._timed("plans"):
                self._freeze_plans = self._make_freeze_plans(rows_LP)
            self._plans_step = self.longact.state.last_mask_step
        for t in self._targets:
            t.plan, t.frozen_rows = self._freeze_plans[id(t)] if freezing else (None, None)
        with self._timed("zero"):
            self._removed_fraction = self._zero_frozen_grads() if freezing else None
        try:
            result = self._orig_step(*args, **kwargs)
        finally:
            for t in self._targets:
                t.plan = t.frozen_rows = None
            self._restore_param_lists()
            for t, pieces, _, _ in self._swapped:  # only when the torch optimizer's step raised
                for p in pieces:
                    t.ref.torch_optimizer.state.pop(p, None)
                    p.grad = None
            self._swapped.clear()
            if self.phase_times is not None:
                self.phase_times.close_step()
        self.step_count += 1
        return result

    def _make_freeze_plans(self, rows_LP: np.ndarray) -> dict[int, tuple[_KeepPlan, torch.Tensor]]:
        """Per target: the shard-local keep plan (for the main params and state) and the TP-local
        frozen row indices (for the gradients), rebuilt only when the mask changes. Host
        arithmetic on all targets at once (:class:`_PlanBatch`); what the device needs (norm
        weights, frozen and gathered row indices) goes there in two copies per device."""
        if not self._targets:
            return {}
        keep_TP = rows_LP[self._row_slots]
        plans = self._plan_batch.plans(keep_TP)
        frozen = _columns_per_row(~keep_TP)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(self._targets):
            by_device.setdefault(t.ref.model_param.device, []).append(i)
        out = {}
        for device, idx in by_device.items():
            weights = to_device([plans[i].frozen_weights.numpy() for i in idx], device)
            indices = to_device([frozen[i] for i in idx] + [plans[i].gather_rows for i in idx], device)
            for i, w, frozen_dev, gather_dev in zip(idx, weights, indices, indices[len(idx):]):
                plans[i].frozen_weights = w
                plans[i].gather_rows_dev = gather_dev
                out[id(self._targets[i])] = (plans[i], frozen_dev)
        return out

    def _zero_frozen_grads(self) -> torch.Tensor:
        """Zero frozen rows of the model gradients; return [total, removed] squared linear_qkv
        gradient norms over the gradient values the optimizers own, reduced like the grad norm."""
        norms, weights = [], []
        for t in self._targets:
            p = t.ref.model_param
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            if grad is None:
                continue
            owned = grad.view(-1)[t.ref.flat_start:t.ref.flat_start + t.ref.main_param.numel()]
            norms += t.plan.row_norms(owned)  # before the zeroing below
            weights.append(t.plan.frozen_weights)
            grad.index_fill_(0, t.frozen_rows, 0)
            if p.grad is not None and p.grad is not grad:
                p.grad.index_fill_(0, t.frozen_rows, 0)
        if norms:
            sums = squared_norm_sums(norms, weights)
        else:  # this DP rank owns no part of any linear_qkv weight
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            sums = torch.zeros(2, dtype=torch.float64, device=device)
        for group in self._norm_groups:
            collectives.all_reduce(sums, group)
        return sums

    def _find_norm_groups(self) -> list:
        """The groups :meth:`_zero_frozen_grads` reduces over: the gradient-norm groups of the
        megatron optimizers that hold a linear_qkv shard on any rank (one in practice), the same
        list on every rank. A rank cannot read it off its own targets: under the distributed
        optimizer a DP rank may own no part of any linear_qkv weight (a small model at a large
        DP), and it must still join the reductions the other ranks make. So which optimizers hold
        one is agreed on over all ranks, once."""
        inner = inner_optimizers(self.optimizer)
        holds = torch.zeros(len(inner), dtype=torch.float64)
        for t in self._targets:
            holds[next(i for i, opt in enumerate(inner) if opt is t.ref.megatron_optimizer)] = 1
        collectives.all_reduce(holds, None, op="max")
        groups = []
        for i in torch.nonzero(holds).flatten().tolist():
            group = inner[i].get_grad_stats_parallel_group()
            if group is not None and all(group is not g for g in groups):
                groups.append(group)
        return groups

    def _compact(self, torch_opt, args, kwargs) -> None:
        """The torch optimizer's step pre-hook: :meth:`_gather`, timed when timing is on."""
        with self._timed("gather"):
            self._gather(torch_opt)
        if self.phase_times is not None:
            self.phase_times.start("torch step")

    def _expand(self, torch_opt, args, kwargs) -> None:
        """The torch optimizer's step post-hook: :meth:`_scatter`, timed when timing is on."""
        if self.phase_times is not None:
            self.phase_times.stop("torch step")
        with self._timed("scatter"):
            self._scatter(torch_opt)

    def _gather(self, torch_opt) -> None:
        """Before the torch optimizer steps: in each target's param list, replace its main shard
        by the kept entries only: views of the long kept runs (stepped in place) and one compact
        tensor of the other kept rows, each with the matching gradient and state tensors. The
        compact rows' moments persist between steps (:mod:`compact_state`); their values and
        gradients are gathered here.

        The optimizer then never reads or writes a frozen row: frozen main values and moments stay
        as they were because nothing touches them, and no work is spent on them. Elementwise
        optimizers (Adam(W), also as multi-tensor kernels) give each kept element exactly the
        update the full tensor would get. Gradient norm and clipping already ran over the full
        shards (megatron reads the param groups before this hook), so they are unchanged.
        """
        by_main = {}
        for t in self._targets:
            main = t.ref.main_param
            if t.plan is None or t.ref.torch_optimizer is not torch_opt or main.grad is None:
                continue
            plan = t.plan
            c = self._compact_rows.get(id(t))
            if c is None:
                c = self._compact_rows[id(t)] = CompactRows(plan.mid, plan.width, main.shape, main.device)
            full = torch_opt.state.get(main)
            if full is None or full is not c.synced:
                c.drop()  # first step, or the state was replaced (a load): the full state is the truth
            full = {} if full is None else full
            # The cached views are valid until someone else touches the state (which drops them).
            full_mid = c.synced_mid if c.synced_mid is not None else c.full_views(full)
            c.retarget(plan.gather_rows, full_mid, plan.gather_rows_dev)
            main_flat, grad_flat = main.data.view(-1), main.grad.view(-1)
            pieces = [torch.index_select(c.mid_view(main_flat), 0, c.rows_dev,
                                         out=c.buffer("param", main))] + plan.views(main_flat)
            grads = [torch.index_select(c.mid_view(grad_flat), 0, c.rows_dev,
                                        out=c.buffer("grad", main.grad))] + plan.views(grad_flat)
            if full_mid:
                scalars = c.scalars if c.newer else {k: v for k, v in dict.items(full) if k not in full_mid}
                states = [{k: c.live(c.moments[k]) for k in full_mid}]
                states += [{k: view for k, view in zip(full_mid, views)}
                           for views in zip(*(plan.views(dict.__getitem__(full, k).view(-1))
                                              for k in full_mid))]
                for st in states:  # per-tensor scalars (Adam's step): a copy per piece, since the
                    # optimizer increments them in place once per tensor it steps
                    st.update({k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()})
                for piece, st in zip(pieces, states):
                    torch_opt.state[piece] = st
            for piece, grad in zip(pieces, grads):
                piece.grad = grad
            by_main[id(main)] = pieces
            self._swapped.append((t, pieces, c, bool(full_mid)))
        if not by_main:
            return
        for group in torch_opt.param_groups:
            params = group["params"]
            if any(id(p) in by_main for p in params):
                self._saved_params.append((group, params))
                new = []
                for p in params:
                    new.extend(by_main.get(id(p), (p,)))
                group["params"] = new

    def _scatter(self, torch_opt) -> None:
        """After the torch optimizer step: scatter the compact values back into the full main
        shard (the in-place runs are already there), so that megatron's main-to-model copy sees
        them. The compact moments stay compact; the full state dict becomes a
        :class:`SyncedState` that writes them back the moment anything else looks at it."""
        self._restore_param_lists()
        for t, pieces, c, had_state in self._swapped:
            if t.ref.torch_optimizer is not torch_opt:
                continue
            main = t.ref.main_param
            c.mid_view(main.data.view(-1)).index_copy_(0, c.rows_dev, pieces[0])
            states = [torch_opt.state.pop(p, {}) for p in pieces]
            for p in pieces:
                p.grad = None
            moment_keys = list(c.moments) or [k for k, v in states[0].items()
                                              if torch.is_tensor(v) and v.shape == pieces[0].shape]
            synced = torch_opt.state.get(main)
            if not (had_state and synced is c.synced):
                # One SyncedState per main shard, made here once: on the first step, or when the
                # state came from elsewhere (a load, a step without a mask).
                full = dict(dict.items(synced or {}))
                if not had_state:
                    # State this very step created (the first step) starts from zero for frozen
                    # entries, as if the step never touched them; the runs' state moves into it.
                    for k in moment_keys:
                        full[k] = torch.zeros_like(main)
                        for view, st in zip(t.plan.views(full[k].view(-1)), states[1:]):
                            view.copy_(st[k])
                        c.moments[k] = states[0][k]
                    for k, v in states[0].items():
                        if k not in moment_keys:
                            full[k] = v.clone() if torch.is_tensor(v) else v
                synced = c.synced = torch_opt.state[main] = SyncedState(full, None)
                c.synced_mid = c.full_views(synced)
            c.scalars = {k: v for k, v in states[0].items() if k not in moment_keys}
            c.newer = True
            synced.on_touch = partial(self._flush_compact, c)  # armed again after each step
        self._swapped = [s for s in self._swapped if s[0].ref.torch_optimizer is not torch_opt]

    @staticmethod
    def _flush_compact(c: CompactRows) -> None:
        """Someone else is about to read or write the full state: write the compact rows back
        and drop them (the next step gathers them again)."""
        c.flush(c.synced)
        c.drop()

    def flush_optimizer_state(self) -> None:
        """Write the compact optimizer state of the kept rows back into the full-layout state.
        Not needed before megatron's or torch's own state handling (any access to the state dict
        does it), only for code that holds references to the state tensors across steps."""
        for c in self._compact_rows.values():
            if c.synced is not None:
                c.synced._touch()

    def _restore_param_lists(self) -> None:
        for group, params in self._saved_params:
            group["params"] = params
        self._saved_params.clear()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "mask_state": self.longact.state.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.step_count = int(sd["step_count"])
        self.longact.state.load_state_dict(sd["mask_state"])

    def persistent_bytes(self) -> int:
        """Bytes of LongAct's own state on this rank between steps, as
        :func:`~megatron_longact.longact.controller.persistent_state_bytes` counts them (masks,
        churn, EMA, the last step's per-layer metrics, statistics accumulators); the optimizer
        state it keeps compact is :meth:`compact_state_bytes`."""
        return self.longact.persistent_bytes()

    def compact_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds twice while the kept rows' moments are
        compact (the compact storage, with its slack, plus the reused value and gradient buffers);
        the full-layout tensors are megatron's own."""
        return sum(t.numel() * t.element_size() for c in self._compact_rows.values()
                   for t in list(c.moments.values()) + list(c.buffers.values()))


def install(model_chunks: list, optimizer, config: LongActConfig | None = None, *,
            groups: LongActGroups | None = None) -> LongActHandle:
    """Attach LongAct to a megatron-core model and its optimizer.

    ``model_chunks``: the (DDP-wrapped) model chunks of this rank, as passed to megatron's
    schedule; ``optimizer``: what ``get_megatron_optimizer`` returned; ``groups``: the process
    groups (default: megatron's parallel state). After this, ``optimizer.step()`` applies the masks;
    call ``handle.begin_microbatch(valid_BS, response_BS)`` before each micro-batch's forward when
    only some tokens should count, and ``handle.set_collecting(False)`` around forwards that are
    not update passes (rollouts, evaluation).
    """
    config = config or LongActConfig()
    if len(model_chunks) != 1:
        # Micro-batch ids (recomputation dedup, token masks) are tracked per model forward; with
        # virtual pipeline stages the chunks' forwards interleave and the ids would mix.
        raise NotImplementedError(
            f"LongAct: got {len(model_chunks)} model chunks; virtual pipeline stages "
            "(virtual_pipeline_model_parallel_size > 1) are not supported, use one chunk per rank")
    groups = groups or megatron_groups()
    tconfig = model_chunks[0].config
    longact = LongAct(config, model_chunks, tconfig, groups)
    return LongActHandle(longact, optimizer, config)
