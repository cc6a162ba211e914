"""LongAct optimizer overhead, side by side in one process.

For each case, two engines with identical weights (bf16, DistributedOptimizer): one plain, one with
``megatron_longact.install``. Each iteration runs forward/backward on both (untimed), then times
``optimizer.step()`` of each, alternating which goes first. Cases:

- ``small``: the 30 M-parameter model (``configs/model/small.yaml``), every parameter trains;
- ``qwen3_8b_qkv``: one Qwen3-8B attention layer shape (hidden 4096, 32 heads, 8 groups, head dim
  128, so linear_qkv is 6144 x 4096) where only linear_qkv trains: the DistributedOptimizer step
  of that one weight;
- ``llama3_70b_qkv_tp8``: what one TP rank of Llama-3-70B at TP=8 holds of one attention layer
  (hidden 8192, 8 of the 64 heads, 1 of the 8 query groups, head dim 128: linear_qkv is
  1280 x 8192), built as a one-layer model of that shape in which only linear_qkv trains. A
  rank's share of the global top-k differs a little from rank to rank; this case's mask keeps the
  same 30% within the layer;
- ``tiny`` (only with ``--cases tiny``): the 0.2 M-parameter test model, dominated by per-op cost.

Each case runs twice, first with the host allocator as configured, then with freed memory kept
for reuse (``--allocator``; see ``_reuse_freed_memory``): the first flatters LongAct on the CPU,
the second is closer to what a GPU's caching allocator does.

Prints the median step times and their ratio LongAct/plain (target <= 1.00) with the memory
LongAct's compact optimizer state adds (the kept rows' moments and the value/gradient buffers),
then the bytes LongAct keeps between steps on one rank for a Llama-3-70B shape, taken from a real
``MaskState`` and ``StatsCollector`` (80 layers, 64 heads, 8 groups, head dim 128; TP=8, PP=4: 20
layers per rank).

With ``--phases`` it also prints, per case, where LongAct's step goes (medians, ms): its own
phases (statistics and top-k in ``end_step``, the keep plans, zeroing the frozen gradient rows
with the logged norm, the gathers before the torch optimizer steps, the scatter after it) and the
torch optimizer's own work, timed between the hooks, for the plain and the LongAct side: the
latter is what the skipped rows save.

Run: python benchmarks/optimizer_overhead.py [--iters 20] [--cases small,qwen3_8b_qkv,llama3_70b_qkv_tp8]
     [--allocator default,reuse] [--phases]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _case(name: str):
    from megatron_longact.models.config import ModelConfig
    from megatron_longact.run_config import load_run_config

    if name in ("small", "tiny"):
        return load_run_config(str(ROOT / f"configs/model/{name}.yaml")).model, None
    layer_cases = {"qwen3_8b_qkv": ("qwen3_8b", 1), "llama3_70b_qkv_tp8": ("llama3_70b", 8)}
    if name in layer_cases:
        config, tp = layer_cases[name]
        full = load_run_config(str(ROOT / f"configs/model/{config}.yaml")).model
        # One layer with the real attention shape (a TP rank's heads and query groups); a small
        # vocabulary and FFN keep the (untimed) forward/backward cheap. Only linear_qkv trains,
        # so the timed step is that weight's.
        cfg = dataclasses.replace(full, num_layers=1, ffn_hidden_size=256, vocab_size=263,
                                  max_position_embeddings=512,
                                  num_attention_heads=full.num_attention_heads // tp,
                                  num_query_groups=full.num_query_groups // tp)
        assert isinstance(cfg, ModelConfig)
        return cfg, (lambda n: n.endswith("self_attention.linear_qkv.weight"))
    raise ValueError(f"--cases: unknown case {name!r}; expected small, qwen3_8b_qkv, "
                     "llama3_70b_qkv_tp8 or tiny")


def measure(model_cfg, trainable, iters: int, seq: int, parallel, device, phases: bool = False):
    """Median plain and LongAct step times, trained parameter count, compact state bytes and
    linear_qkv moment bytes; with ``phases`` also the medians of LongAct's phases and of the torch
    optimizers' own work on both sides (``longact.timing``; on the CPU timing costs nothing)."""
    from megatron_longact.longact import LongActConfig
    from megatron_longact.longact.optimizer import install
    from megatron_longact.longact.timing import PhaseTimes, TorchStepTimer
    from megatron_longact.training.config import TrainConfig
    from megatron_longact.training.engine import forward_backward, setup_engine
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    train = TrainConfig(steps=iters + 3, seq_length=seq, micro_batch_size=2, global_batch_size=2,
                        lr=1e-3, weight_decay=0.1)
    plain = setup_engine(model_cfg, train, parallel, trainable=trainable)
    masked = setup_engine(model_cfg, train, parallel, trainable=trainable)
    handle = install(masked.model, masked.optimizer, LongActConfig())

    def fwd_bwd(engine, la, step):
        forward_backward(engine, partial(_forward_step, la),
                         iter(micro_batches_for_step(step, engine, device)), 1, seq, 2)

    times = {"plain": [], "longact": []}
    for step in range(iters + 3):
        fwd_bwd(plain, None, step)
        fwd_bwd(masked, handle, step)
        order = [("plain", plain), ("longact", masked)]
        if step % 2:
            order.reverse()
        if phases and step == 3:  # warm-up: optimizer state allocation
            longact_times, plain_times = handle.enable_timing(), PhaseTimes()
            TorchStepTimer(plain.optimizer, plain_times)
        for name, engine in order:
            t0 = time.perf_counter()
            engine.optimizer.step()
            if step >= 3:
                times[name].append(time.perf_counter() - t0)
        if phases and step >= 3:
            plain_times.close_step()
    trained = sum(p.numel() for p in masked.gpt_models[0].parameters() if p.requires_grad)
    qkv_moments = sum(2 * t.ref.main_param.numel() * 4 for t in handle._targets)
    out = (statistics.median(times["plain"]), statistics.median(times["longact"]), trained,
           handle.compact_state_bytes(), qkv_moments)
    if phases:
        split = {("torch step (LongAct)" if k == "torch step" else k): v
                 for k, v in longact_times.medians_ms().items()}
        out += (split | {"torch step (plain)": plain_times.medians_ms()["torch step"]},)
    del plain, masked, handle
    return out


def llama70b_state_bytes() -> tuple[int, int]:
    """Bytes LongAct keeps between steps on one rank for Llama-3-70B (TP=8, PP=4: 20 layers a
    stage), from the real objects (``persistent_state_bytes``): the global mask state with its
    current and previous mask (packed masks, churn, the EMA when ema > 0), what the controller
    keeps of the last step for its metrics (per-layer top/median and token counts; the full
    statistics only on heatmap steps) and this rank's statistics accumulators. Returns (default
    config, with ema=0.9)."""
    from megatron_longact.longact import LongActConfig
    from megatron_longact.longact.controller import persistent_state_bytes
    from megatron_longact.longact.layout import QKGeometry

    geo = QKGeometry(num_layers=80, num_heads=64, num_groups=8, head_dim=128)
    return tuple(persistent_state_bytes(cfg, geo, local_layers=20)
                 for cfg in (LongActConfig(), LongActConfig(ema=0.9)))


ALLOCATORS = {
    "default": "default (large temporaries are fresh pages each step: page faults)",
    "reuse": "reuse (M_MMAP_THRESHOLD/M_TRIM_THRESHOLD 1 GiB: freed memory is reused, no page faults)",
}


def _reuse_freed_memory() -> bool:
    """Make glibc serve large allocations from memory it keeps instead of fresh mmap'd pages.

    By default glibc maps allocations above a threshold (at most 32 MiB) afresh and unmaps them on
    free, so every large temporary of an optimizer step (Adam's ``denom``, a gathered copy) costs
    page faults on first touch, a cost proportional to its size that a GPU's caching allocator
    never pays. It inflates the plain step (whose temporaries are whole weights) more than
    LongAct's (whose temporaries are its kept rows), so both settings are printed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def main() -> int:
    from megatron_longact.errors import at_least
    from megatron_longact.runtime import ParallelConfig, destroy, initialize

    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=at_least(1), default=20)
    p.add_argument("--cases", default="small,qwen3_8b_qkv,llama3_70b_qkv_tp8")
    p.add_argument("--seq", type=at_least(8), default=64)
    p.add_argument("--allocator", default="default,reuse",
                   help="comma-separated, in this order: default (glibc as configured), reuse (freed "
                        "memory kept for reuse, as a GPU's caching allocator does)")
    p.add_argument("--phases", action="store_true",
                   help="also print where LongAct's step goes: its phases and the torch optimizers' own work")
    args = p.parse_args()
    allocators = [a for a in args.allocator.split(",") if a]
    for a in allocators:
        if a not in ALLOCATORS:
            p.error(f"--allocator: unknown {a!r}; expected default or reuse")
    if "reuse" in allocators and allocators[-1] != "reuse":
        p.error("--allocator: reuse cannot be undone in a process; put it last")
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        try:
            _case(c)  # fail on a bad name before building anything
        except ValueError as e:
            p.error(str(e))
    from benchmarks.alternate import StolenTime

    runtime = initialize(ParallelConfig(), seed=0)
    with StolenTime() as stolen:  # the timed cases
        print(f"{torch.get_num_threads()} threads, single process (DP=1, TP=1), median of {args.iters} "
              f"optimizer steps per case, LongAct defaults (keep_ratio 0.3, every_step)")
        print(f"  {'case':18s} {'trained params':>15s} {'plain ms':>10s} {'LongAct ms':>11s} {'ratio':>7s}")
        for allocator in allocators:
            if allocator == "reuse" and not _reuse_freed_memory():
                print("  (reuse: glibc's mallopt is not available here; skipped)")
                continue
            print(f" host allocator: {ALLOCATORS[allocator]}")
            for c in cases:
                cfg, trainable = _case(c)
                tp, tl, n, extra, qkv, *split = measure(cfg, trainable, args.iters, args.seq,
                                                        runtime.parallel, runtime.device, args.phases)
                print(f"  {c:18s} {n:15,d} {tp * 1e3:10.2f} {tl * 1e3:11.2f} {tl / tp:7.3f}"
                      f"   (target <= 1.00)   compact state + buffers {extra / 2**20:.1f} MiB "
                      f"= {extra / qkv:.0%} of the linear_qkv moments")
                if split:
                    print("    medians, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in split[0].items()))
    default, ema = llama70b_state_bytes()
    print(f"LongAct state kept between steps, Llama-3-70B shape, one rank (TP=8, PP=4): "
          f"{default:,} bytes (ema=0), {ema:,} bytes (ema=0.9)   (target <= 1,000,000)")
    print(stolen.describe())
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
