"""longact-plan: layout validation, the memory estimate on the shipped configs, and parameter
counts checked against models megatron actually builds (tiny and small shapes, TP=2 and PP=2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_longact.cli import plan as plan_cli
from megatron_longact.config import ConfigError
from megatron_longact.models.config import ModelConfig
from megatron_longact.plan import (
    GiB,
    PlanOptions,
    layer_activation_bytes,
    make_plan,
    rank_parameters,
)
from megatron_longact.run_config import load_run_config
from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _run(name: str, *overrides: str):
    return load_run_config(CONFIGS / name, list(overrides))


# ---------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------

def test_70b_64k_fits_80gb_under_its_layout():
    run = _run("llama3_70b_grpo_64k.yaml")
    plan = make_plan(run, nodes=8, gpus_per_node=8, opts=PlanOptions(reference_model=True))
    assert (plan.tp, plan.pp, plan.cp, plan.dp) == (8, 4, 2, 1)
    assert plan.fits, [s.peak / GiB for s in plan.stages]
    assert plan.worst.peak < 0.9 * 80 * GiB
    # Honest, not empty: weights + fp32 grads + optimizer shard alone are > 25 GiB per GPU.
    stage0 = plan.stages[0]
    assert sum(stage0.static[k] for k in ("weights", "gradients", "optimizer")) > 25 * GiB
    # ~70.55 B parameters over TP 8 x PP 4, the embedding on stage 0.
    assert stage0.parameters == rank_parameters(run.model, 8, 4, 0)
    assert 2.2e9 < stage0.parameters < 2.3e9
    # More data parallelism only shrinks the optimizer shard.
    bigger = make_plan(run, nodes=16, gpus_per_node=8, opts=PlanOptions(reference_model=True))
    assert bigger.dp == 2 and bigger.worst.peak < plan.worst.peak
    # Its rollouts come from a colocated vLLM engine (sleep mode): 30% of each of stage 0's GPUs
    # while it generates and syncs, plus the sync's transient (two full 128256 x 8192 bf16
    # vocabulary matrices) on every GPU.
    sync = 2 * 128256 * 8192 * 2
    assert plan.stages[0].phases["vLLM rollout and weight sync"] == int(0.3 * 80 * GiB) + sync
    assert [st.phases["vLLM rollout and weight sync"] for st in plan.stages[1:]] == [sync] * 3
    assert "vLLM engine" not in plan.stages[0].static and plan.refusals == []
    assert "3 sequence(s) of 65536 tokens at once" in plan.numbers["rollout"]
    # Host memory of the weight pushes: one engine (TP 8) on the first node; a push gathers the
    # whole model there (70.55 B x 2 B) and writes it once more as a file in /dev/shm.
    from megatron_longact.plan import vllm_host_memory

    host = vllm_host_memory(run, 8, 2, 1, 8)
    assert host["weights"] == run.model.num_parameters() * 2 and 1.40e11 < host["weights"] < 1.42e11
    assert (host["engines_per_node"], host["held"], host["push"]) == (1, 0, 2 * host["weights"])
    assert plan.numbers["host memory"].startswith("weight pushes to the vLLM engines, 1 engine(s) on the "
                                                  "fullest node: 262.83 GiB of host memory")
    # The native engine cannot generate under CP=2: refused, as by the trainer.
    native = make_plan(_run("llama3_70b_grpo_64k.yaml", "rollout.engine=megatron"), 8, 8)
    assert native.refusals == ["parallel.context_parallel_size: 2 with RL rollouts: native generation "
                               "does not run under context parallelism; use rollout.engine: vllm"]


def test_vllm_engine_memory_without_sleep_and_too_small_a_share():
    run = _run("llama3_70b_grpo_64k.yaml", "rollout.enable_sleep_mode=false")
    plan = make_plan(run, 8, 8)
    # Without sleep mode the engine's share is held through the whole step on stage 0's GPUs.
    assert plan.stages[0].static["vLLM engine"] == int(0.3 * 80 * GiB)
    assert "vLLM engine" not in plan.stages[1].static and plan.refusals == []
    # 20% of an 80 GiB GPU cannot hold the engine's weights (70.55 B x 2 B / TP 8 = 16.4 GiB) and
    # the KV cache of one 64k sequence: vLLM would not start, so the plan is refused.
    small = make_plan(_run("llama3_70b_grpo_64k.yaml", "rollout.gpu_memory_utilization=0.2"), 8, 8)
    assert len(small.refusals) == 1 and small.refusals[0].startswith(
        "rollout.gpu_memory_utilization: 0.2 gives the vLLM engine 16.00 GiB per GPU")
    wide = make_plan(_run("llama3_70b_grpo_64k.yaml", "rollout.tensor_parallel_size=16"), 8, 8)
    assert any(r.startswith("rollout.tensor_parallel_size: 16 is more than the 8 GPUs") for r in wide.refusals)


def test_vllm_host_memory_counts_the_engines_of_a_node():
    """Replica hosts are global ranks TP x CP x replica: Qwen3-8B at TP 4 puts two on each node
    of 8 GPUs. With engine TP 1 the pushed weights stay in shared memory between pushes."""
    from megatron_longact.plan import vllm_host_memory

    run = _run("qwen3_8b_grpo.yaml")
    weights = run.model.num_parameters() * 2
    assert vllm_host_memory(run, 4, 1, 4, 8) == dict(weights=weights, shared=False, engines_per_node=2,
                                                     held=0, push=4 * weights)
    shared = _run("qwen3_8b_grpo.yaml", "rollout.tensor_parallel_size=1")
    assert vllm_host_memory(shared, 4, 1, 4, 8) == dict(weights=weights, shared=True, engines_per_node=2,
                                                        held=2 * weights, push=2 * weights)
    # TP 1 x DP 16 on two nodes: every GPU hosts an engine, eight a node.
    assert vllm_host_memory(shared, 1, 1, 16, 8)["engines_per_node"] == 8
    plan = make_plan(shared, 2, 8)
    assert "all of it shared memory (/dev/shm) kept between pushes" in plan.numbers["host memory"]


def test_fp8_and_8b_configs_fit():
    fp8 = make_plan(_run("llama3_70b_grpo_64k_fp8.yaml"), 8, 8,
                    PlanOptions(reference_model=True, fp8=True))
    assert fp8.fits and "fp8 weight copies" in fp8.stages[0].static
    for nodes, dp in ((1, 2), (2, 4)):
        plan = make_plan(_run("qwen3_8b_grpo.yaml"), nodes, 8, PlanOptions(reference_model=True))
        assert plan.fits and plan.dp == dp and (plan.tp, plan.pp, plan.cp) == (4, 1, 1)


def test_70b_without_recomputation_or_on_too_few_gpus_does_not_fit():
    selective = make_plan(_run("llama3_70b_grpo_64k.yaml", "model.recompute=selective"), 8, 8)
    assert not selective.fits
    small = make_plan(_run("llama3_70b_grpo_64k.yaml", "parallel.pipeline_model_parallel_size=2",
                           "parallel.context_parallel_size=1"), 2, 8)
    assert not small.fits


@pytest.mark.parametrize("config,overrides,nodes,message", [
    ("llama3_70b_grpo_64k.yaml", ["parallel.tensor_model_parallel_size=3"], 8,
     "does not divide the world size 64"),
    ("qwen3_8b_grpo.yaml", ["parallel.tensor_model_parallel_size=64"], 8,
     "parallel.tensor_model_parallel_size: 64 does not divide model.num_attention_heads=32"),
    ("llama3_70b_grpo_64k.yaml", ["parallel.pipeline_model_parallel_size=3",
                                  "parallel.context_parallel_size=1"], 3,
     "parallel.pipeline_model_parallel_size: 3 does not divide model.num_layers=80"),
    ("llama3_70b_grpo_64k.yaml", ["train.seq_length=65534"], 8,
     "train.seq_length: 65534 is not divisible by 2 x parallel.context_parallel_size = 4"),
    ("llama3_70b_grpo_64k.yaml", ["train.seq_length=65544"], 8,
     "65544 / context_parallel_size 2 = 32772 tokens per rank is not divisible by "
     "tensor_model_parallel_size=8"),
    ("llama3_70b_grpo_64k.yaml", ["train.seq_length=262144"], 8,
     "train.seq_length: 262144 exceeds model.max_position_embeddings=131072"),
    ("llama3_70b_grpo_64k.yaml", [], 3, "does not divide the world size 24"),
    ("llama3_70b_grpo_64k.yaml", ["rl.prompts_per_step=7"], 16,
     "rl.prompts_per_step: 7 is not a multiple of the data-parallel size 2"),
    ("llama3_70b_grpo_64k.yaml", ["model.make_vocab_size_divisible_by=4"], 8,
     "model.make_vocab_size_divisible_by: 4 is not divisible by parallel.tensor_model_parallel_size=8"),
])
def test_wrong_layouts_fail_with_a_clear_message(config, overrides, nodes, message):
    with pytest.raises(ConfigError) as info:
        make_plan(_run(config, *overrides), nodes, 8)
    assert message in str(info.value)


def test_cli_exit_codes_and_report(capsys):
    cfg = str(CONFIGS / "llama3_70b_grpo_64k.yaml")
    assert plan_cli.main(["--config", cfg, "--nodes", "8", "--reference-model",
                          "parallel.context_parallel_size=1", "rollout.engine=megatron"]) == 0
    out = capsys.readouterr().out
    for text in ("TP=8 x PP=4 x CP=1 x DP=2", "128256 padded to 128256", "layers per stage  20",
                 "pipeline bubble", "FITS: fullest GPU", "optimizer", "reference model",
                 "longact state", "checkpoint", "64 sequences/RL step", "rollout (native generation)",
                 "native generation: 32 rows per DP replica", "log-prob forward"):
        assert text in out, text
    # The shipped layout (CP=2, vLLM rollouts) fits and runs.
    assert plan_cli.main(["--config", cfg, "--nodes", "8"]) == 0
    assert "colocated vLLM engine, TP 8" in capsys.readouterr().out
    # The same layout with the native engine: the plan is printed, then refused.
    assert plan_cli.main(["--config", cfg, "--nodes", "8", "rollout.engine=megatron"]) == 2
    captured = capsys.readouterr()
    assert "FITS: fullest GPU" in captured.out and "REFUSED: parallel.context_parallel_size: 2" in captured.out
    assert captured.err.strip() == ("longact-plan: refused: parallel.context_parallel_size: 2 with RL "
                                    "rollouts: native generation does not run under context "
                                    "parallelism; use rollout.engine: vllm")
    assert plan_cli.main(["--config", cfg, "--nodes", "2", "parallel.pipeline_model_parallel_size=2",
                          "parallel.context_parallel_size=1"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan_cli.main(["--config", cfg, "--nodes", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longact-plan: invalid layout: parallel:") and "world size 24" in err


# ---------------------------------------------------------------------------------------------
# The memory model
# ---------------------------------------------------------------------------------------------

def test_activation_formula_by_hand_and_scaling():
    cfg = _run("llama3_70b_grpo_64k.yaml").model  # h 8192, f 28672, 64 heads / 8 groups x 128
    s = 32768
    h, f = 8192, 28672
    by_hand = (2 * s * h * 2 + 2 * s * h * 2 + 2 * s * (64 + 16) * 128 + 2 * s * 64 * 128
               + 4 * s * 64 + 4 * s * f + 2 * s * f)
    assert layer_activation_bytes(cfg, s, 1) == by_hand
    assert layer_activation_bytes(cfg, s, 8) == by_hand // 8
    assert layer_activation_bytes(cfg, s // 2, 8) == by_hand // 16
    # Without sequence parallelism the residual-stream terms are not split over TP.
    no_sp = layer_activation_bytes(cfg, s, 8, sequence_parallel=False)
    assert no_sp - layer_activation_bytes(cfg, s, 8) == 4 * 2 * s * h * 7 // 8
    assert layer_activation_bytes(cfg, s, 8, fp8=True) < layer_activation_bytes(cfg, s, 8)


def test_full_recompute_keeps_layer_inputs_and_stage0_holds_pp_microbatches():
    run = _run("llama3_70b_grpo_64k.yaml")
    opts = PlanOptions(longact_enabled=False)
    plan = make_plan(run, 8, 8, opts)
    tokens = 32768
    stored_per_mb_layer = 2 * tokens * 8192 // 8
    full_layer = layer_activation_bytes(run.model, tokens, 8)
    assert plan.stages[0].phases["activations"] == 4 * 20 * stored_per_mb_layer + full_layer
    assert plan.stages[1].phases["activations"] == 3 * 20 * stored_per_mb_layer + full_layer
    logits = 8 * tokens * 128256 // 8
    assert plan.stages[3].phases["activations"] == 1 * 20 * stored_per_mb_layer + full_layer + logits


def test_longact_state_is_counted_with_its_compact_optimizer_state():
    from megatron_longact.longact import LongActConfig

    run = _run("llama3_70b_grpo_64k.yaml")
    on = make_plan(run, 8, 8).stages[0]
    off = make_plan(run, 8, 8, PlanOptions(longact_enabled=False)).stages[0]
    assert off.static["longact state"] == 0
    assert not any("longact" in k for k in on.phases)  # nothing LongAct holds is transient
    # Own state: benchmarks/optimizer_overhead.py's 70B figure (TP=8, PP=4). Compact optimizer
    # state of the stage's 20 linear_qkv weights (hidden 8192; V runs of 128 x 8192 stay in
    # place), split over DP x CP = 2, 17 B per kept element (two fp32 moments with 1/8 slack,
    # fp32 value and gradient buffers). scope=layer: a layer's top 30% of 8192 Q and 1024 K
    # channels may all fall on one rank's 1024 + 128, so the bound is every local q/k row.
    def expected(rows):
        return 832_800 + (2 * (rows + rows // 8) + 2 * rows) * 8192 * 4 * 20 // 2

    assert on.static["longact state"] == expected(1024 + 128)
    # scope=head keeps round(0.3 x 128) = 38 channels of each of the rank's 8 heads and 1 group.
    head = make_plan(run, 8, 8, PlanOptions(longact=LongActConfig(scope="head"))).stages[0]
    assert head.static["longact state"] == expected(9 * 38)
    # apply_to=gradient keeps no optimizer state of its own.
    grad = make_plan(run, 8, 8, PlanOptions(longact=LongActConfig(apply_to="gradient"))).stages[0]
    assert grad.static["longact state"] == 832_800


# ---------------------------------------------------------------------------------------------
# Parameter counts against built models
# ---------------------------------------------------------------------------------------------

def _small_models() -> dict[str, ModelConfig]:
    tiny = _run("model/tiny.yaml").model
    return {
        "tiny": dataclasses.replace(tiny, transformer_impl="local"),
        "small_qwen2_tied": ModelConfig(
            family="qwen2", num_layers=4, hidden_size=256, ffn_hidden_size=768,
            num_attention_heads=8, num_query_groups=2, vocab_size=1000,
            max_position_embeddings=2048, add_qkv_bias=True, tie_word_embeddings=True,
            transformer_impl="local"),
        "small_qwen3_vocab": ModelConfig(
            family="qwen3", num_layers=2, hidden_size=128, ffn_hidden_size=384,
            num_attention_heads=4, num_query_groups=4, head_dim=64, vocab_size=151936,
            max_position_embeddings=2048, qk_layernorm=True, transformer_impl="local"),
        "small_llama3": ModelConfig(
            family="llama3", num_layers=4, hidden_size=192, ffn_hidden_size=512,
            num_attention_heads=6, num_query_groups=2, vocab_size=32000,
            max_position_embeddings=2048, transformer_impl="local"),
    }


def _count_built(runtime, models: dict) -> list:
    """Per layout (TP=2 x PP=1, then TP=1 x PP=2 on the same two ranks): this rank's parameter
    counts of each model as megatron builds it."""
    from megatron.core import parallel_state as ps

    from megatron_longact.models.builder import build_model
    from megatron_longact.runtime import ParallelConfig, initialize

    out = []
    for tp, pp in ((2, 1), (1, 2)):
        runtime = initialize(ParallelConfig(tensor_model_parallel_size=tp,
                                            pipeline_model_parallel_size=pp))
        for name, cfg in models.items():
            model, _ = build_model(cfg, runtime.parallel)
            local = sum(p.numel() for p in model.parameters())
            split = sum(p.numel() for p in model.parameters()
                        if getattr(p, "tensor_model_parallel", False))
            out.append({"model": name, "tp": tp, "pp": pp, "local": local, "split": split,
                        "stage": ps.get_pipeline_model_parallel_rank(),
                        "tp_rank": ps.get_tensor_model_parallel_rank()})
            del model
    return out


def test_parameter_counts_match_built_models():
    """rank_parameters against megatron-built models (TP=2 x PP=2 is checked on the converted
    models in test_convert.py); num_parameters against the sum over ranks."""
    models = _small_models()
    per_rank = run_distributed(_count_built, tp=2, args=(models,), timeout=240)
    rows = [row for rank in per_rank for row in rank]
    assert len(rows) == 2 * 2 * len(models)
    for row in rows:
        cfg = models[row["model"]]
        assert row["local"] == rank_parameters(cfg, row["tp"], row["pp"], row["stage"]), row
    for name, cfg in models.items():
        # TP=2: split parameters add up over the two ranks, replicated ones (norms) count once.
        tp_rows = [r for r in rows if r["model"] == name and r["tp"] == 2]
        total = sum(r["split"] for r in tp_rows) + (tp_rows[0]["local"] - tp_rows[0]["split"])
        assert total == cfg.num_parameters(), name
        # PP=2: stages add up, less the last stage's own copy of a tied embedding.
        pp_total = sum(r["local"] for r in rows if r["model"] == name and r["pp"] == 2)
        if cfg.tie_word_embeddings:
            pp_total -= cfg.padded_vocab_size * cfg.hidden_size
        assert pp_total == cfg.num_parameters(), name


# ---------------------------------------------------------------------------------------------
# RL runs: batch from the rl section, rollout and log-prob memory
# ---------------------------------------------------------------------------------------------

def test_rl_batch_comes_from_the_rl_section():
    """The 70B RL recipe trains 8 prompts x 8 responses = 64 sequences per step; train.global_batch_size
    (8 by default) is read by LM mode only."""
    plan = make_plan(_run("llama3_70b_grpo_64k.yaml", "parallel.context_parallel_size=1"), 8, 8)
    assert plan.numbers["batch"].startswith("64 sequences/RL step (rl.prompts_per_step 8 x rl.group_size 8), "
                                            "32 per DP rank; 1 optimizer step(s) of 1 per micro-batch x "
                                            "32 micro-batches x DP 2")
    two = make_plan(_run("llama3_70b_grpo_64k.yaml", "parallel.context_parallel_size=1",
                         "rl.mini_batches=2"), 8, 8)
    assert "2 optimizer step(s) of 1 per micro-batch x 16 micro-batches" in two.numbers["batch"]


def test_rollout_memory_of_the_70b_recipe():
    from megatron_longact.generation import generation_bytes_per_row
    from megatron_longact.plan import rollout_rows

    run = _run("llama3_70b_grpo_64k.yaml", "parallel.context_parallel_size=1", "rollout.engine=megatron")
    plan = make_plan(run, 8, 8)
    per_row = generation_bytes_per_row(num_layers=20, hidden_size=8192, ffn_hidden_size=28672,
                                       num_attention_heads=64, num_query_groups=8, head_dim=128,
                                       padded_vocab_size=128256, tp=8, width=65536, prefill=65536 - 2048)
    for st in plan.stages:
        rows = st.phases["rollout (native generation)"] // per_row
        assert st.phases["rollout (native generation)"] == rows * per_row
        # As many rows as fit in 85% of what the static part leaves, never more than the replica's 32.
        assert 1 <= rows <= 32 and rows * per_row <= 0.85 * (plan.usable_bytes - st.static_total)
        assert (rows + 1) * per_row > 0.85 * (plan.usable_bytes - st.static_total)
    # The reference model (rl.kl_coef > 0) is static memory of RL runs.
    assert plan.stages[0].static["reference model"] == plan.stages[0].static["weights"]
    # The old way (all 32 rows of the replica prefilled at once) would need ~130 GiB on one GPU.
    assert 32 * per_row > 120 * GiB
    r = rollout_rows(run, plan_layout(run), 1, plan.stages[1].static_total, plan.usable_bytes)
    assert f"sub-batches of {r['sub_batch']} rows x {r['sub_batches']}" in plan.numbers["rollout"]


def plan_layout(run):
    from megatron_longact.plan import check_layout

    return check_layout(run, 8, 8)


def test_a_layout_where_not_one_rollout_row_fits_is_refused():
    run = _run("llama3_70b_grpo_64k.yaml", "parallel.context_parallel_size=1", "rollout.engine=megatron")
    plan = make_plan(run, 8, 8, PlanOptions(gpu_memory_gib=36))
    assert not plan.fits
    assert "not even one row fits beside the static memory" in plan.numbers["rollout"]
