"""LongAct statistics overhead and mask computation time.

1. Forward+backward of the tiny model (configs/model/tiny.yaml, bf16) at sequence length 2048 with
   LongAct statistics hooks on versus no hooks, alternated in one process; prints the median times
   and their ratio (target <= 1.03 on CPU).
2. Mask computation for a Llama-3-70B-shaped model (80 layers, 64 heads, 8 groups, head dim 128)
   from given statistics in one process: EMA update + top-k selection for every layer + the
   TP-local linear_qkv row masks of one TP=8 rank; prints the median time (target <= 50 ms).

Run: python benchmarks/stats_overhead.py [--seq 2048] [--iters 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_longact.longact import LongAct, LongActConfig, LongActGroups, QKGeometry  # noqa: E402
from megatron_longact.longact.state import MaskState  # noqa: E402
from megatron_longact.longact.stats import GlobalStats  # noqa: E402


def fwd_bwd_overhead(seq: int, iters: int, batch: int) -> tuple[float, float]:
    from megatron_longact.models.builder import build_model
    from megatron_longact.run_config import load_run_config
    from megatron_longact.runtime import initialize

    root = Path(__file__).resolve().parent.parent
    cfg = load_run_config(root / "configs/model/tiny.yaml")
    runtime = initialize(cfg.parallel, seed=0)
    model, tconfig = build_model(cfg.model, runtime.parallel)
    tokens = torch.randint(0, 256, (batch, seq))
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def step():
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(tokens, pos, None, labels=tokens)
        loss.float().mean().backward()
        return time.perf_counter() - t0

    for _ in range(2):
        step()  # warm-up
    off, on = [], []
    for i in range(iters):
        longact = None
        # alternate the order so drift of the machine does not favour one side
        for phase in (("off", "on") if i % 2 == 0 else ("on", "off")):
            if phase == "on":
                longact = LongAct(LongActConfig(), [model], tconfig, LongActGroups())
                longact.begin_microbatch()
                on.append(step())
                longact.end_step(i)
                longact.remove()
            else:
                off.append(step())
    return statistics.median(off), statistics.median(on)


def mask_time(iters: int) -> float:
    geo = QKGeometry(num_layers=80, num_heads=64, num_groups=8, head_dim=128)
    state = MaskState(LongActConfig(ema=0.9), geo)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(iters):
        stats = GlobalStats(torch.rand(80, geo.q_channels, generator=gen),
                            torch.rand(80, geo.k_channels, generator=gen), torch.ones(80))
        t0 = time.perf_counter()
        state.update(stats, i)
        rows_LP = geo.local_row_mask(state.q_keep_LC, state.k_keep_LC, 0, 8)
        times.append(time.perf_counter() - t0)
        assert tuple(rows_LP.shape) == (80, geo.qkv_rows // 8)
    return statistics.median(times)


def main() -> int:
    from megatron_longact.errors import at_least

    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=at_least(1), default=2048)
    p.add_argument("--batch", type=at_least(1), default=1)
    p.add_argument("--iters", type=at_least(1), default=10)
    args = p.parse_args()
    threads = torch.get_num_threads()
    off, on = fwd_bwd_overhead(args.seq, args.iters, args.batch)
    print(f"tiny model fwd+bwd, seq {args.seq}, batch {args.batch}, {threads} threads, "
          f"median of {args.iters}:")
    print(f"  statistics off {off * 1e3:8.1f} ms")
    print(f"  statistics on  {on * 1e3:8.1f} ms")
    print(f"  ratio on/off   {on / off:8.3f}   (target <= 1.03)")
    mt = mask_time(max(args.iters, 10))
    print(f"Llama-3-70B-shaped masks (80 x 64 heads x 8 groups x 128): {mt * 1e3:.1f} ms "
          f"(target <= 50 ms)")
    from megatron_longact.runtime import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
