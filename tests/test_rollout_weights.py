"""The weights an inference engine receives: the HF tensors gathered from any (TP, PP, CP) layout
equal those of a single process, land in host memory on the replica's host only, and never put
more than one full parameter on a rank at a time (they are moved to host memory one by one)."""

from pathlib import Path

import torch

from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _gather(runtime, dtype):
    from megatron_longact.models.builder import build_model
    from megatron_longact.rollout.weights import EngineGroups, gather_hf_weights
    from megatron_longact.run_config import load_run_config
    from megatron_longact.training.engine import reference_initialize

    cfg = load_run_config(ROOT / "configs/model/tiny.yaml", [f"model.params_dtype={dtype}"]).model
    model, _ = build_model(cfg, runtime.parallel)
    reference_initialize(model, cfg, seed=7)
    groups = EngineGroups.from_parallel_state()
    groups.check()
    items = gather_hf_weights([model], cfg, groups)
    # Gathering again into the host's tensors (as the vLLM engine's shared-memory pushes do)
    # writes every HF tensor in place and returns those very tensors.
    into = None if items is None else {n: torch.zeros_like(t) for n, t in items}
    again = gather_hf_weights([model], cfg, groups, into=into)
    if items is None:
        assert again is None
        return runtime.rank, None
    assert all(t.device.type == "cpu" for _, t in items)
    assert [n for n, _ in again] == [n for n, _ in items]
    for (name, a), (_, b) in zip(items, again):
        assert b is into[name] and torch.equal(a, b), name
    return runtime.rank, [(n, t.clone()) for n, t in items]


def test_engine_weights_are_layout_independent_and_only_on_the_host():
    (_, ref), = run_distributed(_gather, args=("bf16",))
    names = [n for n, _ in ref]
    assert len(names) == len(set(names)) and "model.layers.3.self_attn.k_proj.weight" in names
    results = run_distributed(_gather, args=("bf16",), tp=2, pp=2)
    hosts = [(rank, items) for rank, items in results if items is not None]
    assert [rank for rank, _ in hosts] == [0]  # TP rank 0 of stage 0
    got = hosts[0][1]
    assert [n for n, _ in got] == names
    for (name, a), (_, b) in zip(ref, got):
        assert torch.equal(a, b), name
