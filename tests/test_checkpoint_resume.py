"""Checkpoints: resume reproduces the uninterrupted run (losses and parameters, LongAct state
included) at TP=2 and PP=2, loading under another DP size works, and a damaged checkpoint gives a
clear error while the previous one stays loadable."""

from functools import partial
from pathlib import Path

import pytest
import torch

from megatron_longact.longact import LongActConfig
from megatron_longact.models.config import ModelConfig
from megatron_longact.training.config import TrainConfig
from tests.dist_harness import run_distributed

# A mask fixed after one warm-up step with an EMA: resuming only matches if the mask, the EMA and
# the schedule position come back from the checkpoint.
LONGACT = LongActConfig(schedule="fixed", warmup_steps=1, ema=0.5)
STEPS, SPLIT = 4, 2


def _engine(runtime):
    from megatron_longact.longact.optimizer import install
    from megatron_longact.training.engine import setup_engine

    model = ModelConfig(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=260,
                        max_position_embeddings=512, qk_layernorm=True, params_dtype="bf16")
    train = TrainConfig(steps=STEPS, seq_length=32, micro_batch_size=2, global_batch_size=4, lr=1e-2,
                        lr_warmup_steps=1, lr_decay_style="cosine", weight_decay=0.1)
    engine = setup_engine(model, train, runtime.parallel)
    return engine, install(engine.model, engine.optimizer, LONGACT)


def _steps(runtime, engine, handle, first, last):
    from megatron.core import parallel_state as ps

    from megatron_longact.training.engine import reduce_last_stage_mean, train_step
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    tc = engine.train_cfg
    losses = []
    for step in range(first, last):
        out = train_step(engine, partial(_forward_step, handle),
                         iter(micro_batches_for_step(step, engine, runtime.device)),
                         tc.num_microbatches(ps.get_data_parallel_world_size()), tc.seq_length,
                         tc.micro_batch_size)
        losses.append(reduce_last_stage_mean([float(d["lm_loss"]) for d in out["losses"]]))
    return losses


def _params(engine):
    return {n: p.detach().clone() for n, p in engine.gpt_models[0].named_parameters()}


def _save(runtime, root, engine, handle, step):
    from megatron_longact import checkpoint

    checkpoint.save(root, step, engine.model, engine.optimizer,
                    {"scheduler": engine.scheduler.state_dict(), "longact": handle.state_dict(),
                     "step": step}, keep=0)


def _uninterrupted(runtime, with_full) -> dict:
    """The reference: all STEPS steps in one go (when asked for)."""
    if not with_full:
        return {}
    engine, handle = _engine(runtime)
    out = {"full_losses": _steps(runtime, engine, handle, 0, STEPS), "full_params": _params(engine)}
    handle.uninstall()
    return out


def _first_half(runtime, root, with_full):
    out = _uninterrupted(runtime, with_full)
    engine, handle = _engine(runtime)
    out["first_losses"] = _steps(runtime, engine, handle, 0, SPLIT)
    _save(runtime, root, engine, handle, SPLIT)
    return out


def _second_half(runtime, root, with_full):
    from megatron_longact import checkpoint

    out = _uninterrupted(runtime, with_full)
    engine, handle = _engine(runtime)
    folder = checkpoint.latest_valid(root)
    objs = checkpoint.load(folder, engine.model, engine.optimizer, ["scheduler", "longact", "step"],
                           load_rng=not with_full)
    engine.scheduler.load_state_dict(objs["scheduler"])
    handle.load_state_dict(objs["longact"])
    out["resumed_losses"] = _steps(runtime, engine, handle, objs["step"], STEPS)
    out["resumed_params"] = _params(engine)
    out["mask_step"] = handle.longact.state.last_mask_step
    return out


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, layout):
    first = run_distributed(_first_half, args=(str(tmp_path), True), **layout)
    second = run_distributed(_second_half, args=(str(tmp_path), False), **layout)
    for a, b in zip(first, second):
        assert a["first_losses"] == a["full_losses"][:SPLIT]
        assert b["resumed_losses"] == a["full_losses"][SPLIT:], (b["resumed_losses"], a["full_losses"])
        assert b["mask_step"] == 1  # the fixed mask from the first run, not recomputed
        for name, p in a["full_params"].items():
            assert torch.equal(p, b["resumed_params"][name]), name


def test_resume_under_another_data_parallel_size(tmp_path):
    run_distributed(_first_half, args=(str(tmp_path), False), dp=2)
    out = run_distributed(_second_half, args=(str(tmp_path), True), dp=1)[0]
    # DP=2 -> DP=1 changes only the order of gradient sums: fp32-level differences in the losses.
    for got, ref in zip(out["resumed_losses"], out["full_losses"][SPLIT:]):
        assert abs(got - ref) < 2e-3, (out["resumed_losses"], out["full_losses"])
    assert out["mask_step"] == 1


def _damaged(runtime, root):
    from megatron_longact import checkpoint

    engine, handle = _engine(runtime)
    _steps(runtime, engine, handle, 0, 1)
    _save(runtime, root, engine, handle, 1)
    _steps(runtime, engine, handle, 1, 2)
    _save(runtime, root, engine, handle, 2)
    newest = checkpoint.step_dir(root, 2)
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    (Path(root) / ".tmp_iter_0000003").mkdir()  # an interrupted save
    out = {}
    try:
        checkpoint.load(newest, engine.model, engine.optimizer, ["step"])
    except checkpoint.CheckpointError as exc:
        out["error"] = str(exc)
    good = checkpoint.latest_valid(root)
    out["fallback"] = good.name
    out["step"] = checkpoint.load(good, engine.model, engine.optimizer, ["step"])["step"]
    try:
        checkpoint.verify(Path(root) / ".tmp_iter_0000003")
    except checkpoint.CheckpointError as exc:
        out["tmp_error"] = str(exc)
    return out


def test_damaged_checkpoint_is_reported_and_the_previous_one_loads(tmp_path):
    out = run_distributed(_damaged, args=(str(tmp_path),))[0]
    assert "iter_0000002 is corrupt" in out["error"] and "truncated" in out["error"]
    assert out["fallback"] == "iter_0000001" and out["step"] == 1
    assert "is incomplete" in out["tmp_error"]
