"""What a run reports: Python ``logging`` lines, TensorBoard, optionally Weights & Biases.

Step counting (one definition for the whole project): a run of mode ``rl`` has ``sft.steps``
supervised warm-start steps followed by ``train.steps`` RL steps, so it runs
``sft.steps + train.steps`` optimizer steps in all; mode ``sft`` runs ``train.steps`` SFT steps.
The global step counts both phases (TensorBoard's x axis, checkpoint numbers, ``history.json``);
every log line shows it as ``step N/TOTAL`` together with the phase's own count
(``sft 12/400`` or ``rl 3/150``); the progress bar, when there is a terminal, is labelled with the
phase it is in.

Every log line (every ``train.log_interval`` steps, and the last) carries the step, the seconds per
step, tokens per second and an ETA, so a SLURM log file without a terminal says how far the run
is. The logger is ``megatron_longact`` with a rank filter: rank 0 only by default,
``output.log_all_ranks`` (or ``LONGACT_LOG_ALL_RANKS=1``) for every rank, each line then prefixed
with its rank.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "megatron_longact"

# Shown on the console when present (TensorBoard gets every metric), short name first.
CONSOLE_KEYS = (("loss", "sft/loss"), ("reward", "rl/reward"), ("acc", "rl/accuracy"),
                ("pg_loss", "rl/pg_loss"), ("entropy", "rl/entropy"), ("kl", "rl/kl"),
                ("resp_len", "rl/response_length"), ("kept_q", "longact/kept_fraction_q"),
                ("grad_norm", "train/grad_norm"), ("lr", "train/lr"))


class RankFilter(logging.Filter):
    """Passes records of rank 0, or of every rank with ``all_ranks`` (adding ``[rank N]``)."""

    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = f"[rank {self.rank}] " if self.all_ranks else ""
        return self.all_ranks or self.rank == 0


def setup_logging(rank: int, all_ranks: bool = False) -> logging.Logger:
    """The project's logger, writing plain lines to stdout through the rank filter. Idempotent."""
    all_ranks = all_ranks or os.environ.get("LONGACT_LOG_ALL_RANKS", "") == "1"
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if getattr(h, "_longact", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler._longact = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
    handler.addFilter(RankFilter(rank, all_ranks))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER)


def format_seconds(s: float) -> str:
    s = int(round(max(s, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class StepClock:
    """Seconds per step (mean of the last ``window`` steps) and the ETA of the remaining ones."""

    def __init__(self, window: int = 20):
        self.window = window
        self.times: list[float] = []

    def add(self, seconds: float) -> None:
        self.times = (self.times + [seconds])[-self.window:]

    @property
    def per_step(self) -> float:
        return sum(self.times) / len(self.times) if self.times else 0.0

    def eta(self, remaining: int) -> float:
        return self.per_step * remaining


def phase_of(step: int, sft_steps: int, total: int) -> tuple[str, int, int]:
    """(phase, 1-based index within it, its length) of global step ``step`` (0-based)."""
    if step < sft_steps:
        return "sft", step + 1, sft_steps
    return "rl", step - sft_steps + 1, total - sft_steps


def format_line(step: int, total: int, sft_steps: int, metrics: dict, seconds: float,
                clock: StepClock) -> str:
    """``step N/TOTAL (phase i/n)  metrics...  | s/step  tok/s  eta`` for global step ``step``."""
    phase, i, n = phase_of(step, sft_steps, total)
    shown = "  ".join(f"{short} {metrics[key]:.4g}" for short, key in CONSOLE_KEYS if key in metrics)
    tps = metrics.get("perf/tokens", 0.0) / max(seconds, 1e-9)
    return (f"step {step + 1}/{total} ({phase} {i}/{n})  {shown}  | {clock.per_step:.2f} s/step  "
            f"{tps:,.0f} tok/s  eta {format_seconds(clock.eta(total - step - 1))}")


def console_postfix(metrics: dict) -> str:
    return "  ".join(f"{short} {metrics[key]:.4f}" for short, key in CONSOLE_KEYS if key in metrics)


class WandbLogger:
    """Weights & Biases beside TensorBoard (``output.wandb``); rank 0 only. The import is checked
    at start-up (:func:`check_wandb`) so a missing package is a config error, not a traceback."""

    def __init__(self, cfg, run_dir: str):
        import wandb

        from megatron_longact.config import to_dict

        out = cfg.output
        self.run = wandb.init(project=out.wandb_project, name=out.wandb_name, dir=run_dir,
                              config=to_dict(cfg), mode=out.wandb_mode, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_wandb(cfg) -> None:
    """ConfigError when ``output.wandb`` is set but the package is not installed."""
    from megatron_longact.config import ConfigError

    if not cfg.output.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("output.wandb: true, but the wandb package is not installed "
                          "(pip install 'megatron-longact[wandb]')") from None

