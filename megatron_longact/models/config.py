"""Model shape configuration (Qwen3-, Qwen2- and Llama-3-style decoder-only transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_longact.config import ConfigError, check_choice, check_positive


@dataclass
class ModelConfig:
    """Shape and options of a GPT-style model, named after Hugging Face config fields where
    megatron has no better name. ``configs/model/*.yaml`` hold the shipped shapes."""

    family: Literal["qwen3", "qwen2", "llama3"]
    """Architecture family; checked against the flags below so a config cannot mix them up."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """Intermediate size of the SwiGLU MLP (HF ``intermediate_size``)."""
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    vocab_size: int
    """Tokenizer vocabulary; the embedding is padded up to make_vocab_size_divisible_by."""
    max_position_embeddings: int
    head_dim: int | None = None
    """Per-head dimension; None means hidden_size / num_attention_heads (Qwen3 sets it explicitly)."""
    rotary_base: float = 10000.0
    """RoPE theta (HF ``rope_theta``)."""
    rope_scaling: bool = False
    """Llama-3.1-style RoPE frequency scaling."""
    rope_scaling_factor: float = 8.0
    qk_layernorm: bool = False
    """RMSNorm on each query and key head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2/2.5)."""
    tie_word_embeddings: bool = False
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this. Independent of TP so that every layout computes
    the same logits; it must itself be divisible by the tensor-parallel size."""
    params_dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    """Dtype of the model weights; bf16 keeps fp32 main weights in the optimizer."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: auto uses Transformer Engine when it is importable and CUDA is present."""
    core_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of the local layer spec: PyTorch's fused ``scaled_dot_product_attention``
    (models/attention.py) or megatron's own ``DotProductAttention`` (materialised scores). Same
    function up to rounding; Transformer Engine's spec always uses TE's attention."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (megatron's recompute_granularity)."""
    fp8: Literal["none", "hybrid", "e4m3"] = "none"
    """FP8 compute through Transformer Engine (delayed scaling) with BF16 primary weights; needs
    the Transformer Engine layer spec and CUDA. FP8 primary weights are not supported by LongAct."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings", "head_dim",
                     "make_vocab_size_divisible_by"):
            check_positive(f"model.{name}", getattr(self, name))
        check_positive("model.rotary_base", self.rotary_base)
        check_positive("model.norm_epsilon", self.norm_epsilon)
        check_choice("model.family", self.family, ("qwen3", "qwen2", "llama3"))
        check_choice("model.fp8", self.fp8, ("none", "hybrid", "e4m3"))
        check_choice("model.core_attention", self.core_attention, ("sdpa", "megatron"))
        if self.fp8 != "none" and self.transformer_impl == "local":
            raise ConfigError("model.fp8: FP8 needs transformer_impl 'transformer_engine' or 'auto', not 'local'")
        if self.fp8 != "none" and self.params_dtype != "bf16":
            raise ConfigError(f"model.fp8: FP8 compute expects params_dtype bf16, got {self.params_dtype}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ConfigError(
                f"model.num_query_groups: {self.num_query_groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"model.head_dim: not set and model.hidden_size={self.hidden_size} is not divisible "
                f"by model.num_attention_heads={self.num_attention_heads}; set head_dim"
            )
        if self.family == "qwen3" and self.add_qkv_bias:
            raise ConfigError("model.add_qkv_bias: Qwen3 has no QKV bias (family qwen3); use family qwen2")
        if self.family != "qwen3" and self.qk_layernorm:
            raise ConfigError(f"model.qk_layernorm: only family qwen3 has QK-norm, not {self.family}")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    def check_layout(self, tp: int, pp: int, cp: int = 1) -> None:
        """Raise ConfigError when the model cannot be split over (tp, pp, cp)."""
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size: {tp} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_query_groups % tp and tp % self.num_query_groups:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size: {tp} and model.num_query_groups="
                f"{self.num_query_groups} must divide one another"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size: {tp} does not divide "
                f"model.ffn_hidden_size={self.ffn_hidden_size}"
            )
        if self.make_vocab_size_divisible_by % tp:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by: {self.make_vocab_size_divisible_by} is not "
                f"divisible by parallel.tensor_model_parallel_size={tp}"
            )
        if self.num_layers % pp:
            raise ConfigError(
                f"parallel.pipeline_model_parallel_size: {pp} does not divide "
                f"model.num_layers={self.num_layers}"
            )

    def num_parameters(self) -> int:
        """Parameter count of the unsharded model (padded vocabulary), for planning and tests."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        d = self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        attn += 2 * d if self.qk_layernorm else 0
        mlp = 2 * h * f + f * h
        norms = 2 * h
        embed = self.padded_vocab_size * h
        out = 0 if self.tie_word_embeddings else embed
        return L * (attn + mlp + norms) + embed + out + h
