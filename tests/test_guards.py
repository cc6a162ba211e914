"""Guards and GPU flags: no silent CPU run on a GPU node, fused kernels where TE runs, no reference
initialization before loading weights, evaluate() restores statistics collection."""

from pathlib import Path

import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.runtime.gpu_guard import OPT_IN, check_cpu_fallback, gpu_evidence
from tests.dist_harness import run_distributed

NO_SMI = dict(which=lambda name: None, devices=lambda pattern: [])


@pytest.mark.parametrize("env,probes,expected", [
    ({}, NO_SMI, []),
    ({"CUDA_VISIBLE_DEVICES": ""}, NO_SMI, []),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, NO_SMI, []),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, NO_SMI, ["CUDA_VISIBLE_DEVICES=0,1"]),
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, NO_SMI, ["SLURM_JOB_GPUS=0,1,2,3"]),
    ({}, dict(which=lambda name: "/usr/bin/nvidia-smi", devices=lambda p: []), ["nvidia-smi at /usr/bin/nvidia-smi"]),
    ({}, dict(which=lambda name: None, devices=lambda p: ["/dev/nvidia0"]), ["device nodes /dev/nvidia0"]),
])
def test_gpu_evidence(env, probes, expected):
    assert gpu_evidence(env, **probes) == expected


def test_cpu_fallback_needs_opt_in_on_a_gpu_node(monkeypatch):
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(ConfigError, match=r"SLURM_GPUS_ON_NODE=8.*MEGATRON_LONGACT_CPU=1"):
        check_cpu_fallback({"SLURM_GPUS_ON_NODE": "8"}, **NO_SMI)
    check_cpu_fallback({"SLURM_GPUS_ON_NODE": "8", OPT_IN: "1"}, **NO_SMI)
    check_cpu_fallback({}, **NO_SMI)


def test_initialize_refuses_the_cpu_path_on_a_gpu_node(monkeypatch):
    from megatron_longact.runtime import destroy, initialize

    monkeypatch.delenv(OPT_IN, raising=False)
    try:
        with pytest.raises(ConfigError, match="looks like a GPU node"):
            initialize(environ={"CUDA_VISIBLE_DEVICES": "0", "MASTER_PORT": "29517"})
    finally:
        destroy()


def _tiny_model_cfg(tmp):
    from tests.test_trainer import _config

    return _config(tmp, f"{tmp}/out").model


def test_fused_kernels_on_with_transformer_engine(monkeypatch, tmp_path):
    import importlib.util

    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import transformer_config as tc_module

    from megatron_longact.models import builder
    from megatron_longact.runtime import ParallelConfig

    seen = {}
    monkeypatch.setattr(tc_module, "TransformerConfig", lambda **kw: seen.update(kw) or kw)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object()
                        if name == "fused_weight_gradient_mlp_cuda" else real_find_spec(name, *a))
    cfg = _tiny_model_cfg(str(tmp_path))
    monkeypatch.setattr(builder, "use_transformer_engine", lambda c: True)
    builder.transformer_config(cfg, ParallelConfig())
    assert seen["gradient_accumulation_fusion"] and seen["apply_rope_fusion"]
    monkeypatch.setattr(builder, "use_transformer_engine", lambda c: False)
    builder.transformer_config(cfg, ParallelConfig())
    assert not seen["gradient_accumulation_fusion"] and not seen["apply_rope_fusion"]


def _skip_init_and_evaluate(runtime, tmp):
    from megatron_longact.training import engine as engine_module
    from megatron_longact.training.trainer import Trainer
    from tests.test_trainer import _config

    calls = []
    original = engine_module.reference_initialize
    engine_module.reference_initialize = lambda *a, **k: calls.append("init") or original(*a, **k)
    cfg = _config(tmp, f"{tmp}/out", **{"evaluation.lengths": "[160]", "evaluation.num_samples": 2})
    engine_module.setup_engine(cfg.model, cfg.train, runtime.parallel, initialize_weights=False)
    skipped = calls == []
    trainer = Trainer(cfg, runtime)
    initialized = calls == ["init"]
    trainer._start_rl()

    import dataclasses

    import megatron_longact.convert.checkpoint as weights

    weights.load_model_weights = lambda *a, **k: calls.append("load")
    loading = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                      load_weights=f"{tmp}/weights"))
    Trainer(loading, runtime)
    loaded_without_init = calls == ["init", "load"]

    import megatron_longact.generation as generation

    def broken(*a, **k):
        raise RuntimeError("generation failed")

    generation.generate = broken
    try:
        trainer.evaluate()
        raised = False
    except RuntimeError:
        raised = True
    return skipped, initialized, loaded_without_init, raised, trainer.handle.longact.collector.enabled


def test_weights_from_a_checkpoint_skip_init_and_evaluate_restores_collection(tmp_path):
    skipped, initialized, loaded_without_init, raised, collecting = run_distributed(
        _skip_init_and_evaluate, args=(str(tmp_path),))[0]
    assert skipped and initialized and raised
    assert loaded_without_init  # load_weights: no reference initialization before loading
    assert collecting  # statistics collection is back on although evaluation raised
