"""Model, DDP, optimizer and scheduler set-up, and one optimizer step through megatron's schedule.

Every training mode (LM smoke test now; SFT and RL later) drives the same :class:`Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_longact.models.builder import PARAMS_DTYPES, build_model, unwrap, wrap_for_training
from megatron_longact.models.config import ModelConfig
from megatron_longact.models.sharding import load_global_tensors, reference_init
from megatron_longact.runtime import ParallelConfig
from megatron_longact.training.config import TrainConfig


@dataclass
class Engine:
    model: list  # model chunks (DDP-wrapped), one per virtual pipeline stage
    optimizer: object  # megatron ChainedOptimizer
    scheduler: object  # megatron OptimizerParamScheduler
    tconfig: object  # megatron TransformerConfig
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    parallel: ParallelConfig

    @property
    def gpt_models(self) -> list:
        return [unwrap(m) for m in self.model]


def reference_initialize(gpt_model, model_cfg: ModelConfig, seed: int) -> None:
    """Give every parameter its layout-independent initial value (see sharding.reference_init), so
    that runs with different (TP, PP, DP) start from the same weights."""
    from megatron.core import parallel_state

    def full(name, shape):
        return reference_init(name, shape, std=model_cfg.init_method_std,
                              num_layers=model_cfg.num_layers, seed=seed)

    load_global_tensors(gpt_model, full,
                        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                        tp_size=parallel_state.get_tensor_model_parallel_world_size())


def optimizer_config(train_cfg: TrainConfig, model_cfg: ModelConfig):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.clip_grad,
        bf16=model_cfg.params_dtype == "bf16",
        fp16=model_cfg.params_dtype == "fp16",
        params_dtype=PARAMS_DTYPES[model_cfg.params_dtype],
        use_distributed_optimizer=train_cfg.use_distributed_optimizer,
    )


def setup_engine(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel: ParallelConfig,
                 trainable: Callable[[str], bool] | None = None, *,
                 initialize_weights: bool = True) -> Engine:
    """Build, initialize and wrap the model; build the optimizer and LR schedule.

    ``trainable(name)``, when given, picks the parameters that train (the others get
    ``requires_grad=False`` before DDP and the optimizer see them, e.g. to time the optimizer step
    of one layer shape alone). ``initialize_weights=False`` skips the layout-independent reference
    initialization (it draws every global weight on every rank: billions of normals at 70B) for
    callers that load all weights from a checkpoint right after."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gpt, tconfig = build_model(model_cfg, parallel)
    if initialize_weights:
        reference_initialize(gpt, model_cfg, train_cfg.seed)
    if trainable is not None:
        for name, param in gpt.named_parameters():
            param.requires_grad_(trainable(name))
    ddp = wrap_for_training(gpt, tconfig, use_distributed_optimizer=train_cfg.use_distributed_optimizer,
                            bucket_size=train_cfg.ddp_bucket_size)
    chunks = [ddp]
    optimizer = get_megatron_optimizer(optimizer_config(train_cfg, model_cfg), chunks)
    # megatron's schedule calls these hooks; the training loop of Megatron-LM sets them the same way.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = ddp.no_sync
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train_cfg.lr_warmup_steps else train_cfg.lr,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.lr_warmup_steps,
        lr_decay_steps=max(train_cfg.steps, train_cfg.lr_warmup_steps + 1),
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=train_cfg.steps,
        wd_incr_style="constant",
    )
    return Engine(chunks, optimizer, scheduler, tconfig, model_cfg, train_cfg, parallel)


def forward_backward(engine: Engine, forward_step: Callable, micro_batches: Iterator,
                     num_microbatches: int, seq_length: int, micro_batch_size: int) -> list:
    """Zero the gradients, then forward/backward over the micro-batches through megatron's
    schedule (with pipelining when PP > 1), which also reduces the gradients over DP. Returns
    the schedule's per-micro-batch loss dicts (last stage only). The first half of
    :func:`train_step`; the optimizer benchmarks time the step apart from it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in engine.model:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batches,
        model=engine.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )


def train_step(engine: Engine, forward_step: Callable, micro_batches: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, *, skip_non_finite: bool = True) -> dict:
    """One optimizer step: forward/backward over the micro-batches through megatron's schedule
    (with pipelining when PP > 1), gradient reduction, clipping and the optimizer update.

    With ``skip_non_finite`` a step whose loss or gradients hold NaN/inf on any rank is skipped:
    no optimizer update (parameters, optimizer state and the LongAct masks, which update inside
    ``optimizer.step``, stay as they were) and no LR-schedule step; ``"skipped"`` says so.

    Returns ``{"losses": [per-micro-batch loss dicts (last stage only)], "grad_norm", "lr" (the
    learning rate of this update),
    "update_successful", "skipped"}``.
    """
    from megatron_longact.training.resilience import step_is_finite

    losses = forward_backward(engine, forward_step, micro_batches, num_microbatches, seq_length,
                              micro_batch_size)
    # The learning rate this update uses (the scheduler moves it on after the update; a caller
    # may have set it for this step, as the SFT warm start does with sft.lr).
    lr = engine.optimizer.param_groups[0]["lr"]
    if skip_non_finite and not step_is_finite(engine.model, losses):
        return {"losses": losses, "grad_norm": float("nan"), "lr": lr,
                "update_successful": False, "skipped": True}
    update_successful, grad_norm, _ = engine.optimizer.step()
    engine.scheduler.step(increment=1)
    return {
        "losses": losses,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "update_successful": bool(update_successful),
        "skipped": False,
    }


def _last_stage_reduce(local: list[float], op: str) -> list[float]:
    """``local`` (computed on the last pipeline stage) reduced with ``op`` over its data-parallel
    ranks, then broadcast to every rank of the pipeline."""
    from megatron.core import parallel_state as ps

    from megatron_longact.runtime import collectives

    total = [0.0] * len(local)
    if ps.is_pipeline_last_stage():
        total = collectives.all_reduce_values(local, ps.get_data_parallel_group(), op=op)
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        group = ps.get_pipeline_model_parallel_group()
        t = torch.tensor(total, dtype=torch.float64, device=collectives.comm_device(group))
        total = collectives.broadcast(t, pp - 1, group).tolist()
    return total


def reduce_last_stage_mean(values: list[float]) -> float:
    """Mean of a per-micro-batch scalar over micro-batches and data-parallel ranks, computed on
    the last pipeline stage and broadcast to every rank of the pipeline."""
    total = _last_stage_reduce([float(sum(values)), float(len(values))], "sum")
    return float(total[0] / total[1])


def reduce_last_stage(values: list[float], op: str) -> float:
    """Sum (``op="sum"``) or maximum (``"max"``, 0 for none) of a per-micro-batch scalar over
    micro-batches and data-parallel ranks, as :func:`reduce_last_stage_mean` computes the mean."""
    local = float(sum(values)) if op == "sum" else max(map(float, values), default=0.0)
    return float(_last_stage_reduce([local], op)[0])

