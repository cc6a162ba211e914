"""``longact-train --config <yaml> [key=value ...]``: the project's main job.

Launch with ``python -m`` / the console script for one process, or under torchrun or srun for
many; the parallel layout comes from the config. Every check that can fail on user input runs
before any process group is created or any model is built.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from megatron_longact.config import to_dict
from megatron_longact.errors import ArgumentParser, cli_entry, report
from megatron_longact.run_config import RunConfig, load_run_config
from megatron_longact.runtime import initialize, read_dist_env


def parse_args(argv=None):
    p = ArgumentParser(prog="longact-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True,
                   help="run config: a YAML path or a bundled example name such as demo_cpu")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=5 train.lr=1e-4")
    return p.parse_args(argv)


def prepare(argv=None) -> tuple[RunConfig, object]:
    """Load and validate the config against the launcher's world size (no heavy work)."""
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    from megatron_longact.training.logs import check_wandb

    check_wandb(cfg)
    env = read_dist_env()
    parallel = cfg.check_layout(env.world_size)
    return cfg, parallel


@cli_entry("longact-train")
def main(argv=None) -> int:
    from megatron_longact.runtime.watchdog import exit_with_launcher

    exit_with_launcher()  # first: a rank must not outlive its launcher even during start-up
    from megatron_longact.preflight import check_run

    cfg, parallel = prepare(argv)
    checked = check_run(cfg, parallel)
    runtime = initialize(parallel, seed=cfg.train.seed)
    try:
        return _run(cfg, parallel, runtime, checked)
    finally:
        from megatron_longact.runtime import destroy

        destroy()


def _run(cfg, parallel, runtime, checked) -> int:
    from megatron_longact.training.resilience import TrainingStopped

    rank0 = runtime.rank == 0
    out_dir = Path(cfg.output.dir)
    writer = None
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if cfg.train.mode == "rl":
            # One definition of a step (training.logs): SFT warm-start steps, then RL steps.
            steps = f"steps={cfg.sft.steps + cfg.train.steps} (sft {cfg.sft.steps} + rl {cfg.train.steps})"
        else:
            steps = f"steps={cfg.train.steps} ({cfg.train.mode})"
        print(f"longact-train: mode={cfg.train.mode} layout tp={parallel.tensor_model_parallel_size} "
              f"pp={parallel.pipeline_model_parallel_size} cp={parallel.context_parallel_size} "
              f"dp={parallel.data_parallel_size} device={runtime.device} {steps}",
              flush=True)
        if cfg.train.mode == "lm":
            # The SFT/RL trainer opens its own writer; one writer per run folder, so TensorBoard
            # does not find an empty second event file.
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out_dir / "tb"))

    if cfg.train.mode in ("sft", "rl"):
        from megatron_longact.training.trainer import Trainer

        start = time.monotonic()
        try:
            history = Trainer(cfg, runtime, tokenizer=checked.tokenizer, records=checked.records).run()
        except TrainingStopped as exc:
            report("longact-train", exc)
            return 3
        if rank0:
            print(f"done: {len(history)} steps in {time.monotonic() - start:.1f}s; logs in {out_dir}",
                  flush=True)
        return 0

    from megatron_longact.training.lm import train_lm

    start = time.monotonic()
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length

    def on_step(step, loss, out):
        if not rank0:
            return
        elapsed = time.monotonic() - start
        tps = tokens_per_step * (step + 1) / max(elapsed, 1e-9)
        writer.add_scalar("train/lm_loss", loss, step)
        writer.add_scalar("train/grad_norm", out["grad_norm"], step)
        writer.add_scalar("train/lr", out["lr"], step)
        writer.add_scalar("perf/tokens_per_second", tps, step)
        if step % cfg.train.log_interval == 0 or step == cfg.train.steps - 1:
            eta = elapsed / (step + 1) * (cfg.train.steps - step - 1)
            print(f"step {step + 1:>4}/{cfg.train.steps}  lm_loss {loss:.4f}  "
                  f"grad_norm {out['grad_norm']:.3f}  lr {out['lr']:.2e}  "
                  f"{tps:,.0f} tok/s  eta {eta:.0f}s", flush=True)

    losses = train_lm(cfg.model, cfg.train, runtime.parallel, runtime.device, on_step=on_step)
    if rank0:
        writer.close()
        print(f"done: lm_loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.monotonic() - start:.1f}s; "
              f"logs in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
