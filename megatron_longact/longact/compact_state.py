"""Optimizer state of the kept q/k rows, kept compact between steps (docs/optimizer_freeze.md,
"State between steps").

The inner optimizer steps the kept rows of a linear_qkv main shard as one compact tensor. Gathering
and scattering that tensor's Adam moments every step would cost about as much memory traffic as
skipping the frozen rows saves, so the compact moments stay between steps in :class:`CompactRows`,
and only the rows that enter or leave the kept set when the mask changes are moved.

The full-layout state tensors stay where megatron and torch expect them, under the main shard in
``torch_optimizer.state``; they hold the truth for every row except the ones in the compact set.
To keep that invisible, the per-parameter state dict is replaced by a :class:`SyncedState`: the
first time anything other than LongAct reads or writes it (a checkpoint save or load, megatron's
own state handling, a test, a user), the compact rows are written back into the full tensors and
the compact set is dropped, since the caller may also write the full tensors. The next step
gathers the kept rows again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch


class SyncedState(dict):
    """A per-parameter optimizer state dict that calls ``on_touch`` before any access by others.

    Every reading or writing method flushes first, including iteration and pickling (which then
    produce a plain dict, so checkpoints never contain this class). LongAct itself reads through
    ``dict``'s own methods, which do not flush."""

    __slots__ = ("on_touch",)

    def __init__(self, data: dict, on_touch: Callable[[], None]):
        super().__init__(data)
        self.on_touch = on_touch

    def _touch(self) -> None:
        touch, self.on_touch = self.on_touch, None  # once: later accesses see the full tensors
        if touch is not None:
            touch()


def _flushing(name: str):
    base = getattr(dict, name)

    def method(self, *args, **kwargs):
        self._touch()
        return base(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in ("__getitem__", "__setitem__", "__delitem__", "__iter__", "__contains__", "__eq__",
              "__ne__", "__repr__", "get", "items", "keys", "values", "pop", "popitem", "setdefault",
              "update", "clear", "copy", "__or__", "__ior__"):
    setattr(SyncedState, _name, _flushing(_name))


def _reduce(self, protocol=2):
    self._touch()
    return dict, (dict(dict.items(self)),)


def _deepcopy(self, memo):
    self._touch()
    return copy.deepcopy(dict(dict.items(self)), memo)


SyncedState.__reduce_ex__ = _reduce
SyncedState.__reduce__ = _reduce
SyncedState.__deepcopy__ = _deepcopy
SyncedState.__copy__ = lambda self: SyncedState.copy(self)


def to_device(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    """Host arrays of one dtype as tensors on ``device``, moved in one host-to-device copy (views
    of one buffer). On a GPU each copy is a driver call: a step that moves a few small index arrays
    per layer would otherwise issue hundreds of them. The copy goes through pinned memory, so it is
    truly asynchronous: from pageable memory the driver may first wait for the stream, which would
    make every layer's copy wait for the kernels queued before it. PyTorch's host allocator keeps
    the pinned block until the copy has run."""
    device = torch.device(device)
    if device.type == "cpu":
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    return _in_one_copy(arrays, device)


def _in_one_copy(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    flat = torch.from_numpy(np.concatenate([np.ravel(a) for a in arrays]))
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [t.view(a.shape) for t, a in zip(torch.split(flat, [a.size for a in arrays]), arrays)]


def regathers(device) -> bool:
    """Whether a change of the kept set writes every compact row back and gathers the new set
    afresh (off the CPU) instead of moving only the rows that leave or enter (on the CPU).

    On a GPU each indexing operation costs a launch and some host time (tens of microseconds
    apiece, measured on an H200 node: docs/performance.md), while the bytes are cheap: writing
    back and gathering all of a layer's kept rows is 2 operations per moment and needs no host
    set arithmetic; moving only the changed rows is up to 6 per moment plus that arithmetic. On
    the CPU bytes are what costs, and the kept set changes by a few rows a step."""
    return torch.device(device).type != "cpu"


def capacity(n: int) -> int:
    """Rows a compact tensor is allocated with for ``n`` live rows: 1/8 slack, so that a mask
    change that adds a few rows does not reallocate."""
    return n + n // 8


def compact_rows_bytes(n: int, width: int, itemsize: int = 4) -> int:
    """Bytes of a :class:`CompactRows` that has held at most ``n`` rows of ``width`` elements:
    Adam's two moments at :func:`capacity` plus the value and gradient buffers (fp32 main
    parameters and main gradients)."""
    return (2 * capacity(n) + 2 * n) * width * itemsize


class CompactRows:
    """The compact optimizer state of some whole rows of one main shard.

    ``rows[i]`` is the row (in the shard's whole-row region) whose state is in slot ``i`` of every
    compact tensor; slots need not follow row order. ``moments`` maps each state key shaped like
    the main shard (Adam's ``exp_avg``, ``exp_avg_sq``) to a [capacity, width] storage, of which
    the first ``n`` slots are live. ``scalars`` holds the per-tensor state (Adam's ``step``) of the
    last step. ``newer`` is true when the compact tensors hold values the full tensors do not.
    """

    def __init__(self, mid: tuple[int, int], width: int, main_shape: torch.Size, device):
        self.mid = mid  # (offset, rows) of the whole-row region of the flat shard
        self.width = width
        self.main_shape = main_shape
        self.device = device
        self.regather = regathers(device)  # see :func:`regathers`
        self.set_rows(np.zeros(0, dtype=np.int64))
        self.moments: dict[str, torch.Tensor] = {}
        self.scalars: dict = {}
        self.buffers: dict[str, torch.Tensor] = {}  # param and grad gathers, [capacity, width]
        self.newer = False
        self.synced: SyncedState | None = None  # the state dict this cache shadows
        # full_views(synced), valid while nobody else has touched it (drop() forgets it)
        self.synced_mid: dict[str, torch.Tensor] | None = None

    def mid_view(self, flat: torch.Tensor) -> torch.Tensor:
        off, rows = self.mid
        return flat[off:off + rows * self.width].view(rows, self.width)

    def full_views(self, full: dict) -> dict[str, torch.Tensor]:
        """The whole-row regions of the full state tensors shaped like the main shard."""
        return {k: self.mid_view(v.view(-1)) for k, v in dict.items(full)
                if torch.is_tensor(v) and v.shape == self.main_shape}

    @property
    def n(self) -> int:
        return self.rows.size

    def live(self, storage: torch.Tensor) -> torch.Tensor:
        return storage[:self.n]

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The first ``n`` slots of a reusable [capacity, width] buffer of ``like``'s dtype."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < self.n or buf.dtype != like.dtype:
            buf = self.buffers[name] = torch.empty((self.n, self.width), dtype=like.dtype,
                                                   device=self.device)
        return buf[:self.n]

    def drop(self) -> None:
        """Forget the compact set (the full tensors are the truth for every row) and free its
        memory (megatron's ``offload_to_cpu`` reads the state to free the device)."""
        self.set_rows(np.zeros(0, dtype=np.int64))
        self.moments.clear()
        self.buffers.clear()
        self.scalars = {}
        self.newer = False
        self.synced_mid = None

    def flush(self, full: dict) -> None:
        """Write the compact rows and the scalars into the full state ``full``."""
        if self.newer:
            full_mid = self.full_views(full)
            for k, storage in self.moments.items():
                full_mid[k].index_copy_(0, self.rows_dev, self.live(storage))
            for k, v in self.scalars.items():
                dict.__setitem__(full, k, v.clone() if torch.is_tensor(v) else v)
        self.newer = False

    def retarget(self, want: np.ndarray, full_mid: dict[str, torch.Tensor],
                 want_dev: torch.Tensor | None = None) -> None:
        """Make the compact set hold exactly the rows ``want`` (any order; ``want_dev``: the same
        on the state's device, if the caller has it there already), reading entering rows from
        the full tensors ``full_mid`` and writing leaving rows back to them. With
        :attr:`regather` every row is written back and the set gathered afresh in ``want``'s
        order; otherwise only the rows that leave or enter move (index arithmetic in numpy:
        a few small host arrays per layer)."""
        want = np.asarray(want, dtype=np.int64)
        cur, n, total_rows = self.rows, self.n, self.mid[1]
        if self.moments and set(self.moments) != set(full_mid):
            raise RuntimeError(f"LongAct: optimizer state keys changed from {sorted(self.moments)} "
                               f"to {sorted(full_mid)} between steps")
        if self.regather:
            self._regather(want, full_mid, want_dev)
            return
        in_want = np.zeros(total_rows, dtype=bool)
        in_want[want] = True
        stay = in_want[cur]
        in_cur = np.zeros(total_rows, dtype=bool)
        in_cur[cur[stay]] = True
        enter = want[~in_cur[want]]
        leave_slots = np.flatnonzero(~stay)
        if leave_slots.size == 0 and enter.size == 0 and set(self.moments) == set(full_mid):
            return
        n_new = int(stay.sum()) + enter.size
        # Free slots below n_new take the entering rows, then the live rows from slots >= n_new.
        free = np.concatenate([leave_slots, np.arange(n, max(n, n_new))])
        free = free[free < n_new]
        movers = np.flatnonzero(stay & (np.arange(n) >= n_new))
        to_enter, to_move = free[:enter.size], free[enter.size:]
        rows = np.concatenate([cur, np.zeros(max(0, n_new - n), dtype=np.int64)])
        rows[to_move] = cur[movers]
        rows[to_enter] = enter
        rows = rows[:n_new]
        # every index of this retarget in one host-to-device copy
        leave_dev, leave_rows_dev, to_move_dev, movers_dev, to_enter_dev, enter_dev, rows_dev = to_device(
            [leave_slots, cur[leave_slots], to_move, movers, to_enter, enter, rows], self.device)
        if leave_slots.size and self.newer:
            for k, storage in self.moments.items():
                full_mid[k].index_copy_(0, leave_rows_dev, storage.index_select(0, leave_dev))
        for k in full_mid:
            storage = self.moments.get(k)
            if storage is None or storage.shape[0] < n_new:
                grown = torch.empty((capacity(n_new), self.width), dtype=full_mid[k].dtype,
                                    device=self.device)
                if storage is not None:
                    grown[:n].copy_(storage[:n])
                storage = self.moments[k] = grown
            if movers.size:
                storage.index_copy_(0, to_move_dev, storage.index_select(0, movers_dev))
            if enter.size:
                storage.index_copy_(0, to_enter_dev, full_mid[k].index_select(0, enter_dev))
        self.set_rows(rows, rows_dev)

    def _regather(self, want: np.ndarray, full_mid: dict[str, torch.Tensor],
                  want_dev: torch.Tensor | None) -> None:
        """:meth:`retarget` by writing every live row back and gathering ``want``: 2 indexing
        operations per moment, whatever changed."""
        if self.moments and np.array_equal(want, self.rows):
            return
        if want_dev is None:
            want_dev = to_device([want], self.device)[0]
        if self.newer:  # the scalars stay in self.scalars until a flush writes them
            for k, storage in self.moments.items():
                full_mid[k].index_copy_(0, self.rows_dev, self.live(storage))
        for k in full_mid:
            storage = self.moments.get(k)
            if storage is None or storage.shape[0] < want.size:
                storage = self.moments[k] = torch.empty((capacity(want.size), self.width),
                                                        dtype=full_mid[k].dtype, device=self.device)
            torch.index_select(full_mid[k], 0, want_dev, out=storage[:want.size])
        self.set_rows(want, want_dev)

    def set_rows(self, rows: np.ndarray, rows_dev: torch.Tensor | None = None) -> None:
        """The rows of the compact slots (host), and the same as an index on the state's device."""
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.rows_dev = to_device([self.rows], self.device)[0] if rows_dev is None else rows_dev
