"""``longact-ablate``: compare LongAct strategies over several seeds at one scale.

    longact-ablate --config configs/demo_cpu.yaml --strategies none,topk,random,bottomk \
        --seeds 1,2,3 --out runs/ablation [key=value ...]

For each seed, the SFT warm start runs once (LongAct is only installed for RL, so it is the same for
every strategy); each strategy then resumes from that checkpoint and runs the RL phase and the
evaluation. Each run is a separate ``longact-train`` process (use ``--launcher`` to wrap it, e.g.
``"torchrun --nproc-per-node 8"``). Writes ``results.md`` and ``results.json`` under ``--out``:
final reward (mean of the last ``--tail`` RL steps) and evaluation accuracy per length, as mean and
standard deviation over seeds (evaluation scores in percent).
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from megatron_longact.checkpoint import TRACKER, iter_dir
from megatron_longact.config import ConfigError
from megatron_longact.errors import ArgumentParser, UsageError, cli_entry
from megatron_longact.run_config import load_run_config


def parse_args(argv=None):
    p = ArgumentParser(prog="longact-ablate", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True,
                   help="run config: a YAML path or a bundled example name such as demo_cpu")
    p.add_argument("--strategies", default="none,topk,random,bottomk")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--tail", type=int, default=20, help="RL steps averaged for the final reward")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m",
                   help="command prefix that runs a python module (default: this python -m)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def _run(launcher: str, config: str, overrides: list[str]) -> None:
    cmd = shlex.split(launcher) + ["megatron_longact.cli.train", "--config", config] + overrides
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        # The run printed its own error above; say which run it was and stop.
        raise UsageError(f"the run `{' '.join(shlex.quote(c) for c in cmd)}` failed with exit code {rc}")


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +- {std:.3f}"


@cli_entry("longact-ablate")
def main(argv=None) -> int:
    args = parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: got {args.seeds!r}, expected integers separated by commas, "
                         f"e.g. 1,2,3") from None
    if not seeds:
        raise UsageError(f"--seeds: got {args.seeds!r}, expected at least one integer")
    try:
        cfg = load_run_config(args.config, args.overrides)
        for s in strategies:
            load_run_config(args.config, args.overrides + [f"longact.strategy={s}"])
    except ConfigError as exc:
        print(f"longact-ablate: config error: {exc}", file=sys.stderr)
        return 2
    if cfg.train.mode != "rl":
        print("longact-ablate: train.mode must be rl", file=sys.stderr)
        return 2
    out = Path(args.out)
    sft_steps = cfg.sft.steps
    results: dict[str, dict] = {}
    for seed in seeds:
        common = args.overrides + [f"train.seed={seed}", f"data.shuffle_seed={seed}"]
        warm = out / f"sft_seed{seed}"
        warm_ckpt = iter_dir(warm / "checkpoints", sft_steps)
        if sft_steps and not warm_ckpt.is_dir():
            _run(args.launcher, args.config, common + [
                "train.steps=0", "evaluation.lengths=[]", f"output.dir={warm}", "checkpoint.resume=none",
                "checkpoint.interval=0"])
        for strategy in strategies:
            run_dir = out / f"{strategy}_seed{seed}"
            if sft_steps:
                target = run_dir / "checkpoints" / warm_ckpt.name
                if not target.exists():
                    shutil.copytree(warm_ckpt, target)
                    (run_dir / "checkpoints" / TRACKER).write_text(f"{sft_steps}\n")
            _run(args.launcher, args.config, common + [
                f"longact.strategy={strategy}", f"output.dir={run_dir}", "checkpoint.resume=auto"])
            data = json.loads((run_dir / "history.json").read_text())
            rl_rewards = [h["rl/reward"] for h in data["history"] if "rl/reward" in h]
            entry = results.setdefault(strategy, {"final_reward": [], "eval": {}})
            entry["final_reward"].append(statistics.fmean(rl_rewards[-args.tail:]))
            ruler = (data.get("evaluation") or {}).get("ruler", {})
            for task, by_length in ruler.get("tasks", {}).items():
                for length, score in by_length.items():  # percent
                    entry["eval"].setdefault(f"{task}@{length}", []).append(float(score))
    columns = sorted({k for e in results.values() for k in e["eval"]})
    lines = [f"Strategies over seeds {seeds} ({args.config}; final reward = mean of the last "
             f"{args.tail} RL steps; mean +- std over seeds)", "",
             "| strategy | final reward | " + " | ".join(columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for strategy, e in results.items():
        lines.append(f"| {strategy} | {_fmt(e['final_reward'])} | "
                     + " | ".join(_fmt(e["eval"].get(c, [])) for c in columns) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
