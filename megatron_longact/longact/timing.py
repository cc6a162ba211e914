"""Where a LongAct optimizer step's time goes (docs/performance.md, "The optimizer step").

:class:`PhaseTimes` records wall time per phase and step; ``LongActHandle.enable_timing()`` makes
the handle time its own phases with it (statistics and top-k, keep plans, zeroing with the logged
norm, the gathers before the torch optimizer steps, the torch optimizer's own work, the scatter
after it). :class:`TorchStepTimer` times the torch optimizers' own work of a megatron optimizer
without LongAct, for the plain side of a comparison.

On a GPU each phase boundary synchronises the device, so that a phase's time is its own work and
not that of kernels queued before it. That serialises host and device, so timed steps are slower
than untimed ones: time the totals of a comparison with timing off, and the phases in separate
steps (``benchmarks/optimizer_overhead.py --phases``, ``gpu_check``'s ``optimizer_overhead``).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch


def synchronize() -> None:
    """Wait for the current CUDA device's queued work (nothing to wait for on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimes:
    """Seconds per phase, summed within a step (a phase may run once per torch optimizer) and
    recorded per step by :meth:`close_step`."""

    def __init__(self):
        self.steps: dict[str, list[float]] = {}
        self._open: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, label: str) -> None:
        synchronize()
        self._started[label] = time.perf_counter()

    def stop(self, label: str) -> None:
        t0 = self._started.pop(label, None)
        if t0 is None:  # started before timing was enabled
            return
        synchronize()
        self._open[label] = self._open.get(label, 0.0) + time.perf_counter() - t0

    @contextmanager
    def time(self, label: str):
        self.start(label)
        try:
            yield
        finally:
            self.stop(label)

    def close_step(self) -> None:
        for label, seconds in self._open.items():
            self.steps.setdefault(label, []).append(seconds)
        self._open.clear()

    def medians_ms(self) -> dict[str, float]:
        """The median over steps of each phase, in milliseconds, in the order phases first ran."""
        return {label: statistics.median(v) * 1e3 for label, v in self.steps.items()}


class TorchStepTimer:
    """Times the torch optimizers' own step inside a megatron optimizer's ``step()`` (between
    their pre- and post-hooks), summed over the torch optimizers of a chained optimizer, into
    ``times`` under ``label``. Register it on an optimizer that has no other step hooks."""

    def __init__(self, optimizer, times: PhaseTimes, label: str = "torch step"):
        from megatron_longact.compat import inner_optimizers

        self._handles = []
        for opt in inner_optimizers(optimizer):
            torch_opt = opt.optimizer
            self._handles.append(torch_opt.register_step_pre_hook(lambda *a: times.start(label)))
            self._handles.append(torch_opt.register_step_post_hook(lambda *a: times.stop(label)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
