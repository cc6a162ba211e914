"""Non-finite steps end to end: a NaN injected into one RL step (on one rank only, or on every
rank) is skipped with no change to parameters, optimizer state, LongAct state or the LR schedule;
a run whose updates stay non-finite stops with exit code 3 through the real CLI and leaves the last
finite checkpoint as the newest; ``checkpoint.save`` never publishes NaN weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _snapshot(trainer) -> dict:
    """Copies of everything a skipped update must leave alone."""
    from megatron_longact.compat import inner_optimizers

    model = {n: p.detach().clone() for n, p in trainer.engine.gpt_models[0].named_parameters()}
    optim = []
    for opt in inner_optimizers(trainer.engine.optimizer):
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                optim.append(p.detach().clone())
                optim.extend(v.detach().clone() for v in torch_opt.state.get(p, {}).values()
                             if torch.is_tensor(v))
    return {"model": model, "optim": optim, "longact": _clone(trainer.handle.state_dict()),
            "scheduler": trainer.engine.scheduler.num_steps}


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _nan_run(runtime, tmp, dtype, bad_step, bad_ranks):
    """RL run with LongAct whose global step ``bad_step`` gets a NaN loss on ``bad_ranks``."""
    import megatron_longact.training.trainer as trainer_mod
    from tests.test_trainer import _config

    original = trainer_mod._rl_forward_step
    state = {"poison": False}

    def poisoned_forward_step(*args, **kwargs):
        output, loss_func = original(*args, **kwargs)

        def loss_with_nan(output_tensor):
            loss, metrics = loss_func(output_tensor)
            return (loss * float("nan"), metrics) if state["poison"] else (loss, metrics)

        return output, loss_with_nan

    trainer_mod._rl_forward_step = poisoned_forward_step
    cfg = _config(tmp, f"{tmp}/out", **{"model.params_dtype": dtype, "train.steps": 3, "sft.steps": 1,
                                        "evaluation.lengths": "[]", "checkpoint.interval": 100})
    trainer = trainer_mod.Trainer(cfg, runtime)
    step_fn = trainer.rl_step
    snaps = {}

    def rl_step():
        state["poison"] = trainer.step == bad_step and runtime.rank in bad_ranks
        before = _snapshot(trainer)
        out = step_fn()
        snaps[trainer.step] = (before, _snapshot(trainer))
        return out

    trainer.rl_step = rl_step
    history = trainer.run()
    return history, {s: (_same(b, a), {k: _same(b[k], a[k]) for k in b}) for s, (b, a) in snaps.items()}


@pytest.mark.parametrize("dtype,layout,bad_ranks", [("fp32", {}, (0,)), ("bf16", {}, (0,)),
                                                    ("bf16", {"dp": 2}, (1,))],
                         ids=["fp32", "bf16", "bf16-dp2-nan-on-rank1-only"])
def test_nonfinite_rl_step_is_skipped_without_any_state_change(tmp_path, dtype, layout, bad_ranks):
    bad_step = 2  # the second RL step (step 0 is the SFT warm start)
    results = run_distributed(_nan_run, args=(str(tmp_path), dtype, bad_step, bad_ranks), **layout)
    for history, unchanged in results:
        assert [h["step"] for h in history] == [0, 1, 2, 3]
        assert [h.get("train/skipped_updates") for h in history[1:]] == [0.0, 1.0, 0.0]
        # The skipped step changed nothing at all; the steps around it did update (the check can fail).
        same, parts = unchanged[bad_step]
        assert same, parts
        assert not unchanged[1][1]["model"] and not unchanged[3][1]["optim"]
        assert not unchanged[1][1]["scheduler"] and not unchanged[3][1]["scheduler"]
        # The run went on after one skip (max_nonfinite_skips=3 counts consecutive skips).
        assert history[3]["train/grad_norm"] == history[3]["train/grad_norm"]
    # Every rank took the same decision, including the rank whose own loss was finite.
    assert all(r[0][2]["train/skipped_updates"] == 1.0 for r in results)


def test_cli_stops_on_nonfinite_updates_and_keeps_the_last_finite_checkpoint(tmp_path):
    """A learning rate of 1e25 makes the weights explode after the first update: every later step
    is non-finite. The run stops with exit code 3 after ``train.max_nonfinite_skips`` skips in a
    row, with one error line, and the newest checkpoint is the last finite one."""
    env = dict(os.environ, MEGATRON_LONGACT_CPU="1")
    cmd = [sys.executable, "-m", "megatron_longact.cli.train", "--config", "demo_cpu", "train.mode=sft",
           "train.steps=6", "sft.batch_size=4", "train.micro_batch_size=4", "sft.lr=1e25",
           "data.ruler.num_samples=16", "evaluation.lengths=[]", "checkpoint.interval=1",
           "checkpoint.resume=none", "output.dir=run", "train.max_nonfinite_skips=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("longact-train: error")]
    assert len(errors) == 1 and "train.max_nonfinite_skips=2" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_0000001", "iter_0000002"]
    from megatron_longact import checkpoint

    assert checkpoint.resolve_auto(root) == root / "iter_0000002"
    # The published weights are finite (huge, after lr=1e25, but finite).
    cmd_resume = cmd[:-1] + ["train.max_nonfinite_skips=1", "checkpoint.resume=auto"]
    again = subprocess.run(cmd_resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "resumed from" in again.stdout + again.stderr
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def _save_with_nan(runtime, tmp):
    from megatron_longact import checkpoint
    from tests.test_trainer import _config
    from megatron_longact.training.trainer import Trainer

    cfg = _config(tmp, f"{tmp}/out", **{"train.mode": "sft", "train.steps": 1, "sft.steps": 1,
                                        "evaluation.lengths": "[]"})
    trainer = Trainer(cfg, runtime)
    trainer.sft_step()  # optimizer state exists only after a first update
    root = Path(tmp) / "ckpt"
    checkpoint.save(root, 1, trainer.engine.model, trainer.engine.optimizer, trainer._objects())
    if runtime.rank == 1:  # one poisoned weight on one rank is enough to refuse on every rank
        with torch.no_grad():
            next(trainer.engine.gpt_models[0].parameters()).view(-1)[0] = float("nan")
    try:
        checkpoint.save(root, 2, trainer.engine.model, trainer.engine.optimizer, trainer._objects())
    except checkpoint.NonFiniteCheckpointError as exc:
        return str(exc), sorted(p.name for p in root.iterdir()), \
            (root / "latest_checkpointed_iteration.txt").read_text().strip()
    return None


def test_save_refuses_nonfinite_weights_on_every_rank(tmp_path):
    results = run_distributed(_save_with_nan, args=(str(tmp_path),), dp=2)
    for result in results:
        assert result is not None, "a checkpoint with a NaN weight was published"
        message, names, latest = result
        assert "NaN or inf" in message
        assert latest == "1" and "iter_0000002" not in names and not any(n.startswith(".tmp") for n in names)
