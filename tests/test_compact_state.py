"""The kept rows' optimizer state kept compact between steps (docs/optimizer_freeze.md, "State
between steps"): the state dict that writes it back before anyone else looks, the slot bookkeeping
when the kept set changes, and bit-identity with writing it back after every step."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch

from megatron_longact.longact.compact_state import CompactRows, SyncedState
from megatron_longact.longact import LongActConfig
from tests.dist_harness import run_distributed


ACCESSES = {
    "getitem": lambda s: s["exp_avg"],
    "get": lambda s: s.get("exp_avg"),
    "items": lambda s: list(s.items()),
    "values": lambda s: list(s.values()),
    "keys": lambda s: list(s.keys()),
    "iter": lambda s: list(iter(s)),
    "contains": lambda s: "exp_avg" in s,
    "dict()": lambda s: dict(s),
    "unpack": lambda s: {**s},
    "copy": lambda s: s.copy(),
    "setitem": lambda s: s.__setitem__("exp_avg", torch.zeros(2)),
    "update": lambda s: s.update(step=torch.tensor(1.0)),
    "pop": lambda s: s.pop("exp_avg"),
    "setdefault": lambda s: s.setdefault("x", 1),
    "pickle": lambda s: pickle.dumps(s),
    "deepcopy": lambda s: copy.deepcopy(s),
    "repr": lambda s: repr(s),
}


@pytest.mark.parametrize("how", sorted(ACCESSES))
def test_synced_state_writes_back_before_any_access(how):
    calls = []
    s = SyncedState({"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}, lambda: calls.append(1))
    assert len(s) == 2 and calls == []  # the size reveals no value
    ACCESSES[how](s)
    assert calls == [1]
    s.get("exp_avg")
    assert calls == [1]  # once: from then on the full tensors are the truth


def test_synced_state_copies_as_a_plain_dict():
    calls = []
    s = SyncedState({"exp_avg": torch.ones(2)}, lambda: calls.append(1))
    assert type(pickle.loads(pickle.dumps(s))) is dict and type(copy.deepcopy(s)) is dict
    assert type(dict(s)) is dict and type(s.copy()) is dict
    assert calls == [1]


@pytest.mark.parametrize("regather", [False, True], ids=["move-changed-rows", "regather"])
@pytest.mark.parametrize("off,tail", [(0, 0), (5, 2)])
def test_compact_rows_follow_a_changing_row_set(off, tail, regather):
    """Random kept sets (growing, shrinking, empty, all rows) over 40 steps: the compact slots
    always hold exactly the wanted rows with their true values, rows outside them are never
    written except when they leave, and a final write-back gives the full truth. Both ways of
    changing the set: moving only the rows that change (CPU), and writing all back and gathering
    the new set (GPU: :func:`regathers`), whose slots follow the wanted order."""
    R, W = 37, 3
    gen = torch.Generator().manual_seed(off)
    rng = np.random.default_rng(off)
    flat = {k: torch.randn(off + R * W + tail, generator=gen) for k in ("exp_avg", "exp_avg_sq")}
    truth = {k: v.clone() for k, v in flat.items()}
    c = CompactRows((off, R), W, flat["exp_avg"].shape, torch.device("cpu"))
    assert c.regather is False  # the CPU's way
    c.regather = regather
    full = {k: v for k, v in flat.items()}
    sizes = [10, 12, 12, 5, 0, 0, R, R, 3, 20, 19, 19, 30] + list(rng.integers(0, R + 1, 27))
    for step, size in enumerate(sizes):
        want = rng.choice(R, size=int(size), replace=False)
        want = np.sort(want) if step % 2 else want  # any order
        c.retarget(want, c.full_views(full))
        assert sorted(c.rows.tolist()) == sorted(want.tolist())
        if regather:
            assert c.rows.tolist() == want.tolist()
        outside = np.setdiff1d(np.arange(R), want)
        for k in flat:
            mid_truth = c.mid_view(truth[k])
            assert torch.equal(c.live(c.moments[k]), mid_truth[torch.from_numpy(c.rows)])
            assert torch.equal(c.mid_view(flat[k])[torch.from_numpy(outside)],
                               mid_truth[torch.from_numpy(outside)])
            assert torch.equal(flat[k][:off], truth[k][:off]) and torch.equal(flat[k][off + R * W:],
                                                                              truth[k][off + R * W:])
            upd = torch.randn(c.n, W, generator=gen)  # "the optimizer step" on the compact rows
            c.live(c.moments[k]).add_(upd)
            mid_truth.index_add_(0, torch.from_numpy(c.rows), upd)
        c.scalars, c.newer = {"step": torch.tensor(float(step))}, True
    c.flush(full)
    for k in flat:
        assert torch.equal(flat[k], truth[k])
    assert float(full["step"]) == len(sizes) - 1


def _run_every_step_mask(runtime, write_back_every_step: bool, steps: int, dtype: str,
                         distributed: bool, regather: bool = False):
    """Train the tiny model with a mask recomputed every step (with the distributed optimizer at
    DP=2, weights split mid-row); optionally write the compact state back (and drop it) after
    every step, or change the compact set the GPU's way (``regather``). Returns the final
    parameters, main shards and moments, and per step how many compact rows were carried into
    it."""
    from functools import partial

    from megatron.core import parallel_state as ps

    from megatron_longact.longact import compact_state

    if regather:
        compact_state.regathers = lambda device: True

    from megatron_longact.longact.optimizer import install
    from megatron_longact.training.engine import setup_engine, train_step
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step
    from tests.test_longact_optimizer import LR, WD, _tiny
    from megatron_longact.training.config import TrainConfig

    train = TrainConfig(steps=steps, seq_length=32, micro_batch_size=2, global_batch_size=4, lr=LR,
                        weight_decay=WD, use_distributed_optimizer=distributed, ddp_bucket_size=3000)
    engine = setup_engine(_tiny(dtype), train, runtime.parallel)
    handle = install(engine.model, engine.optimizer, LongActConfig(keep_ratio=0.3))
    num_mb = train.num_microbatches(ps.get_data_parallel_world_size())
    carried, churn = [], []
    for step in range(steps):
        carried.append(sum(c.n for c in handle._compact_rows.values()))
        train_step(engine, partial(_forward_step, handle),
                   iter(micro_batches_for_step(step, engine, runtime.device)), num_mb,
                   train.seq_length, train.micro_batch_size)
        if handle.longact.state.churn_q_L is not None:
            churn.append(float(handle.longact.state.churn_q_L.min()))
        if write_back_every_step:
            handle.flush_optimizer_state()
    gpt = engine.gpt_models[0]
    out = {"params": {n: p.detach().clone() for n, p in gpt.named_parameters()}, "carried": carried,
           "churn": churn, "targets": []}
    for t in handle._targets:
        st = t.ref.torch_optimizer.state[t.ref.main_param]  # the access writes the compact rows back
        out["targets"].append([t.ref.main_param.detach().clone(), st["exp_avg"].clone(),
                               st["exp_avg_sq"].clone(), st["step"].clone()])
    buf = io.BytesIO()  # a saved torch optimizer state holds plain dicts (loads weights-only)
    torch.save(handle._targets[0].ref.torch_optimizer.state_dict(), buf)
    buf.seek(0)
    out["saved_state_types"] = {type(v) for v in torch.load(buf, weights_only=True)["state"].values()}
    handle.uninstall()
    out["plain_dicts"] = all(type(t.ref.torch_optimizer.state[t.ref.main_param]) is dict
                             for t in handle._targets)
    return out


@pytest.mark.parametrize("dtype,distributed,layout,regather", [
    ("bf16", True, dict(dp=2), False),   # DistributedOptimizer, shards cut mid-row
    ("bf16", True, dict(dp=2), True),    # the same, the compact set changed the GPU's way
    ("fp32", False, dict(tp=2), False),  # FP32Optimizer, TP-local weights
])
def test_compact_state_across_changing_masks_equals_writing_it_back_every_step(dtype, distributed, layout,
                                                                              regather):
    kept = run_distributed(_run_every_step_mask, args=(False, 5, dtype, distributed, regather), **layout)
    flushed = run_distributed(_run_every_step_mask, args=(True, 5, dtype, distributed), **layout)
    for a, b in zip(kept, flushed):
        assert all(n > 0 for n in a["carried"][1:]), a["carried"]  # really kept between steps
        assert b["carried"][1:] == [0] * 4
        assert min(a["churn"]) < 1.0  # the mask did change
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
        for ta, tb in zip(a["targets"], b["targets"]):
            for x, y in zip(ta, tb):
                assert torch.equal(x, y)
        assert a["plain_dicts"] and a["saved_state_types"] == {dict}


def test_index_arrays_reach_the_device_in_one_copy_with_their_values_and_shapes():
    from megatron_longact.longact.compact_state import _in_one_copy, to_device

    arrays = [np.array([3, 1, 2]), np.zeros(0, dtype=np.int64), np.arange(6).reshape(2, 3), np.array([7])]
    for out in (to_device(arrays, "cpu"), _in_one_copy(arrays, torch.device("cpu"))):
        assert [tuple(t.shape) for t in out] == [a.shape for a in arrays]
        assert all(np.array_equal(t.numpy(), a) for t, a in zip(out, arrays))
    # the batched path: views of one buffer, not one tensor per array
    out = _in_one_copy(arrays, torch.device("cpu"))
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
