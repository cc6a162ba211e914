"""The engine is real: LM training through megatron-core's schedule, DDP and DistributedOptimizer
gives the same per-step losses for every (TP, PP, DP) layout.

Tolerances. In fp32 the layouts differ only in the order of floating-point reductions (TP splits
matmul sums and all-reduces partial results; DP averages gradients across ranks), so the losses
agree to ~1e-6; we allow 1e-5. In bf16 the weights and activations are rounded to 8 mantissa bits
(relative step 2^-8 ~ 3.9e-3): when TP changes where a bf16 partial sum is rounded, single logits
move by up to that step. The loss averages ~1000 token losses, which shrinks the per-step effect,
but the Adam updates carry it into later steps; measured drift after 3 steps is ~2e-3 absolute on
a loss of ~5.4. We allow 5e-3 absolute (0.1% relative), far below the step-to-step loss change
(~0.3), so a wrong gradient reduction, a missing DP average or a mis-sharded weight would still fail.
"""

import pytest

from megatron_longact.models.config import ModelConfig
from megatron_longact.training.config import TrainConfig
from tests.dist_harness import run_distributed

STEPS = 3


def _tiny(params_dtype):
    return ModelConfig(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=260,
                       max_position_embeddings=512, qk_layernorm=True, params_dtype=params_dtype)


def _train(runtime, params_dtype):
    from megatron_longact.training.lm import train_lm

    train = TrainConfig(steps=STEPS, seq_length=64, micro_batch_size=2, global_batch_size=8, lr=3e-3,
                        weight_decay=0.01)
    return train_lm(_tiny(params_dtype), train, runtime.parallel, runtime.device)


@pytest.fixture(scope="module")
def reference():
    return {dtype: run_distributed(_train, args=(dtype,))[0] for dtype in ("bf16", "fp32")}


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_bf16_losses_match_single_process(reference, tp, pp, dp):
    per_rank = run_distributed(_train, tp=tp, pp=pp, dp=dp, args=("bf16",))
    ref = reference["bf16"]
    assert ref[0] > 5.0 and ref[-1] < ref[0] - 0.3, f"training does not learn: {ref}"
    for rank, losses in enumerate(per_rank):
        assert losses == per_rank[0], f"rank {rank} reports other losses than rank 0"
    diffs = [abs(a - b) for a, b in zip(per_rank[0], ref)]
    assert max(diffs) < 5e-3, f"tp={tp} pp={pp} dp={dp}: {per_rank[0]} vs {ref}"


def test_fp32_layouts_agree_tightly(reference):
    losses = run_distributed(_train, tp=2, pp=2, dp=1, args=("fp32",))[0]
    diffs = [abs(a - b) for a, b in zip(losses, reference["fp32"])]
    assert max(diffs) < 1e-5, f"{losses} vs {reference['fp32']}"
