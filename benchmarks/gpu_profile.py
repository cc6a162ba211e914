"""Where the time goes on a CUDA GPU: the LongAct optimizer step, the statistics hooks and native
generation, on the shapes of ``launch/gpu_check.sh`` (one GPU, one rank).

For each part it prints the wall time of LongAct's phases (CUDA-synchronised around each) and
torch.profiler's operator table sorted by host time, plus the number of kernel launches, host syncs
and host-to-device copies per step: on a GPU a step that issues thousands of tiny operations is
bound by launches and syncs, not by arithmetic.

Run (CUDA only): python benchmarks/gpu_profile.py [--parts optimizer,stats,generation] [--out DIR]
(``MEGATRON_LONGACT_CPU=1`` runs it on the CPU runtime, with ``--seq 256``, to try the script.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial, wraps
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNTIME_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaStreamSynchronize",
                  "cudaDeviceSynchronize", "cudaMemsetAsync", "cudaMalloc", "cudaFree")


def _sync():
    from megatron_longact.longact.timing import synchronize

    synchronize()


class PhaseTimer:
    """Wraps methods so that each call is timed between two CUDA synchronisations."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.on = False

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        @wraps(fn)
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            _sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self.times.setdefault(label, []).append((time.perf_counter() - t0) * 1e3)

        setattr(obj, name, timed)

    def report(self) -> str:
        return "\n".join(f"  {k:<28} median {statistics.median(v):8.2f} ms over {len(v)} calls"
                         for k, v in self.times.items())


def _profile(fn, steps: int, title: str, out: Path, rows: int = 30) -> str:
    """fn() ``steps`` times under torch.profiler: the operator table and runtime-call counts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        _sync()
    avg = prof.key_averages()
    counts = {e.key: e.count for e in avg if e.key in RUNTIME_EVENTS}
    table = avg.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    if torch.cuda.is_available():
        table += "\n" + avg.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    text = (f"== {title}: {steps} step(s) profiled\n"
            + "  per step: " + ", ".join(f"{k} {v / steps:.0f}" for k, v in sorted(counts.items())) + "\n"
            + table)
    (out / f"{title}.txt").write_text(text)
    return text


def _optimizer(out: Path, seq: int) -> None:
    from megatron_longact import gpu_check
    from megatron_longact.longact import LongActConfig
    from megatron_longact.longact.compact_state import CompactRows
    from megatron_longact.longact.optimizer import LongActHandle, install
    from megatron_longact.training.engine import forward_backward
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    work = Path(tempfile.mkdtemp())
    runtime, cfg, train, setup_engine = gpu_check._big_engine(work, seq)
    plain = setup_engine(cfg.model, train, runtime.parallel)
    masked = setup_engine(cfg.model, train, runtime.parallel)
    timer = PhaseTimer()
    # class level, before install() registers the bound hooks
    timer.wrap(LongActHandle, "_compact", "compact (pre-hook)")
    timer.wrap(LongActHandle, "_expand", "expand (post-hook)")
    timer.wrap(LongActHandle, "_zero_frozen_grads", "zero frozen grads + norm")
    timer.wrap(LongActHandle, "_make_freeze_plans", "keep plans (all targets)")
    timer.wrap(CompactRows, "retarget", "retarget (one target)")
    handle = install(masked.model, masked.optimizer, LongActConfig())
    timer.wrap(handle.longact, "end_step", "end_step (statistics, top-k)")
    timer.wrap(masked.optimizer, "step", "LongAct step (total)")
    timer.wrap(plain.optimizer, "step", "plain step (total)")

    def fwd_bwd(engine, step):
        la = handle if engine is masked else None
        forward_backward(engine, partial(_forward_step, la),
                         iter(micro_batches_for_step(step, engine, runtime.device)), 1, seq, 1)

    for step in range(8):
        timer.on = step >= 3
        fwd_bwd(plain, step)
        fwd_bwd(masked, step)
        plain.optimizer.step()
        masked.optimizer.step()
    print("optimizer phases (Qwen3-0.6B shape):\n" + timer.report(), flush=True)
    timer.on = False
    fwd_bwd(plain, 9)
    print(_profile(plain.optimizer.step, 1, "optimizer_plain", out, rows=15), flush=True)
    fwd_bwd(masked, 9)
    print(_profile(masked.optimizer.step, 1, "optimizer_longact", out), flush=True)


def _stats(out: Path, seq: int) -> None:
    import torch

    from megatron_longact import gpu_check
    from megatron_longact.longact import LongAct, LongActConfig, LongActGroups

    work = Path(tempfile.mkdtemp())
    runtime, cfg, train, setup_engine = gpu_check._big_engine(work, seq)
    engine = setup_engine(cfg.model, train, runtime.parallel)
    model = engine.model[0]
    tokens = torch.randint(0, 263, (1, seq), device=runtime.device)
    pos = torch.arange(seq, device=runtime.device).unsqueeze(0)

    def step():
        model.zero_grad_buffer()
        model(tokens, pos, None, labels=tokens).float().mean().backward()

    for _ in range(2):
        step()
    print(_profile(step, 1, "fwd_bwd_plain", out, rows=15), flush=True)
    la = LongAct(LongActConfig(), engine.model, engine.tconfig, LongActGroups())
    la.begin_microbatch()
    step()
    la.end_step(0)
    la.begin_microbatch()
    print(_profile(step, 1, "fwd_bwd_longact_stats", out), flush=True)
    t0 = time.perf_counter()
    la.end_step(1)
    _sync()
    print(f"end_step after one micro-batch: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)


def _generation(out: Path) -> None:
    from megatron_longact import gpu_check
    from megatron_longact.generation import ModelParallelGroups, SamplingConfig, generate
    from megatron_longact.models.builder import build_model
    from megatron_longact.run_config import load_run_config
    from megatron_longact.training.engine import reference_initialize

    work = Path(tempfile.mkdtemp())
    runtime = gpu_check._init()
    cfg = load_run_config(gpu_check._model_yaml(work, "small", gpu_check.SMALL))
    model, _ = build_model(cfg.model, runtime.parallel)
    reference_initialize(model, cfg.model, 0)
    prompts = [[(7 * i + j) % 250 for j in range(512)] for i in range(16)]
    kwargs = dict(eos_id=262, pad_id=261, vocab_size=263, groups=ModelParallelGroups.from_parallel_state())
    generate(model, prompts[:2], SamplingConfig(temperature=0.0, max_new_tokens=4), **kwargs)
    for new in (1, 33):
        _sync()
        t0 = time.perf_counter()
        generate(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=new), **kwargs)
        _sync()
        print(f"generation, 16 x 512 prompts, {new} new tokens: {(time.perf_counter() - t0) * 1e3:.0f} ms",
              flush=True)
    print(_profile(lambda: generate(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=17),
                                    **kwargs), 1, "generation_17_tokens", out), flush=True)


PARTS = ("optimizer", "stats", "generation")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--out", default=".")
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts: got {args.parts!r}, expected a comma-separated subset of {','.join(PARTS)}")
    if args.seq < 128 or args.seq % 128:
        p.error(f"--seq: got {args.seq}, expected a multiple of 128")
    import torch

    if not torch.cuda.is_available() and os.environ.get("MEGATRON_LONGACT_CPU") != "1":
        print("gpu_profile: needs a CUDA GPU", file=sys.stderr)
        return 1
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if len(parts) > 1:  # one process per part: each initialises its own process group
        return max(subprocess.call([sys.executable, __file__, "--parts", part, "--seq", str(args.seq),
                                    "--out", args.out]) for part in parts)
    {"optimizer": lambda: _optimizer(out, args.seq), "stats": lambda: _stats(out, args.seq),
     "generation": lambda: _generation(out)}[parts[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
