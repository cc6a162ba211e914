"""A full RL step (rollouts, rewards, old log-probs, policy update) with LongAct versus without,
side by side in one process on the demo configuration.

Two trainers are built from ``configs/demo_cpu.yaml`` (no SFT warm start, no checkpoints): one
with ``longact.enabled=true`` and one with ``longact.enabled=false``. They alternate RL steps
(which one goes first alternates too); the script prints the median step times, the split into
rollout and update, and the ratio (target <= 1.02). Every response runs to ``rl.max_new_tokens``
(``rl.ignore_eos``): once the two policies have drifted apart they sample different responses,
and with EOS their lengths, and so the work of both phases, would differ (``--stop-at-eos``
restores stopping at EOS). The default of 30 timed steps per side: with 12, two runs on a quiet
machine read 1.057 and 1.059 where two with 30 read 1.006 and 0.997 (the difference being
measured is a few percent, about what the medians of 12 steps move from one run to the next).

With ``--phases`` the LongAct trainer then runs ``--phase-steps`` more steps with its own work
timed (the statistics hooks, and the optimizer phases of ``handle.enable_timing``) and the script
prints their medians per step: what the ratio above should be made of. They run after the timed
steps, so the timers' own cost stays out of the ratio.

Run: python benchmarks/step_overhead.py [--steps 30] [--stop-at-eos] [--phases] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from megatron_longact.run_config import load_run_config
    from megatron_longact.runtime import destroy, initialize
    from megatron_longact.training.trainer import Trainer

    from benchmarks.alternate import StolenTime, alternate_rl_steps
    from megatron_longact.errors import at_least, foreseeable_errors, one_line

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=at_least(1), default=30)
    p.add_argument("--config", default=str(ROOT / "configs/demo_cpu.yaml"))
    p.add_argument("--stop-at-eos", action="store_true", help="responses end at EOS")
    p.add_argument("--phases", action="store_true",
                   help="then time LongAct's own work (hooks, optimizer phases) in more steps")
    p.add_argument("--phase-steps", type=at_least(1), default=10)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    tmp = tempfile.mkdtemp()
    steps = args.steps + 2 + (args.phase_steps if args.phases else 0)  # 2 warm-up steps
    base = ["sft.steps=0", f"train.steps={steps}", "checkpoint.resume=none",
            "evaluation.lengths=[]", f"output.dir={tmp}",
            f"rl.ignore_eos={str(not args.stop_at_eos).lower()}"] + args.overrides
    try:
        cfgs = {name: load_run_config(args.config, base + [f"longact.enabled={flag}"])
                for name, flag in (("plain", "false"), ("longact", "true"))}
    except foreseeable_errors() as e:
        p.error(one_line(e))
    runtime = initialize(cfgs["plain"].parallel, seed=cfgs["plain"].train.seed)
    trainers = {name: Trainer(cfg, runtime) for name, cfg in cfgs.items()}
    with StolenTime() as stolen:
        split = {name: s[2:] for name, s in alternate_rl_steps(trainers, args.steps + 2).items()}  # warm-up
    print(f"RL step on {args.config} (tiny model, 1 process), median of {args.steps} steps:")
    total = {name: statistics.median(s[0] + s[1] for s in split[name]) for name in trainers}
    for name in trainers:
        r = statistics.median(s[0] for s in split[name])
        u = statistics.median(s[1] for s in split[name])
        print(f"  {name:8s} {total[name]:7.3f} s   (rollout {r:.3f} s, update {u:.3f} s)")
    ratio = total["longact"] / total["plain"]
    print(f"  ratio    {ratio:7.3f}     (target <= 1.02)")
    print(f"  {stolen.describe()}")
    if args.phases:
        times = _time_longact(trainers["longact"])
        alternate_rl_steps({"longact": trainers["longact"]}, args.phase_steps)
        own = {k: v for k, v in times.medians_ms().items() if k != "torch step"}
        print(f"LongAct's own work per step, medians of {args.phase_steps} further steps, ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in own.items())
              + f"; in all {sum(own.values()):.1f} ms = {sum(own.values()) / 1e3 / total['longact']:.1%} "
                f"of the LongAct step above")
    destroy()
    return 0


def _time_longact(trainer):
    """Turn on the timing of a LongAct trainer's own work: the optimizer phases
    (``handle.enable_timing``) and, in the same per-step record, every call of the statistics
    hooks (rollout and old-log-prob forwards included, where they return at once)."""
    times = trainer.handle.enable_timing()
    collector = trainer.handle.longact.collector
    observe = collector._observe

    def timed(*args):
        times.start("hooks")
        try:
            observe(*args)
        finally:
            times.stop("hooks")

    collector._observe = timed  # the hooks call self._observe: the instance attribute wins
    return times


if __name__ == "__main__":
    sys.exit(main())
