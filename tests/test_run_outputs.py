"""What a run shows and leaves behind: config conventions (bundled names, aliases, "did you mean"),
log lines, figures, the prompt-length limit, the stop file of the SLURM scripts, one TensorBoard
event file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron_longact.config import ConfigError
from megatron_longact.run_config import load_run_config
from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent


# -- configuration -------------------------------------------------------------------------------

def test_bundled_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_run_config("demo_cpu")
    by_path = load_run_config(ROOT / "configs" / "demo_cpu.yaml")
    assert by_name == by_path
    with pytest.raises(ConfigError, match="did you mean demo_cpu"):
        load_run_config("demo_cpuu")


def test_relative_input_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    cfg_file = tmp_path / "proj" / "run.yaml"
    cfg_file.write_text(f"include: {ROOT / 'configs/model/tiny.yaml'}\n"
                        "data: {source: jsonl, path: data/train.jsonl}\n"
                        "checkpoint: {load_weights: ../weights}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(cfg_file)
    assert cfg.data.path == str(tmp_path / "proj" / "data" / "train.jsonl")
    assert cfg.checkpoint.load_weights == str(tmp_path / "weights")
    assert cfg.output.dir == "runs/default"  # outputs stay relative to the working directory
    # A command-line override is relative to the working directory, as typed.
    assert load_run_config(cfg_file, ["data.path=other.jsonl"]).data.path == "other.jsonl"


def test_verl_and_trl_names_are_recorded_under_ours():
    from megatron_longact.config import to_dict

    path = ROOT / "configs" / "demo_cpu.yaml"
    cfg = load_run_config(path, ["rl.clip_ratio_low=0.2", "rl.clip_ratio_high=0.28", "rl.beta=0.01",
                                 "rl.num_generations=4", "rl.max_response_length=8"])
    assert (cfg.rl.clip_low, cfg.rl.clip_high, cfg.rl.kl_coef, cfg.rl.group_size,
            cfg.rl.max_new_tokens) == (0.2, 0.28, 0.01, 4, 8)
    saved = to_dict(cfg)["rl"]
    assert "beta" not in saved and "num_generations" not in saved and saved["kl_coef"] == 0.01
    assert load_run_config(path, ["rl.kl_loss_coef=0.02", "rl.n=2"]).rl.kl_coef == 0.02
    with pytest.raises(ConfigError, match="rl.beta is another name for rl.kl_coef"):
        load_run_config(path, ["rl.beta=0.1", "rl.kl_coef=0.2"])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"rl.grop_size; did you mean 'group_size'"):
        load_run_config(ROOT / "configs" / "demo_cpu.yaml", ["rl.grop_size=4"])


# -- log lines -----------------------------------------------------------------------------------

def test_log_line_has_step_rate_throughput_eta_and_policy_loss():
    from megatron_longact.training.logs import StepClock, format_line

    clock = StepClock()
    for s in (2.0, 2.0):
        clock.add(s)
    metrics = {"rl/reward": 0.5, "rl/pg_loss": -0.0123, "rl/entropy": 1.5, "perf/tokens": 4000.0}
    line = format_line(401, 550, 400, metrics, 2.0, clock)
    assert line.startswith("step 402/550 (rl 2/150)")
    for part in ("pg_loss -0.0123", "entropy 1.5", "2.00 s/step", "2,000 tok/s", "eta 4m56s"):
        assert part in line, (part, line)
    assert format_line(3, 550, 400, {"sft/loss": 1.0}, 1.0, clock).startswith("step 4/550 (sft 4/400)")


def test_rank_filter():
    from megatron_longact.training.logs import RankFilter

    rec = logging.LogRecord("megatron_longact", logging.INFO, __file__, 1, "x", (), None)
    assert RankFilter(0, False).filter(rec) and not RankFilter(1, False).filter(rec)
    assert RankFilter(1, True).filter(rec) and rec.rank_prefix == "[rank 1] "


def test_prompt_limit_filter_truncate_error():
    from types import SimpleNamespace

    from megatron_longact.data.prompt_limit import apply_prompt_limit, limit_prompt

    records = [{"id": f"r{n}", "n": n} for n in (3, 8, 5)]
    ids = lambda r: list(range(r["n"]))  # noqa: E731
    cfg = SimpleNamespace(max_prompt_length=5, prompt_overflow="filter")
    kept, report = apply_prompt_limit(records, ids, cfg)
    assert [r["id"] for r in kept] == ["r3", "r5"] and report.filtered == 1 and report.longest == 8
    cfg.prompt_overflow = "truncate"
    kept, report = apply_prompt_limit(records, ids, cfg)
    assert len(kept) == 3 and report.over == 1 and report.filtered == 0
    assert limit_prompt(list(range(8)), cfg) == ([3, 4, 5, 6, 7], True)
    cfg.prompt_overflow = "error"
    with pytest.raises(ConfigError, match="record r8 has a 8-token prompt"):
        apply_prompt_limit(records, ids, cfg)


# -- a run -------------------------------------------------------------------------------------

def _run(runtime, tmp):
    import os

    from megatron_longact.training.trainer import Trainer
    from tests.test_trainer import _config

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    stop = Path(tmp) / "stop"
    os.environ["LONGACT_STOP_FILE"] = str(stop)
    cfg = _config(tmp, f"{tmp}/out", **{"sft.steps": 1, "train.steps": 3, "longact.heatmap_interval": 1,
                                        "data.max_prompt_length": 120, "data.prompt_overflow": "truncate"})
    trainer = Trainer(cfg, runtime)
    logging.getLogger("megatron_longact").addHandler(Keep())
    original = trainer.rl_step

    def rl_step_then_stop():
        out = original()
        stop.write_text("")  # what launch/slurm/common.sh does on SIGUSR1
        return out

    trainer.rl_step = rl_step_then_stop
    history = trainer.run()
    del os.environ["LONGACT_STOP_FILE"]
    return history, lines


def test_run_logs_figures_and_stops_on_the_stop_file(tmp_path):
    history, lines = run_distributed(_run, args=(str(tmp_path),))[0]
    # Stopped after the first RL step (global step 1 of 4) and saved there.
    assert [h["step"] for h in history] == [0, 1]
    assert any("checkpoint: saved step 2" in ln for ln in lines), lines
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert step_lines[0].startswith("step 1/4 (sft 1/1)") and step_lines[1].startswith("step 2/4 (rl 1/3)")
    for ln in step_lines:
        assert " s/step" in ln and " tok/s" in ln and " eta " in ln, ln
    assert "pg_loss" in step_lines[1] and "entropy" in step_lines[1]
    assert history[1]["rl/entropy"] > 0.0
    # The 160-token tasks have prompts over 120 tokens: truncated, and counted.
    assert history[1]["data/prompts_over_limit"] > 0 and history[1]["data/prompts_filtered"] == 0
    assert history[1]["data/prompts_truncated"] > 0
    figures = tmp_path / "out" / "figures"
    assert (figures / "saliency_step0000001.png").is_file() and (figures / "top_median_ratio.png").is_file()
    events = list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1, events


def test_wandb_logger_is_optional(monkeypatch):
    import sys
    import types

    from megatron_longact.training.logs import WandbLogger, check_wandb

    cfg = load_run_config(ROOT / "configs" / "demo_cpu.yaml", ["output.wandb=true", "output.wandb_mode=offline"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="output.wandb: true, but the wandb package is not installed"):
        check_wandb(cfg)
    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("log", dict(metrics), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    check_wandb(cfg)
    logger = WandbLogger(cfg, "runs/x")
    logger.log({"rl/reward": 0.5}, 3)
    logger.close()
    init = calls[0][1]
    assert init["project"] == "megatron-longact" and init["mode"] == "offline"
    assert init["config"]["rl"]["group_size"] == cfg.rl.group_size
    assert calls[1:] == [("log", {"rl/reward": 0.5}, 3), ("finish",)]
