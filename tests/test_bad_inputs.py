"""Every foreseeable bad input to the command-line tools: exit code 2, exactly one line on stderr
that names the field, file or record, and no process group or model was ever created.

Each case runs through the real entry point (``main([...])`` in this process, so the suite stays
fast); ``test_a_bad_input_in_a_real_process`` checks a few through ``python -m`` as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longact.cli import ablate as ablate_cli
from megatron_longact.cli import convert as convert_cli
from megatron_longact.cli import eval as eval_cli
from megatron_longact.cli import plan as plan_cli
from megatron_longact.cli import train as train_cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "model" / "tiny.yaml"


def _record(i=0, **over):
    rec = {"id": f"r{i}", "suite": "ruler", "task": "niah_single_1", "prompt": "The key is 123. Key?",
           "answer_prefix": "", "answer": "123", "references": ["123"], "metric": "all",
           "max_new_tokens": 4, "num_tokens": 20, "groups": {}, "metadata": {}}
    rec.update(over)
    return rec


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _fake_checkpoint(folder: Path, *, tp=1, pp=1, checksum=False, **model) -> Path:
    """A checkpoint folder as far as the pre-flight checks read it: files and a manifest in the
    format the checkpoint module writes (sizes, optional CRC32, layout, model shape)."""
    import zlib

    import yaml

    folder.mkdir(parents=True)
    (folder / "common.pt").write_bytes(os.urandom(256))
    (folder / "__0_0.distcp").write_bytes(os.urandom(1024))
    files = {}
    for p in sorted(folder.iterdir()):
        files[p.name] = {"size": p.stat().st_size}
        if checksum:
            files[p.name]["crc32"] = zlib.crc32(p.read_bytes())
    shape = {**yaml.safe_load(TINY.read_text())["model"], **model}
    (folder / "manifest.json").write_text(json.dumps({
        "step": 2, "files": files, "checksum": checksum, "layout": {"tp": tp, "pp": pp, "dp": 1},
        "model": shape}))
    return folder


@pytest.fixture
def world(tmp_path):
    """Files the cases point at, built once per test (cheap)."""
    w = {"tmp": tmp_path}
    data = tmp_path / "data"
    data.mkdir()
    w["good_jsonl"] = _write_jsonl(data / "good.jsonl", [_record(i) for i in range(4)])
    w["malformed"] = data / "malformed.jsonl"
    w["malformed"].write_text(json.dumps(_record()) + "\n{\"id\": \"r1\", \n")
    w["no_field"] = _write_jsonl(data / "no_field.jsonl", [{k: v for k, v in _record().items() if k != "answer"}])
    w["wrong_type"] = _write_jsonl(data / "wrong_type.jsonl", [_record(max_new_tokens="four")])
    w["bad_metric"] = _write_jsonl(data / "bad_metric.jsonl", [_record(metric="fuzzy")])
    w["empty"] = data / "empty.jsonl"
    w["empty"].write_text("\n")
    w["latin1"] = data / "latin1.jsonl"
    w["latin1"].write_bytes(json.dumps(_record()).encode() + b"\n" +
                            json.dumps(_record(1, prompt="caf_")).encode().replace(b"caf_", b"caf\xe9") + b"\n")
    w["not_parquet"] = data / "records.parquet"
    w["not_parquet"].write_text("this is not parquet\n")
    w["too_long"] = _write_jsonl(data / "too_long.jsonl", [_record(0), _record(1, prompt="x" * 5000)])
    tok = tmp_path / "tok"
    tok.mkdir()
    w["tok_empty"] = tok / "empty"
    w["tok_empty"].mkdir()
    w["tok_garbage"] = tok / "garbage"
    w["tok_garbage"].mkdir()
    (w["tok_garbage"] / "tokenizer.json").write_text("{not json")
    (w["tok_garbage"] / "tokenizer_config.json").write_text("garbage")
    ck = tmp_path / "ck"
    w["ck_empty"] = ck / "empty"
    w["ck_empty"].mkdir(parents=True)
    w["ck_truncated"] = _fake_checkpoint(ck / "truncated" / "iter_0000002")
    with open(w["ck_truncated"] / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    w["ck_no_manifest"] = _fake_checkpoint(ck / "nomanifest" / "iter_0000002")
    (w["ck_no_manifest"] / "manifest.json").unlink()
    w["ck_bad_manifest"] = _fake_checkpoint(ck / "badmanifest" / "iter_0000002")
    (w["ck_bad_manifest"] / "manifest.json").write_text("{\"step\": 2, \"files\": [")
    w["ck_flipped"] = _fake_checkpoint(ck / "flipped" / "iter_0000002", checksum=True)
    blob = bytearray((w["ck_flipped"] / "common.pt").read_bytes())
    blob[10] ^= 0xFF
    (w["ck_flipped"] / "common.pt").write_bytes(bytes(blob))
    w["ck_other_shape"] = _fake_checkpoint(ck / "shape" / "iter_0000002", hidden_size=128)
    w["ck_other_tp"] = _fake_checkpoint(ck / "tp2" / "iter_0000002", tp=2)
    w["ck_root"] = ck / "tp2"
    (w["ck_root"] / "latest_checkpointed_iteration.txt").write_text("2\n")
    w["ck_dangling"] = ck / "dangling"
    w["ck_dangling"].mkdir()
    (w["ck_dangling"] / "latest_checkpointed_iteration.txt").write_text("7\n")
    w["ck_old_layout"] = ck / "old"
    (w["ck_old_layout"] / "step_00000004").mkdir(parents=True)
    w["a_file"] = tmp_path / "a_file"
    w["a_file"].write_text("x")
    hf = tmp_path / "hf"
    w["hf_invalid"] = hf / "invalid"
    w["hf_invalid"].mkdir(parents=True)
    (w["hf_invalid"] / "config.json").write_text("{\"model_type\": \"qwen3\",")
    w["hf_incomplete"] = hf / "incomplete"
    w["hf_incomplete"].mkdir()
    (w["hf_incomplete"] / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64}))
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(w["hf_incomplete"] / "model.safetensors"))
    w["hf_bad_weights"] = hf / "bad_weights"
    w["hf_bad_weights"].mkdir()
    (w["hf_bad_weights"] / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (w["hf_bad_weights"] / "model.safetensors").write_bytes(b"\x00" * 4)
    w["bad_yaml"] = tmp_path / "bad.yaml"
    w["bad_yaml"].write_text("model: [unclosed\n")
    return w


def _rl(out, *extra):
    """A valid tiny RL run on the JSONL file (every case changes one thing)."""
    return ["--config", str(TINY), "train.mode=rl", "train.steps=2", "sft.steps=1", "sft.batch_size=2",
            "rl.group_size=2", "rl.prompts_per_step=2", "rl.max_new_tokens=4",
            f"output.dir={out}", *extra]


def _jsonl(w, key):
    return ["data.source=jsonl", f"data.path={w[key]}"]


# (id, entry point, argv builder, text the one line must contain)
CASES = [
    # -- data ------------------------------------------------------------------------------------
    ("jsonl-missing", "train", lambda w, o: _rl(o, "data.source=jsonl", f"data.path={w['tmp']}/nope.jsonl"), "nope.jsonl"),
    ("jsonl-malformed-line", "train", lambda w, o: _rl(o, *_jsonl(w, "malformed")), "malformed.jsonl:2"),
    ("jsonl-missing-field", "train", lambda w, o: _rl(o, *_jsonl(w, "no_field")), "'answer'"),
    ("jsonl-wrong-type", "train", lambda w, o: _rl(o, *_jsonl(w, "wrong_type")), "'max_new_tokens'"),
    ("jsonl-bad-metric", "train", lambda w, o: _rl(o, *_jsonl(w, "bad_metric")), "'metric'"),
    ("jsonl-empty", "train", lambda w, o: _rl(o, *_jsonl(w, "empty")), "empty.jsonl holds no records"),
    ("jsonl-not-utf8", "train", lambda w, o: _rl(o, *_jsonl(w, "latin1")), "latin1.jsonl:2: not UTF-8"),
    ("parquet-not-parquet", "train", lambda w, o: _rl(o, "data.source=parquet", f"data.path={w['not_parquet']}"),
     "records.parquet is not a readable parquet file"),
    ("data-path-is-folder", "train", lambda w, o: _rl(o, "data.source=jsonl", f"data.path={w['tmp']}"), "is not a file"),
    ("record-longer-than-context", "train", lambda w, o: _rl(o, *_jsonl(w, "too_long"), "model.max_position_embeddings=1024"),
     "line 2 (record 'r1')"),
    # -- tokenizer -------------------------------------------------------------------------------
    ("tokenizer-missing-path", "train", lambda w, o: _rl(o, "data.tokenizer.kind=tokenizers",
                                                         f"data.tokenizer.path={w['tmp']}/notok"), "notok does not exist"),
    ("tokenizer-garbage", "train", lambda w, o: _rl(o, "data.tokenizer.kind=tokenizers",
                                                    f"data.tokenizer.path={w['tok_garbage']}"), "could not be loaded"),
    ("tokenizer-empty-folder-tokenizers", "train", lambda w, o: _rl(o, "data.tokenizer.kind=tokenizers",
                                                                    f"data.tokenizer.path={w['tok_empty']}"), "is an empty folder"),
    ("tokenizer-empty-folder-hf", "train", lambda w, o: _rl(o, "data.tokenizer.kind=hf",
                                                            f"data.tokenizer.path={w['tok_empty']}"), "is an empty folder"),
    ("tokenizer-garbage-hf", "train", lambda w, o: _rl(o, "data.tokenizer.kind=hf",
                                                       f"data.tokenizer.path={w['tok_garbage']}"), "data.tokenizer.path"),
    # -- resume ----------------------------------------------------------------------------------
    ("resume-missing-folder", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['tmp']}/gone"), "gone does not exist"),
    ("resume-empty-folder", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_empty']}"), "has no manifest.json"),
    ("resume-truncated-file", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_truncated']}"), "__0_0.distcp has 100 bytes"),
    ("resume-missing-manifest", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_no_manifest']}"), "has no manifest.json"),
    ("resume-corrupt-manifest", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_bad_manifest']}"), "manifest.json is corrupt"),
    ("resume-same-size-corruption", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_flipped']}"), "common.pt fails its CRC32"),
    ("resume-other-model-shape", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_other_shape']}"), "model.hidden_size is 128"),
    ("resume-other-tp", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_other_tp']}"), "saved with TP=2, PP=1"),
    ("resume-auto-other-tp", "train", lambda w, o: _rl(o, f"checkpoint.dir={w['ck_root']}"), "saved with TP=2, PP=1"),
    ("resume-names-a-root", "train", lambda w, o: _rl(o, f"checkpoint.resume={w['ck_root']}"), "is a checkpoint root"),
    ("resume-auto-dangling-tracker", "train", lambda w, o: _rl(o, f"checkpoint.dir={w['ck_dangling']}"),
     "names iteration 7"),
    ("resume-auto-old-layout", "train", lambda w, o: _rl(o, f"checkpoint.dir={w['ck_old_layout']}"), "old step_NNNNNNNN layout"),
    ("resume-Auto-capitalised", "train", lambda w, o: _rl(o, "checkpoint.resume=Auto"), "did you mean 'auto'"),
    # -- folders ---------------------------------------------------------------------------------
    ("checkpoint-dir-is-a-file", "train", lambda w, o: _rl(o, f"checkpoint.dir={w['a_file']}"), "checkpoint.dir"),
    ("output-dir-is-a-file", "train", lambda w, o: _rl(f"{w['a_file']}"), "output.dir"),
    ("output-dir-under-a-file", "train", lambda w, o: _rl(f"{w['a_file']}/run"), "output.dir"),
    # -- config values ---------------------------------------------------------------------------
    ("keep-ratio-nan", "train", lambda w, o: _rl(o, "longact.keep_ratio=nan"), "longact.keep_ratio"),
    ("lr-inf", "train", lambda w, o: _rl(o, "train.lr=inf"), "train.lr"),
    ("lr-minus-inf", "train", lambda w, o: _rl(o, "train.lr=-.inf"), "train.lr"),
    ("temperature-nan", "train", lambda w, o: _rl(o, "rl.temperature=nan"), "rl.temperature"),
    ("clip-grad-nan", "train", lambda w, o: _rl(o, "train.clip_grad=.nan"), "train.clip_grad"),
    ("kl-coef-inf", "train", lambda w, o: _rl(o, "rl.kl_coef=inf"), "rl.kl_coef"),
    ("override-not-yaml", "train", lambda w, o: _rl(o, "train.lr=[1e-3"), "train.lr"),
    ("override-no-equals", "train", lambda w, o: _rl(o, "train.lr"), "expected key=value"),
    ("unknown-key", "train", lambda w, o: _rl(o, "train.learning_rate=1e-3"), "train.learning_rate"),
    ("wrong-type", "train", lambda w, o: _rl(o, "train.steps=many"), "train.steps"),
    ("config-missing", "train", lambda w, o: ["--config", f"{w['tmp']}/none.yaml"], "none.yaml does not exist"),
    ("config-not-yaml", "train", lambda w, o: ["--config", str(w["bad_yaml"])], "bad.yaml is not valid YAML"),
    ("unknown-option", "train", lambda w, o: _rl(o, "--stepz", "3"), "--stepz"),
    ("ruler-length-too-small", "train", lambda w, o: _rl(o, "data.ruler.lengths=[160]",
                                                          "data.ruler.tasks=[niah_single_3]"), "data.ruler: ruler task niah_single_3"),
    ("eval-length-over-context", "train", lambda w, o: _rl(o, "evaluation.lengths=[8192]"), "evaluation.lengths[0]"),
    ("fp16-training", "train", lambda w, o: _rl(o, "model.params_dtype=fp16"), "model.params_dtype"),
    # -- reward ----------------------------------------------------------------------------------
    ("reward-raises", "train", lambda w, o: _rl(o, *_jsonl(w, "good_jsonl"), "rl.reward.function=tests.bad_rewards:raises"),
     "raised KeyError on record 'r0'"),
    ("reward-out-of-range", "train", lambda w, o: _rl(o, *_jsonl(w, "good_jsonl"),
                                                      "rl.reward.function=tests.bad_rewards:out_of_range"), "returned 2.0 for record 'r0'"),
    ("reward-not-a-number", "train", lambda w, o: _rl(o, "rl.reward.function=tests.bad_rewards:not_a_number"), "returned '1.0'"),
    ("reward-wrong-signature", "train", lambda w, o: _rl(o, "rl.reward.function=tests.bad_rewards:one_argument"),
     "cannot be called as fn(response, record)"),
    ("reward-not-callable", "train", lambda w, o: _rl(o, "rl.reward.function=tests.bad_rewards:NOT_CALLABLE"), "not callable"),
    ("reward-module-missing", "train", lambda w, o: _rl(o, "rl.reward.function=no_such_module:f"), "no_such_module"),
    # -- the other tools -------------------------------------------------------------------------
    ("plan-gpu-memory-nan", "plan", lambda w, o: ["--config", str(ROOT / "configs/demo_cpu.yaml"), "--nodes", "1",
                                                  "--gpu-memory-gib", "nan"], "--gpu-memory-gib"),
    ("plan-config-missing", "plan", lambda w, o: ["--config", f"{w['tmp']}/none.yaml", "--nodes", "1"], "none.yaml"),
    ("ablate-seeds-not-integers", "ablate", lambda w, o: ["--config", str(ROOT / "configs/demo_cpu.yaml"),
                                                          "--seeds", "1,abc"], "--seeds: got '1,abc'"),
    ("convert-invalid-config-json", "convert", lambda w, o: ["hf-to-mcore", str(w["hf_invalid"]), f"{o}/mc"],
     "config.json: not valid JSON"),
    ("convert-incomplete-config-json", "convert", lambda w, o: ["hf-to-mcore", str(w["hf_incomplete"]), f"{o}/mc"],
     "config.json: missing"),
    ("convert-bad-safetensors", "convert", lambda w, o: ["hf-to-mcore", str(w["hf_bad_weights"]), f"{o}/mc"],
     "model.safetensors: not a readable safetensors file"),
    ("convert-missing-source", "convert", lambda w, o: ["hf-to-mcore", f"{w['tmp']}/nohf", f"{o}/mc"], "nohf"),
    ("eval-config-missing", "eval", lambda w, o: ["--config", f"{w['tmp']}/none.yaml"], "none.yaml"),
]

ENTRY = {"train": train_cli, "plan": plan_cli, "ablate": ablate_cli, "convert": convert_cli, "eval": eval_cli}


def _forbid_heavy_work(monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("a process group or a model was created although the input is bad")

    import megatron_longact.models.builder as builder
    import megatron_longact.runtime as runtime
    import megatron_longact.runtime.distributed as distributed
    import megatron_longact.training.engine as engine

    for module in (train_cli, eval_cli, runtime, distributed):
        monkeypatch.setattr(module, "initialize", must_not_run)
    monkeypatch.setattr(engine, "setup_engine", must_not_run)
    monkeypatch.setattr(builder, "build_model", must_not_run)
    monkeypatch.setattr(ablate_cli.subprocess, "run", must_not_run)


def test_the_table_has_enough_cases():
    assert len(CASES) >= 45
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,tool,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(name, tool, argv, expected, world, monkeypatch, capsys):
    _forbid_heavy_work(monkeypatch)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    out = world["tmp"] / "out"
    rc = ENTRY[tool].main(argv(world, str(out)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (name, rc, err)
    assert len(lines) == 1, (name, err)
    assert expected in lines[0], (name, lines[0])
    assert "Traceback" not in err


def test_a_bad_input_in_a_real_process(world):
    """The same answer from ``python -m``: one line, exit code 2, before any process group."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    argv = _rl(str(world["tmp"] / "out"), f"checkpoint.resume={world['ck_other_tp']}")
    proc = subprocess.run([sys.executable, "-m", "megatron_longact.cli.train", *argv], capture_output=True,
                          text=True, timeout=120, env=env, cwd=world["tmp"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "saved with TP=2, PP=1" in lines[0], proc.stderr[-2000:]
    assert not (world["tmp"] / "out" / "config.yaml").exists()  # nothing ran
