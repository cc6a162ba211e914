"""Asynchronous checkpoint saving: a run whose checkpoints were written in the background resumes
and ends with exactly the weights of an uninterrupted run that saved synchronously."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMALL = ["sft.steps=1", "sft.batch_size=4", "train.micro_batch_size=4", "rl.prompts_per_step=2",
         "rl.group_size=2", "data.ruler.num_samples=16", "evaluation.lengths=[]",
         "checkpoint.interval=1", "train.log_interval=1"]


def _train(out: Path, steps: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "megatron_longact.cli.train", "--config",
           str(REPO / "configs" / "demo_cpu.yaml"), *SMALL, f"train.steps={steps}",
           f"output.dir={out}", *extra]
    env = dict(os.environ, MEGATRON_LONGACT_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _weights(ckpt_root: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    env = dict(os.environ, MEGATRON_LONGACT_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_longact.cli.convert", "mcore-to-hf",
                           str(ckpt_root), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (f,) = out.glob("*.safetensors")
    return load_file(str(f))


def test_resume_from_async_saved_checkpoint_matches_uninterrupted_run(tmp_path):
    pytest.importorskip("safetensors")
    run, ref = tmp_path / "async", tmp_path / "sync"
    log = _train(run, 2, "checkpoint.async_save=true")
    assert "in the background" in log
    root = run / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not list(root.glob(".tmp_*")), "an async save left its temporary folder behind"
    log = _train(run, 3, "checkpoint.async_save=true")
    assert "resumed from" in log and "iter_0000003" in log
    _train(ref, 3)
    a, b = _weights(root, tmp_path / "hf_async"), _weights(ref / "checkpoints", tmp_path / "hf_sync")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
