"""GPU acceptance check: does this stack work on this machine's NVIDIA GPUs?

    bash launch/gpu_check.sh [--gpus N] [--steps 3] [--seq 8192] [--only a,b] [--skip a,b] [--log-dir DIR]

Without CUDA it says so and exits 1 before running anything. With CUDA it runs each check below in
fresh worker processes (one per GPU where the check is distributed), times it, asserts its
result, and prints one table; the exit code is 0 only when every check that ran passed.

- ``nccl``: NCCL process group over all local GPUs; an all-reduce of CUDA tensors and of host
  scalars through :mod:`megatron_longact.runtime.collectives`.
- ``rl_tp1`` / ``rl_tpN``: the trainer for ``--steps`` RL steps in BF16 with LongAct at TP=1 and
  TP=number of GPUs; the W_Q/W_K rows that LongAct froze in a step must be bit-identical on CUDA.
- ``stats_overhead`` / ``optimizer_overhead``: a Qwen3-0.6B-shaped random model at ``--seq``,
  forward+backward with LongAct statistics on versus off, and the optimizer step with LongAct
  versus plain megatron-core, alternated in one process; the ratios are printed.
- ``optimizer_overhead_70b``: the same optimizer comparison on what one GPU of Llama-3-70B holds
  at TP=8, PP=8: 10 layers of a TP rank's shapes (8 of the 64 heads, 1 of the 8 query groups,
  hidden 8192, FFN 28672 / 8), every parameter training, at ``--seq`` up to 2048 (the optimizer
  step does not depend on it); about 55 GB for the two engines, skipped on a GPU with less than
  64 GiB free.
- ``generation``: greedy decoding tokens/s through megatron's KV cache.
- ``te_spec`` / ``fp8_step`` (when transformer_engine imports): one training step with the
  Transformer Engine layer spec in BF16, then one with FP8 (hybrid, delayed scaling).

Everything it needs is on PyPI (torch, megatron-core, optionally transformer-engine[pytorch]).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHECKS = ("nccl", "rl_tp1", "rl_tpN", "stats_overhead", "optimizer_overhead", "optimizer_overhead_70b",
          "generation", "te_spec", "fp8_step")
RESULT_TAG = "GPU_CHECK_RESULT "

# A Qwen3-0.6B-shaped model (28 layers, hidden 1024, 16 heads, 8 KV groups, head dim 128) with
# random weights and the byte tokenizer's vocabulary: realistic attention and MLP sizes.
QWEN3_0_6B = dict(family="qwen3", num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                  num_attention_heads=16, num_query_groups=8, head_dim=128, vocab_size=263,
                  max_position_embeddings=32768, rotary_base=1000000.0, qk_layernorm=True,
                  add_qkv_bias=False, tie_word_embeddings=True, norm_epsilon=1e-6,
                  params_dtype="bf16")
# One GPU's share of Llama-3-70B at TP=8, PP=8: 10 of the 80 layers, each with a TP rank's
# heads (8 of 64), query group (1 of 8) and FFN columns (28672 / 8); a small vocabulary, since
# the embedding and output layer live on the first and last stages only.
LLAMA3_70B_TP8_PP8_RANK = dict(family="llama3", num_layers=10, hidden_size=8192, ffn_hidden_size=3584,
                               num_attention_heads=8, num_query_groups=1, head_dim=128, vocab_size=263,
                               max_position_embeddings=8192, rotary_base=500000.0, qk_layernorm=False,
                               add_qkv_bias=False, tie_word_embeddings=False, norm_epsilon=1e-5,
                               params_dtype="bf16")
# A small model whose 8 heads and 8 groups split over TP = 1, 2, 4 or 8.
SMALL = dict(QWEN3_0_6B, num_layers=4, hidden_size=512, ffn_hidden_size=1024,
             num_attention_heads=8, num_query_groups=8, head_dim=64, max_position_embeddings=4096)


@dataclass
class Options:
    gpus: int | None = None
    steps: int = 3
    seq: int = 8192
    iters: int = 5
    timeout: int = 240
    log_dir: str | None = None
    checks: list[str] = field(default_factory=lambda: list(CHECKS))


def parse_args(argv: list[str]) -> Options:
    """Parse the command line; raise SystemExit(2) with one message on a bad value."""
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--steps", type=int, default=3, help="RL steps per trainer check")
    p.add_argument("--seq", type=int, default=8192, help="sequence length of the overhead checks")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per overhead side")
    p.add_argument("--timeout", type=int, default=240, help="seconds per check")
    p.add_argument("--only", default="", help="comma-separated checks to run")
    p.add_argument("--skip", default="", help="comma-separated checks to skip")
    p.add_argument("--log-dir", default=None,
                   help="write each worker's whole output to DIR/<check>.rank<N>.log")
    a = p.parse_args(argv)
    for name in ("gpus", "steps", "seq", "iters", "timeout"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name}: got {value}, expected a positive integer")
    if a.seq % 128:
        p.error(f"--seq: got {a.seq}, expected a multiple of 128")

    def names(text, flag):
        out = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in out if n not in CHECKS]
        if unknown:
            p.error(f"{flag}: unknown check(s) {', '.join(unknown)}; expected some of {', '.join(CHECKS)}")
        return out

    only, skip = names(a.only, "--only"), names(a.skip, "--skip")
    checks = [c for c in CHECKS if (not only or c in only) and c not in skip]
    if not checks:
        p.error("--only/--skip: no check left to run")
    return Options(gpus=a.gpus, steps=a.steps, seq=a.seq, iters=a.iters, timeout=a.timeout,
                   log_dir=a.log_dir, checks=checks)


def cuda_status() -> tuple[int, str]:
    """(number of CUDA devices torch sees, a reason when it is 0)."""
    import torch

    if not torch.cuda.is_available():
        return 0, (f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device; "
                   "this check needs NVIDIA GPUs, a CUDA build of torch and a working driver")
    return torch.cuda.device_count(), ""


def format_table(rows: list[dict]) -> str:
    """rows: {"check", "status", "seconds", "detail"} -> an aligned plain-text table."""
    header = ("check", "status", "seconds", "detail")
    cells = [header] + [(r["check"], r["status"], "-" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                         r.get("detail", "")) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(3)]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(str(c[j]).ljust(widths[j]) for j in range(3)) + "  " + str(c[3]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def parse_result(output: str) -> dict | None:
    """The worker's last result line (``GPU_CHECK_RESULT {json}``), or None."""
    found = None
    for line in output.splitlines():
        if line.startswith(RESULT_TAG):
            found = json.loads(line[len(RESULT_TAG):])
    return found


def tp_for(gpus: int) -> int:
    """The largest TP <= gpus that splits SMALL's 8 heads and 8 groups."""
    return max(t for t in (1, 2, 4, 8) if t <= gpus)


# ------------------------------------------------------------------------------------------------
# Parent: launch workers, collect, tabulate

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(check: str, world: int, opts: Options, workdir: str) -> dict:
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("MEGATRON_LONGACT_CPU", None)
        cmd = [sys.executable, "-m", "megatron_longact.gpu_check", "--worker", check,
               "--workdir", workdir, "--opts", json.dumps(opts.__dict__)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    timed_out = False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, opts.timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            out, _ = p.communicate()
        outputs.append(out or "")
    seconds = time.monotonic() - t0
    if opts.log_dir:
        Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
        for rank, out in enumerate(outputs):
            (Path(opts.log_dir) / f"{check}.rank{rank}.log").write_text(out)
    result = parse_result(outputs[0])
    if timed_out:
        return {"check": check, "status": "FAIL", "seconds": seconds, "detail": f"timed out after {opts.timeout} s"}
    bad = [r for r, p in enumerate(procs) if p.returncode != 0]
    if result is None or bad:
        tail = next((o for r, o in enumerate(outputs) if r in bad), outputs[0]).strip().splitlines()[-3:]
        return {"check": check, "status": "FAIL", "seconds": seconds,
                "detail": f"ranks {bad or [0]} failed: " + " | ".join(tail)}
    return {"check": check, "status": result.get("status", "PASS"), "seconds": seconds,
            "detail": result.get("detail", "")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return _worker_main(argv[1:])
    opts = parse_args(argv)
    count, reason = cuda_status()
    if count == 0:
        print(f"gpu_check: {reason}. Nothing was run.", file=sys.stderr)
        return 1
    gpus = min(opts.gpus or count, count)
    te = _te_importable()
    rows = []
    print(f"gpu_check: {gpus} GPU(s), Transformer Engine {'importable' if te else 'not importable'}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for check in opts.checks:
            if check in ("te_spec", "fp8_step") and not te:
                rows.append({"check": check, "status": "SKIP", "seconds": None,
                             "detail": "transformer_engine is not importable"})
                continue
            if check == "rl_tpN" and tp_for(gpus) == 1:
                rows.append({"check": check, "status": "SKIP", "seconds": None, "detail": "one GPU: same as rl_tp1"})
                continue
            world = gpus if check == "nccl" else tp_for(gpus) if check == "rl_tpN" else 1
            rows.append(_launch(check, world, opts, workdir))
            r = rows[-1]
            print(f"  {check}: {r['status']} ({r['seconds']:.1f} s) {r['detail']}", flush=True)
    print(format_table(rows))
    return 0 if all(r["status"] in ("PASS", "SKIP") for r in rows) else 1


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Workers (one process per rank; RANK/WORLD_SIZE/MASTER_* set by the parent)

def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("check", choices=CHECKS)
    p.add_argument("--workdir", required=True)
    p.add_argument("--opts", required=True)
    a = p.parse_args(argv)
    opts = Options(**json.loads(a.opts))
    result = WORKERS[a.check](opts, Path(a.workdir))
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def _sync():
    from megatron_longact.longact.timing import synchronize

    synchronize()  # the workers also run on the CPU runtime, to try them: nothing to wait for


def _model_yaml(workdir: Path, name: str, model: dict) -> Path:
    import yaml

    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return path


def _init(tp: int = 1):
    from megatron_longact.runtime import ParallelConfig, initialize

    return initialize(ParallelConfig(tensor_model_parallel_size=tp), seed=1234)


def _check_nccl(opts: Options, workdir: Path) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_longact.runtime import collectives

    runtime = _init()
    assert runtime.backend == "nccl", runtime.backend
    world, rank = dist.get_world_size(), dist.get_rank()
    t = torch.full((1024,), float(rank), device=runtime.device)
    collectives.all_reduce(t)
    want = world * (world - 1) / 2
    assert torch.all(t == want).item(), f"all-reduce gave {t[0].item()}, expected {want}"
    host = collectives.all_reduce_values([1.0, float(rank)], None, op="sum")  # built on the host
    assert host == [float(world), want], host
    return {"status": "PASS", "detail": f"{world} ranks, all-reduce of CUDA tensors and host scalars"}


def _check_rl(tp: int):
    def run(opts: Options, workdir: Path) -> dict:
        import torch

        from megatron_longact.run_config import load_run_config
        from megatron_longact.training.trainer import Trainer

        runtime = _init(tp)
        model_yaml = _model_yaml(workdir, "small", SMALL)
        run_yaml = workdir / f"rl_tp{tp}.yaml"
        run_yaml.write_text(f"include: {model_yaml}\n")
        over = {"parallel.tensor_model_parallel_size": tp, "train.mode": "rl", "train.steps": opts.steps,
                "train.micro_batch_size": 4, "train.lr": 1e-3, "sft.steps": 0,
                "data.ruler.num_samples": 64, "data.ruler.template": "compact",
                "data.ruler.number_digits": 3, "data.ruler.lengths": "[160]",
                "data.ruler.tasks": "[niah_single_1]", "rl.group_size": 4, "rl.prompts_per_step": 4,
                "rl.max_new_tokens": 16, "rl.reward.function": "megatron_longact.gpu_check:byte_value_score",
                "checkpoint.resume": "none", "checkpoint.interval": 0,
                "output.dir": str(workdir / f"out_tp{tp}")}
        cfg = load_run_config(run_yaml, [f"{k}={v}" for k, v in over.items()])
        trainer = Trainer(cfg, runtime)
        original = trainer.rl_step
        frozen_checked, kept_moved = [], []

        def rl_step_checked():
            gpt = trainer.engine.gpt_models[0]
            before = [layer.self_attention.linear_qkv.weight.detach().clone() for layer in gpt.decoder.layers]
            metrics = original()
            masks = trainer.handle.longact.local_qkv_row_masks()
            assert masks, "LongAct computed no mask"
            for (module, keep_P), w0 in zip(masks, before):
                assert module.weight.device.type == runtime.device.type, module.weight.device
                frozen = ~keep_P.to(w0.device)
                assert torch.equal(module.weight.detach()[frozen], w0[frozen]), "a frozen row moved"
                # Kept rows move whenever the step had a gradient (all-equal rewards give none).
                kept_moved.append(not torch.equal(module.weight.detach()[~frozen], w0[~frozen]))
                frozen_checked.append(int(frozen.sum()))
            return metrics

        trainer.rl_step = rl_step_checked
        history = trainer.run()
        assert len(history) == opts.steps and all(v == v for h in history for v in h.values()), "NaN"
        # The reward differs between the rows of a group, so every step has a gradient: a freeze
        # that froze everything (or an optimizer that stepped nothing) would pass the check above.
        assert any(kept_moved), f"no kept W_Q/W_K row moved in {len(kept_moved)} layer-steps"
        return {"status": "PASS", "detail": f"TP={tp}, {opts.steps} RL steps, bf16, frozen rows "
                                            f"bit-identical ({sum(frozen_checked)} row checks), kept "
                                            f"rows moved in {sum(kept_moved)}/{len(kept_moved)} layer-steps, "
                                            f"reward {history[-1].get('rl/reward', float('nan')):.3f}"}
    return run


def byte_value_score(response: str, record) -> float:
    """The rl checks' reward: the mean character code of the response, each capped at 255, over
    255: in [0, 1]. A random model's responses differ in it, so every group has non-zero
    advantages."""
    if not response:
        return 0.0
    return sum(min(ord(c), 255) for c in response) / (255.0 * len(response))


def _median_ms(fn, iters: int) -> float:
    import statistics

    times = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _big_engine(workdir: Path, seq: int, name: str = "qwen3_0_6b", model: dict | None = None):
    from megatron_longact.run_config import load_run_config
    from megatron_longact.training.config import TrainConfig
    from megatron_longact.training.engine import setup_engine

    runtime = _init()
    cfg = load_run_config(_model_yaml(workdir, name, QWEN3_0_6B if model is None else model))
    train = TrainConfig(steps=100, seq_length=seq, micro_batch_size=1, global_batch_size=1, lr=1e-4,
                        weight_decay=0.1)
    return runtime, cfg, train, setup_engine


def _check_stats_overhead(opts: Options, workdir: Path) -> dict:
    import torch

    from megatron_longact.longact import LongAct, LongActConfig, LongActGroups

    runtime, cfg, train, setup_engine = _big_engine(workdir, opts.seq)
    engine = setup_engine(cfg.model, train, runtime.parallel)
    model = engine.model[0]
    tokens = torch.randint(0, 263, (1, opts.seq), device=runtime.device)
    pos = torch.arange(opts.seq, device=runtime.device).unsqueeze(0)

    def step():
        model.zero_grad_buffer()
        model(tokens, pos, None, labels=tokens).float().mean().backward()

    # One controller, its statistics switched on and off per step as the trainer does between
    # update passes and rollouts (hooks stay registered; off, they return at once).
    la = LongAct(LongActConfig(), engine.model, engine.tconfig, LongActGroups())
    for on_ in (False, True):
        la.set_collecting(on_)
        la.begin_microbatch()
        step()
    la.end_step(0)
    off, on = [], []
    for i in range(opts.iters):
        for phase in (("off", "on") if i % 2 == 0 else ("on", "off")):
            la.set_collecting(phase == "on")
            la.begin_microbatch()
            (on if phase == "on" else off).append(_median_ms(step, 1))
            if phase == "on":
                la.end_step(i + 1)
    la.remove()
    import statistics

    a, b = statistics.median(off), statistics.median(on)
    return {"status": "PASS", "detail": f"Qwen3-0.6B shape, seq {opts.seq}: fwd+bwd {a:.1f} ms off, "
                                        f"{b:.1f} ms on, ratio {b / a:.3f}"}


def _check_optimizer_overhead(opts: Options, workdir: Path, name: str = "qwen3_0_6b",
                              model: dict | None = None, label: str = "Qwen3-0.6B shape") -> dict:
    from functools import partial

    from megatron_longact.longact import LongActConfig
    from megatron_longact.longact.optimizer import install
    from megatron_longact.longact.timing import PhaseTimes, TorchStepTimer
    from megatron_longact.training.engine import forward_backward
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    runtime, cfg, train, setup_engine = _big_engine(workdir, opts.seq, name, model)
    plain = setup_engine(cfg.model, train, runtime.parallel)
    masked = setup_engine(cfg.model, train, runtime.parallel)
    handle = install(masked.model, masked.optimizer, LongActConfig())

    def fwd_bwd(engine, la, step):
        forward_backward(engine, partial(_forward_step, la),
                         iter(micro_batches_for_step(step, engine, runtime.device)), 1, opts.seq, 1)

    times = {"plain": [], "longact": []}
    for step in range(opts.iters + 2):
        fwd_bwd(plain, None, step)
        fwd_bwd(masked, handle, step)
        order = [("plain", plain), ("longact", masked)]
        if step % 2:
            order.reverse()
        for name, engine in order:
            ms = _median_ms(engine.optimizer.step, 1)
            if step >= 2:
                times[name].append(ms)
    import statistics

    a, b = statistics.median(times["plain"]), statistics.median(times["longact"])
    # Where the LongAct step goes, in further steps: timing synchronises at each phase boundary,
    # so it stays out of the totals above.
    phases, plain_times = handle.enable_timing(), PhaseTimes()
    TorchStepTimer(plain.optimizer, plain_times)
    for step in range(opts.iters + 2, opts.iters + 5):
        for engine, la in ((plain, None), (masked, handle)):
            fwd_bwd(engine, la, step)
            engine.optimizer.step()
        plain_times.close_step()
    split = ", ".join(f"{k} {v:.1f}" for k, v in phases.medians_ms().items())
    return {"status": "PASS", "detail": f"{label}: optimizer step {a:.1f} ms plain, {b:.1f} ms "
                                        f"LongAct, ratio {b / a:.3f}; LongAct phases, synchronised, ms: "
                                        f"{split} (plain's torch step "
                                        f"{plain_times.medians_ms()['torch step']:.1f})"}


def _check_optimizer_overhead_70b(opts: Options, workdir: Path) -> dict:
    import dataclasses

    import torch

    # Two engines of 1.07 B parameters at 18 bytes each (bf16 weight, fp32 gradient, main weight
    # and two moments) plus one engine's activations and Adam's temporaries: about 55 GB.
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    if free is not None and free < 64 * 2**30:
        return {"status": "SKIP", "detail": f"{free / 2**30:.0f} GiB free on the GPU; this check needs 64 GiB"}
    return _check_optimizer_overhead(dataclasses.replace(opts, seq=min(opts.seq, 2048)), workdir,
                                     "llama3_70b_tp8_pp8_rank", LLAMA3_70B_TP8_PP8_RANK,
                                     "Llama-3-70B TP=8 PP=8 rank (10 layers)")


def _check_generation(opts: Options, workdir: Path) -> dict:
    from megatron_longact.generation import ModelParallelGroups, SamplingConfig, generate
    from megatron_longact.models.builder import build_model
    from megatron_longact.run_config import load_run_config
    from megatron_longact.training.engine import reference_initialize

    runtime = _init()
    cfg = load_run_config(_model_yaml(workdir, "small", SMALL))
    model, _ = build_model(cfg.model, runtime.parallel)
    reference_initialize(model, cfg.model, 0)
    prompts = [[(7 * i + j) % 250 for j in range(512)] for i in range(16)]
    new = 128
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=new)
    kwargs = dict(eos_id=262, pad_id=261, vocab_size=263, groups=ModelParallelGroups.from_parallel_state())
    generate(model, prompts[:2], SamplingConfig(temperature=0.0, max_new_tokens=4), **kwargs)  # warm-up
    _sync()
    t0 = time.perf_counter()
    out = generate(model, prompts, sampling, **kwargs)
    _sync()
    dt = time.perf_counter() - t0
    produced = int(out.response_lengths.sum())
    assert produced > 0
    return {"status": "PASS", "detail": f"small model, 16 x 512-token prompts: {produced / dt:.0f} new tokens/s"}


def _te_step(opts: Options, workdir: Path, fp8: str) -> dict:
    import dataclasses

    from functools import partial

    from megatron_longact.models.builder import use_transformer_engine
    from megatron_longact.run_config import load_run_config
    from megatron_longact.training.config import TrainConfig
    from megatron_longact.training.engine import setup_engine, train_step
    from megatron_longact.training.lm import _forward_step, micro_batches_for_step

    runtime = _init()
    cfg = load_run_config(_model_yaml(workdir, "small", SMALL))
    model_cfg = dataclasses.replace(cfg.model, transformer_impl="transformer_engine", fp8=fp8)
    assert use_transformer_engine(model_cfg)
    train = TrainConfig(steps=3, seq_length=1024, micro_batch_size=2, global_batch_size=2, lr=1e-4)
    engine = setup_engine(model_cfg, train, runtime.parallel)
    name = type(engine.gpt_models[0].decoder.layers[0].self_attention.linear_qkv).__name__
    assert name.startswith("TE"), f"linear_qkv is {name}, expected a Transformer Engine module"
    out = train_step(engine, partial(_forward_step, None),
                     iter(micro_batches_for_step(0, engine, runtime.device)), 1, 1024, 2)
    loss = float(out["losses"][0]["lm_loss"])
    assert loss == loss and out["grad_norm"] == out["grad_norm"], "NaN loss or grad norm"
    return {"status": "PASS", "detail": f"{name}, fp8={fp8}: loss {loss:.3f}, grad norm {out['grad_norm']:.3f}"}


WORKERS = {
    "nccl": _check_nccl,
    "rl_tp1": _check_rl(1),
    "rl_tpN": lambda opts, workdir: _check_rl(int(os.environ["WORLD_SIZE"]))(opts, workdir),
    "stats_overhead": _check_stats_overhead,
    "optimizer_overhead": _check_optimizer_overhead,
    "optimizer_overhead_70b": _check_optimizer_overhead_70b,
    "generation": _check_generation,
    "te_spec": lambda opts, workdir: _te_step(opts, workdir, "none"),
    "fp8_step": lambda opts, workdir: _te_step(opts, workdir, "hybrid"),
}


if __name__ == "__main__":
    sys.exit(main())
