"""``longact-ablate``: compare LongAct strategies over several seeds at one scale.

    longact-ablate --config configs/demo_cpu.yaml --strategies none,topk,random,bottomk \
        --seeds 1,2,3 --out runs/ablation [key=value ...]

For each seed, the SFT warm start runs once (LongAct is only installed for RL, so it is the same for
every strategy); each strategy then resumes from that checkpoint and runs the RL phase and the
evaluation. Each run is a separate ``longact-train`` process (use ``--launcher`` to wrap it, e.g.
``"torchrun --nproc-per-node 8"``). A run whose ``history.json`` already exists is read, not rerun,
so an interrupted ablation continues where it stopped; ``--report-only`` starts no run and reports
the runs that finished. Writes ``results.md`` and ``results.json``
under ``--out`` after every run: final reward (mean of the last ``--tail`` RL steps) and evaluation
accuracy per length, as mean and standard deviation over seeds (evaluation scores in percent), every
run's own values, and a paired comparison of ``--reference`` (default ``topk``) against each other
strategy: per seed (same seed, same SFT warm start, same prompts) the difference reference minus
other, its mean and standard deviation over seeds, and how many seeds the reference was ahead.
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
    p.add_argument("--reference", default="topk",
                   help="strategy compared seed by seed against each other strategy (default topk)")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: write results.md / results.json from the runs that finished")
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


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def run_values(history: dict, tail: int) -> dict[str, float]:
    """One run's measures from its ``history.json``: ``final_reward`` and ``<task>@<length>``."""
    rl_rewards = [h["rl/reward"] for h in history["history"] if "rl/reward" in h]
    values = {"final_reward": statistics.fmean(rl_rewards[-tail:])} if rl_rewards else {}
    ruler = (history.get("evaluation") or {}).get("ruler", {})
    for task, by_length in ruler.get("tasks", {}).items():
        for length, score in by_length.items():  # percent
            values[f"{task}@{length}"] = float(score)
    return values


def paired(runs: list[dict], reference: str, other: str, measure: str) -> dict | None:
    """Seed-by-seed difference ``reference - other`` of one measure, over the seeds both finished."""
    by_seed = {}
    for r in runs:
        if measure in r["values"]:
            by_seed.setdefault(r["seed"], {})[r["strategy"]] = r["values"][measure]
    seeds = sorted(s for s, v in by_seed.items() if reference in v and other in v)
    if not seeds:
        return None
    diffs = [by_seed[s][reference] - by_seed[s][other] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, "mean": statistics.fmean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "ahead": sum(d > 0 for d in diffs), "tied": sum(d == 0 for d in diffs)}


def summarize(runs: list[dict], strategies: list[str], seeds: list[int], reference: str,
              header: str) -> tuple[list[str], dict]:
    """The markdown lines and the JSON object of the results so far."""
    columns = sorted({k for r in runs for k in r["values"] if k != "final_reward"},
                     key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0))
    measures = ["final_reward"] + columns
    table: dict[str, dict] = {}
    for strategy in strategies:
        mine = [r for r in runs if r["strategy"] == strategy]
        if mine:
            table[strategy] = {m: [r["values"][m] for r in mine if m in r["values"]] for m in measures}
            table[strategy]["seeds"] = [r["seed"] for r in mine]
    done = len(runs)
    planned = len(strategies) * len(seeds)
    lines = [header, "",
             f"Runs finished: {done} of {planned}." + ("" if done == planned else " (partial results)"),
             "", "| strategy | seeds | final reward | " + " | ".join(columns) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for strategy, t in table.items():
        lines.append(f"| {strategy} | {','.join(map(str, t['seeds']))} | {_fmt(t['final_reward'])} | "
                     + " | ".join(_fmt(t[c], 1) for c in columns) + " |")
    comparisons = {}
    others = [s for s in strategies if s != reference and s in table]
    if reference in table and others:
        lines += ["", f"Paired by seed (same seed, same SFT warm start): {reference} minus the other "
                  f"strategy, mean +- std of the per-seed differences, and seeds where {reference} "
                  "was ahead / all seeds compared.", "",
                  "| comparison | final reward | " + " | ".join(columns) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
        for other in others:
            cells = []
            for m in measures:
                p = paired(runs, reference, other, m)
                comparisons.setdefault(f"{reference}-{other}", {})[m] = p
                if p is None:
                    cells.append("-")
                else:
                    digits = 3 if m == "final_reward" else 1
                    cells.append(f"{p['mean']:+.{digits}f} +- {p['std']:.{digits}f} "
                                 f"({p['ahead']}/{len(p['seeds'])})")
            lines.append(f"| {reference} - {other} | " + " | ".join(cells) + " |")
    notes = commentary(comparisons, reference)
    if notes:
        lines += ["", "Reading (generated from the paired differences above):", ""] + notes
    result = {"strategies": strategies, "seeds": seeds, "reference": reference,
              "runs": runs, "table": table, "paired": comparisons}
    return lines, result


def commentary(comparisons: dict, reference: str) -> list[str]:
    """One factual line per comparison: for each measure, whether the mean paired difference is
    larger than its seed-to-seed standard deviation (and in which direction), else "within the
    spread". No significance test: with a handful of seeds none would have power."""
    out = []
    for name, by_measure in comparisons.items():
        other = name.split("-", 1)[1]
        parts = []
        for measure, p in by_measure.items():
            if p is None:
                continue
            n = len(p["seeds"])
            label = "final reward" if measure == "final_reward" else measure
            if n < 2:
                verdict = f"{p['mean']:+.3g} on one seed (no spread to compare with)"
            elif abs(p["mean"]) > p["std"]:
                word = "above" if p["mean"] > 0 else "below"
                verdict = (f"{reference} {word} by {abs(p['mean']):.3g} (std {p['std']:.3g} over "
                           f"{n} seeds, ahead in {p['ahead']})")
            else:
                verdict = (f"within the spread ({p['mean']:+.3g}, std {p['std']:.3g} over {n} "
                           f"seeds, ahead in {p['ahead']})")
            parts.append(f"{label}: {verdict}")
        if parts:
            out.append(f"- {reference} vs {other}: " + "; ".join(parts) + ".")
    return out


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
    if args.tail < 1:
        raise UsageError(f"--tail: got {args.tail}, expected a positive number of RL steps")
    if args.reference not in strategies:
        raise UsageError(f"--reference: got {args.reference!r}, expected one of --strategies "
                         f"({', '.join(strategies)})")
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
    out.mkdir(parents=True, exist_ok=True)
    sft_steps = cfg.sft.steps
    header = (f"Strategies over seeds {seeds} ({args.config}"
              + (f" {' '.join(args.overrides)}" if args.overrides else "")
              + f"; final reward = mean of the last {args.tail} RL steps; mean +- std over seeds; "
              "evaluation in percent)")
    runs: list[dict] = []
    lines: list[str] = []
    for seed in seeds:
        common = args.overrides + [f"train.seed={seed}", f"data.shuffle_seed={seed}"]
        warm = out / f"sft_seed{seed}"
        warm_ckpt = iter_dir(warm / "checkpoints", sft_steps)
        for strategy in strategies:
            run_dir = out / f"{strategy}_seed{seed}"
            if args.report_only and not (run_dir / "history.json").is_file():
                continue
            if not (run_dir / "history.json").is_file():
                if sft_steps and not warm_ckpt.is_dir():
                    _run(args.launcher, args.config, common + [
                        "train.steps=0", "evaluation.lengths=[]", f"output.dir={warm}",
                        "checkpoint.resume=none", "checkpoint.interval=0"])
                if sft_steps:
                    target = run_dir / "checkpoints" / warm_ckpt.name
                    if not target.exists():
                        shutil.copytree(warm_ckpt, target)
                        (run_dir / "checkpoints" / TRACKER).write_text(f"{sft_steps}\n")
                _run(args.launcher, args.config, common + [
                    f"longact.strategy={strategy}", f"output.dir={run_dir}", "checkpoint.resume=auto"])
            history = json.loads((run_dir / "history.json").read_text())
            runs.append({"strategy": strategy, "seed": seed, "dir": run_dir.name,
                         "values": run_values(history, args.tail)})
            lines, result = summarize(runs, strategies, seeds, args.reference, header)
            (out / "results.md").write_text("\n".join(lines) + "\n")
            (out / "results.json").write_text(json.dumps(result, indent=1))
    if not runs:
        raise UsageError(f"--out {out}: no finished run (history.json) to report")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
