"""longact-train: bad input fails before any process group or model exists; the CLI runs."""

import os
import subprocess
import sys
from pathlib import Path


from megatron_longact.cli import train as train_cli

ROOT = Path(__file__).resolve().parent.parent


def test_bad_config_fails_before_initialization(monkeypatch, capsys):
    def must_not_run(*a, **k):
        raise AssertionError("initialize() ran although the config is invalid")

    monkeypatch.setattr(train_cli, "initialize", must_not_run)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    rc = train_cli.main(["--config", str(ROOT / "configs/demo_cpu.yaml"),
                         "parallel.tensor_model_parallel_size=3"])
    assert rc == 2
    assert "does not divide the world size 4" in capsys.readouterr().err
    rc = train_cli.main(["--config", str(ROOT / "configs/demo_cpu.yaml"), "train.lr=fast"])
    assert rc == 2
    assert "train.lr: got str 'fast', expected a number" in capsys.readouterr().err


def test_cli_trains_a_few_steps(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_longact.cli.train", "--config", str(ROOT / "configs/demo_cpu.yaml"),
         "train.mode=lm", "train.steps=4", "train.micro_batch_size=4", f"output.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step    4/4" in proc.stdout
    assert (tmp_path / "config.yaml").is_file()
    assert any((tmp_path / "tb").iterdir())
