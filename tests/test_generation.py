"""Generation and teacher-forced log-probs: layout invariance, agreement with a naive loop, EOS and
truncation, seeded sampling, log-probs that the RL loss can recompute, and ``longact-eval`` end to end.

One spawned run per layout computes everything (spawning dominates the cost); the tests read its
results. Tolerances: in fp32 the paths differ only in the order of floating-point reductions (KV
cache vs full forward, TP-split matmuls, batch vs single row), measured at ~5e-7 on log-probs; we
allow 1e-5. Tokens must match exactly: ties of random-init logits closer than that are absent for
these prompts (the greedy margin is checked against the naive loop).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.data.tokenizer import ByteTokenizer, encode_prompt_text
from megatron_longact.generation import SamplingConfig, sample_tokens
from megatron_longact.models.config import ModelConfig
from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()
NEW = 8
PROMPTS = [encode_prompt_text(text, TOK) for text in ("needle in a haystack", "key:", "the value of x is")]
# Prompts repeated as in a GRPO group (prompt sharing runs one prefill row per distinct prompt).
REPEATED = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
SAMPLED = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=NEW, seed=7)


def _tiny() -> ModelConfig:
    # vocab 263 pads to 384: ids 263..383 exist in the embedding and must never be sampled. A
    # larger init std than the default spreads the logits, so greedy choices are not near-ties.
    return ModelConfig(family="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=TOK.vocab_size,
                       max_position_embeddings=256, qk_layernorm=True, params_dtype="fp32",
                       init_method_std=0.1)


def _naive_greedy(gpt, prompt, eos_id):
    """Reference: one prompt at a time, the full forward per token, argmax over the vocabulary."""
    ids, log_probs = list(prompt), []
    for _ in range(NEW):
        tokens = torch.tensor([ids])
        logits = gpt(tokens, torch.arange(len(ids)).unsqueeze(0), None)[0, -1, :TOK.vocab_size].float()
        top2 = torch.topk(logits, 2).values
        log_probs.append((int(logits.argmax()), float(torch.log_softmax(logits, -1).max()),
                          float(top2[0] - top2[1])))
        ids.append(log_probs[-1][0])
        if ids[-1] == eos_id:
            break
    return log_probs


def _run_all(runtime, full: bool):
    from megatron_longact.generation import generate, sequence_log_probs
    from megatron_longact.models.builder import build_model
    from megatron_longact.training.engine import reference_initialize

    from megatron.core import parallel_state as ps

    cfg = _tiny()
    model, _ = build_model(cfg, runtime.parallel)
    reference_initialize(model, cfg, seed=11)
    kw = dict(eos_id=TOK.eos_id, pad_id=TOK.pad_id, vocab_size=TOK.vocab_size)
    # Data-parallel ranks generate for their own contiguous share of the prompts; global sample ids
    # make their random streams those of the single-process run.
    dp, dp_rank, n = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), len(PROMPTS)
    rows = list(range(dp_rank * n // dp, (dp_rank + 1) * n // dp))
    prompts = [PROMPTS[i] for i in rows]

    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=NEW), **kw)
    sampled = generate(model, prompts, SAMPLED, sample_ids=rows, **kw)
    out = {
        "rows": rows,
        "repeated": generate(model, REPEATED, SAMPLED, sample_ids=list(range(len(REPEATED))), **kw),
        "greedy": greedy,
        "sampled": sampled,
        # Micro-batches of 2 rows for 3 rows: the last one is padded by repeating a row.
        "seq_lp_sampled": sequence_log_probs(model, sampled.tokens, vocab_size=TOK.vocab_size,
                                             temperature=SAMPLED.temperature, micro_batch_size=2),
        "seq_lp_greedy": sequence_log_probs(model, greedy.tokens, vocab_size=TOK.vocab_size),
    }
    # EOS: declare the third greedy token of row 0 to be EOS; greedy decoding is otherwise unchanged.
    eos = int(greedy.responses[0, 2])
    out["eos"] = eos
    out["with_eos"] = generate(model, prompts, SamplingConfig(max_new_tokens=NEW),
                               **{**kw, "eos_id": eos})
    out["ignore_eos"] = generate(model, prompts, SamplingConfig(max_new_tokens=NEW, ignore_eos=True),
                                 **{**kw, "eos_id": eos})
    out["greedy_recompute"] = generate(model, prompts, SamplingConfig(max_new_tokens=NEW), kv_cache=False,
                                       bucket=4, **kw)
    if not full:
        return out
    out["sampled_recompute"] = generate(model, PROMPTS, SAMPLED, kv_cache=False, **kw)
    # The default runs these prompts (lengths 21, 5, 18) left-padded in one batch. Right-padded,
    # they split into two sub-batches (spread 8), or run as one batch that feeds the longer
    # prompts' tails one column per step.
    out["greedy_right"] = generate(model, PROMPTS, SamplingConfig(max_new_tokens=NEW), padding="right", **kw)
    out["greedy_one_batch"] = generate(model, PROMPTS, SamplingConfig(max_new_tokens=NEW),
                                       max_prompt_spread=100, padding="right", **kw)
    out["sampled_right"] = generate(model, PROMPTS, SAMPLED, padding="right", **kw)
    out["sampled_full"] = generate(model, PROMPTS, SAMPLED, **kw)
    # megatron's own core attention honours the left-padding mask too (same weights).
    other, _ = build_model(dataclasses.replace(cfg, core_attention="megatron"), runtime.parallel)
    reference_initialize(other, cfg, seed=11)
    out["greedy_megatron_attention"] = generate(other, PROMPTS, SamplingConfig(max_new_tokens=NEW),
                                                padding="left", **kw)
    # The cache of rotated keys against megatron's own path (keys cached before RoPE and the
    # whole cache rotated at every step): the same values, bit for bit.
    from megatron_longact.models.self_attention import CachedRopeSelfAttention

    with mock.patch.object(CachedRopeSelfAttention, "_rotates_on_write", lambda *a: False):
        out["greedy_megatron_cache"] = generate(model, PROMPTS, SamplingConfig(max_new_tokens=NEW),
                                                padding="left", **kw)
    # Prompt sharing: each prompt twice (and one prompt three times), left- and right-padded
    # (equal lengths take the right-padded path), with and without sharing the prefill.
    import megatron_longact.generation as gen_module

    repeated = REPEATED
    same_length = [PROMPTS[0], PROMPTS[0], PROMPTS[0][:-1] + [7], PROMPTS[0]]
    prefill_rows = []
    real_forward = gen_module._forward_rows

    def counting_forward(model_, tokens_BS, *a, **k):
        prefill_rows.append(tokens_BS.shape)
        return real_forward(model_, tokens_BS, *a, **k)

    for name, rows_ in (("shared_left", repeated), ("shared_right", same_length)):
        for share in (True, False):
            for sampling_ in (SamplingConfig(max_new_tokens=NEW), SAMPLED):
                prefill_rows.clear()
                with mock.patch.object(gen_module, "_forward_rows", counting_forward):
                    got = generate(model, rows_, sampling_, share_prompts=share,
                                   sample_ids=list(range(len(rows_))), **kw)
                key = f"{name}_{'on' if share else 'off'}_{'sampled' if sampling_.temperature else 'greedy'}"
                out[key] = (got, prefill_rows[0])
    # megatron's cache layout ([sequence, batch, ...], with megatron's core attention).
    for share in (True, False):
        out[f"shared_megatron_{'on' if share else 'off'}"] = generate(
            other, repeated, SAMPLED, share_prompts=share, sample_ids=list(range(len(repeated))), **kw)
    out["padding_errors"] = []
    for bad in (dict(padding="middle"), dict(padding="left", kv_cache=False)):
        try:
            generate(model, PROMPTS, SamplingConfig(max_new_tokens=NEW), **bad, **kw)
        except ValueError as e:
            out["padding_errors"].append(str(e))
    out["sampled_again"] = generate(model, PROMPTS, SAMPLED, **kw)
    out["sampled_other_seed"] = generate(model, PROMPTS, SamplingConfig(
        temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=NEW, seed=8), **kw)
    # One row alone draws the same tokens as inside the batch (per-row random streams).
    out["sampled_row1_alone"] = generate(model, PROMPTS[1:2], SAMPLED, sample_ids=[1], **kw)
    model.eval()
    with torch.no_grad():
        out["naive"] = [_naive_greedy(model, p, TOK.eos_id) for p in PROMPTS]
    model.train()
    lp = sequence_log_probs(model, sampled.tokens, vocab_size=TOK.vocab_size,
                            temperature=SAMPLED.temperature, with_grad=True)
    mask = sampled.response_mask()[:, 1:]
    (lp * mask).sum().backward()
    out["with_grad"] = lp.detach()
    out["grad_norm"] = float(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5)
    return out


@pytest.fixture(scope="module")
def single():
    return run_distributed(_run_all, args=(True,), timeout=240)[0]


def _response_log_probs(seq_lp, gen):
    """Pick, from teacher-forced log-probs [B, W-1], the entries of each row's response."""
    rows = []
    for i in range(seq_lp.shape[0]):
        p, n = int(gen.prompt_lengths[i]), int(gen.response_lengths[i])
        rows.append(seq_lp[i, p - 1:p - 1 + n])
    return rows


def test_greedy_matches_naive_loop(single):
    greedy = single["greedy"]
    for i, naive in enumerate(single["naive"]):
        assert greedy.response_ids(i) == [t for t, _, _ in naive], f"row {i}"
        expected = torch.tensor([lp for _, lp, _ in naive])
        assert torch.allclose(greedy.log_probs[i, :len(naive)], expected, atol=1e-5), f"row {i}"
        # The comparison means something only if no argmax was a near-tie.
        assert min(margin for _, _, margin in naive) > 1e-4
    assert not (greedy.responses >= TOK.vocab_size).any(), "a padded-vocabulary id was generated"
    assert greedy.truncated.all() and (greedy.response_lengths == NEW).all()


def test_kv_cache_full_recompute_and_batching_agree(single):
    for kv, re in (("greedy", "greedy_recompute"), ("sampled_full", "sampled_recompute"),
                   ("greedy", "greedy_one_batch"), ("greedy", "greedy_right"),
                   ("sampled_full", "sampled_right"), ("greedy", "greedy_megatron_attention")):
        assert torch.equal(single[kv].responses, single[re].responses), kv
        assert torch.allclose(single[kv].log_probs, single[re].log_probs, atol=1e-5), kv


def test_rotated_key_cache_equals_megatrons_cache_bit_for_bit(single):
    ours, theirs = single["greedy"], single["greedy_megatron_cache"]
    assert torch.equal(ours.responses, theirs.responses)
    assert torch.equal(ours.log_probs, theirs.log_probs)


def test_prompt_sharing_runs_one_prefill_row_per_prompt_with_the_same_results(single):
    for name, distinct, rows, width in (("shared_left", 3, 6, 21), ("shared_right", 2, 4, 21)):
        for kind in ("greedy", "sampled"):
            (on, on_shape), (off, off_shape) = single[f"{name}_on_{kind}"], single[f"{name}_off_{kind}"]
            assert tuple(on_shape) == (distinct, width) and tuple(off_shape) == (rows, width), name
            assert torch.equal(on.responses, off.responses), (name, kind)
            assert torch.allclose(on.log_probs, off.log_probs, atol=1e-5), (name, kind)
            # Repeats of a prompt still draw their own tokens when sampling.
            if kind == "sampled" and name == "shared_left":
                assert not torch.equal(on.responses[0], on.responses[2])
    on, off = single["shared_megatron_on"], single["shared_megatron_off"]
    assert torch.equal(on.responses, off.responses)
    assert torch.allclose(on.log_probs, off.log_probs, atol=1e-5)


def test_bad_padding_choices_are_refused(single):
    errors = single["padding_errors"]
    assert len(errors) == 2 and "padding" in errors[0] and "KV cache" in errors[1], errors


def test_eos_stops_each_row_truncation_is_flagged_and_ignore_eos_runs_on(single):
    greedy, out, eos = single["greedy"], single["with_eos"], single["eos"]
    for i in range(len(PROMPTS)):
        full = greedy.response_ids(i)
        if eos in full:
            n = full.index(eos) + 1
            assert out.response_ids(i) == full[:n] and not bool(out.truncated[i]), f"row {i}"
        else:
            n = NEW
            assert out.response_ids(i) == full and bool(out.truncated[i]), f"row {i}"
        assert int(out.response_lengths[i]) == n
        assert (out.responses[i, n:] == TOK.pad_id).all() and (out.log_probs[i, n:] == 0).all()
        p = int(out.prompt_lengths[i])
        assert out.tokens[i, :p].tolist() == PROMPTS[i]
        assert out.tokens[i, p:p + n].tolist() == out.response_ids(i)
        assert (out.tokens[i, p + n:] == TOK.pad_id).all()
    # Row 0 stops at the latest on the token chosen as EOS.
    assert int(out.response_lengths[0]) <= 3 and not bool(out.truncated[0])
    # With ignore_eos the EOS token does not end row 0: every row is the plain greedy run.
    ignored = single["ignore_eos"]
    assert eos in greedy.response_ids(0)[:-1]  # the case is real: row 0 would have stopped early
    assert torch.equal(ignored.responses, greedy.responses)
    assert (ignored.response_lengths == NEW).all() and ignored.truncated.all()


def test_sampling_is_seeded_and_per_row(single):
    sampled = single["sampled"]
    assert torch.equal(sampled.responses, single["sampled_again"].responses)
    assert not torch.equal(sampled.responses, single["sampled_other_seed"].responses)
    assert not torch.equal(sampled.responses, single["greedy"].responses)
    assert single["sampled_row1_alone"].response_ids(0) == sampled.response_ids(1)
    assert not (sampled.responses >= TOK.vocab_size).any()


def test_log_probs_equal_teacher_forced_log_probs(single):
    for gen, seq in (("sampled", "seq_lp_sampled"), ("greedy", "seq_lp_greedy")):
        for i, row in enumerate(_response_log_probs(single[seq], single[gen])):
            n = row.shape[0]
            assert torch.allclose(row, single[gen].log_probs[i, :n], atol=1e-5, rtol=0), f"{gen} row {i}"
    # The differentiable path gives the same numbers and gradients reach the weights.
    assert torch.allclose(single["with_grad"], single["seq_lp_sampled"], atol=1e-5)
    assert single["grad_norm"] > 0


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_layouts_give_identical_tokens(single, tp, pp, dp):
    per_rank = run_distributed(_run_all, tp=tp, pp=pp, dp=dp, args=(False,), timeout=240)
    covered = []
    for rank, out in enumerate(per_rank):
        rows = out["rows"]
        covered += rows
        # The EOS check picks its EOS from the rank's first row: comparable without DP only.
        for key in ("greedy", "sampled", "greedy_recompute") + (("with_eos",) if dp == 1 else ()):
            assert torch.equal(out[key].responses, single[key].responses[rows]), f"{key} on rank {rank}"
            assert torch.equal(out[key].response_lengths, single[key].response_lengths[rows]), key
            assert torch.allclose(out[key].log_probs, single[key].log_probs[rows], atol=1e-5), key
        # Teacher-forced log-probs of the responses (buffers are as wide as each shard needs).
        for key, gen in (("seq_lp_sampled", "sampled"), ("seq_lp_greedy", "greedy")):
            mine = _response_log_probs(out[key], out[gen])
            ref = _response_log_probs(single[key], single[gen])
            for j, i in enumerate(rows):
                assert torch.allclose(mine[j], ref[i], atol=1e-5), f"{key} row {i} on rank {rank}"
    assert sorted(set(covered)) == list(range(len(PROMPTS)))
    # Prompt sharing under the layout: the same tokens as the single process's.
    for out in per_rank:
        assert torch.equal(out["repeated"].responses, single["repeated"].responses)
        assert torch.allclose(out["repeated"].log_probs, single["repeated"].log_probs, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Pure sampling rules (no model)


def test_sample_tokens_rules():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    greedy = SamplingConfig(max_new_tokens=1)
    assert sample_tokens(logits, greedy, None)[0].tolist() == [3]
    plain = SamplingConfig(temperature=1.0, max_new_tokens=1)
    # Inverse CDF: cumulative 0.1, 0.3, 0.6, 1.0.
    picks = [int(sample_tokens(logits, plain, torch.tensor([u], dtype=torch.float64))[0]) for u in
             (0.05, 0.15, 0.35, 0.65, 0.999)]
    assert picks == [0, 1, 2, 3, 3]
    # top_k=2 keeps ids 2 and 3 (renormalised 3/7, 4/7); top_p=0.5 keeps 3 and 2 (0.4 < 0.5).
    for cfg in (SamplingConfig(temperature=1.0, top_k=2, max_new_tokens=1),
                SamplingConfig(temperature=1.0, top_p=0.5, max_new_tokens=1)):
        picks = [int(sample_tokens(logits, cfg, torch.tensor([u], dtype=torch.float64))[0]) for u in
                 (0.0, 0.42, 0.43, 0.99)]
        assert picks == [2, 2, 3, 3]
    # Log-probs are of the temperature-scaled, unfiltered distribution.
    tok, lp = sample_tokens(logits, SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=1),
                            torch.tensor([0.5], dtype=torch.float64))
    assert int(tok) == 3 and abs(float(lp) - float(torch.log(torch.tensor(0.4)))) < 1e-6


def test_sampling_config_names_bad_fields():
    with pytest.raises(ConfigError, match="sampling.temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="sampling.max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


# --------------------------------------------------------------------------------------------------
# longact-eval


def test_eval_cli_bad_input_fails_before_start(monkeypatch, capsys, tmp_path):
    from megatron_longact.cli import eval as eval_cli

    def must_not_run(*a, **k):
        raise AssertionError("initialize() ran although the input is invalid")

    monkeypatch.setattr(eval_cli, "initialize", must_not_run)
    config = str(ROOT / "configs/demo_cpu.yaml")
    assert eval_cli.main(["--config", config]) == 2
    assert "eval.checkpoint: required" in capsys.readouterr().err
    assert eval_cli.main(["--config", config, "--init", "random", "--lengths", "256,x"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert eval_cli.main(["--config", config, "--init", "random", "--suite", "longbench-v2"]) == 2
    assert "suite.longbench_v2.path: required" in capsys.readouterr().err
    assert eval_cli.main(["--config", config, "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert eval_cli.main(["--config", config, "--checkpoint", str(tmp_path)]) == 2
    assert "no longact_model.json" in capsys.readouterr().err
    assert eval_cli.main(["--config", config, "--init", "random", "--checkpoint", str(tmp_path)]) == 2
    assert "choose one" in capsys.readouterr().err


# One process: longact-eval with --init random; then the same reference-initialized weights saved
# as a checkpoint and evaluated with --checkpoint. A script, not a spawned daemonic process:
# dist_checkpointing.save starts helper processes.
_EVAL_RANDOM_SAVE_EVAL_CHECKPOINT = """
import sys
from megatron_longact.cli import eval as eval_cli
from megatron_longact.convert.checkpoint import save_model_weights
from megatron_longact.models.builder import build_model
from megatron_longact.run_config import load_run_config
from megatron_longact.runtime import destroy, initialize
from megatron_longact.training.engine import reference_initialize

if __name__ == "__main__":
    config, work, suite = sys.argv[1], sys.argv[2], sys.argv[3:]
    rc = eval_cli.main(["--config", config, "--init", "random", *suite, "--out", work + "/random",
                        "--tb-dir", work + "/tb"])
    if rc:
        sys.exit(rc)
    cfg = load_run_config(config)
    runtime = initialize(cfg.parallel, seed=cfg.train.seed)
    model, _ = build_model(cfg.model, runtime.parallel)
    reference_initialize(model, cfg.model, cfg.train.seed)
    save_model_weights(model, work + "/ckpt", cfg.model, source="test")
    destroy()
    sys.exit(eval_cli.main(["--config", config, "--checkpoint", work + "/ckpt", *suite,
                            "--out", work + "/from_ckpt"]))
"""


def test_eval_cli_runs_end_to_end(tmp_path):
    script = tmp_path / "eval_twice.py"
    script.write_text(_EVAL_RANDOM_SAVE_EVAL_CHECKPOINT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = tmp_path / "eval.log"
    suite = ["--lengths", "256", "--tasks", "niah_single_1,vt", "--num-samples", "2", "--template", "compact",
             "--batch-size", "4"]
    # Output to a file, not a pipe: checkpoint helper processes may hold inherited pipes open.
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(script), str(ROOT / "configs/demo_cpu.yaml"), str(tmp_path),
                               *suite], stdout=f, stderr=subprocess.STDOUT, timeout=300, env=env, cwd=tmp_path)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "ruler: overall" in text

    out = tmp_path / "random"
    table = (out / "results.md").read_text()
    assert "| niah_single_1 |" in table and "| vt |" in table and "| **Average** |" in table
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["samples"]) == 4 and payload["run"]["init"] == "random"
    assert payload["summary"]["ruler"]["lengths"] == ["256"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())

    # The same weights through a checkpoint give the same predictions.
    loaded = json.loads((tmp_path / "from_ckpt" / "results.json").read_text())
    assert loaded["run"]["checkpoint"] == str(tmp_path / "ckpt")
    assert [s["prediction"] for s in loaded["samples"]] == [s["prediction"] for s in payload["samples"]]


def _bounded(runtime):
    """Rows per forward with and without a memory budget, and the outputs of both."""
    from megatron_longact.generation import _model_bytes_per_row, generate
    from megatron_longact.models.builder import build_model
    from megatron_longact.training.engine import reference_initialize
    from megatron_longact.generation import ModelParallelGroups

    cfg = _tiny()
    model, _ = build_model(cfg, runtime.parallel)
    reference_initialize(model, cfg, seed=11)
    rows_seen = []
    model.register_forward_pre_hook(lambda m, args: rows_seen.append(int(args[0].shape[0])))
    kw = dict(eos_id=TOK.eos_id, pad_id=TOK.pad_id, vocab_size=TOK.vocab_size, sample_ids=[0, 1, 2, 3],
              max_prompt_spread=100)
    prompts = PROMPTS + PROMPTS[:1]
    free = generate(model, prompts, SAMPLED, memory_budget=None, **kw)
    unbounded_rows = max(rows_seen)
    rows_seen.clear()
    width = max(len(p) for p in prompts) + NEW
    per_row = _model_bytes_per_row(model, ModelParallelGroups.from_parallel_state(), width,
                                   max(len(p) for p in prompts))
    bounded = generate(model, prompts, SAMPLED, memory_budget=2 * per_row + per_row // 2, **kw)
    bounded_rows = max(rows_seen)
    try:
        generate(model, prompts, SAMPLED, memory_budget=per_row - 1, **kw)
        too_small = None
    except ValueError as exc:
        too_small = str(exc)
    return unbounded_rows, bounded_rows, free, bounded, too_small


def test_memory_budget_bounds_rows_per_forward_and_keeps_results():
    unbounded_rows, bounded_rows, free, bounded, too_small = run_distributed(_bounded, timeout=240)[0]
    assert unbounded_rows == 4 and bounded_rows == 2
    assert torch.equal(free.responses, bounded.responses) and torch.equal(free.tokens, bounded.tokens)
    assert torch.allclose(free.log_probs, bounded.log_probs, atol=1e-5)
    assert too_small is not None and too_small.startswith("memory_budget:")


def test_generation_bytes_per_row_by_hand():
    from megatron_longact.generation import generation_bytes_per_row

    # Llama-3-70B shapes, TP=8, PP=4 (20 layers), a 62k-token prompt + 2k new tokens, bf16.
    got = generation_bytes_per_row(num_layers=20, hidden_size=8192, ffn_hidden_size=28672,
                                   num_attention_heads=64, num_query_groups=8, head_dim=128,
                                   padded_vocab_size=128256, tp=8, width=65536, prefill=63488)
    kv = 2 * 20 * 65536 * 1 * 128 * 2                       # 640 MiB
    transient = 63488 * 2 * (2 * 8192 + (8 + 2) * 128 + 8 * 128 + 3 * 28672 // 8)
    assert got == kv + transient + 8 * 128256
    assert 3.5 * 2**30 < got < 4.5 * 2**30                   # ~4 GiB per row: 64 rows cannot go at once


def test_generate_refuses_a_context_parallel_model():
    from types import SimpleNamespace

    from megatron_longact.generation import generate

    model = SimpleNamespace(config=SimpleNamespace(context_parallel_size=2))
    with pytest.raises(NotImplementedError, match="native generation does not run under context parallelism"):
        generate(model, [[1, 2]], SamplingConfig(), eos_id=0, pad_id=0, vocab_size=10, groups=object())


def _fp8_model_generates_in_bf16(runtime):
    from megatron_longact.generation import generate
    from megatron_longact.models.builder import build_model

    cfg = _tiny()
    model, tconfig = build_model(cfg, runtime.parallel)
    # As if built with model.fp8 (needs Transformer Engine on CUDA). Without TE megatron's FP8
    # context is a no-op, so make entering it an error: generating at all shows it was not entered.
    from megatron.core.transformer import transformer_block

    def no_fp8(*args, **kwargs):
        raise AssertionError("generation entered megatron's FP8 context")

    transformer_block.get_fp8_context = no_fp8
    tconfig.fp8 = "hybrid"
    out = generate(model, PROMPTS[:2], SamplingConfig(max_new_tokens=3), eos_id=TOK.eos_id,
                   pad_id=TOK.pad_id, vocab_size=TOK.vocab_size)
    return out.response_lengths.tolist(), tconfig.fp8


def test_generation_runs_bf16_under_an_fp8_config_and_restores_it():
    lengths, fp8_after = run_distributed(_fp8_model_generates_in_bf16, timeout=240)[0]
    assert lengths == [3, 3] and fp8_after == "hybrid"


_MASK64 = (1 << 64) - 1


def _splitmix_mix(x: int) -> int:
    """SplitMix64's finalizer in Python integers (no wrapping concerns), for row_uniforms."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def test_row_uniforms_match_splitmix64_and_look_uniform():
    from megatron_longact.generation import row_keys, row_uniforms

    golden = 0x9E3779B97F4A7C15
    ids = [0, 1, 2, 7, 123456789]
    keys = row_keys(seed=5, sample_ids=ids)
    for i, sid in enumerate(ids):
        assert keys[i].item() & _MASK64 == _splitmix_mix((5 * golden + sid) & _MASK64), sid
    for draw in (0, 1, 2, 1000):
        got = row_uniforms(keys, torch.full((len(ids),), draw))
        for i, key in enumerate(keys.tolist()):
            expected = (_splitmix_mix((key + draw * golden) & _MASK64) >> 11) * 2.0 ** -53
            assert got[i].item() == expected, (ids[i], draw)
    many = row_uniforms(row_keys(0, range(20000)), torch.zeros(20000))
    assert 0.0 <= float(many.min()) and float(many.max()) < 1.0
    assert abs(float(many.mean()) - 0.5) < 0.01
    counts = torch.histc(many.float(), bins=10, min=0.0, max=1.0)
    assert float(counts.min()) > 1800 and float(counts.max()) < 2200, counts
    # The draws of one row are distinct numbers.
    assert row_uniforms(row_keys(0, [3] * 1000), torch.arange(1000)).unique().numel() == 1000
