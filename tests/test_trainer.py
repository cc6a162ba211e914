"""The SFT + RL trainer end to end on the tiny model: layouts with 1, 2 and 4 ranks, resume after a
preemption signal reproduces the uninterrupted run, a loop of ``train_step`` reproduces ``run``,
bad config values fail before any model."""

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp: str, out: str, **over):
    from megatron_longact.run_config import load_run_config

    # One file per rank: ranks of one test write their configs at the same time.
    path = Path(tmp) / f"run{os.environ.get('RANK', '0')}.yaml"
    path.write_text(f"include: {ROOT / 'configs/model/tiny.yaml'}\n")
    overrides = {
        "train.mode": "rl", "train.steps": 2, "train.micro_batch_size": 4, "train.lr": 1e-3,
        "sft.steps": 2, "sft.batch_size": 4, "sft.lr": 3e-3,
        "data.ruler.num_samples": 64, "data.ruler.template": "compact", "data.ruler.number_digits": 3,
        "data.ruler.lengths": "[160]", "data.ruler.tasks": "[niah_single_1]",
        "rl.group_size": 2, "rl.prompts_per_step": 4, "rl.max_new_tokens": 4,
        "rl.reward.function": "megatron_longact.tasks.rewards:prefix_match",
        "checkpoint.resume": "none", "output.dir": out,
    }
    overrides.update(over)
    return load_run_config(path, [f"{k}={v}" for k, v in overrides.items()])


def _train(runtime, tmp, out, over):
    from megatron_longact.training.trainer import Trainer

    cfg = _config(tmp, out, **over)
    trainer = Trainer(cfg, runtime)
    history = trainer.run()
    params = {n: p.detach().clone() for n, p in trainer.engine.gpt_models[0].named_parameters()}
    return history, params


@pytest.mark.parametrize("layout", [dict(), dict(dp=2), dict(tp=2, pp=2)])
def test_trainer_runs_sft_then_rl(tmp_path, layout):
    over = {"parallel.tensor_model_parallel_size": layout.get("tp", 1),
            "parallel.pipeline_model_parallel_size": layout.get("pp", 1),
            "evaluation.lengths": "[160]", "evaluation.num_samples": 4, "rl.kl_coef": 0.05}
    results = run_distributed(_train, args=(str(tmp_path), str(tmp_path / "out"), over), **layout)
    history, _ = results[0]
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert "sft/loss" in history[0] and "rl/reward" in history[2]
    # The SFT warm start logs the learning rate its updates use (sft.lr, not train.lr), and its
    # tokens/s counts every token it processes (4 prompts of ~160 tokens), not only the answers.
    assert history[0]["train/lr"] == pytest.approx(3e-3) and history[1]["train/lr"] == pytest.approx(3e-3)
    assert history[0]["perf/tokens"] >= 4 * 120
    assert history[2]["longact/kept_fraction_q"] == pytest.approx(19 / 64)
    # The reference is the policy as RL starts: zero KL on the first RL step, then it moves.
    assert history[2]["rl/kl"] == 0.0 and history[3]["rl/kl"] > 0.0
    for h in history:
        assert all(v == v for v in h.values()), h  # no NaN
    for other, _ in results[1:]:
        assert [h.get("rl/reward") for h in other] == [h.get("rl/reward") for h in history]
    assert (tmp_path / "out" / "eval" / "results.md").is_file()
    assert any((tmp_path / "out" / "tb").iterdir())
    ckpts = tmp_path / "out" / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpts / "iter_0000004" / "manifest.json").is_file()


def _preempt_and_resume(runtime, tmp):
    from megatron_longact.training.trainer import Trainer

    # With a KL reference, so that the checkpoint must also carry the reference policy.
    full_hist, full_params = _train(runtime, tmp, f"{tmp}/full", {"rl.kl_coef": 0.05})
    # Interrupted run: SIGUSR1 arrives during the first RL step (global step 2).
    cfg = _config(tmp, f"{tmp}/cut", **{"checkpoint.resume": "auto", "rl.kl_coef": 0.05})
    trainer = Trainer(cfg, runtime)
    original = trainer.rl_step

    def rl_step_with_signal():
        os.kill(os.getpid(), signal.SIGUSR1)
        return original()

    trainer.rl_step = rl_step_with_signal
    cut_hist = trainer.run()
    saved = (Path(tmp) / "cut" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip()
    resumed = Trainer(cfg, runtime)
    rest_hist = resumed.run()
    params = {n: p.detach().clone() for n, p in resumed.engine.gpt_models[0].named_parameters()}
    # The same run as a loop of train_step (what benchmarks and notebooks drive).
    stepped = Trainer(_config(tmp, f"{tmp}/stepped", **{"rl.kl_coef": 0.05}), runtime)
    step_hist = [stepped.train_step() for _ in range(stepped.total_steps)]
    step_params = {n: p.detach().clone() for n, p in stepped.engine.gpt_models[0].named_parameters()}
    try:
        stepped.train_step()
        beyond = None
    except RuntimeError as e:
        beyond = str(e)
    return (full_hist, full_params, cut_hist, saved, rest_hist, params,
            (stepped.step, step_hist, step_params, beyond))


def test_preemption_saves_and_resume_reproduces_the_run(tmp_path):
    full_hist, full_params, cut_hist, saved, rest_hist, params, stepped = run_distributed(
        _preempt_and_resume, args=(str(tmp_path),))[0]
    assert [h["step"] for h in cut_hist] == [0, 1, 2] and saved == "3"
    assert [h["step"] for h in rest_hist] == [3]
    assert cut_hist[2]["rl/reward"] == full_hist[2]["rl/reward"]
    assert rest_hist[0]["rl/reward"] == full_hist[3]["rl/reward"]
    assert rest_hist[0]["train/grad_norm"] == full_hist[3]["train/grad_norm"]
    assert rest_hist[0]["rl/kl"] == full_hist[3]["rl/kl"] > 0.0
    for name, p in full_params.items():
        assert torch.equal(p, params[name]), name
    # train_step in a loop is run() without its logging, checkpoints and evaluation.
    step_count, step_hist, step_params, beyond = stepped
    assert step_count == 4 and "sft/loss" in step_hist[0] and "longact/kept_fraction_q" in step_hist[2]
    assert "all 4 steps of this run are done (sft.steps=2 + train.steps=2)" in beyond
    for key in ("sft/loss", "rl/reward", "rl/kl", "train/grad_norm"):
        assert [h.get(key) for h in step_hist] == [h.get(key) for h in full_hist], key
    for name, p in full_params.items():
        assert torch.equal(p, step_params[name]), name


def test_bad_rl_config_fails_before_any_model(monkeypatch, capsys, tmp_path):
    from megatron_longact.cli import train as train_cli

    monkeypatch.setattr(train_cli, "initialize", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("initialize() ran although the config is invalid")))
    for override, message in [("rl.group_size=1", "rl.group_size: got 1"),
                              ("rl.algorithm=reinforce", "rl.algorithm: got 'reinforce'"),
                              ("longact.keep_ratio=0", "longact.keep_ratio"),
                              ("rl.kl_coef=-1", "rl.kl_coef")]:
        rc = train_cli.main(["--config", str(ROOT / "configs/demo_cpu.yaml"), override])
        assert rc == 2
        assert message in capsys.readouterr().err
