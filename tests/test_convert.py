"""Hugging Face <-> megatron-core conversion: logit parity and a bit-exact round trip.

Tiny random models are built locally with ``transformers`` (no downloads) for the three families:
Qwen3 (QK-norm, tied embeddings), Qwen2 (QKV bias) and Llama 3 (Llama-3 RoPE scaling, untied).
Norm weights and biases are randomized too, so a swapped or misplaced tensor changes the logits.

Flow: ``longact-convert hf-to-mcore`` (one process, TP=PP=1) writes a megatron distributed
checkpoint; it is loaded at TP=1 and at TP=2/PP=2 (gloo), the logits are compared with the HF
model's; ``longact-convert mcore-to-hf`` writes safetensors again, compared bit for bit.

Tolerance. Everything runs in fp32 (HF eager attention, megatron local spec). The weights are
drawn with std 0.15 (not HF's 0.02) so that logits have std ~1.3 and attention and RoPE matter:
dropping the Llama-3 RoPE scaling alone moves the logits by ~0.1. The two implementations compute
the same function; at TP=1 on this CPU the logits came out bit-identical, at TP=2/PP=2 the TP
partial sums are all-reduced in another order and the max |diff| measured 4.5e-6. We allow 1e-4
absolute: ~20x the measured error, ~1000x below what a mapping error (a permuted head, gate/up
swapped, a missing norm or bias, unpadded vocabulary rows, a wrong RoPE) produces.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import traceback

import pytest
import torch

from megatron_longact.config import ConfigError
from megatron_longact.convert import hf as hfmap
from megatron_longact.models.config import ModelConfig
from tests.dist_harness import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

FAMILIES = ("qwen3", "qwen2", "llama3")
VOCAB, SEQ, BATCH = 300, 64, 2
ATOL = 1e-4


def _hf_model(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, attn_implementation="eager")
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            head_dim=16, tie_word_embeddings=True, rope_theta=10000.0, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            tie_word_embeddings=False, rope_theta=1000000.0, **common))
    else:
        # Llama 3.1 RoPE scaling; max_position_embeddings above the original 8192 as in 3.1.
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            **{**common, "max_position_embeddings": 16384}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            else:  # larger than HF's 0.02 init, so attention patterns and RoPE matter
                p.normal_(0.0, 0.15)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------
# Distributed pieces (module level: they run in spawned processes)
# ---------------------------------------------------------------------------------------------

def _megatron_logits(gpt_model, tokens: torch.Tensor, tconfig) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, padded_v] on the last pipeline stage (None elsewhere), through
    megatron's forward-only schedule so that PP stages pass activations as in training."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)

    def forward_step(data_iterator, model):
        return model(next(data_iterator), position_ids, None), None  # no loss: outputs returned

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[gpt_model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
        if not ps.is_pipeline_last_stage():
            return None
        return gather_from_tensor_model_parallel_region(outputs[0]).float()


def _load_and_forward(runtime, ckpt_dirs: dict, tokens: torch.Tensor) -> dict:
    import dataclasses

    from megatron_longact.convert.checkpoint import load_model_weights, read_meta
    from megatron_longact.models.builder import build_model

    out = {}
    for family, ckpt in ckpt_dirs.items():
        cfg, _ = read_meta(ckpt)
        cfg = dataclasses.replace(cfg, params_dtype="fp32", transformer_impl="local")
        model, tconfig = build_model(cfg, runtime.parallel)
        load_model_weights(model, ckpt, cfg)
        out[family] = _megatron_logits(model, tokens, tconfig)
        out[family + "/parameters"] = sum(p.numel() for p in model.parameters())
    return out


def _convert_worker(hf_dirs: dict, work: str, tokens: torch.Tensor, out) -> None:
    """hf-to-mcore and mcore-to-hf through the CLI for each family, then the TP=1 logits.

    A plain (non-daemonic) process: dist_checkpointing.save starts helper processes, which a
    daemonic process may not have."""
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            os.environ.pop(key, None)
        torch.set_num_threads(1)
        from megatron_longact.cli import convert as cli
        from megatron_longact.runtime import ParallelConfig, destroy, initialize

        ckpts, backs = {}, {}
        for family, hf_dir in hf_dirs.items():
            ckpts[family] = os.path.join(work, f"mcore_{family}")
            backs[family] = os.path.join(work, f"hf_back_{family}")
            assert cli.main(["hf-to-mcore", hf_dir, ckpts[family]]) == 0
            assert cli.main(["mcore-to-hf", ckpts[family], backs[family]]) == 0
        # A bare distributed checkpoint (as a training checkpoint holds it) with the model named by
        # a config file: once with the source HF folder for config.json, once generating it.
        import yaml

        from megatron_longact.config import to_dict
        from megatron_longact.convert.checkpoint import read_meta

        for family, hf_source in (("qwen2", hf_dirs["qwen2"]), ("llama3", None)):
            cfg_path = os.path.join(work, f"{family}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump({"model": to_dict(read_meta(ckpts[family])[0])}, f)
            backs[f"{family}/bare"] = os.path.join(work, f"hf_bare_{family}")
            argv = ["mcore-to-hf", os.path.join(ckpts[family], "weights"), backs[f"{family}/bare"],
                    "--config", cfg_path] + (["--hf-source", hf_source] if hf_source else [])
            assert cli.main(argv) == 0
        runtime = initialize(ParallelConfig())
        try:
            logits = _load_and_forward(runtime, ckpts, tokens)
        finally:
            destroy()
        out.put(("ok", pickle.dumps((ckpts, backs, logits))))
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put(("error", traceback.format_exc()))


def _run_plain_process(target, args, timeout: float = 240.0):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out))
    proc.start()
    try:
        status, payload = out.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise AssertionError(f"conversion process failed:\n{payload}")
    return pickle.loads(payload)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tokens = _tokens()
    dirs, ref = {}, {}
    torch.manual_seed(0)
    for family in FAMILIES:
        model = _hf_model(family)
        dirs[family] = str(root / family)
        model.save_pretrained(dirs[family])
        with torch.no_grad():
            ref[family] = model(tokens).logits.float()
    return {"dirs": dirs, "ref": ref, "tokens": tokens}


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("converted")
    ckpts, backs, logits = _run_plain_process(
        _convert_worker, (hf_models["dirs"], str(work), hf_models["tokens"]))
    return {"ckpts": ckpts, "backs": backs, "tp1_logits": logits}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def _check_logits(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape[:2] == ref.shape[:2], what
    padded = got.shape[-1]
    assert padded % 128 == 0 and padded >= VOCAB, f"{what}: padded vocab {padded}"
    diff = (got[..., :VOCAB] - ref).abs().max().item()
    assert diff < ATOL, f"{what}: max |logit diff| {diff:.3e} >= {ATOL}"


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_logits_match_hf(hf_models, converted, family):
    _check_logits(converted["tp1_logits"][family], hf_models["ref"][family], f"{family} TP=1")


def test_tp2_pp2_logits_match_hf(hf_models, converted):
    per_rank = run_distributed(_load_and_forward, tp=2, pp=2,
                               args=(converted["ckpts"], hf_models["tokens"]), timeout=240)
    # Ranks 2 and 3 are the last stage (TP ranks 0 and 1); both gathered the full vocabulary.
    for rank in (2, 3):
        for family in FAMILIES:
            _check_logits(per_rank[rank][family], hf_models["ref"][family], f"{family} TP=2/PP=2 rank {rank}")
    assert per_rank[0][FAMILIES[0]] is None and per_rank[1][FAMILIES[0]] is None
    # The planner's per-GPU parameter count, checked on these built models (rank = pp * 2 + tp).
    from megatron_longact.convert.checkpoint import read_meta
    from megatron_longact.plan import rank_parameters

    for family in FAMILIES:
        cfg, _ = read_meta(converted["ckpts"][family])
        for rank in range(4):
            assert per_rank[rank][family + "/parameters"] == rank_parameters(cfg, 2, 2, rank // 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(hf_models, converted, family):
    from safetensors.torch import load_file

    src = load_file(os.path.join(hf_models["dirs"][family], "model.safetensors"))
    back = load_file(os.path.join(converted["backs"][family], "model.safetensors"))
    assert sorted(src) == sorted(back)
    for name, tensor in src.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), f"{family}: {name} changed in the round trip"
    cfg_src = json.load(open(os.path.join(hf_models["dirs"][family], "config.json")))
    cfg_back = json.load(open(os.path.join(converted["backs"][family], "config.json")))
    assert cfg_back == cfg_src
    assert os.path.isfile(os.path.join(converted["backs"][family], "generation_config.json"))
    # The published folders hold no staging leftovers.
    parent = os.path.dirname(converted["backs"][family])
    assert not [n for n in os.listdir(parent) if n.endswith(".partial") or n.endswith(".old")]


def test_export_from_a_bare_checkpoint_with_a_config(hf_models, converted):
    """mcore-to-hf on a plain distributed checkpoint (what a training checkpoint holds) plus the
    run config: the same weights; with --hf-source the same config.json, without it a generated
    config.json that transformers loads into the same model."""
    from safetensors.torch import load_file

    src = load_file(os.path.join(hf_models["dirs"]["qwen2"], "model.safetensors"))
    back = load_file(os.path.join(converted["backs"]["qwen2/bare"], "model.safetensors"))
    assert sorted(src) == sorted(back) and all(torch.equal(back[n], src[n]) for n in src)
    cfg_src = json.load(open(os.path.join(hf_models["dirs"]["qwen2"], "config.json")))
    assert json.load(open(os.path.join(converted["backs"]["qwen2/bare"], "config.json"))) == cfg_src

    generated = converted["backs"]["llama3/bare"]
    model = transformers.AutoModelForCausalLM.from_pretrained(generated, attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(hf_models["tokens"]).logits.float()
    assert torch.equal(logits, hf_models["ref"]["llama3"])


def test_checkpoint_records_the_model(converted):
    from megatron_longact.convert.checkpoint import read_meta

    cfg, meta = read_meta(converted["ckpts"]["qwen2"])
    assert cfg.family == "qwen2" and cfg.add_qkv_bias and cfg.padded_vocab_size == 384
    assert cfg.params_dtype == "fp32" and meta["source"].endswith("qwen2")
    assert os.path.isfile(os.path.join(converted["ckpts"]["qwen2"], "weights", "metadata.json"))


# ---------------------------------------------------------------------------------------------
# Pure mapping (no processes)
# ---------------------------------------------------------------------------------------------

def _cfg(**kw) -> ModelConfig:
    base = dict(family="qwen2", num_layers=1, hidden_size=8, ffn_hidden_size=12,
                num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=10,
                max_position_embeddings=32, add_qkv_bias=True, params_dtype="fp32")
    base.update(kw)
    return ModelConfig(**base)


def test_fused_qkv_rows_follow_the_group_layout():
    cfg = _cfg()  # nh=4, ng=2, G=2, hn=3: group block = [q0, q1, k0, v0] then [q2, q3, k1, v1]
    nh, ng, hn, h = 4, 2, 3, 8
    q = torch.arange(nh * hn * h, dtype=torch.float32).reshape(nh * hn, h)
    k = -torch.arange(ng * hn * h, dtype=torch.float32).reshape(ng * hn, h) - 1
    v = 1000 + torch.arange(ng * hn * h, dtype=torch.float32).reshape(ng * hn, h)
    qkv = hfmap.fuse_qkv(q, k, v, cfg)
    R = (nh // ng + 2) * hn
    for head in range(nh):
        row = (head // 2) * R + (head % 2) * hn
        assert torch.equal(qkv[row:row + hn], q[head * hn:(head + 1) * hn])
    for g in range(ng):
        assert torch.equal(qkv[g * R + 2 * hn:g * R + 3 * hn], k[g * hn:(g + 1) * hn])
        assert torch.equal(qkv[g * R + 3 * hn:g * R + 4 * hn], v[g * hn:(g + 1) * hn])
    for a, b in zip(hfmap.split_qkv(qkv, cfg), (q, k, v)):
        assert torch.equal(a, b)
    bias = hfmap.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], cfg)
    assert torch.equal(bias, qkv[:, 0])


def test_state_dict_mapping_round_trips_and_pads():
    cfg = _cfg(tie_word_embeddings=False, vocab_size=10)
    gen = torch.Generator().manual_seed(0)
    hf_sd = {}
    for name in hfmap.hf_names(cfg):
        shape = {
            "model.embed_tokens.weight": (10, 8), "lm_head.weight": (10, 8), "model.norm.weight": (8,),
        }.get(name)
        if shape is None:
            suffix = name.split(".", 3)[3]
            shape = {"self_attn.q_proj.weight": (12, 8), "self_attn.k_proj.weight": (6, 8),
                     "self_attn.v_proj.weight": (6, 8), "self_attn.q_proj.bias": (12,),
                     "self_attn.k_proj.bias": (6,), "self_attn.v_proj.bias": (6,),
                     "self_attn.o_proj.weight": (8, 12), "mlp.gate_proj.weight": (12, 8),
                     "mlp.up_proj.weight": (12, 8), "mlp.down_proj.weight": (8, 12),
                     "input_layernorm.weight": (8,), "post_attention_layernorm.weight": (8,)}[suffix]
        hf_sd[name] = torch.randn(shape, generator=gen)
    g = hfmap.hf_to_global(hf_sd, cfg)
    assert sorted(g) == sorted(hfmap.global_names(cfg))
    emb = g["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 8) and not emb[10:].any()
    fc1 = g["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:12], hf_sd["model.layers.0.mlp.gate_proj.weight"])
    back = hfmap.global_to_hf(g, cfg)
    assert sorted(back) == sorted(hf_sd)
    assert all(torch.equal(back[n], hf_sd[n]) for n in hf_sd)
    te_name = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert hfmap.canonical_name(te_name) == "decoder.layers.0.input_layernorm.weight"


def test_config_mapping_both_ways():
    hf = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
          "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    cfg = hfmap.model_config_from_hf(hf)
    assert (cfg.family, cfg.kv_channels, cfg.params_dtype, cfg.rope_scaling) == ("llama3", 128, "bf16", True)
    assert cfg.num_parameters() == 70_553_706_496  # Llama-3.1-70B's published count
    gen = hfmap.hf_config_from_model_config(cfg)
    again = hfmap.model_config_from_hf(gen)
    assert again == cfg
    # transformers reads the generated config (legacy RoPE keys) into the same shape.
    tcfg = transformers.AutoConfig.for_model(**gen)
    assert tcfg.num_key_value_heads == 8 and tcfg.head_dim == 128
    # The transformers-5 spelling of RoPE parameters reads the same.
    hf5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    hf5["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": 500000.0}
    assert hfmap.model_config_from_hf(hf5) == cfg


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"attention_bias": True}, "attention_bias true is not supported for family llama3"),
])
def test_unsupported_configs_fail_clearly(change, message):
    hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
          "max_position_embeddings": 256}
    hf.update(change)
    with pytest.raises(ConfigError, match=message):
        hfmap.model_config_from_hf(hf)


def test_cli_rejects_bad_input_before_starting(tmp_path, capsys):
    from megatron_longact.cli import convert as cli

    assert cli.main(["hf-to-mcore", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["mcore-to-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "longact_model.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--max-shard-size"):
        cli.parse_size("lots")
    assert cli.parse_size("5GB") == 5 * 2**30 and cli.parse_size("500MB") == 500 * 2**20


def test_shard_writer_splits_and_indexes(tmp_path):
    from safetensors.torch import load_file

    writer = hfmap.SafetensorsShardWriter(tmp_path, max_shard_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200 and len(index["weight_map"]) == 5
    loaded = {}
    for f in names:
        loaded.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    # The reader follows the index across shards.
    (tmp_path / "config.json").write_text("{}")
    reader = hfmap.HFCheckpoint(tmp_path)
    assert sorted(reader.keys()) == sorted(tensors)
    assert torch.equal(reader.get("t3"), tensors["t3"])
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        reader.get("missing")
