"""Padding for the parallel layout (TP with sequence parallelism, 2 x CP, FP8), megatron's
load-balanced context-parallel split, and the start-up checks that go with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.training.batching import (
    SequenceLayout,
    check_length,
    cp_positions,
    pad_batch,
    padded_length,
    shift_left,
    split_for_cp,
)

ROOT = Path(__file__).resolve().parent.parent

# (tp, cp, sequence_parallel, fp8) -> the multiple every padded length must be of.
LAYOUTS = [
    ((1, 1, False, False), 16),
    ((2, 1, False, False), 16),      # TP without SP: no constraint on the sequence
    ((8, 1, True, False), 16),       # SP: S % 8
    ((8, 1, True, True), 128),       # FP8 + SP: S / 8 a multiple of 16
    ((4, 1, False, True), 16),       # FP8 without SP: S a multiple of 16
    ((1, 2, False, False), 16),      # 2 x CP = 4
    ((1, 16, False, False), 32),     # 2 x CP = 32
    ((8, 2, True, False), 16),       # CP x TP = 16
    ((8, 2, True, True), 256),       # FP8: S / CP / TP a multiple of 16
    ((8, 4, True, False), 32),
    ((2, 2, False, True), 32),       # FP8 under CP without SP: S / CP a multiple of 16
    ((3, 5, True, False), 30 * 8),   # odd sizes: lcm(16, 10, 15)
]


@pytest.mark.parametrize("layout,multiple", LAYOUTS, ids=[str(x[0]) for x in LAYOUTS])
def test_padded_length_table(layout, multiple):
    tp, cp, sp, fp8 = layout
    lay = SequenceLayout(tp=tp, cp=cp, sequence_parallel=sp, fp8=fp8)
    assert lay.multiple == multiple and multiple % lay.required == 0
    for length in (1, 15, 16, 17, 200, 1000, 4097, 65536, 65537):
        S = padded_length(length, lay)
        assert S >= length and S - length < multiple and S % multiple == 0
        # What the kernels need, checked directly.
        assert S % 16 == 0
        if cp > 1:
            assert S % (2 * cp) == 0
        per_rank = S // cp // (tp if sp else 1)
        assert per_rank * cp * (tp if sp else 1) == S
        if fp8:
            for b in (1, 2, 3, 4, 7):
                assert (per_rank * b) % 16 == 0
        check_length(S, lay, "train.seq_length")


def test_old_rule_fails_fp8_at_tp8_and_the_new_one_does_not():
    """The old rule padded S to a multiple of 16 only: at TP=8 with sequence parallelism and FP8,
    TE's per-rank token count S/8 * b was a multiple of 8 for only 1 in 4 batch lengths."""
    lay = SequenceLayout(tp=8, sequence_parallel=True, fp8=True)
    old_bad = new_bad = 0
    for length in range(1, 4097):
        old = -(-length // 16) * 16
        old_bad += (old // 8) % 8 != 0
        new_bad += (padded_length(length, lay) // 8) % 16 != 0
    assert old_bad > 0.7 * 4096 and new_bad == 0


def test_check_length_names_the_field_and_the_next_valid_length():
    with pytest.raises(ConfigError, match=r"train.seq_length: 100 is not a multiple of 32, which "
                                          r"TP=8 with sequence parallelism, CP=4 needs \(the next valid length is 128\)"):
        check_length(100, SequenceLayout(tp=8, cp=4, sequence_parallel=True), "train.seq_length")


def test_pad_batch_and_its_limit():
    lay = SequenceLayout(tp=2, cp=2, sequence_parallel=True)
    tokens, valid = pad_batch([[5] * 3, [6] * 17], 0, 64, lay)
    assert tokens.shape == (2, 32) and valid.sum(1).tolist() == [3, 17] and tokens[0, 3:].eq(0).all()
    with pytest.raises(ConfigError, match="needs 32 positions .* more than model.max_position_embeddings=24"):
        pad_batch([[1] * 17], 0, 24, lay)


class _Group:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_split_is_megatrons_get_batch_on_this_cp_rank(cp, monkeypatch):
    from megatron.core import utils as mcore_utils

    monkeypatch.setattr(mcore_utils, "get_pg_size", lambda g=None: g.size())
    monkeypatch.setattr(mcore_utils, "get_pg_rank", lambda g=None: g.rank())
    S = 48
    tokens = torch.arange(3 * S).reshape(3, S)
    seen = []
    for r in range(cp):
        ours = split_for_cp(tokens, cp, r)
        theirs = mcore_utils.get_batch_on_this_cp_rank({"tokens": tokens.clone()}, _Group(cp, r))["tokens"]
        assert torch.equal(ours, theirs)
        # Position ids of the part are its global positions (RoPE uses them under CP).
        assert torch.equal(ours[0], cp_positions(S, cp, r))
        seen += cp_positions(S, cp, r).tolist()
    assert sorted(seen) == list(range(S))  # every token on exactly one rank


def test_labels_are_shifted_before_the_split():
    tokens = torch.arange(16).unsqueeze(0)
    labels = shift_left(tokens, -1)
    for r in range(2):
        t, l = split_for_cp(tokens, 2, r), split_for_cp(labels, 2, r)
        # Every position's target is on the same rank, including the last position of a chunk.
        assert torch.equal(l[0, :-1][t[0, :-1] != 15], t[0, :-1][t[0, :-1] != 15] + 1)
        assert torch.equal(l[0], torch.where(t[0] == 15, -1, t[0] + 1))


def test_cp_split_refuses_a_length_not_divisible_by_2cp():
    with pytest.raises(ValueError, match="not a multiple of 2 x context_parallel_size = 4"):
        cp_positions(18, 2, 0)


# -- start-up checks ----------------------------------------------------------------------------

def _cfg(*overrides):
    from megatron_longact.run_config import load_run_config

    return load_run_config(ROOT / "configs" / "demo_cpu.yaml", list(overrides))


def test_native_generation_under_cp_is_refused_before_any_model():
    from megatron_longact.errors import UsageError
    from megatron_longact.preflight import check_rollout_layout

    with pytest.raises(UsageError, match="parallel.context_parallel_size: 2 with RL rollouts: native "
                                         "generation does not run under context parallelism; use "
                                         "rollout.engine: vllm"):
        check_rollout_layout(_cfg("parallel.context_parallel_size=2"))
    with pytest.raises(UsageError, match="the evaluation at the end of the run"):
        check_rollout_layout(_cfg("parallel.context_parallel_size=2", "train.mode=sft"))
    check_rollout_layout(_cfg("parallel.context_parallel_size=2", "train.mode=sft", "evaluation.lengths=[]"))
    check_rollout_layout(_cfg())
    # After the rollout-engine section exists, another engine passes.
    cfg = _cfg("parallel.context_parallel_size=2")
    object.__setattr__(cfg, "rollout", type("R", (), {"engine": "vllm"})())
    check_rollout_layout(cfg)


def test_cli_refuses_cp_rollouts_with_exit_2_and_no_process_group(monkeypatch, capsys):
    from megatron_longact.cli import train as train_cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train_cli, "initialize", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("initialize() ran although the layout is refused")))
    rc = train_cli.main(["--config", str(ROOT / "configs" / "demo_cpu.yaml"),
                         "parallel.context_parallel_size=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "use rollout.engine: vllm" in err[0]


def test_lm_mode_seq_length_must_fit_the_layout():
    from megatron_longact.errors import UsageError
    from megatron_longact.preflight import check_lm_layout
    from megatron_longact.runtime import ParallelConfig

    cfg = _cfg("train.mode=lm", "train.micro_batch_size=1", "train.seq_length=100")
    check_lm_layout(cfg, ParallelConfig(tensor_model_parallel_size=2))  # SP: 100 % 2 == 0
    with pytest.raises(UsageError, match="train.seq_length: 100 is not a multiple of 8, which TP=8 with "
                                         "sequence parallelism, CP=1 needs"):
        check_lm_layout(cfg, ParallelConfig(tensor_model_parallel_size=8))
    with pytest.raises(UsageError, match="does not split batches over context-parallel ranks"):
        check_lm_layout(_cfg("train.mode=lm", "train.micro_batch_size=1"), ParallelConfig(context_parallel_size=2))
