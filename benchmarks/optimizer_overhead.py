"""LongAct optimizer overhead on the tiny model, side by side in one process.

Two engines with identical weights (bf16, DistributedOptimizer): one plain, one with
``megatron_longact.install``. Each iteration runs forward/backward on both (untimed), then times
``optimizer.step()`` of each, alternating which goes first. Prints the median step times, their
ratio (target <= 1.05 on CPU) and the bytes LongAct keeps between steps on this rank (target: no
per-element mask of full weight size).

Run: python benchmarks/optimizer_overhead.py [--iters 30] [--config configs/model/tiny.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longact.longact import LongActConfig
    from megatron_longact.longact.optimizer import install
    from megatron_longact.run_config import load_run_config
    from megatron_longact.runtime import initialize
    from megatron_longact.training.config import TrainConfig
    from megatron_longact.training.engine import setup_engine
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--config", default=str(ROOT / "configs/model/tiny.yaml"))
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()

    cfg = load_run_config(args.config)
    runtime = initialize(cfg.parallel, seed=0)
    train = TrainConfig(steps=args.iters + 3, seq_length=args.seq, micro_batch_size=2,
                        global_batch_size=2, lr=1e-3, weight_decay=0.1)
    plain = setup_engine(cfg.model, train, runtime.parallel)
    masked = setup_engine(cfg.model, train, runtime.parallel)
    handle = install(masked.model, masked.optimizer, LongActConfig())

    def fwd_bwd(engine, la, step):
        for chunk in engine.model:
            chunk.zero_grad_buffer()
        engine.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=partial(_forward_step, la),
            data_iterator=iter(micro_batches_for_step(step, engine, runtime.device)),
            model=engine.model, num_microbatches=1, seq_length=args.seq, micro_batch_size=2,
            forward_only=False)

    def timed_step(engine):
        t0 = time.perf_counter()
        engine.optimizer.step()
        return time.perf_counter() - t0

    times = {"plain": [], "longact": []}
    for step in range(args.iters + 3):
        fwd_bwd(plain, None, step)
        fwd_bwd(masked, handle, step)
        order = [("plain", plain), ("longact", masked)]
        if step % 2:
            order.reverse()
        for name, engine in order:
            dt = timed_step(engine)
            if step >= 3:  # warm-up: optimizer state allocation
                times[name].append(dt)
    tp = statistics.median(times["plain"])
    tl = statistics.median(times["longact"])
    qkv = sum(layer.self_attention.linear_qkv.weight.numel()
              for layer in masked.gpt_models[0].decoder.layers)
    print(f"model {args.config}: tp={ps.get_tensor_model_parallel_world_size()} "
          f"dp={ps.get_data_parallel_world_size()}, {torch.get_num_threads()} threads, "
          f"median of {args.iters} optimizer steps")
    print(f"  plain megatron-core  {tp * 1e3:8.2f} ms")
    print(f"  with LongAct         {tl * 1e3:8.2f} ms")
    print(f"  ratio                {tl / tp:8.3f}   (target <= 1.05)")
    print(f"  LongAct state kept between steps: {handle.persistent_bytes():,} bytes on this rank "
          f"(a per-element fp32 mask of the local linear_qkv weights would be {qkv * 4:,} bytes)")
    from megatron_longact.runtime import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
