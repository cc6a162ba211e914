"""Dry-run planner: check a run's parallel layout and estimate its per-GPU memory before queueing.

:func:`make_plan` validates the layout of a :class:`RunConfig` on ``nodes x gpus_per_node`` GPUs
(world size, divisibility of heads, groups, FFN, layers and vocabulary, context parallelism against
the sequence length, the batch) and estimates the memory of the fullest GPU; :func:`format_plan`
prints it. ``longact-plan`` is the command line.

Memory model (bytes per GPU; all of it is an estimate, stated so that it can be checked):

* Parameters of one rank, counted exactly for the layers megatron builds (see
  :func:`rank_parameters`; the tests compare it with built models): weights in ``params_dtype``
  (bf16: 2 B).
* Gradients: megatron DDP's contiguous buffer, 4 B per parameter with ``grad_reduce_in_fp32`` (the
  default of :func:`megatron_longact.models.builder.wrap_for_training`), else the parameter size.
  The buffer is full size on every rank; the distributed optimizer reduce-scatters into it.
* Optimizer: fp32 main weights + Adam ``exp_avg`` + ``exp_avg_sq`` = 12 B per parameter for bf16
  weights (8 B for fp32 weights, which are their own main copy), divided by DP x CP with the
  distributed optimizer (megatron shards over the data-parallel group with context parallelism).
* FP8 (Transformer Engine, delayed scaling): +2 B per linear-layer parameter for the FP8 weight
  and its transpose; the inputs TE saves for the backward of a linear layer are FP8 (1 B).
* Activations per transformer layer and micro-batch (Korthikanti et al. 2022, "Reducing
  activation recomputation in large transformer models", redone for SwiGLU, GQA, QK-norm and no
  dropout), with s' = seq_length / CP tokens per rank, b = micro_batch_size, divided by TP (with
  sequence parallelism every term is split over TP):

      2 s'b h   (input norm in) + 2 s'b h (QKV in) + 2 s'b (nh + 2 ng) hn (q, k, v)
    + 2 s'b (nh + ng) hn (QK-norm in, Qwen3) + 2 s'b nh hn (attention out) + 4 s'b nh (softmax lse)
    + 2 s'b h (pre-MLP norm in) + 2 s'b h (fc1 in) + 4 s'b f (fc1 out) + 2 s'b f (fc2 in)

  For GPT's shape (MHA, 4h GeLU MLP) the same count gives 32 s'bh, the paper's 34 s'bh less its two
  dropout masks. Attention is assumed flash/cuDNN fused (no s^2 term), as Transformer Engine runs
  it on H100; so ``selective`` recomputation (megatron recomputes core attention) saves nothing
  more and is estimated like ``none``. ``full`` (uniform, one layer per checkpoint) keeps only each
  layer's input (2 s'bh / TP) plus one layer's full activations while that layer recomputes.
  With the 1F1B pipeline schedule stage i holds min(PP - i, micro-batches) micro-batches in
  flight. The last stage adds the logits of one micro-batch: 8 B per vocab-parallel logit (the bf16
  output, the fp32 copy that megatron's vocab-parallel cross entropy keeps as softmax for the
  backward, the bf16 gradient).
* LongAct, all of it kept between steps (static): its own state, measured on the real objects
  (:func:`megatron_longact.longact.controller.persistent_state_bytes`: packed masks, churn, the
  EMA, the last step's per-layer metrics, this rank's fp32 statistics accumulators; about 0.8 MB
  per rank at 70B), and with ``apply_to=update`` the optimizer state it keeps compact: the kept
  q/k rows (and short V runs) of each ``linear_qkv`` main shard, whose two fp32 moments (with 1/8
  slack) and fp32 value and gradient buffers exist beside megatron's full-layout tensors, about
  17 B per kept element (:func:`megatron_longact.longact.optimizer.compact_state_bound`, an upper
  bound; divided over the distributed optimizer's shards). The optimizer step itself adds only
  row-index arrays.
* Optional: a KL reference model (bf16 weights, same sharding, no gradients or optimizer state;
  implied by ``rl.kl_coef > 0`` when the run config has an rl section).
* RL runs (``train.mode: rl``): the batch comes from the ``rl`` section (``prompts_per_step x
  group_size`` sequences per RL step, split over DP, then into ``mini_batches`` optimizer steps of
  micro-batches), not from ``train.global_batch_size``, which only LM mode reads. Sequences are
  planned at ``train.seq_length`` tokens (prompt + response). Two more phases:
  - rollout with the native engine (megatron's static KV cache,
    :func:`megatron_longact.generation.generate`): each DP replica's rows run in sub-batches bounded
    by the memory left beside the static part (generation's default budget: 85% of the free
    memory); a row costs :func:`megatron_longact.generation.generation_bytes_per_row` (its KV cache
    over the whole width, one layer's prefill transient without sequence parallelism, its fp32
    last-token logits). A layout where not even one row fits does not fit. Native generation does
    not run under context parallelism: such a plan is refused (as the trainer refuses the run).
  - rollout with a colocated vLLM engine (:func:`vllm_engine_memory`): the engine takes
    ``rollout.gpu_memory_utilization`` of each of its GPUs (stage 0's), as static memory, or, with
    ``rollout.enable_sleep_mode``, only in a phase of its own (it sleeps while the policy trains);
    a weight sync adds twice the largest full parameter to every GPU. A plan whose engine has no
    room for the KV cache of one full-length sequence is refused. External servers
    (``vllm_server``) use no memory of the training GPUs. Host memory is not planned against a
    limit, but the plan states what the weight pushes take of it (:func:`vllm_host_memory`): the
    whole model per engine in shared memory, kept between pushes with engine TP 1, twice that
    during a push with engine TP > 1.
  - teacher-forced log-prob forwards (old policy, reference): one micro-batch's logits in bf16,
    their fp32 copy and the temperature-scaled copy (10 B per vocab-parallel logit) plus one layer's
    transient, no gradients.
* Fixed reserve for the CUDA context, NCCL buffers and library workspaces (default 4 GiB), and a
  fraction of the device kept free for allocator fragmentation (default 10%).

Peak = static (weights, gradients, optimizer, FP8 copies, reference model, LongAct state,
reserve) + the largest of the phases that do not overlap: forward/backward activations, the
rollout KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_longact.config import ConfigError
from megatron_longact.longact.config import LongActConfig
from megatron_longact.models.config import ModelConfig
from megatron_longact.run_config import RunConfig

GiB = 2**30
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class PlanOptions:
    """What the run config does not say (yet) but memory depends on."""

    gpu_memory_gib: float = 80.0
    """Device memory (H100 SXM: 80 GiB; megatron sees ~79.1 GiB after the CUDA context)."""
    reserve_gib: float = 4.0
    """CUDA context, NCCL communicator buffers, cuBLAS/cuDNN workspaces."""
    fragmentation: float = 0.10
    """Fraction of the device kept free for the caching allocator's fragmentation."""
    fp8: bool = False
    """Transformer Engine FP8 linear layers (hybrid E4M3/E5M2, delayed scaling)."""
    grad_reduce_in_fp32: bool = True
    reference_model: bool = False
    """A frozen KL reference policy kept on the GPUs (GRPO with a KL term)."""
    rollout_sequences: int = 0
    """Sequences of ``seq_length`` tokens generated at once per data-parallel replica (KV cache);
    0 plans RL runs' rollouts from the ``rl`` section (native engine) and leaves other runs'
    out."""
    longact_enabled: bool = True
    """False plans without LongAct's state whatever the config says."""
    longact: LongActConfig | None = None
    """LongAct settings; None takes the run config's ``longact`` section, or LongActConfig's
    defaults (keep ratio 0.3, exact freeze of the update) when the config has none."""

    def __post_init__(self):
        if self.gpu_memory_gib <= 0:
            raise ConfigError(f"gpu_memory_gib: got {self.gpu_memory_gib}, expected a number > 0")
        if not 0 <= self.fragmentation < 1:
            raise ConfigError(f"fragmentation: got {self.fragmentation}, expected a value in [0, 1)")
        if self.rollout_sequences < 0:
            raise ConfigError(f"rollout_sequences: got {self.rollout_sequences}, expected >= 0")


@dataclass
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage`` (every TP/CP/DP rank of a stage is alike)."""

    stage: int
    parameters: int
    static: dict[str, int]
    """Held through the whole step."""
    phases: dict[str, int]
    """Phases that do not overlap; the largest one adds to the static part."""

    @property
    def static_total(self) -> int:
        return sum(self.static.values())

    @property
    def peak(self) -> int:
        return self.static_total + max(self.phases.values())


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    stages: list[StageMemory]
    numbers: dict[str, str]
    """Step-time-independent numbers, already formatted, in print order."""
    warnings: list[str]
    usable_bytes: int
    device_bytes: int
    refusals: list[str] = dataclasses.field(default_factory=list)
    """Reasons the run cannot start whatever the memory (e.g. native generation under CP)."""

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.usable_bytes


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------

def layer_parameters(cfg: ModelConfig, tp: int = 1) -> dict[str, int]:
    """Parameters of one transformer layer on one TP rank, by kind (``linear`` are the matrices
    Transformer Engine runs in FP8; ``qkv`` is the fused QKV weight and bias)."""
    h, f, hn = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    qkv_rows = (nh + 2 * ng) * hn
    qkv = qkv_rows * h // tp + (qkv_rows // tp if cfg.add_qkv_bias else 0)
    linear = qkv_rows * h // tp + nh * hn * h // tp + 3 * f * h // tp
    replicated = 2 * h + (2 * hn if cfg.qk_layernorm else 0)  # norms are not split over TP
    total = linear + (qkv_rows // tp if cfg.add_qkv_bias else 0) + replicated
    return {"total": total, "linear": linear, "qkv": qkv}


def rank_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Exact parameter count of one tensor-parallel rank of pipeline stage ``stage``, as megatron
    builds it: the stage's layers, the vocab-parallel embedding on the first stage, the final norm
    and output layer on the last. With tied embeddings and PP > 1 the last stage holds its own
    copy of the embedding as output layer (megatron keeps the two in sync)."""
    per_layer = layer_parameters(cfg, tp)["total"]
    n = cfg.num_layers // pp * per_layer
    vocab = cfg.padded_vocab_size * cfg.hidden_size // tp
    if stage == 0:
        n += vocab
    if stage == pp - 1:
        n += cfg.hidden_size
        if not cfg.tie_word_embeddings or pp > 1:
            n += vocab
    return n


# ---------------------------------------------------------------------------------------------
# Layout checks
# ---------------------------------------------------------------------------------------------

def check_layout(run: RunConfig, nodes: int, gpus_per_node: int):
    """The resolved ParallelConfig, or ConfigError naming what does not divide. Adds to
    :meth:`RunConfig.check_layout` what only matters on the GPU cluster: sequence parallelism's
    and context parallelism's requirements on the sequence length."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    world = nodes * gpus_per_node
    parallel = run.check_layout(world)
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    seq = run.train.seq_length
    if cp > 1 and seq % (2 * cp):
        raise ConfigError(
            f"train.seq_length: {seq} is not divisible by 2 x parallel.context_parallel_size = "
            f"{2 * cp}; megatron's load-balanced context parallelism cuts each sequence into 2 x CP chunks")
    sp = parallel.sequence_parallel
    if sp is None:
        sp = tp > 1  # what initialize() chooses on CUDA
    if sp and (seq // cp) % tp:
        raise ConfigError(
            f"train.seq_length: {seq} / context_parallel_size {cp} = {seq // cp} tokens per rank is "
            f"not divisible by tensor_model_parallel_size={tp}, which sequence parallelism needs")
    return dataclasses.replace(parallel, sequence_parallel=sp)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, *, sequence_parallel: bool = True,
                           fp8: bool = False) -> int:
    """Bytes one transformer layer keeps for its backward, for ``tokens`` tokens (s' x b) on one
    TP rank, without recomputation (formula in the module docstring)."""
    h, f, hn = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    lin_in = 1 if fp8 else 2  # bytes of a saved linear-layer input
    # Residual-stream tensors: split over TP only with sequence parallelism.
    seq_split = tp if sequence_parallel else 1
    norm_inputs = 2 * 2 * tokens * h // seq_split
    linear_inputs_h = 2 * lin_in * tokens * h // seq_split  # QKV in, fc1 in
    heads = (2 * (nh + 2 * ng) * hn + (2 * (nh + ng) * hn if cfg.qk_layernorm else 0)
             + 2 * nh * hn + (lin_in * nh * hn if fp8 else 0) + 4 * nh) * tokens // tp
    mlp = (4 * f + lin_in * f) * tokens // tp
    return norm_inputs + linear_inputs_h + heads + mlp


def _longact_bytes(cfg: ModelConfig, la: LongActConfig | None, tp: int, pp: int, shard: int,
                   tokens: int) -> tuple[int, int]:
    """(kept between steps, forward transient) bytes of LongAct on one rank."""
    if la is None or not la.enabled:
        return 0, 0
    from megatron_longact.longact.controller import persistent_state_bytes
    from megatron_longact.longact.layout import QKGeometry
    from megatron_longact.longact.optimizer import compact_state_bound

    geometry = QKGeometry(cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups,
                          cfg.kv_channels)
    layers = cfg.num_layers // pp
    compact = compact_state_bound(la, geometry, cfg.hidden_size, tp_size=tp, local_layers=layers,
                                  bias=cfg.add_qkv_bias and la.include_bias)
    persistent = persistent_state_bytes(la, geometry, layers) + math.ceil(compact / shard)
    channels = (cfg.num_attention_heads + cfg.num_query_groups) * cfg.kv_channels
    forward = 4 * tokens * channels // tp  # |q|, |k| of one layer in fp32 while its hook runs
    return persistent, forward


def rl_batch(run: RunConfig, dp: int) -> dict | None:
    """The RL step's batch numbers from the ``rl`` section (None for other modes)."""
    rl = getattr(run, "rl", None)
    if run.train.mode != "rl" or rl is None:
        return None
    sequences = rl.prompts_per_step * rl.group_size
    per_rank = sequences // dp
    per_mini = per_rank // rl.mini_batches
    return {"sequences": sequences, "per_rank": per_rank, "per_mini": per_mini,
            "micro_batches": max(math.ceil(per_mini / run.train.micro_batch_size), 1),
            "updates": rl.ppo_epochs * rl.mini_batches, "max_new_tokens": rl.max_new_tokens}


def _rollout_engine(run: RunConfig) -> str:
    return getattr(getattr(run, "rollout", None), "engine", "megatron")


def rollout_row_bytes(run: RunConfig, tp: int, pp: int, prefill: int) -> int:
    """Bytes of one native-generation row on one GPU (see the module docstring)."""
    from megatron_longact.generation import generation_bytes_per_row

    cfg = run.model
    return generation_bytes_per_row(
        num_layers=cfg.num_layers // pp, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        head_dim=cfg.kv_channels, padded_vocab_size=cfg.padded_vocab_size, tp=tp,
        width=run.train.seq_length, prefill=prefill, dtype_bytes=_DTYPE_BYTES[cfg.params_dtype],
        fused_attention=cfg.transformer_impl != "local" or cfg.core_attention == "sdpa")


def stage_memory(run: RunConfig, parallel, stage: int, opts: PlanOptions,
                 usable: int | None = None) -> StageMemory:
    cfg, train = run.model, run.train
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp, dp = parallel.context_parallel_size, parallel.data_parallel_size
    sp = bool(parallel.sequence_parallel)
    n = rank_parameters(cfg, tp, pp, stage)
    pbytes = _DTYPE_BYTES[cfg.params_dtype]
    layers = cfg.num_layers // pp
    shard = dp * cp if train.use_distributed_optimizer else 1
    items: dict[str, int] = {}
    items["weights"] = n * pbytes
    items["gradients"] = n * (4 if opts.grad_reduce_in_fp32 else pbytes)
    items["optimizer"] = math.ceil(n * (12 if pbytes == 2 else 8) / shard)
    if opts.fp8:
        items["fp8 weight copies"] = 2 * layers * layer_parameters(cfg, tp)["linear"]
    if opts.reference_model:
        items["reference model"] = n * 2
    tokens = train.seq_length // cp * train.micro_batch_size
    la_persistent, la_forward = _longact_bytes(cfg, opts.longact, tp, pp, shard, tokens)
    items["longact state"] = la_persistent
    items["reserve"] = int(opts.reserve_gib * GiB)

    # Forward/backward activations.
    rlb = rl_batch(run, dp)
    num_mb = rlb["micro_batches"] if rlb else train.num_microbatches(dp)
    in_flight = min(pp - stage, num_mb)
    full_layer = layer_activation_bytes(cfg, tokens, tp, sequence_parallel=sp, fp8=opts.fp8)
    seq_split = tp if sp else 1
    if cfg.recompute == "full":
        stored = in_flight * layers * 2 * tokens * cfg.hidden_size // seq_split
        activations = stored + full_layer
    else:
        activations = in_flight * layers * full_layer
    if stage == pp - 1:
        activations += 8 * tokens * cfg.padded_vocab_size // tp
    activations += la_forward
    phases = {"activations": activations}
    if opts.rollout_sequences:
        kv = kv_cache_bytes_per_sequence(cfg, train.seq_length, tp, pp)
        phases["rollout kv cache"] = kv * opts.rollout_sequences
    elif rlb is not None:
        engine = _rollout_engine(run)
        if engine == "megatron":
            rows = rollout_rows(run, parallel, stage, sum(items.values()), usable)
            phases["rollout (native generation)"] = rows["bytes"]
        elif engine == "vllm":
            vm = vllm_engine_memory(run, int(opts.gpu_memory_gib * GiB))
            # The engine's GPUs are stage 0's; asleep while the policy trains (sleep mode), it
            # takes its memory only while it generates and syncs, else through the whole step.
            awake = vm["engine"] if stage == 0 and vm["sleep"] else 0
            if stage == 0 and not vm["sleep"]:
                items["vLLM engine"] = vm["engine"]
            phases["vLLM rollout and weight sync"] = awake + vm["sync"]
        # Old-policy / reference log-prob forwards: logits of one micro-batch and one layer.
        lin = layer_activation_bytes(cfg, tokens, tp, sequence_parallel=sp) // max(2 * layers, 1)
        logits = 10 * tokens * cfg.padded_vocab_size // tp if stage == pp - 1 else 0
        phases["log-prob forward"] = logits + full_layer + lin
    return StageMemory(stage=stage, parameters=n, static=items, phases=phases)


def rollout_rows(run: RunConfig, parallel, stage: int, static_bytes: int, usable: int | None) -> dict:
    """How native generation splits one DP replica's rows on ``stage``: rows per sub-batch fitting
    85% of the memory beside ``static_bytes`` (at least one row, which then may not fit)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    rlb = rl_batch(run, parallel.data_parallel_size)
    prefill = max(run.train.seq_length - rlb["max_new_tokens"], 1)
    per_row = rollout_row_bytes(run, tp, pp, prefill)
    room = (usable if usable is not None else 0) - static_bytes
    fit = int(0.85 * room) // per_row if room > 0 else 0
    sub = max(min(rlb["per_rank"], fit), 1)
    return {"rows": rlb["per_rank"], "sub_batch": sub, "sub_batches": math.ceil(rlb["per_rank"] / sub),
            "per_row": per_row, "bytes": sub * per_row, "fit": fit, "prefill": prefill}


def vllm_engine_memory(run: RunConfig, device_bytes: int) -> dict:
    """GPU memory of a colocated vLLM engine (``rollout.engine: vllm``, docs/rollout.md) on each of
    its GPUs (the host's GPU and the next ``rollout.tensor_parallel_size - 1``, all of stage 0):

    - ``engine``: what vLLM takes, ``gpu_memory_utilization`` x the GPU (weights, KV cache, its
      activations); held through the step, or only while it generates and syncs with
      ``enable_sleep_mode`` (it sleeps while the policy trains);
    - ``weights``: the model's weights over the engine's TP ranks; ``kv``: what is left of
      ``engine`` for the KV cache, and ``sequences``: full-length sequences that fit in it at
      once (vLLM refuses to start below one);
    - ``sync``: the transient of a weight sync on every training GPU, twice the largest full
      parameter (the gather moves one parameter at a time to host memory)."""
    cfg, ro = run.model, run.rollout
    pbytes = _DTYPE_BYTES[cfg.params_dtype]
    etp = ro.tensor_parallel_size
    engine = int(ro.gpu_memory_utilization * device_bytes)
    weights = math.ceil(cfg.num_parameters() * pbytes / etp)
    kv_seq = kv_cache_bytes_per_sequence(cfg, run.train.seq_length, etp, 1)
    kv = max(engine - weights, 0)
    largest = max(cfg.padded_vocab_size * cfg.hidden_size, 2 * cfg.ffn_hidden_size * cfg.hidden_size,
                  (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels * cfg.hidden_size)
    return {"engine": engine, "weights": weights, "kv": kv, "kv_per_sequence": kv_seq,
            "sequences": kv // kv_seq, "sync": 2 * largest * pbytes, "tp": etp,
            "sleep": bool(ro.enable_sleep_mode)}


def vllm_host_memory(run: RunConfig, tp: int, cp: int, dp: int, gpus_per_node: int) -> dict:
    """Host memory of the weight pushes to colocated vLLM engines (docs/rollout.md, "Transport"),
    on the node that hosts the most engines. Each data-
    parallel replica's engine is hosted by its rank with TP, CP and PP rank 0 (global rank
    ``TP x CP x replica`` in megatron's rank order), which gathers the whole model to host memory:

    - engine TP 1: the HF weights stay in shared memory (``/dev/shm``) between pushes (later
      pushes gather into the same tensors), ``held`` = ``push`` = the model's weights per engine;
    - engine TP > 1: each push writes a safetensors file to ``/dev/shm`` beside the gathered copy
      and deletes it after the reload, ``held`` = 0 and ``push`` = twice the weights per engine.
    """
    cfg, ro = run.model, run.rollout
    weights = cfg.num_parameters() * _DTYPE_BYTES[cfg.params_dtype]
    shared = ro.tensor_parallel_size == 1
    nodes = [tp * cp * replica // gpus_per_node for replica in range(dp)]
    engines = max(nodes.count(n) for n in set(nodes))
    return {"weights": weights, "shared": shared, "engines_per_node": engines,
            "held": engines * weights if shared else 0, "push": engines * weights * (1 if shared else 2)}


def kv_cache_bytes_per_sequence(cfg: ModelConfig, seq_length: int, tp: int, pp: int) -> int:
    """bf16 K and V of one sequence of ``seq_length`` tokens for one stage's layers on one TP rank
    (key/value groups are split over TP, or replicated when there are fewer groups than ranks)."""
    groups = max(cfg.num_query_groups // tp, 1)
    return 2 * (cfg.num_layers // pp) * seq_length * groups * cfg.kv_channels * 2


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    if n >= 2**40:
        return f"{n / 2**40:.2f} TiB"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def make_plan(run: RunConfig, nodes: int, gpus_per_node: int, opts: PlanOptions | None = None) -> Plan:
    """Validate ``run`` on ``nodes x gpus_per_node`` GPUs and estimate memory and step numbers.
    Raises ConfigError for a layout that cannot run at all; a layout that runs but does not fit
    in memory returns a plan with ``fits`` False."""
    opts = opts or PlanOptions()
    if not opts.longact_enabled:
        opts = dataclasses.replace(opts, longact=None)
    elif opts.longact is None:
        opts = dataclasses.replace(opts, longact=getattr(run, "longact", None) or LongActConfig())
    rl = getattr(run, "rl", None)
    if rl is not None and getattr(rl, "kl_coef", 0.0) > 0:  # a KL term needs the reference policy
        opts = dataclasses.replace(opts, reference_model=True)
    parallel = check_layout(run, nodes, gpus_per_node)
    cfg, train = run.model, run.train
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp, dp = parallel.context_parallel_size, parallel.data_parallel_size
    world = nodes * gpus_per_node
    warnings = []
    if tp > gpus_per_node:
        warnings.append(f"tensor_model_parallel_size={tp} spans nodes ({gpus_per_node} GPUs per node): "
                        "TP all-reduces would cross the inter-node network")
    rlb = rl_batch(run, dp)
    num_mb = rlb["micro_batches"] if rlb else train.num_microbatches(dp)
    if pp > 1 and num_mb < pp:
        warnings.append(f"{num_mb} micro-batches per step for {pp} pipeline stages: most of each "
                        "step is pipeline bubble; raise train.global_batch_size")
    needs_te = [what for what, on in (("context parallelism", cp > 1), ("FP8", opts.fp8)) if on]
    if needs_te:
        warnings.append(f"{' and '.join(needs_te)} need{'s' if len(needs_te) == 1 else ''} "
                        "Transformer Engine on CUDA; the CPU path cannot run this layout")
    device = int(opts.gpu_memory_gib * GiB)
    usable = int(device * (1 - opts.fragmentation))
    stages = [stage_memory(run, parallel, s, opts, usable) for s in range(pp)]
    refusals = []
    native_rollouts = rlb is not None and not opts.rollout_sequences and _rollout_engine(run) == "megatron"
    if native_rollouts and cp > 1:
        refusals.append(f"parallel.context_parallel_size: {cp} with RL rollouts: native generation does "
                        "not run under context parallelism; use rollout.engine: vllm")

    n_total = cfg.num_parameters()
    embed = cfg.padded_vocab_size * cfg.hidden_size
    n_matmul = n_total - embed  # the input embedding is a lookup; the output layer is a matmul
    seqs_step = rlb["sequences"] * rlb["updates"] // max(rl.mini_batches, 1) if rlb else train.global_batch_size
    tokens_step = seqs_step * train.seq_length
    L, s = cfg.num_layers, train.seq_length
    attn_flops_seq = 6 * L * s * s * cfg.num_attention_heads * cfg.kv_channels  # causal, fwd+bwd
    model_flops = 6 * n_matmul * tokens_step + attn_flops_seq * seqs_step
    hw_flops = model_flops * (4 / 3 if cfg.recompute == "full" else 1.0)
    worst = max(stages, key=lambda st: st.peak)
    pbytes = _DTYPE_BYTES[cfg.params_dtype]
    grad_b = 4 if opts.grad_reduce_in_fp32 else pbytes
    shard_group = dp * cp
    dp_traffic = (worst.parameters * (grad_b + pbytes) * (shard_group - 1) / shard_group
                  if shard_group > 1 else 0)
    tokens_mb = train.seq_length // cp * train.micro_batch_size
    # Sequence parallelism: 2 all-gathers + 2 reduce-scatters of s'bh per layer forward, as many
    # backward, one more forward with full recomputation.
    passes = 3 if cfg.recompute == "full" else 2
    tp_traffic = (4 * passes * tokens_mb * cfg.hidden_size * 2 * (tp - 1) / tp
                  * (L // pp) * num_mb) if tp > 1 else 0
    # Ring attention: each rank receives (CP - 1) K/V blocks forward, K/V and their gradients backward.
    kv_block = tokens_mb * cfg.num_query_groups * cfg.kv_channels * 2 * 2 // tp
    cp_traffic = kv_block * (cp - 1) * 3 * (L // pp) * num_mb if cp > 1 else 0
    ckpt_bytes = n_total * (pbytes + (12 if pbytes == 2 else 8))

    numbers = {
        "world size": f"{world} GPUs = {nodes} nodes x {gpus_per_node}",
        "layout": f"TP={tp} x PP={pp} x CP={cp} x DP={dp}  (sequence parallel: "
                  f"{'on' if parallel.sequence_parallel else 'off'}, distributed optimizer: "
                  f"{'on' if train.use_distributed_optimizer else 'off'})",
        "model": f"{cfg.family}, {L} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
                 f"{cfg.num_query_groups} groups x {cfg.kv_channels}, ffn {cfg.ffn_hidden_size}",
        "parameters": f"{_fmt_count(n_total)} total ({_fmt_count(embed)} per vocabulary matrix), "
                      f"{_fmt_count(worst.parameters)} on the fullest GPU",
        "vocabulary": f"{cfg.vocab_size} padded to {cfg.padded_vocab_size} "
                      f"(+{cfg.padded_vocab_size - cfg.vocab_size} zero rows; "
                      f"{cfg.padded_vocab_size // tp} per TP rank)",
        "layers per stage": f"{L // pp}",
        "sequence": f"{train.seq_length} tokens, {train.seq_length // cp} per CP rank, "
                    f"{train.seq_length // cp // (tp if parallel.sequence_parallel else 1)} per GPU "
                    "in the residual stream",
        "batch": (f"{train.global_batch_size} sequences/step = {train.micro_batch_size} per micro-batch "
                  f"x {num_mb} micro-batches x DP {dp}; {_fmt_count(tokens_step)} tokens/step") if rlb is None
        else (f"{rlb['sequences']} sequences/RL step (rl.prompts_per_step {rl.prompts_per_step} x "
              f"rl.group_size {rl.group_size}), {rlb['per_rank']} per DP rank; {rlb['updates']} optimizer "
              f"step(s) of {train.micro_batch_size} per micro-batch x {num_mb} micro-batches x DP {dp}; "
              f"{_fmt_count(tokens_step)} tokens trained per RL step"),
        "pipeline bubble": f"{(pp - 1) / (num_mb + pp - 1):.1%} of a step (1F1B, (PP-1)/(M+PP-1))",
        "recompute": cfg.recompute + ("" if cfg.recompute != "selective" else
                                      " (estimated as none: fused attention keeps no s^2 scores)"),
        "model FLOPs/step": f"{model_flops / 1e15:.1f} PFLOP ({model_flops / world / 1e12:.0f} TFLOP "
                            f"per GPU; {hw_flops / world / 1e12:.0f} TFLOP per GPU with recomputation)",
        "traffic/step/GPU": f"DP {_fmt_bytes(dp_traffic)}, TP {_fmt_bytes(tp_traffic)}, "
                            f"CP {_fmt_bytes(cp_traffic)}",
        "kv cache": f"{_fmt_bytes(kv_cache_bytes_per_sequence(cfg, train.seq_length, tp, pp))} per GPU per "
                    f"{train.seq_length}-token sequence in rollouts",
        "checkpoint": f"{_fmt_bytes(ckpt_bytes)} on disk (weights + fp32 main weights and Adam moments)",
    }
    if native_rollouts:
        worst_stage = max(stages, key=lambda st: st.phases.get("rollout (native generation)", 0))
        r = rollout_rows(run, parallel, worst_stage.stage, worst_stage.static_total, usable)
        numbers["rollout"] = (
            f"native generation: {r['rows']} rows per DP replica of up to {train.seq_length} tokens "
            f"(prompt <= {r['prefill']}), {_fmt_bytes(r['per_row'])} per row per GPU (KV cache "
            f"{_fmt_bytes(kv_cache_bytes_per_sequence(cfg, train.seq_length, tp, pp))}, prefill "
            f"transient, logits); sub-batches of {r['sub_batch']} rows x {r['sub_batches']}: "
            f"{_fmt_bytes(r['bytes'])} per GPU"
            + ("" if r["fit"] >= 1 else "; not even one row fits beside the static memory"))
    elif rlb is not None and not opts.rollout_sequences and _rollout_engine(run) == "vllm":
        vm = vllm_engine_memory(run, device)
        numbers["rollout"] = (
            f"colocated vLLM engine, TP {vm['tp']} on stage 0's GPUs: {_fmt_bytes(vm['engine'])} per "
            f"engine GPU (rollout.gpu_memory_utilization {run.rollout.gpu_memory_utilization}), "
            + ("released while the policy trains (sleep mode)" if vm["sleep"] else "held through the step")
            + f"; weights {_fmt_bytes(vm['weights'])}, KV cache {_fmt_bytes(vm['kv'])} = "
            f"{vm['sequences']} sequence(s) of {train.seq_length} tokens at once "
            f"({_fmt_bytes(vm['kv_per_sequence'])} each); a weight sync adds "
            f"{_fmt_bytes(vm['sync'])} per training GPU (one full parameter at a time)")
        host = vllm_host_memory(run, tp, cp, dp, gpus_per_node)
        per = f"{_fmt_bytes(host['weights'])} of HF weights per engine"
        numbers["host memory"] = (
            f"weight pushes to the vLLM engines, {host['engines_per_node']} engine(s) on the fullest "
            f"node: {_fmt_bytes(host['push'])} of host memory there while a push runs, "
            + (f"all of it shared memory (/dev/shm) kept between pushes ({per}, engine TP 1)"
               if host["shared"] else
               f"half of it a file in /dev/shm, freed after it ({per}, gathered, then written for "
               "the engine's workers, engine TP > 1)"))
        if vm["tp"] > gpus_per_node:
            refusals.append(f"rollout.tensor_parallel_size: {vm['tp']} is more than the {gpus_per_node} "
                            "GPUs of a node; the engine runs on the host's node")
        if vm["sequences"] < 1:
            refusals.append(
                f"rollout.gpu_memory_utilization: {run.rollout.gpu_memory_utilization} gives the vLLM "
                f"engine {_fmt_bytes(vm['engine'])} per GPU, of which its weights take "
                f"{_fmt_bytes(vm['weights'])}: no room for the KV cache of one {train.seq_length}-token "
                "sequence (vLLM would refuse to start); raise it or rollout.tensor_parallel_size")
    elif rlb is not None and not opts.rollout_sequences:
        numbers["rollout"] = "external vLLM servers (rollout.server_urls): no memory on the training GPUs"
    if opts.rollout_sequences == 0 and not native_rollouts:
        kv = kv_cache_bytes_per_sequence(cfg, train.seq_length, tp, pp)
        room = min(usable - st.static_total for st in stages)
        numbers["kv cache"] += f"; ~{max(room // kv, 0)} sequences fit beside the static memory"
    return Plan(world, tp, pp, cp, dp, bool(parallel.sequence_parallel), stages, numbers, warnings,
                usable, device, refusals)


def format_plan(plan: Plan) -> str:
    """The plan as a text report: numbers, then a memory table (fullest GPU, every stage)."""
    lines = ["Layout and step numbers"]
    width = max(len(k) for k in plan.numbers)
    lines += [f"  {k:<{width}}  {v}" for k, v in plan.numbers.items()]
    worst = plan.worst
    lines.append("")
    lines.append(f"Memory per GPU (GiB), stages 0..{plan.pp - 1}; peak = static + largest phase")
    lines.append(f"  {'':<36}" + "".join(f"{'stage ' + str(s.stage):>10}" for s in plan.stages))

    def row(label, values):
        return f"  {label:<36}" + "".join(f"{v / GiB:>10.2f}" for v in values)

    for name in worst.static:
        lines.append(row(name, [s.static.get(name, 0) for s in plan.stages]))
    lines.append(row("= static", [s.static_total for s in plan.stages]))
    for name in worst.phases:
        lines.append(row("phase: " + name, [s.phases.get(name, 0) for s in plan.stages]))
    lines.append(row("= peak", [s.peak for s in plan.stages]))
    frag = 1 - plan.usable_bytes / plan.device_bytes
    lines.append(f"  {'usable of device':<36}{plan.usable_bytes / GiB:>10.2f}  "
                 f"({plan.device_bytes / GiB:.0f} GiB less {frag:.0%} for fragmentation)")
    lines.append("")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: fullest GPU (stage {worst.stage}) needs {worst.peak / GiB:.2f} GiB of "
                 f"{plan.usable_bytes / GiB:.2f} GiB usable "
                 f"(headroom {(plan.usable_bytes - worst.peak) / GiB:+.2f} GiB)")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    for r in plan.refusals:
        lines.append(f"REFUSED: {r}")
    return "\n".join(lines)
