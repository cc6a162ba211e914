"""Helpers of the side-by-side benchmarks.

:func:`alternate_rl_steps` runs RL steps of several trainers in one process, alternating which
goes first (``step_overhead.py``, ``vs_trl.py``): every trainer runs under the same machine
conditions, so a ratio of their step times measures what differs between their configurations.
:class:`StolenTime` measures how much CPU time a shared virtual machine lost while a benchmark ran.
"""

from __future__ import annotations

import time


def alternate_rl_steps(trainers: dict, steps: int) -> dict[str, list[tuple[float, float, float]]]:
    """Run ``steps`` RL steps of each trainer (built with no SFT phase) with ``Trainer.train_step``,
    the order reversed every step. Returns, per trainer and step, (rollout seconds, the rest of the
    step in seconds, of which the weight push to the rollout engine after the update)."""
    for name, trainer in trainers.items():
        if trainer.step < trainer.sft_steps:
            raise ValueError(f"alternate_rl_steps: trainer {name!r} has SFT steps to run first "
                             f"(sft.steps={trainer.sft_steps}); build it with sft.steps=0")
    out = {name: [] for name in trainers}
    for step in range(steps):
        order = list(trainers.items())
        if step % 2:
            order.reverse()
        for name, trainer in order:
            syncs = trainer.rollout.syncs if trainer.rollout is not None else 0
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            total = time.perf_counter() - t0
            rollout = metrics["perf/rollout_seconds"]
            engine = trainer.rollout
            # The step's last push is the one after its update (the native engine has none to make).
            pushed = engine is not None and engine.syncs > syncs
            push = getattr(engine, "last_sync_seconds", 0.0) if pushed else 0.0
            out[name].append((rollout, total - rollout, push))
    return out


class StolenTime:
    """The share of this machine's CPU time that its hypervisor gave to other guests while the
    block ran (``steal`` in ``/proc/stat``; Linux only, None elsewhere). Benchmarks print it with
    their ratios: on a shared virtual machine a few percent of steal can move step times by more
    than the differences being measured, and more so between separate processes."""

    def __enter__(self):
        self.start = self._read()
        self.fraction = None
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self.start is not None and end is not None and end[1] > self.start[1]:
            self.fraction = (end[0] - self.start[0]) / (end[1] - self.start[1])
        return False

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 8:
            return None
        return fields[7], sum(fields[:8])  # steal, all time (user .. steal)

    def describe(self) -> str:
        if self.fraction is None:
            return "CPU time lost to other guests: unknown (no /proc/stat)"
        return f"CPU time lost to other guests during the run (steal): {self.fraction:.1%}"
