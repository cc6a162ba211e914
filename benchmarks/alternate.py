"""RL steps of several trainers in one process, alternating which goes first (used by
``step_overhead.py`` and ``vs_trl.py``): every trainer runs under the same machine conditions, so
a ratio of their step times measures what differs between their configurations."""

from __future__ import annotations

import time


def alternate_rl_steps(trainers: dict, steps: int) -> dict[str, list[tuple[float, float]]]:
    """Run ``steps`` RL steps of each trainer (built with no SFT phase), the order reversed every
    step. Returns, per trainer and step, (rollout seconds, the rest of the step in seconds)."""
    for trainer in trainers.values():
        trainer._start_rl()
    out = {name: [] for name in trainers}
    for step in range(steps):
        order = list(trainers.items())
        if step % 2:
            order.reverse()
        for name, trainer in order:
            t0 = time.perf_counter()
            metrics = trainer.rl_step()
            total = time.perf_counter() - t0
            trainer.step += 1
            if trainer.rollout is not None:  # as Trainer.run: push the new weights to the engine
                trainer.rollout.after_update(trainer.step - trainer.sft_steps)
            rollout = metrics["perf/rollout_seconds"]
            out[name].append((rollout, total - rollout))
    return out
