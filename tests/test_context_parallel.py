"""Context parallelism in the trainer: one RL update at CP=2, TP=2 x CP=2 and PP=2 x CP=2, and one SFT
update at CP=2 and TP=2 x CP=2, give the loss, gradient norm and LongAct statistics of CP=1 (fp32).

megatron's local attention refuses CP > 1, so every layout here (CP=1 included, so that all of them
run the same attention arithmetic) builds its model with the test-only CP-capable core attention of
``tests/cp_attention.py``, injected through the layer spec. The RL update consumes a fixed rollout
batch built without generation (native generation never runs under CP), with a KL reference and two
mini-batches, so the old and reference log-prob forwards run under CP too.
"""

import os
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp: str, mode: str, **over):
    from megatron_longact.run_config import load_run_config

    Path(tmp).mkdir(parents=True, exist_ok=True)
    # One file per rank: ranks writing and reading one file at once can read it half-written.
    path = Path(tmp) / f"run{os.environ.get('RANK', '0')}.yaml"
    path.write_text(f"include: {ROOT / 'configs/model/tiny.yaml'}\n")
    overrides = {
        "model.params_dtype": "fp32", "train.mode": mode, "train.steps": 1, "train.micro_batch_size": 2,
        "train.lr": 1e-3, "sft.steps": 0 if mode == "rl" else 1, "sft.batch_size": 4,
        "data.ruler.num_samples": 16, "data.ruler.template": "compact", "data.ruler.number_digits": 3,
        "data.ruler.lengths": "[128]", "data.ruler.tasks": "[niah_single_1]",
        "rl.group_size": 2, "rl.prompts_per_step": 4, "rl.max_new_tokens": 12, "rl.kl_coef": 0.05,
        "rl.mini_batches": 2, "rl.reward.function": "megatron_longact.tasks.rewards:prefix_match",
        "longact.tokens": "response", "checkpoint.resume": "none", "output.dir": str(Path(tmp) / "out"),
        "evaluation.lengths": "[]",
    }
    overrides.update(over)
    return load_run_config(path, [f"{k}={v}" for k, v in overrides.items()])


def fixed_rollouts(n: int = 8, max_new: int = 12, eos: int = 1) -> dict:
    """A rollout batch as Trainer._collect returns it, without generation: prompts of different
    lengths, responses of different lengths (some end in EOS, one is cut at the budget)."""
    from megatron_longact.generation import GenerationOutput

    g = torch.Generator().manual_seed(7)
    prompts = [[2] + torch.randint(10, 250, (int(L),), generator=g).tolist()
               for L in torch.randint(20, 44, (n,), generator=g)]
    resp_len = torch.tensor([5, 12, 3, 9, 12, 7, 1, 10])[:n]
    responses = torch.full((n, max_new), 0, dtype=torch.long)
    truncated = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        r = int(resp_len[i])
        responses[i, :r] = torch.randint(10, 250, (r,), generator=g)
        if r < max_new:
            responses[i, r - 1] = eos
        else:
            truncated[i] = True
    width = max(len(p) for p in prompts) + max_new
    tokens = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
        tokens[i, len(p):len(p) + int(resp_len[i])] = responses[i, :int(resp_len[i])]
    gen = GenerationOutput(tokens=tokens, prompt_lengths=torch.tensor([len(p) for p in prompts]),
                           responses=responses, response_lengths=resp_len.clone(),
                           log_probs=-torch.rand(n, max_new, generator=g), truncated=truncated)
    scores = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 0.0, 0.75])[:n]
    return {"prompts": prompts, "gen": gen, "scores": scores, "rewards": scores.clone(), "tries": 1,
            "records": []}


def _rl_update(runtime, tmp):
    from tests.cp_attention import use_cp_attention

    use_cp_attention()
    from megatron_longact.training.trainer import Trainer

    trainer = Trainer(_config(tmp, "rl"), runtime)
    trainer._start_rl()
    batch = fixed_rollouts()
    trainer._collect = lambda: batch
    metrics = trainer.rl_step()
    stats = trainer.handle.longact.last_stats
    return {k: float(v) for k, v in metrics.items()}, (stats.q_LC.clone(), stats.k_LC.clone(),
                                                      stats.tokens_L.clone())


def _sft_update(runtime, tmp):
    from tests.cp_attention import use_cp_attention

    use_cp_attention()
    from megatron_longact.training.trainer import Trainer

    trainer = Trainer(_config(tmp, "sft"), runtime)
    return {k: float(v) for k, v in trainer.sft_step().items()}


LAYOUTS = [dict(cp=2), dict(tp=2, cp=2), dict(pp=2, cp=2)]
IDS = ["cp2", "tp2xcp2", "pp2xcp2"]


@pytest.fixture(scope="module")
def rl_reference(tmp_path_factory):
    return run_distributed(_rl_update, args=(str(tmp_path_factory.mktemp("cp1")),), timeout=400)[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_rl_update_under_context_parallelism_matches_cp1(tmp_path, rl_reference, layout):
    ref_metrics, ref_stats = rl_reference
    results = run_distributed(_rl_update, args=(str(tmp_path),), timeout=600, **layout)
    for metrics, stats in results:
        for key in ("rl/pg_loss", "train/grad_norm", "rl/kl", "rl/approx_kl", "rl/ratio_mean",
                    "rl/entropy", "rl/num_tokens", "rl/num_seqs", "perf/tokens"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=2e-5, abs=1e-7), key
        assert ref_metrics["train/grad_norm"] > 0 and ref_metrics["rl/kl"] >= 0
        for got, want in zip(stats, ref_stats):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
        # Each response token once: the statistic's token count is that of the whole batch.
        assert float(stats[2][0]) == float(ref_stats[2][0]) > 0


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=IDS[:2])
def test_sft_update_under_context_parallelism_matches_cp1(tmp_path, layout):
    ref = run_distributed(_sft_update, args=(str(tmp_path / "a"),), timeout=400)[0]
    for metrics in run_distributed(_sft_update, args=(str(tmp_path / "b"),), timeout=600, **layout):
        for key in ("sft/loss", "train/grad_norm", "perf/tokens"):
            assert metrics[key] == pytest.approx(ref[key], rel=2e-5), key


def _attention_vs_megatron(runtime):
    import copy

    from megatron_longact.models import builder
    from megatron_longact.run_config import load_run_config
    from megatron_longact.training.engine import reference_initialize
    from tests.cp_attention import cp_layer_spec

    cfg = copy.deepcopy(load_run_config(ROOT / "configs/model/tiny.yaml", ["model.params_dtype=fp32"]).model)
    tokens = torch.randint(0, 263, (2, 48), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(48).unsqueeze(0).expand_as(tokens)
    outs = []
    for spec in (builder.layer_spec, cp_layer_spec):
        original = builder.layer_spec
        builder.layer_spec = spec
        try:
            model, _ = builder.build_model(cfg, runtime.parallel)
        finally:
            builder.layer_spec = original
        reference_initialize(model, cfg, 5)
        outs.append(model(tokens, pos, None).detach())
    return outs


def test_the_test_attention_is_megatrons_attention_at_cp1():
    megatron_out, ours = run_distributed(_attention_vs_megatron, timeout=300)[0]
    torch.testing.assert_close(ours, megatron_out, rtol=1e-5, atol=1e-5)
