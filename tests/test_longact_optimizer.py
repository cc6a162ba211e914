"""LongAct inside megatron-core's optimizers (docs/method.md).

(a) freeze exactness for DistributedOptimizer, Float16OptimizerWithFloat16Params and FP32Optimizer
    at TP=2, DP=2 (a linear_qkv weight split across DP ranks) and PP=2, with a large learning rate
    and weight decay: frozen rows keep model params, main params and Adam moments bit-identical;
(b) strategy=none is bit-identical to plain megatron-core, and with a mask the unfrozen entries take
    exactly the update plain megatron-core gives them from the same gradients;
(c) apply_to=gradient drifts as documented (weight decay still shrinks frozen rows).
"""

import pytest
import torch

from megatron_longact.longact import LongActConfig
from megatron_longact.models.config import ModelConfig
from megatron_longact.training.config import TrainConfig
from tests.dist_harness import run_distributed

LR, WD = 0.05, 0.1


def _tiny(dtype):
    return ModelConfig(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=260,
                       max_position_embeddings=512, qk_layernorm=True, params_dtype=dtype)


def _run(runtime, dtype, distributed, longact_cfg, steps, clip=1.0, bucket=None, min_view=None,
         timing=False):
    """Train ``steps`` steps; return what the checks need (all on CPU, plain tensors).
    ``min_view=0``: the V rows are stepped as one strided view however few they are. ``timing``:
    time the steps' phases (``enable_timing``, or a ``TorchStepTimer`` without LongAct)."""
    import megatron_longact.longact.optimizer as longact_optimizer
    from megatron_longact.compat import main_param_refs

    if min_view is not None:
        longact_optimizer.MIN_STRIDED_VIEW = min_view
    from megatron_longact.longact.optimizer import install
    from megatron_longact.training.engine import setup_engine, train_step
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step
    from functools import partial

    train = TrainConfig(steps=steps, seq_length=32, micro_batch_size=2, global_batch_size=4, lr=LR,
                        weight_decay=WD, clip_grad=clip, use_distributed_optimizer=distributed,
                        ddp_bucket_size=bucket)
    engine = setup_engine(_tiny(dtype), train, runtime.parallel)
    handle = install(engine.model, engine.optimizer, longact_cfg) if longact_cfg else None
    if timing:
        from megatron_longact.longact.timing import PhaseTimes, TorchStepTimer

        if handle is not None:
            times = handle.enable_timing()
        else:
            times = PhaseTimes()
            TorchStepTimer(engine.optimizer, times)
    gpt = engine.gpt_models[0]
    init = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    refs = {id(r.model_param): r for r in main_param_refs(engine.optimizer)}
    init_main = {n: refs[id(p)].main_param.detach().clone() for n, p in gpt.named_parameters()
                 if id(p) in refs}
    from megatron.core import parallel_state as ps

    num_mb = train.num_microbatches(ps.get_data_parallel_world_size())
    for step in range(steps):
        train_step(engine, partial(_forward_step, handle), iter(micro_batches_for_step(step, engine, runtime.device)),
                   num_mb, train.seq_length, train.micro_batch_size)
        if timing and handle is None:
            times.close_step()
    out = {"params": {n: p.detach().clone() for n, p in gpt.named_parameters()}, "init": init,
           "init_main": init_main, "targets": []}
    if handle is not None:
        out["compact_bytes"] = handle.compact_state_bytes()  # before reading the state flushes it
        rows = {id(m.weight): r for m, r in handle.longact.local_qkv_row_masks()}
        names = {id(p): n for n, p in gpt.named_parameters()}
        out["keep_rows"] = {names[k]: r for k, r in rows.items()}
        for t in handle._targets:
            main = t.ref.main_param
            state = t.ref.torch_optimizer.state.get(main, {})
            name = next(n for n, p in gpt.named_parameters() if p is t.ref.model_param)
            keep_rows = rows.get(id(t.ref.model_param))
            if keep_rows is None:  # a bias: find its weight's rows
                keep_rows = rows[id(gpt.get_submodule(name.rsplit(".", 1)[0]).weight)]
            # Frozen elements of this rank's main shard, derived independently: every element of a
            # frozen row, cut to the shard's flat range.
            start, n = t.ref.flat_start, main.numel()
            frozen = (~keep_rows).repeat_interleave(t.row_width)[start:start + n]
            out["targets"].append(dict(
                name=name, keep_rows=keep_rows, frozen=frozen, main=main.detach().clone(),
                exp_avg=state["exp_avg"].clone(), exp_avg_sq=state["exp_avg_sq"].clone(),
                split=t.ref.flat_start > 0 or main.numel() < t.ref.model_param.numel()))
        out["metrics"] = dict(handle.metrics)
        out["persistent_bytes"] = handle.persistent_bytes()
    if timing:
        out["phase_times"] = times.steps
    return out


FIXED = LongActConfig(schedule="fixed", keep_ratio=0.3)


@pytest.mark.parametrize("dtype,distributed,layout", [
    ("bf16", True, dict(tp=2, dp=2)),    # DistributedOptimizer, weights split across DP ranks
    ("bf16", True, dict(pp=2)),
    ("bf16", False, dict(tp=2)),         # Float16OptimizerWithFloat16Params
    ("fp32", False, dict(dp=2)),         # FP32Optimizer
])
def test_frozen_rows_are_bit_identical(dtype, distributed, layout):
    # Small DDP buckets: every bucket is sharded over DP separately, so linear_qkv weights are
    # cut mid-tensor (and mid-row) between the two DP ranks.
    results = run_distributed(_run, args=(dtype, distributed, FIXED, 3, 1.0, 3000), **layout)
    any_split = False
    for out in results:
        assert out["targets"], "no linear_qkv targets found"
        for t in out["targets"]:
            name, frozen = t["name"], t["frozen"]
            any_split |= t["split"]
            assert frozen.any() and (~frozen).any()
            # model copy: frozen rows unchanged to the bit, the others moved
            rows = t["keep_rows"]
            p0, p1 = out["init"][name], out["params"][name]
            assert torch.equal(p1[~rows], p0[~rows]), name
            assert not torch.equal(p1[rows], p0[rows]), name
            # main params and Adam moments of frozen entries: unchanged (moments never left zero)
            main0 = out["init_main"][name].view(-1)
            assert torch.equal(t["main"].view(-1)[frozen], main0[frozen]), name
            assert not t["exp_avg"].view(-1)[frozen].any() and not t["exp_avg_sq"].view(-1)[frozen].any()
            assert t["exp_avg_sq"].view(-1)[~frozen].any()
        assert out["metrics"]["longact/kept_fraction_q"] == pytest.approx(19 / 64)
        assert 0.0 < out["metrics"]["longact/grad_norm_removed_fraction_qkv"] < 1.0
    if distributed and layout.get("dp") == 2:
        assert any_split, "no linear_qkv weight is split across DP ranks: the case is not exercised"
    # What the memory planner counts for LongAct, against the real objects of these runs.
    from megatron_longact.longact.controller import persistent_state_bytes
    from megatron_longact.longact.layout import QKGeometry
    from megatron_longact.longact.optimizer import compact_state_bound

    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    geometry = QKGeometry(num_layers=4, num_heads=4, num_groups=2, head_dim=16)
    for out in results:
        assert out["persistent_bytes"] == persistent_state_bytes(FIXED, geometry, 4 // pp)
    bound = compact_state_bound(FIXED, geometry, 64, tp_size=tp, local_layers=4 // pp)
    if distributed:  # the DP ranks share a weight's state: the bound covers their sum
        real = sum(out["compact_bytes"] for out in results)
        assert 0 < real <= bound * tp * pp
    else:  # every DP rank holds all of it
        real = results[0]["compact_bytes"]
        assert all(0 < out["compact_bytes"] <= bound for out in results)
    if tp == 1 and (not distributed or len(results) == pp):
        # Whole weights (no DP sharding): per layer 19 q + 10 k + 32 V rows of 64 fp32 values, 16 B
        # each (two moments, value and gradient buffers; the V rows are too few for a strided
        # view). A fixed mask never grows the set, so the moments carry none of the 1/8 slack the
        # bound allows for.
        assert real == 4 * 61 * 64 * 16


def _run_one_layer(runtime, steps):
    """A one-layer model under the distributed optimizer: (targets, logged removed fraction) of
    each step."""
    import dataclasses
    from functools import partial

    from megatron.core import parallel_state as ps

    from megatron_longact.longact.optimizer import install
    from megatron_longact.training.engine import setup_engine, train_step
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    train = TrainConfig(steps=steps, seq_length=32, micro_batch_size=2, global_batch_size=4, lr=LR,
                        weight_decay=WD, use_distributed_optimizer=True)
    engine = setup_engine(dataclasses.replace(_tiny("bf16"), num_layers=1), train, runtime.parallel)
    handle = install(engine.model, engine.optimizer, LongActConfig(warmup_steps=0))
    num_mb = train.num_microbatches(ps.get_data_parallel_world_size())
    out = []
    for step in range(steps):
        train_step(engine, partial(_forward_step, handle),
                   iter(micro_batches_for_step(step, engine, runtime.device)), num_mb,
                   train.seq_length, train.micro_batch_size)
        out.append((len(handle._targets), handle.metrics["longact/grad_norm_removed_fraction_qkv"]))
    return out


def test_a_dp_rank_that_owns_no_linear_qkv_joins_the_norm_reduction():
    """Under the distributed optimizer a DP rank may own no part of any linear_qkv weight (one
    layer at DP=2: the other rank owns all of it). It still joins the reduction of the logged
    norm, so the ranks' collectives stay matched (before, gloo failed with a collective mismatch;
    NCCL would hang) and every rank logs the fraction a single rank computes."""
    dp2 = run_distributed(_run_one_layer, args=(2,), dp=2)
    dp1 = run_distributed(_run_one_layer, args=(2,), dp=1)[0]
    assert sorted(steps[0][0] for steps in dp2) == [0, 1], "the case is not exercised"
    for step in range(2):
        fractions = [steps[step][1] for steps in dp2]
        assert fractions[0] == fractions[1] and 0.0 < fractions[0] < 1.0
        assert fractions[0] == pytest.approx(dp1[step][1], rel=0.02)


def test_strategy_none_is_bit_identical_to_plain_megatron():
    plain = run_distributed(_run, args=("bf16", True, None, 3), tp=2)
    none = run_distributed(_run, args=("bf16", True, LongActConfig(strategy="none"), 3), tp=2)
    for a, b in zip(plain, none):
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.mark.parametrize("min_view", [None, 0])
def test_unfrozen_entries_follow_plain_megatron_given_the_same_gradients(min_view):
    """One step from the same weights and batch without clipping: every entry LongAct does not
    freeze gets exactly the update plain megatron-core gives it (min_view=0: with the V rows
    stepped as one strided view)."""
    plain = run_distributed(_run, args=("bf16", True, None, 1, 0.0), dp=2)
    masked = run_distributed(_run, args=("bf16", True, FIXED, 1, 0.0, None, min_view), dp=2)
    for a, b in zip(plain, masked):
        for name, p in a["params"].items():
            q = b["params"][name]
            if name in b["keep_rows"]:
                keep = b["keep_rows"][name]
                assert (~keep).any()
                assert torch.equal(p[keep], q[keep]), name
                assert torch.equal(q[~keep], b["init"][name][~keep]), name
            else:
                assert torch.equal(p, q), name


def test_timed_steps_record_every_phase_and_change_nothing():
    """``enable_timing`` records each phase once per step (the mask changes every step, so the
    keep plans are rebuilt each time) and leaves the training bit-identical; the plain side's
    ``TorchStepTimer`` records its torch optimizer's step."""
    cfg = LongActConfig(keep_ratio=0.3)
    timed = run_distributed(_run, args=("bf16", True, cfg, 3, 1.0, 3000, None, True), dp=2)
    untimed = run_distributed(_run, args=("bf16", True, cfg, 3, 1.0, 3000), dp=2)
    plain = run_distributed(_run, args=("bf16", True, None, 2, 1.0, None, None, True))[0]
    for a, b in zip(timed, untimed):
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
        steps = a["phase_times"]
        assert list(steps) == ["end_step", "plans", "zero", "gather", "torch step", "scatter"], list(steps)
        assert all(len(v) == 3 and min(v) > 0 for v in steps.values()), steps
    assert list(plain["phase_times"]) == ["torch step"] and len(plain["phase_times"]["torch step"]) == 2
    assert min(plain["phase_times"]["torch step"]) > 0


def test_gradient_mode_drifts_as_documented():
    """apply_to=gradient zeroes gradients only: with a mask fixed from the first step the Adam
    moments of frozen entries stay zero, so their update is pure decoupled weight decay,
    main <- main * (1 - lr * wd) each step."""
    cfg = LongActConfig(schedule="fixed", apply_to="gradient")
    out = run_distributed(_run, args=("fp32", False, cfg, 3))[0]
    for t in out["targets"]:
        frozen = t["frozen"]
        main0 = out["init_main"][t["name"]].view(-1)[frozen]
        got = t["main"].view(-1)[frozen]
        assert not torch.equal(got, main0)
        torch.testing.assert_close(got, main0 * (1 - LR * WD) ** 3, rtol=1e-6, atol=0)


def _run_counting(runtime, steps, min_run=None, warmup=1, policy="default"):
    """Train with a mask recomputed every step after one full warm-up step (so frozen rows carry
    non-zero Adam moments from earlier steps); record, per step, how many elements the inner torch
    optimizers were handed and which entries of the main shards and moments changed.
    ``policy``: ``strided`` steps the V rows as one strided view however few they are;
    ``contiguous`` runs the inner AdamW's foreach (multi-tensor) path, as on a GPU, so LongAct
    hands it contiguous pieces only."""
    from functools import partial

    from megatron.core import parallel_state as ps

    import megatron_longact.longact.optimizer as longact_optimizer
    from megatron_longact.compat import inner_optimizers
    from megatron_longact.longact.optimizer import install

    if min_run is not None:  # step short runs of kept rows in place too (views, not copies)
        longact_optimizer.MIN_IN_PLACE_RUN = min_run
    if policy == "strided":
        longact_optimizer.MIN_STRIDED_VIEW = 0
    from megatron_longact.training.engine import setup_engine, train_step
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    train = TrainConfig(steps=steps, seq_length=32, micro_batch_size=2, global_batch_size=4, lr=LR,
                        weight_decay=WD, use_distributed_optimizer=True, ddp_bucket_size=3000)
    engine = setup_engine(_tiny("bf16"), train, runtime.parallel)
    if policy == "contiguous":
        for opt in inner_optimizers(engine.optimizer):
            for group in opt.optimizer.param_groups:
                group["foreach"] = True
    handle = install(engine.model, engine.optimizer, LongActConfig(warmup_steps=warmup, keep_ratio=0.3))
    assert all((t.strided_rows is None) == (policy == "contiguous") for t in handle._targets)
    stepped = []

    def count(opt, args, kwargs):  # registered after LongAct's hook: sees what the step sees
        stepped.append(sum(p.numel() for g in opt.param_groups for p in g["params"]
                           if p.grad is not None))

    for opt in inner_optimizers(engine.optimizer):
        opt.optimizer.register_step_pre_hook(count)
    total = sum(p.numel() for opt in inner_optimizers(engine.optimizer)
                for g in opt.optimizer.param_groups for p in g["params"])
    rows_by_weight = None
    out = []
    num_mb = train.num_microbatches(ps.get_data_parallel_world_size())
    for step in range(steps):
        before = []
        for t in handle._targets:
            st = t.ref.torch_optimizer.state.get(t.ref.main_param, {})
            before.append([t.ref.main_param.detach().clone()] +
                          [st[k].clone() for k in ("exp_avg", "exp_avg_sq") if k in st])
        stepped.clear()
        train_step(engine, partial(_forward_step, handle),
                   iter(micro_batches_for_step(step, engine, runtime.device)), num_mb,
                   train.seq_length, train.micro_batch_size)
        rows_by_weight = {id(m.weight): r for m, r in handle.longact.local_qkv_row_masks()}
        frozen_total, checks = 0, []
        for t, prev in zip(handle._targets, before):
            keep = rows_by_weight.get(id(t.ref.model_param)) if t.row_width > 1 else None
            if keep is None:
                continue
            start, n = t.ref.flat_start, t.ref.main_param.numel()
            frozen = (~keep).repeat_interleave(t.row_width)[start:start + n]
            frozen_total += int(frozen.sum())
            st = t.ref.torch_optimizer.state[t.ref.main_param]
            now = [t.ref.main_param.detach(), st["exp_avg"], st["exp_avg_sq"]]
            if len(prev) == 1:  # no state before this step: frozen moments must be created zero
                prev = prev + [torch.zeros_like(now[1]), torch.zeros_like(now[2])]
                fresh = True
            else:
                fresh = False
            checks.append(dict(
                frozen_same=all(torch.equal(a.view(-1)[frozen], b.view(-1)[frozen])
                                for a, b in zip(prev, now)),
                moments_nonzero=bool(not fresh and prev[1].view(-1)[frozen].any()),
                kept_moved=not torch.equal(prev[0].view(-1)[~frozen], now[0].view(-1)[~frozen])))
        views = [plan.strided is not None for plan, _ in handle._freeze_plans.values()]
        out.append(dict(stepped=sum(stepped), total=total, frozen=frozen_total, checks=checks,
                        strided_views=sum(views)))
    return out


@pytest.mark.parametrize("min_run,warmup,policy", [(None, 1, "default"), (64, 1, "default"),
                                                   (64, 0, "default"), (None, 1, "strided"),
                                                   (None, 1, "contiguous")])
def test_optimizer_steps_only_the_kept_rows(min_run, warmup, policy):
    """The inner torch optimizer is handed the kept rows only (frozen rows cost no optimizer work),
    and frozen rows that carry non-zero moments from earlier steps keep main values and moments to
    the bit while the mask changes every step; DP=2 with weights split mid-row. min_run=64 (one row
    of the tiny model) steps every kept run in place; warmup=0 creates the Adam state under a mask;
    strided: the V rows as one strided view; contiguous: a multi-tensor optimizer path, which gets
    no strided view."""
    results = run_distributed(_run_counting, args=(3, min_run, warmup, policy), dp=2)
    for per_step in results:
        assert all((s["strided_views"] > 0) == (policy == "strided") for s in per_step[warmup:])
        first = per_step[0]
        if warmup:
            assert first["frozen"] == 0 and first["stepped"] == first["total"]  # full update
        for s in per_step[warmup:]:
            assert s["frozen"] > 0
            assert s["stepped"] == s["total"] - s["frozen"], s
            for c in s["checks"]:
                assert c["frozen_same"] and c["kept_moved"], c
        assert any(c["moments_nonzero"] for s in per_step[1:] for c in s["checks"])


def _plan(start, n, width, keep, **kw):
    """The keep plan of one shard, as the handle makes them (a batch, here of one)."""
    from megatron_longact.longact.optimizer import _PlanBatch, _ShardRows

    return _PlanBatch([_ShardRows(start, n, width, keep.numel(), **kw)]).plans(keep.numpy()[None])[0]


@pytest.mark.parametrize("start,n,min_run", [(0, 40, 16), (3, 30, 16), (5, 2, 16), (13, 27, 8),
                                             (0, 40, 10 ** 6), (8, 5, 16), (10, 9, 16), (35, 5, 16)])
def test_keep_plan_covers_exactly_the_kept_entries(start, n, min_run):
    """Kept entries split into in-place runs (long runs of kept rows, kept partial edge rows) and
    gathered rows; together they cover every kept element once and no frozen one (width 8, rows
    0..4, rows 1 and 4 frozen: rows 2-3 form a run of 16 elements)."""
    from megatron_longact.longact.optimizer import squared_norm_sums

    width, keep = 8, torch.tensor([True, False, True, True, False])
    kept_elems = keep.repeat_interleave(width)[start:start + n]
    plan = _plan(start, n, width, keep, min_run=min_run)
    flat = torch.zeros(n)
    for view in plan.views(flat):
        view.add_(1.0)
    plan._mid(flat)[torch.from_numpy(plan.gather_rows)] += 1.0  # the compact rows
    assert torch.equal(flat, kept_elems.float())
    # Squared norms in one read: the whole shard's, and its frozen entries' (the logged fraction).
    values = torch.randn(n, generator=torch.Generator().manual_seed(start * 100 + n))
    total, frozen = squared_norm_sums(plan.row_norms(values), [plan.frozen_weights]).tolist()
    assert total == pytest.approx(float((values ** 2).sum()), rel=1e-6)
    assert frozen == pytest.approx(float((values[~kept_elems] ** 2).sum()), rel=1e-6, abs=1e-12)
    # bf16 gradients are read as they are (row norms rounded to bf16, 2^-7 on a square): vs fp64.
    values = values.bfloat16()
    total, frozen = squared_norm_sums(plan.row_norms(values), [plan.frozen_weights]).tolist()
    exact = values.double() ** 2
    assert total == pytest.approx(float(exact.sum()), rel=2 ** -6)
    assert frozen == pytest.approx(float(exact[~kept_elems].sum()), rel=2 ** -6, abs=1e-12)


@pytest.mark.parametrize("start,n", [(0, 12 * 8), (3, 12 * 8 - 3), (20, 50), (30, 40), (0, 30), (41, 6)])
def test_keep_plan_steps_the_v_rows_as_one_strided_view(start, n):
    """Rows given as ``strided_rows`` (the V rows: rows 2-3 of each block of 4) that lie whole in
    the shard's whole-row region become one strided view; V runs cut by the shard's ends, and
    everything else, are stepped as before. Together the pieces cover every kept element once.
    Below ``min_view`` elements the V rows are gathered with the others."""
    import numpy as np

    width = 8
    v_rows = np.tile([False, False, True, True], 3)
    keep = torch.from_numpy(v_rows | np.tile([True, False, False, False], 3))
    keep[5] = True  # a kept k row next to the V rows of its block
    kept_elems = keep.repeat_interleave(width)[start:start + n]
    plan = _plan(start, n, width, keep, min_run=10 ** 6, strided_rows=v_rows, min_view=0)
    flat = torch.zeros(n)
    for view in plan.views(flat):
        view.add_(1.0)
    plan._mid(flat)[torch.from_numpy(plan.gather_rows)] += 1.0
    assert torch.equal(flat, kept_elems.float())
    first_full, last_full = -(-start // width), (start + n) // width
    whole_v_runs = sum(1 for b in range(3) if first_full <= 4 * b + 2 and 4 * b + 4 <= last_full)
    if whole_v_runs:
        assert plan.strided is not None and plan.strided[1] == (whole_v_runs, 2 * width)
        assert not set(plan.gather_rows + first_full) & {4 * b + r for b in range(3) for r in (2, 3)
                                                         if first_full <= 4 * b + 2 and 4 * b + 4 <= last_full}
    else:  # at most one V run, cut by an end of the region: stepped as a view of its own
        assert plan.strided is None or plan.strided[1][0] == 1
    few = _plan(start, n, width, keep, min_run=10 ** 6, strided_rows=v_rows, min_view=3 * 2 * width + 1)
    assert few.strided is None and len(few.gather_rows) == int(keep[first_full:last_full].sum())


def test_keep_plans_of_a_batch_equal_the_plans_made_one_by_one():
    """The handle plans every target of a rank in one batch (shards of different widths, cut at
    different places, some lying inside one row, with and without a strided view, with long runs
    and without); each plan is the one its shard gets alone, and covers exactly its kept
    entries. A batch refuses a mask that freezes a row of a strided view."""
    import numpy as np

    from megatron_longact.longact.optimizer import _PlanBatch, _ShardRows

    rows, gen = 12, np.random.default_rng(0)
    v_rows = np.tile([False, False, True, True], 3)
    shards, keeps = [], []
    for width in (8, 1):
        for start, n in [(0, 96), (3, 93), (20, 50), (41, 6), (9, 2), (0, 12), (5, 4)]:
            if start + n > rows * width:
                continue
            for strided in (None, v_rows):
                shards.append(_ShardRows(start, n, width, rows, min_run=2 * width, strided_rows=strided,
                                         min_view=0))
                keeps.append(v_rows | (gen.random(rows) < 0.5))
    keep_TP = np.stack(keeps)
    batch = _PlanBatch(shards).plans(keep_TP)
    assert any(p.strided for p in batch) and any(len(p.runs) > 1 for p in batch)
    for shard, keep, plan in zip(shards, keep_TP, batch):
        alone = _PlanBatch([shard]).plans(keep[None])[0]
        assert plan.runs == alone.runs and plan.strided == alone.strided
        assert np.array_equal(plan.gather_rows, alone.gather_rows)
        assert torch.equal(plan.frozen_weights, alone.frozen_weights)
        flat = torch.zeros(shard.n)
        for view in plan.views(flat):
            view.add_(1.0)
        plan._mid(flat)[torch.from_numpy(plan.gather_rows)] += 1.0
        kept_elems = torch.from_numpy(keep).repeat_interleave(shard.width)[shard.start:shard.start + shard.n]
        assert torch.equal(flat, kept_elems.float())
        assert plan.frozen_weights.numel() == sum(x.numel() for x in shard.row_norms(flat))
    keep_TP[[i for i, p in enumerate(batch) if p.strided][0], 2] = False
    with pytest.raises(AssertionError, match="strided view"):
        _PlanBatch(shards).plans(keep_TP)


def test_strided_views_only_for_single_tensor_torch_adam():
    from megatron_longact.longact.optimizer import takes_strided_params

    p = [torch.nn.Parameter(torch.zeros(4))]
    assert takes_strided_params(torch.optim.AdamW(p))
    assert takes_strided_params(torch.optim.Adam(p, foreach=False))
    assert not takes_strided_params(torch.optim.AdamW(p, foreach=True))
    assert not takes_strided_params(torch.optim.SGD(p, lr=0.1))

    class FusedAdamLike(torch.optim.AdamW):  # e.g. a multi-tensor subclass: not assumed to take them
        pass

    assert not takes_strided_params(FusedAdamLike(p))
