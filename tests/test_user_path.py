"""The user's loop end to end, through the console-script entry points:

Hugging Face model -> ``longact-convert hf-to-mcore`` -> ``longact-train`` (``checkpoint.load_weights``,
a config whose relative paths resolve against the config file, run from another folder) -> trainer
checkpoint -> ``longact-eval --checkpoint`` (no ``--config``: the saved run config is used) ->
``longact-convert mcore-to-hf`` -> transformers gives the logits megatron gives for the trained weights.

A checkpoint written with the old object keys ("longact_objects/<name>", which megatron's metadata
reader splits on "/") still exports and resumes.

Everything in fp32 on one CPU process; megatron and transformers compute the same function, so the
logits agree to float rounding (1e-4 absolute, as in test_convert).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ATOL = 1e-4
VOCAB = 263  # the byte tokenizer's vocabulary


def _hf_model():
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


RUN_YAML = """\
model: {model}
train: {{mode: rl, steps: 1, micro_batch_size: 4, lr: 1.0e-3, log_interval: 1}}
sft: {{steps: 1, batch_size: 4, lr: 3.0e-3}}
data:
  ruler: {{tasks: [niah_single_1], lengths: [160], num_samples: 16, template: compact, number_digits: 3}}
rl: {{group_size: 2, prompts_per_step: 2, max_new_tokens: 4,
      reward: {{function: "megatron_longact.tasks.rewards:prefix_match"}}}}
longact: {{keep_ratio: 0.3}}
checkpoint: {{resume: none, load_weights: mcore}}
output: {{dir: {out}}}
"""


def _megatron_logits(model_cfg, folder, tokens):
    import dataclasses

    from megatron_longact.convert.checkpoint import load_dist_weights
    from megatron_longact.models.builder import build_model
    from megatron_longact.runtime import ParallelConfig, destroy, initialize

    runtime = initialize(ParallelConfig())
    try:
        model, _ = build_model(dataclasses.replace(model_cfg, transformer_impl="local"), runtime.parallel)
        load_dist_weights(model, folder)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            return model.eval()(tokens, pos, None).float()
    finally:
        destroy()


def _loop_worker(work: str, tokens: torch.Tensor, out) -> None:
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            os.environ.pop(key, None)
        torch.set_num_threads(1)
        import json

        from megatron_longact import checkpoint
        from megatron_longact.cli import convert, eval as eval_cli, train
        from megatron_longact.config import to_dict
        from megatron_longact.convert.checkpoint import read_meta
        from megatron_longact.run_config import load_run_config

        work = Path(work)
        confdir, elsewhere = work / "project", work / "elsewhere"
        confdir.mkdir()
        elsewhere.mkdir()
        torch.manual_seed(0)
        _hf_model().save_pretrained(work / "hf")
        assert convert.main(["hf-to-mcore", str(work / "hf"), str(confdir / "mcore")]) == 0
        model = to_dict(read_meta(confdir / "mcore")[0])
        (confdir / "run.yaml").write_text(RUN_YAML.format(model=json.dumps(model), out=work / "run"))
        # From another folder: load_weights: mcore must resolve against run.yaml's folder.
        os.chdir(elsewhere)
        assert train.main(["--config", str(confdir / "run.yaml")]) == 0
        root = work / "run" / "checkpoints"
        trained = checkpoint.latest_valid(root)
        assert trained is not None
        assert not checkpoint.has_legacy_object_keys(trained)

        assert eval_cli.main(["--checkpoint", str(root), "--lengths", "160", "--num-samples", "2",
                              "--tasks", "niah_single_1", "--max-new-tokens", "4",
                              "--out", str(work / "eval")]) == 0
        report = json.loads((work / "eval" / "results.json").read_text())
        assert convert.main(["mcore-to-hf", str(trained), str(work / "hf_out"),
                             "--hf-source", str(work / "hf")]) == 0
        cfg = load_run_config(checkpoint_run_config(trained))
        logits = _megatron_logits(cfg.model, trained, tokens)

        # A checkpoint with the old object keys: written as before, then exported and resumed.
        checkpoint.OBJECT_PREFIX = checkpoint.LEGACY_OBJECT_PREFIX
        legacy_over = [f"output.dir={work / 'legacy'}", "train.mode=sft", "train.steps=1",
                       "checkpoint.load_weights=null"]
        assert train.main(["--config", str(confdir / "run.yaml"), *legacy_over]) == 0
        checkpoint.OBJECT_PREFIX = "longact_objects."
        legacy = checkpoint.latest_valid(work / "legacy" / "checkpoints")
        legacy_flag = checkpoint.has_legacy_object_keys(legacy)
        legacy_export = convert.main(["mcore-to-hf", str(legacy), str(work / "hf_legacy")])
        from megatron_longact.runtime import ParallelConfig, destroy, initialize
        from megatron_longact.training.trainer import Trainer

        resume_cfg = load_run_config(confdir / "run.yaml", legacy_over[:2] + [
            "train.steps=2", "checkpoint.resume=auto", "checkpoint.load_weights=null"])
        runtime = initialize(ParallelConfig())
        try:
            resumed = [h["step"] for h in Trainer(resume_cfg, runtime).run()]
        finally:
            destroy()
        out.put(("ok", pickle.dumps({"report": report, "logits": logits, "trained": str(trained),
                                     "legacy_flag": legacy_flag, "legacy_export": legacy_export,
                                     "resumed": resumed})))
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put(("error", traceback.format_exc()))


def checkpoint_run_config(folder):
    from megatron_longact.trained import saved_run_config

    path = saved_run_config(folder)
    assert path is not None, f"no run config saved beside {folder}"
    return path


def test_train_eval_export_loop(tmp_path):
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_loop_worker, args=(str(tmp_path), tokens, out))
    proc.start()
    try:
        status, payload = out.get(timeout=400)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert status == "ok", payload
    res = pickle.loads(payload)
    assert res["report"]["summary"], res["report"]
    # The evaluation used the run's tokenizer and template, not the eval defaults.
    assert res["report"]["run"]["eval"]["suite"]["ruler"]["template"] == "compact"

    from safetensors.torch import load_file

    src = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "hf_out" / "model.safetensors"))
    assert sorted(src) == sorted(back)
    assert any(not torch.equal(src[n], back[n]) for n in src), "training changed no weight"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"),
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    got = res["logits"][..., :VOCAB]
    diff = (got - ref).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff:.3e} between megatron and the exported model"

    assert res["legacy_flag"] is True
    assert res["legacy_export"] == 0
    assert res["resumed"] == [1]
