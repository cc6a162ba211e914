"""Hugging Face <-> megatron-core weight mapping for Qwen3 (dense), Qwen2/Qwen2.5 and Llama 3.

Index spaces. An *HF* tensor is a tensor of a ``transformers`` checkpoint under its HF name
(``model.layers.3.self_attn.q_proj.weight``). A *global* tensor is a whole megatron-core weight
under its global name (``decoder.layers.3.self_attention.linear_qkv.weight``: the layer index is
the global layer, as :mod:`megatron_longact.models.sharding` defines it). Tensor- and
pipeline-parallel cutting of global tensors is :mod:`megatron_longact.models.sharding`'s job;
this module only converts between HF and global tensors.

What the mapping does (nothing else changes; values are copied bit for bit):

- ``q_proj``, ``k_proj``, ``v_proj`` (and their biases for Qwen2) -> ``linear_qkv``: megatron's
  fused rows are grouped per key/value group, ``[q heads of the group..., k, v]``, each ``hn``
  rows (hn = head dim). With nh query heads, ng groups and G = nh / ng, global row
  ``g * (G + 2) * hn + j * hn + d`` is q head ``g * G + j`` (j < G), k of group g (j = G) or v of
  group g (j = G + 1), dimension d.
- ``gate_proj``, ``up_proj`` -> ``linear_fc1`` = cat[gate; up] along rows (megatron's SwiGLU
  applies silu to the first half); ``down_proj`` -> ``linear_fc2``.
- ``embed_tokens`` / ``lm_head`` get zero rows up to the padded vocabulary; export strips them.
- Rotary embedding: both sides rotate the pairs (d, d + hn/2) (HF ``rotate_half``, megatron's
  non-interleaved RoPE), so q/k rows are not permuted. The logit-parity test checks this.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from megatron_longact.config import ConfigError
from megatron_longact.models.config import ModelConfig

_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# Per family: HF model_type, architecture class, and the config keys that carry nothing for
# megatron but that a generated config.json should state.
_FAMILIES = {
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "llama3": ("llama", "LlamaForCausalLM"),
}
_MODEL_TYPES = {model_type: family for family, (model_type, _) in _FAMILIES.items()}

# Megatron's Llama-3 RoPE scaling (RotaryEmbedding._apply_scaling) hard-codes these.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}

# The Transformer Engine layer spec fuses the norms into the following linear layer; its
# parameter names map onto the local spec's names used here.
_TE_ALIASES = (
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
)

_GLOBAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer names: global suffix -> HF suffix, for the tensors that map one to one.
_LAYER_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def _rope(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either the transformers-4 keys (``rope_theta``,
    ``rope_scaling``) or the transformers-5 ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


# config.json keys every supported architecture needs.
_REQUIRED_HF_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                     "vocab_size", "max_position_embeddings")


def model_config_from_hf(hf_config: Mapping, family: str | None = None, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (as a dict).

    ``family`` defaults to the one named by ``model_type`` (qwen3, qwen2, llama -> llama3).
    ``overrides`` set ModelConfig fields that HF does not describe (params_dtype defaults to the
    checkpoint's dtype so that conversion never rounds; make_vocab_size_divisible_by to 128).
    Raises ConfigError for a model this converter cannot represent exactly (another activation,
    biases where megatron has none, sliding-window attention, an unsupported RoPE scaling).
    """
    hf = dict(hf_config)
    missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
    if missing:
        raise ConfigError(f"config.json: missing {', '.join(missing)}; expected a complete Hugging Face "
                          f"model config")
    model_type = hf.get("model_type")
    if family is None:
        if model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported; expected one of "
                f"{sorted(_MODEL_TYPES)} (or pass family=qwen3|qwen2|llama3)"
            )
        family = _MODEL_TYPES[model_type]
    if family not in _FAMILIES:
        raise ConfigError(f"family: got {family!r}, expected one of {sorted(_FAMILIES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported; expected 'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
        raise ConfigError("config.json: mlp_bias true is not supported (the megatron layers built "
                          "here have no MLP bias)")
    if family in ("qwen3", "llama3") and hf.get("attention_bias"):
        raise ConfigError(f"config.json: attention_bias true is not supported for family {family}; "
                          "only Qwen2 (family qwen2) has a QKV bias")
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window true is not supported; megatron attends "
                          "to the whole causal context")
    theta, scaling = _rope(hf)
    rope_scaling, rope_factor = False, 8.0
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(f"config.json: rope scaling type {kind!r} is not supported; megatron's "
                              "RotaryEmbedding implements only 'llama3'")
        for key, value in _LLAMA3_ROPE_FIXED.items():
            if float(scaling.get(key, value)) != value:
                raise ConfigError(f"config.json: rope scaling {key}={scaling.get(key)} is not "
                                  f"supported; megatron's llama3 RoPE scaling fixes it to {value}")
        rope_scaling, rope_factor = True, float(scaling.get("factor", 8.0))
    heads = int(hf["num_attention_heads"])
    dtype_name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    if dtype_name not in _DTYPE_NAMES:
        raise ConfigError(f"config.json: dtype {dtype_name!r} is not supported; expected one of "
                          f"{sorted(_DTYPE_NAMES)}")
    fields = dict(
        family=family,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        # Always explicit, so a config read back from a generated config.json compares equal.
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        rotary_base=theta,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        qk_layernorm=family == "qwen3",
        add_qkv_bias=family == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=_DTYPE_NAMES[dtype_name],
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model_config(cfg: ModelConfig, base: Mapping | None = None) -> dict:
    """A Hugging Face ``config.json`` dict for ``cfg``.

    With ``base`` (the config.json the weights came from), that dict is returned with the shape
    fields checked, so that tokenizer ids, generation settings and other fields survive a round
    trip; a shape that disagrees raises ConfigError. Without it, a complete config is generated
    with the transformers-4 RoPE keys (``rope_theta``, ``rope_scaling``), which transformers 5
    also reads.
    """
    model_type, arch = _FAMILIES[cfg.family]
    if base is not None:
        out = dict(base)
        derived = model_config_from_hf(out, cfg.family)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "kv_channels", "qk_layernorm",
                     "add_qkv_bias", "tie_word_embeddings", "rope_scaling"):
            if getattr(derived, name) != getattr(cfg, name):
                raise ConfigError(f"model.{name}: the checkpoint has {getattr(cfg, name)!r} but its "
                                  f"Hugging Face config.json says {getattr(derived, name)!r}")
        return out
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": {v: k for k, v in _DTYPE_NAMES.items()}[cfg.params_dtype],
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                               **_LLAMA3_ROPE_FIXED}
    if cfg.family == "llama3":
        out.update(attention_bias=False, mlp_bias=False)
    elif cfg.family == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Global ``linear_qkv`` weight (2-D) or bias (1-D) from HF q/k/v; see the module docstring."""
    nh, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    tail = q.shape[1:]
    expect = [(nh * hn, *tail), (ng * hn, *tail), (ng * hn, *tail)]
    for name, t, shape in zip("qkv", (q, k, v), expect):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}_proj: shape {tuple(t.shape)}, expected {tuple(shape)}")
    q_g = q.reshape(ng, (nh // ng) * hn, *tail)
    k_g = k.reshape(ng, hn, *tail)
    v_g = v.reshape(ng, hn, *tail)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape((nh + 2 * ng) * hn, *tail)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: HF (q, k, v) from the global ``linear_qkv`` tensor."""
    nh, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    g = nh // ng
    tail = qkv.shape[1:]
    grouped = qkv.reshape(ng, (g + 2) * hn, *tail)
    q, k, v = grouped.split([g * hn, hn, hn], dim=1)
    return (q.reshape(nh * hn, *tail).contiguous(), k.reshape(ng * hn, *tail).contiguous(),
            v.reshape(ng * hn, *tail).contiguous())


def pad_vocab(weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Embedding / output weight with zero rows up to ``cfg.padded_vocab_size``."""
    if weight.shape[0] != cfg.vocab_size:
        raise ValueError(f"vocabulary weight has {weight.shape[0]} rows, config says vocab_size="
                         f"{cfg.vocab_size}")
    pad = cfg.padded_vocab_size - cfg.vocab_size
    if pad == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])], dim=0)


def canonical_name(global_name: str) -> str:
    """Local-spec global name of a parameter (Transformer Engine's fused-norm names mapped)."""
    for pattern, repl in _TE_ALIASES:
        global_name = pattern.sub(repl, global_name)
    return global_name


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of the model, in the order HF writes them."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight"]
        if cfg.add_qkv_bias:
            names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias",
                      p + "self_attn.v_proj.bias"]
        names.append(p + "self_attn.o_proj.weight")
        if cfg.qk_layernorm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight",
                  p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def global_names(cfg: ModelConfig) -> list[str]:
    """Every global megatron parameter name of the model (local spec, PP=1)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        names.append(p + "input_layernorm.weight")
        names.append(p + "self_attention.linear_qkv.weight")
        if cfg.add_qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if cfg.qk_layernorm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def global_tensor_from_hf(name: str, get_hf: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Global tensor ``name`` built from HF tensors fetched with ``get_hf(hf_name)``."""
    name = canonical_name(name)
    if name == "embedding.word_embeddings.weight":
        return pad_vocab(get_hf("model.embed_tokens.weight"), cfg)
    if name == "output_layer.weight":
        source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return pad_vocab(get_hf(source), cfg)
    if name == "decoder.final_layernorm.weight":
        return get_hf("model.norm.weight")
    m = _GLOBAL_LAYER.match(name)
    if m is None:
        raise KeyError(f"{name}: not a parameter of a {cfg.family} model")
    layer, suffix = int(m.group(1)), m.group(2)
    p = f"model.layers.{layer}."
    if suffix in _LAYER_ONE_TO_ONE:
        return get_hf(p + _LAYER_ONE_TO_ONE[suffix])
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return fuse_qkv(*(get_hf(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), cfg)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([get_hf(p + "mlp.gate_proj.weight"), get_hf(p + "mlp.up_proj.weight")], dim=0)
    raise KeyError(f"{name}: not a parameter of a {cfg.family} model")


def hf_tensors_from_global(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF tensors stored in global tensor ``name`` (padding rows stripped)."""
    name = canonical_name(name)
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": tensor[: cfg.vocab_size]}
    if name == "output_layer.weight":
        return {} if cfg.tie_word_embeddings else {"lm_head.weight": tensor[: cfg.vocab_size]}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": tensor}
    m = _GLOBAL_LAYER.match(name)
    if m is None:
        raise KeyError(f"{name}: not a parameter of a {cfg.family} model")
    layer, suffix = int(m.group(1)), m.group(2)
    p = f"model.layers.{layer}."
    if suffix in _LAYER_ONE_TO_ONE:
        return {p + _LAYER_ONE_TO_ONE[suffix]: tensor}
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor, cfg)
        return {f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                f"{p}self_attn.v_proj.{kind}": v}
    if suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
    raise KeyError(f"{name}: not a parameter of a {cfg.family} model")


def hf_to_global(hf_tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every global tensor from a complete HF state dict (for small models and tests)."""
    return {n: global_tensor_from_hf(n, hf_tensors.__getitem__, cfg) for n in global_names(cfg)}


def global_to_hf(global_tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every HF tensor from a complete dict of global tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in global_tensors.items():
        out.update(hf_tensors_from_global(name, tensor, cfg))
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

# Files of an HF model folder that are not weights and travel through a conversion unchanged.
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
             "added_tokens.json", "chat_template.jinja", "chat_template.json")


class HFCheckpoint:
    """Read-only view of a Hugging Face model folder: ``config.json`` and safetensors weights
    (one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``), read one
    tensor at a time so a 70B checkpoint never has to fit in memory at once."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{self.path}: no config.json; expected a Hugging Face model folder")
        self.config = _read_json(config_path)
        if not isinstance(self.config, dict):
            raise ConfigError(f"{config_path}: expected a JSON object")
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index}: no 'weight_map' object")
        elif single.is_file():
            weight_map = None
        else:
            raise ConfigError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json; "
                              "only safetensors checkpoints are supported")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        for f in files:
            try:
                self._handles[f] = safe_open(str(self.path / f), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors' errors for a missing or bad file
                raise ConfigError(f"{self.path / f}: not a readable safetensors file "
                                  f"({type(exc).__name__}: {exc})") from None
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        return self._handles[self.weight_map[name]].get_tensor(name)

    def check_complete(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when expected tensors are missing or unknown ones are present."""
        expected = set(hf_names(cfg))
        present = set(self.weight_map)
        # Tied checkpoints may still store lm_head (a copy of the embedding).
        extra = present - expected - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        extra = {n for n in extra if not n.endswith("rotary_emb.inv_freq")}
        missing = expected - present
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {sorted(missing)[:5]}")
            if extra:
                parts.append(f"unexpected {sorted(extra)[:5]}")
            raise ConfigError(f"{self.path}: weights do not match a {cfg.family} model with "
                              f"{cfg.num_layers} layers: " + "; ".join(parts))


class SafetensorsShardWriter:
    """Write HF tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
    ``max_shard_bytes`` (plus the index), holding only the current shard in memory.

    A single shard is written as ``model.safetensors`` without an index, as HF does."""

    def __init__(self, path: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.path = Path(path)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # clone: safetensors refuses views that share storage (split q/k/v, the stripped vocab).
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        idx = len(self._files)
        save_file(self._pending, str(self.path / f"shard-{idx:05d}.tmp.safetensors"),
                  metadata={"format": "pt"})
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards, write the index; return the file names."""
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            (self.path / f"shard-{i:05d}.tmp.safetensors").rename(self.path / final)
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self._files) for t in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def iter_hf_tensors(global_items: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs from global (name, tensor) pairs, one global tensor at a time."""
    for name, tensor in global_items:
        yield from hf_tensors_from_global(name, tensor, cfg).items()


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return _TORCH_DTYPES[cfg.params_dtype]
