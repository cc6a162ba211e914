"""Build megatron-core GPTModels from a :class:`ModelConfig`.

Local (pure megatron-core) layer spec on the CPU; Transformer Engine spec when TE is importable and
CUDA is present (or when asked for). The builder only builds: wrapping in Float16Module and DDP is
:func:`wrap_for_training`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_longact.config import ConfigError
from megatron_longact.models.config import ModelConfig
from megatron_longact.runtime import ParallelConfig

PARAMS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return torch.cuda.is_available()


def use_transformer_engine(cfg: ModelConfig) -> bool:
    if cfg.transformer_impl == "local":
        return False
    available = transformer_engine_available()
    if cfg.transformer_impl == "transformer_engine" and not available:
        raise ConfigError(
            "model.transformer_impl: 'transformer_engine' needs Transformer Engine and CUDA; "
            "install transformer-engine[pytorch] on a GPU machine or use 'local'"
        )
    return available


def fused_kernel_flags(te: bool) -> dict:
    """``gradient_accumulation_fusion`` and ``apply_rope_fusion``: on where their kernels exist.

    Gradient-accumulation fusion accumulates weight gradients straight into DDP's fp32
    ``main_grad`` buffer inside the wgrad GEMM (TE's linears do it themselves; megatron's own
    ColumnParallelLinear, the output layer, needs Apex's ``fused_weight_gradient_mlp_cuda``, which
    a pip-only install lacks). RoPE fusion is TE's fused rotary kernel. Both stay off on the CPU
    path and with the local spec, where the kernels cannot run.
    """
    if not te:
        return dict(gradient_accumulation_fusion=False, apply_rope_fusion=False)
    import importlib.util

    from megatron_longact.compat import require_attr

    fused_rope = require_attr("megatron.core.models.common.embeddings.rope_utils",
                              "fused_apply_rotary_pos_emb")
    return dict(gradient_accumulation_fusion=importlib.util.find_spec("fused_weight_gradient_mlp_cuda")
                is not None,
                apply_rope_fusion=fused_rope is not None)


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig):
    """The megatron-core TransformerConfig for this model and layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_layout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                     parallel.context_parallel_size)
    dtype = PARAMS_DTYPES[cfg.params_dtype]
    cpu = not torch.cuda.is_available()
    fp8 = {}
    if cfg.fp8 != "none":
        if not use_transformer_engine(cfg):
            raise ConfigError("model.fp8: FP8 runs through Transformer Engine, which is not importable "
                              "here (or CUDA is missing); install transformer-engine[pytorch]")
        fp8 = dict(fp8=cfg.fp8, fp8_recipe="delayed")
    recompute = {}
    if cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif cfg.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=bool(parallel.sequence_parallel),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.params_dtype == "bf16",
        fp16=cfg.params_dtype == "fp16",
        # Fused kernels come from Apex/TE/CUDA; the CPU path uses the plain torch ops.
        use_cpu_initialization=cpu,
        bias_dropout_fusion=not cpu,
        masked_softmax_fusion=not cpu,
        persist_layer_norm=False,
        **fused_kernel_flags(use_transformer_engine(cfg)),
        **recompute,
        **fp8,
    )


def layer_spec(cfg: ModelConfig):
    """Transformer Engine's GPT layer spec, or megatron's local one with the core attention that
    ``model.core_attention`` names (models/attention.py); either way with the self-attention whose
    KV cache holds rotated keys (models/self_attention.py)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from megatron_longact.models.self_attention import CachedRopeSelfAttention

    # The spec functions build a fresh spec per call, so these edits touch no shared object.
    if use_transformer_engine(cfg):
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
        spec.submodules.self_attention.module = CachedRopeSelfAttention
        return spec
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.module = CachedRopeSelfAttention
    if cfg.core_attention == "sdpa":
        from megatron_longact.models.attention import SDPADotProductAttention

        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec


def build_model(cfg: ModelConfig, parallel: ParallelConfig):
    """Build this rank's GPTModel (one pipeline stage) on the current device.

    megatron's parallel state must be initialized (see :func:`megatron_longact.runtime.initialize`).
    Returns ``(model, transformer_config)``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tconfig = transformer_config(cfg, parallel)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        parallel_output=True,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, tconfig


def wrap_for_training(model, tconfig, *, use_distributed_optimizer: bool = True,
                      grad_reduce_in_fp32: bool = True, bucket_size: int | None = None):
    """Float16Module (for bf16/fp16) and megatron-core DDP around ``model``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    if tconfig.bf16 or tconfig.fp16:
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        # megatron only splits the gradient buffer into buckets when it overlaps their reduction.
        overlap_grad_reduce=bucket_size is not None,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=bucket_size,
    )
    return DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
