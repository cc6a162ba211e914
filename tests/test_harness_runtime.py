"""The multi-rank test harness, distributed start-up and the model builder on real ranks."""

import time

import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.runtime import ParallelConfig, read_dist_env
from megatron_longact.runtime.distributed import _first_slurm_host
from tests.dist_harness import RankError, run_distributed


def _groups(runtime):
    from megatron.core import parallel_state as ps

    return dict(
        rank=torch.distributed.get_rank(),
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        pp=(ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        cp=(ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()),
        dp=(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        backend=runtime.backend,
        seq_par=runtime.parallel.sequence_parallel,
    )


def _fail_on_rank_one(runtime):
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom on purpose")
    return "ok"


def _sleep(runtime, seconds):
    time.sleep(seconds)


def _cp_sum(runtime):
    """A reduction over the context-parallel group: the CP group exists even though CP attention
    needs Transformer Engine."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(ps.get_context_parallel_rank() + 1)])
    torch.distributed.all_reduce(t, group=ps.get_context_parallel_group())
    return float(t)


def test_layout_builds_every_group():
    results = run_distributed(_groups, tp=2, pp=2, cp=1, dp=1)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert {r["tp"] for r in results} == {(0, 2), (1, 2)}
    assert {r["pp"] for r in results} == {(0, 2), (1, 2)}
    assert all(r["dp"] == (0, 1) and r["backend"] == "gloo" and r["seq_par"] is False for r in results)


def test_context_parallel_group_reduces():
    assert run_distributed(_cp_sum, cp=2) == [3.0, 3.0]


def test_exception_on_a_rank_is_reraised_with_its_rank():
    with pytest.raises(RankError, match=r"rank 1 failed:(.|\n)*ValueError: boom on purpose"):
        run_distributed(_fail_on_rank_one, dp=2)


def test_timeout_names_the_ranks():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 did not finish"):
        run_distributed(_sleep, args=(60,), timeout=8)


def _param_counts(runtime):
    from megatron_longact.models.builder import build_model
    from megatron_longact.models.config import ModelConfig

    out = []
    for extra in ({}, {"family": "qwen2", "qk_layernorm": False, "add_qkv_bias": True},
                  {"tie_word_embeddings": True}):
        kw = dict(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=96,
                  num_attention_heads=4, num_query_groups=2, head_dim=24, vocab_size=300,
                  max_position_embeddings=256, qk_layernorm=True)
        kw.update(extra)
        cfg = ModelConfig(**kw)
        model, _ = build_model(cfg, runtime.parallel)
        out.append((sum(p.numel() for p in model.parameters()), cfg.num_parameters()))
    return out


def test_built_models_have_the_planned_parameter_count():
    for built, planned in run_distributed(_param_counts)[0]:
        assert built == planned


def test_read_dist_env_sources():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1",
                         "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (3, 8, 3, "n1", "torchrun")
    env = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[007-008,011]", "SLURM_JOB_ID": "42"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 16, 1, "gpu007", "slurm")
    env = read_dist_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_slurm_nodelist_first_host():
    assert _first_slurm_host("node1,node2") == "node1"
    assert _first_slurm_host("a-b[10-12]") == "a-b10"


def test_parallel_config_resolution():
    assert ParallelConfig(tensor_model_parallel_size=2).resolve(8).data_parallel_size == 4
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size: got 0"):
        ParallelConfig(tensor_model_parallel_size=0)
