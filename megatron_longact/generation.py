"""Batched autoregressive generation and teacher-forced log-probs for megatron-core GPTModels.

Works under any (TP, PP, DP) layout. Every forward pass goes through megatron's own
``get_forward_backward_func()`` schedule with ``forward_only=True`` (one micro-batch holding the
whole batch), so pipeline stages exchange activations exactly as in training. Data-parallel ranks
generate for their own prompts and never talk to each other here.

How it generates
----------------
KV cache (default, ``kv_cache=True``): megatron-core's ``StaticInferenceContext`` is passed to
``GPTModel.forward(inference_context=...)``; attention keeps keys and values per layer. One cache
offset is shared by all rows, so rows must place their next token in the same column. Two layouts
do that:

- Left-padded (``padding="left"``; what ``"auto"`` picks for prompts of different lengths): each
  prompt is right-aligned at the longest one, one prefill runs over all prompt columns and then one
  forward per new token serves every row, as Hugging Face's ``generate`` does. Padding columns are
  hidden by an attention mask (a pad column sees only itself, so no softmax row is empty). Positions
  need no change although a row's tokens now sit at columns pad..pad+n-1: megatron's GPTModel
  ignores ``position_ids`` for RoPE (positions are the columns), and RoPE attention depends only on
  the difference of the query and key positions (rotations compose: R(m)q . R(n)k = q . R(n-m)k),
  so a row shifted by ``pad`` columns attends exactly as at positions 0..n-1, up to the rounding of
  the rotation angles (the tests check the log-probs against teacher-forced ones at 1e-5). This
  needs a core attention that honours a given mask in every forward: megatron's local one and the
  SDPA one (models/attention.py) do; Transformer Engine's ignores masks under its causal and
  no-mask types. ``"auto"`` also keeps the prefill mask (one bool per row, query and key) under
  ``MAX_PREFILL_MASK_BYTES``; long mixed-length prompts take the right-padded path.
- Right-padded (``padding="right"``, and ``"auto"`` otherwise): the loop of megatron's static
  text-generation controller. Prompts start at column 0; the first forward runs over the shortest
  prompt (causal prefill), then every step feeds one column for all rows. A row whose prompt is
  longer than the current column is teacher-forced with its own prompt token; a row past its prompt
  samples. The prompt part beyond the shortest prompt is fed one column per step, so prompts whose
  lengths differ by more than ``max_prompt_spread`` run as separate sub-batches.

In both layouts the first forward (the prefill) runs once per distinct row (``share_prompts``,
:func:`_prefill`): GRPO's groups repeat each prompt, and the repeats then take a copy of its KV
cache rows and logits. The cache itself holds keys after RoPE and, with the SDPA attention, is laid
out head-major (models/self_attention.py), so a decode step neither re-rotates the cached keys
nor strides across the batch to read one head's positions.

Memory: rows run in sub-batches whose memory fits ``memory_budget`` (default on CUDA: 85% of the
free device memory when generation starts; unbounded on the CPU). Each row costs its static KV
cache (K and V of every layer of the stage, for the whole buffer width) plus the transient
activations of its prefill forward and its fp32 last-token logits; :func:`generation_bytes_per_row`
states the formula, and ``longact-plan`` uses the same one. Sub-batches run one after the other and
each allocates its own cache, so peak memory is one sub-batch's. Prefill is not chunked: megatron's
static KV cache turns causal masking off for every forward after the first one
(``Attention._adjust_key_value_for_inference`` sets ``no_mask`` once ``sequence_len_offset > 0``),
so a multi-token chunk after the first would attend to its own future; a row's whole prompt
is one forward, and the bound is on rows.

Full recompute (``kv_cache=False``): every step runs the whole (right-padded) batch again, padded
to a multiple of ``bucket`` columns so the schedule sees few distinct ``seq_length`` values, and
reads each row's logits at its own last position. Causal attention means the padding after a row
never reaches its logits. Cost is O(S^2) per token instead of O(S); it is kept as a fallback (and
as a cross-check: both paths give the same tokens) for models or kernels the cache does not cover.

Why not megatron's inference engine. Checked on the CPU runtime layer with megatron-core 0.16.1:
``StaticInferenceEngine`` first builds a ``DynamicInferenceEngine`` (paged KV cache, CUDA graphs);
that failed to initialize (its buffer sizing gave max_tokens 16384 < max_requests 327676) and the
engine fell back to the legacy static controller. The controller needed a CUDA ``torch.Generator``
in its constructor (``text_generation_controller.py:75``); with that worked around it generated
under TP=1 and TP=2 but failed under PP=2 on ``assert tensor.is_cuda``
(``inference/communication_utils.py:31``). It also samples from the padded vocabulary (it produced
ids the tokenizer does not have), draws from one generator for the whole batch, computes the
returned log-probs from logits in the parameter dtype, and owns the stopping rules. So the loop here
is ours and the cache is megatron's: the same ``StaticInferenceContext`` and attention code the
controller uses, driven through the training schedule.

Sampling and log-probs
----------------------
On the last pipeline stage the vocab-parallel logits of the rows' last positions are gathered over
the tensor-parallel group (by megatron's output layer when the KV cache is used), cast to fp32, and cut to the tokenizer's vocabulary (ids >=
``vocab_size`` are the embedding's padding and can never be sampled). Temperature 0 is greedy
(argmax, lowest id on ties). Otherwise logits are divided by the temperature, then top-k and top-p
filter them, and the token is drawn by inverting the CDF with one uniform number per row and step.
Each row owns a counter-based random stream keyed by ``(seed, sample_id)`` (:func:`row_uniforms`:
its k-th token uses draw k), so a row's samples do not depend on the batch it sits in, on the
layout or on the padding path, and all rows draw in one vectorised call.

``log_probs`` are log-softmax of the fp32, temperature-scaled logits *before* top-k/top-p
filtering, at the sampled token (temperature 0 counts as 1). That is the distribution the RL loss
recomputes with :func:`sequence_log_probs` / :func:`vocab_parallel_log_probs` at the same
temperature; truncation by top-k/top-p is not reflected (verl's old log-probs follow the same
convention).

The chosen tokens and their log-probs are broadcast from tensor-parallel rank 0 of the last stage
over the tensor-parallel group, then from the last stage over the pipeline group, so every rank of a
model-parallel group holds identical results and runs the same number of steps.

Index spaces: ``tokens_BW`` rows are right-padded sequences (prompt, response, padding); logits
``*_BV`` are over the tokenizer vocabulary, ``*_BVl`` over this TP rank's slice of the padded
vocabulary. Suffixes: B batch, S sequence, W buffer width, N new tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_longact.config import ConfigError, check_positive, check_range
from megatron_longact.runtime import collectives


# --------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass
class SamplingConfig:
    """How to pick each new token."""

    temperature: float = 0.0
    """0 is greedy decoding; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the top_k most likely tokens (0 = off)."""
    max_new_tokens: int = 128
    """Response budget per row; a row that reaches it without EOS is marked truncated."""
    seed: int = 1234
    """Seed of the per-row random streams (with each row's sample id)."""
    ignore_eos: bool = False
    """EOS does not end a row: every row makes max_new_tokens tokens (and is marked truncated), so
    the work of a generation does not depend on what is sampled (vLLM's ``ignore_eos``)."""

    def __post_init__(self) -> None:
        check_positive("sampling.temperature", self.temperature, allow_zero=True)
        check_range("sampling.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_positive("sampling.top_k", self.top_k, allow_zero=True)
        check_positive("sampling.max_new_tokens", self.max_new_tokens)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"sampling.seed: got {self.seed!r}, expected an integer >= 0")


@dataclass
class GenerationOutput:
    """Results of :func:`generate`, identical on every rank of a model-parallel group.

    ``tokens`` [B, W] holds row i's prompt in ``[:prompt_lengths[i]]``, its response right after
    it, and ``pad_id`` elsewhere (W = longest prompt + max_new_tokens). ``responses`` [B, N] and
    ``log_probs`` [B, N] (fp32) are the response ids and their log-probs, padded with ``pad_id``
    and 0 after ``response_lengths[i]`` (which counts the EOS token when one was produced).
    ``truncated[i]`` is True when row i used its whole budget without producing EOS.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    responses: torch.Tensor
    response_lengths: torch.Tensor
    log_probs: torch.Tensor
    truncated: torch.Tensor

    def response_ids(self, i: int) -> list[int]:
        return self.responses[i, : int(self.response_lengths[i])].tolist()

    def response_mask(self) -> torch.Tensor:
        """[B, W] bool: True on the response tokens of ``tokens`` (EOS included)."""
        col = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        start = self.prompt_lengths.unsqueeze(1)
        return (col >= start) & (col < start + self.response_lengths.unsqueeze(1))


@dataclass(frozen=True)
class ModelParallelGroups:
    """The groups generation talks to: tensor-parallel (logit gather, token broadcast) and
    pipeline (token broadcast from the last stage). ``dp_rank`` only feeds default sample ids."""

    tp: object
    pp: object
    dp_rank: int = 0

    @classmethod
    def from_parallel_state(cls) -> "ModelParallelGroups":
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                   dp_rank=ps.get_data_parallel_rank())

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp)

    @property
    def is_last_stage(self) -> bool:
        return dist.get_rank(self.pp) == self.pp_size - 1


# --------------------------------------------------------------------------------------------------
# Pure pieces: sampling from full logits, log-probs from vocab-parallel logits


def _filter_top_k_top_p(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits of tokens outside top-k / the top-p nucleus to -inf (the most likely token
    always survives)."""
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_tokens(logits_BV: torch.Tensor, sampling: SamplingConfig,
                  uniforms_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from full-vocabulary logits (already cut to the tokenizer's
    vocabulary). ``uniforms_B`` (float64 in [0, 1)) drive the draw; unused when greedy.

    Returns ``(tokens_B, log_probs_B)``: log-probs are of the temperature-scaled, unfiltered
    distribution, in fp32 (see the module docstring)."""
    logits_BV = logits_BV.float()
    if sampling.temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
    if uniforms_B is None:
        raise ValueError("sample_tokens: temperature > 0 needs one uniform number per row")
    scaled_BV = logits_BV / sampling.temperature
    logp_BV = torch.log_softmax(scaled_BV, dim=-1)
    probs_BV = torch.softmax(_filter_top_k_top_p(scaled_BV, sampling.top_k, sampling.top_p), dim=-1)
    # Inverse CDF in float64: the first token whose cumulative probability exceeds u * total.
    cdf_BV = probs_BV.double().cumsum(-1)
    target = uniforms_B.double().unsqueeze(-1) * cdf_BV[:, -1:]
    tokens_B = torch.searchsorted(cdf_BV, target, right=True).squeeze(-1)
    tokens_B = tokens_B.clamp(max=logits_BV.shape[-1] - 1)
    # Rounding can land past the last token with mass; fall back to the most likely token there.
    bad = probs_BV.gather(-1, tokens_B[:, None]).squeeze(-1) <= 0
    if bad.any():
        tokens_B = torch.where(bad, probs_BV.argmax(-1), tokens_B)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def vocab_parallel_log_probs(logits_BSVl: torch.Tensor, targets_BS: torch.Tensor, *, vocab_size: int,
                             temperature: float = 1.0) -> torch.Tensor:
    """log p(target) in fp32 from vocab-parallel logits, without gathering the vocabulary.

    ``logits_BSVl`` is this tensor-parallel rank's contiguous slice of the padded vocabulary (what
    GPTModel returns with ``parallel_output=True``), any leading shape; ``targets_BS`` holds global
    token ids. Ids >= ``vocab_size`` (embedding padding) are excluded from the normalizer.
    Differentiable: the RL loss calls this inside its forward step's loss function, where it works
    under any pipeline layout. Uses megatron's ``vocab_parallel_cross_entropy``, which reduces over
    megatron's global tensor-parallel group (it takes no group argument).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    check_positive("temperature", temperature)
    local_v = logits_BSVl.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local_v
    # A fresh fp32 tensor: vocab_parallel_cross_entropy works in place on its input.
    x = logits_BSVl.float() / temperature if temperature != 1.0 else logits_BSVl.float().clone()
    if start + local_v > vocab_size:
        ids = torch.arange(start, start + local_v, device=x.device)
        x = x.masked_fill(ids >= vocab_size, float("-inf"))
    return -vocab_parallel_cross_entropy(x, targets_BS)


# --------------------------------------------------------------------------------------------------
# Forward passes through megatron's schedule


def _single_chunk(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"model: got {len(model)} chunks; generation supports one chunk per stage "
                             "(no virtual pipeline stages)")
        return model[0]
    return model


def _position_ids(tokens_BS: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens_BS.shape[1], device=tokens_BS.device).unsqueeze(0).expand_as(tokens_BS)


def _forward_rows(model, tokens_BS: torch.Tensor, rows_pos_B: torch.Tensor | None, inference_context,
                  is_last_stage: bool, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """One forward-only pass through megatron's schedule; on the last stage returns each row's
    logits at position ``rows_pos_B`` (None: the last position) as [B, Vl], vocab-parallel without
    an inference context and already gathered over TP with one. ``attention_mask`` (megatron's
    convention, True = hidden) goes to every layer's core attention."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens_BS.shape

    def loss_func(output_BSVl, non_loss_data=False):
        if rows_pos_B is None:
            return output_BSVl[:, -1, :]
        return output_BSVl[torch.arange(batch), rows_pos_B.to(output_BSVl.device), :]

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator)
        if inference_context is None:
            out = chunk(tokens, _position_ids(tokens), attention_mask)
        else:
            # GPTModel insists on gathering the TP logits itself when given an inference context.
            out = chunk(tokens, _position_ids(tokens), attention_mask, inference_context=inference_context,
                        runtime_gather_output=True)
        return out, loss_func

    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens_BS]), model=[model],
        num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
        collect_non_loss_data=True,
    )
    return store[0] if is_last_stage else None


def _prefill(model, tokens_BP: torch.Tensor, context, is_last_stage: bool, share: bool,
             attention_mask: torch.Tensor | None = None,
             pad_B: torch.Tensor | None = None) -> torch.Tensor | None:
    """The first forward of a KV-cache generation, run once per distinct row.

    GRPO and DAPO sample a group of responses per prompt, so a rollout batch holds each prompt
    ``group`` times. Rows with the same tokens and the same padding (``pad_B``: left-padding
    columns, which the attention mask hides; a row's mask is a function of it) get the same
    keys, values and logits, so the prefill runs on one row of each and the KV cache and the
    logits are then copied to the repeats (:func:`share_cache_rows`); with long prompts that
    divides the prefill, most of a rollout's work, by the group size."""
    from megatron_longact.models.self_attention import share_cache_rows

    batch = tokens_BP.shape[0]
    if share and batch > 1:
        rows_BX = tokens_BP.cpu()
        if pad_B is not None:
            rows_BX = torch.cat([rows_BX, pad_B.cpu().long()[:, None]], dim=1)
        _, inverse_B = torch.unique(rows_BX, dim=0, return_inverse=True)
        distinct = int(inverse_B.max()) + 1
        if distinct < batch:
            first_U = torch.full((distinct,), batch, dtype=torch.long).scatter_reduce(
                0, inverse_B, torch.arange(batch), reduce="amin")
            index_U = first_U.to(tokens_BP.device)
            logits = _forward_rows(model, tokens_BP.index_select(0, index_U), None, context, is_last_stage,
                                   attention_mask=None if attention_mask is None
                                   else attention_mask.index_select(0, index_U))
            # Cache row u now holds distinct row u; row b takes the row of its prompt.
            share_cache_rows(context, inverse_B, tokens_BP.shape[1])
            return None if logits is None else logits.index_select(0, inverse_B.to(logits.device))
    return _forward_rows(model, tokens_BP, None, context, is_last_stage, attention_mask=attention_mask)


def _share_from_last_stage(values: torch.Tensor | None, shape: tuple, groups: ModelParallelGroups,
                           device) -> torch.Tensor:
    """Broadcast a float64 tensor from TP rank 0 of the last stage to every rank of the
    model-parallel group (first over TP inside the last stage, then over PP)."""
    if groups.is_last_stage:
        buf = values.to(device=device, dtype=torch.float64).contiguous()
        if groups.tp_size > 1:
            collectives.broadcast(buf, 0, groups.tp)
    else:
        buf = torch.empty(shape, dtype=torch.float64, device=device)
    if groups.pp_size > 1:
        collectives.broadcast(buf, groups.pp_size - 1, groups.pp)
    return buf


@contextlib.contextmanager
def _inference_mode(model):
    """Eval mode, no autograd, sequence parallelism and FP8 off for the duration.

    Sequence parallelism splits the sequence over TP ranks, which a one-token decode step cannot
    do; megatron's static controller switches it off the same way. (SP needs CUDA: this branch is
    not exercised by the CPU tests.)

    FP8: generation runs in BF16. Transformer Engine's FP8 GEMMs need a token count that is a
    multiple of 8/16, which decode steps (one token per row) and unpadded prefills do not have;
    megatron's FP8 inference wrapper pads them instead. Clearing ``config.fp8`` on every config
    object of the model makes ``TransformerBlock`` skip its FP8 autocast context, so TE's layers run
    their BF16 path with the same weights (no FP8 scaling state is touched). Teacher-forced log-prob
    forwards keep FP8: their batches are padded for it (training/batching.py).
    """
    from megatron_longact.models.builder import unwrap

    gpt = unwrap(model)
    fp8_configs = {id(m.config): m.config for m in gpt.modules()
                   if getattr(getattr(m, "config", None), "fp8", None)}
    saved_fp8 = {k: c.fp8 for k, c in fp8_configs.items()}
    for c in fp8_configs.values():
        c.fp8 = None
    was_training = model.training
    sequence_parallel = bool(gpt.config.sequence_parallel)
    switch = None
    if sequence_parallel:
        from megatron_longact.compat import require_attr

        switch = require_attr("megatron.core.transformer.utils", "set_model_to_sequence_parallel",
                              ("model", "set_to"))
        switch(gpt, set_to=False)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if switch is not None:
            switch(gpt, set_to=True)
        for k, c in fp8_configs.items():
            c.fp8 = saved_fp8[k]


def generation_bytes_per_row(*, num_layers: int, hidden_size: int, ffn_hidden_size: int,
                             num_attention_heads: int, num_query_groups: int, head_dim: int,
                             padded_vocab_size: int, tp: int, width: int, prefill: int,
                             dtype_bytes: int = 2, fused_attention: bool = True) -> int:
    """Bytes one row adds to a generation sub-batch on one GPU of a stage with ``num_layers``
    layers: its KV cache over ``width`` positions (megatron's static cache allocates the whole
    width up front; key/value groups split over TP, at least one per rank) plus the largest
    transient of its ``prefill``-token forward (no gradient, so one layer's tensors at a time:
    residual stream and norm output, q/k/v, attention output, the gated MLP's fc1 output and its
    activation, all unsplit over the sequence since inference runs without sequence parallelism;
    without fused attention also the fp32 [heads, prefill, prefill] scores) and its fp32
    full-vocabulary last-token logits (gathered over TP, and the sampler's copy)."""
    groups = max(num_query_groups // tp, 1)
    kv = 2 * num_layers * width * groups * head_dim * dtype_bytes
    heads = num_attention_heads // tp
    per_token = dtype_bytes * (2 * hidden_size + (heads + 2 * groups) * head_dim + heads * head_dim
                               + 3 * ffn_hidden_size // tp)
    transient = prefill * per_token
    if not fused_attention:
        transient += 4 * heads * prefill * prefill
    logits = 2 * 4 * padded_vocab_size
    return kv + transient + logits


def _model_bytes_per_row(gpt, groups: "ModelParallelGroups", width: int, prefill: int) -> int:
    cfg = gpt.config
    return generation_bytes_per_row(
        num_layers=len(gpt.decoder.layers), hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        head_dim=cfg.kv_channels, padded_vocab_size=gpt.vocab_size, tp=groups.tp_size, width=width,
        prefill=prefill, dtype_bytes=cfg.params_dtype.itemsize,
        # Transformer Engine's and the SDPA attention are fused (flash/cuDNN/memory-efficient
        # kernels: no score matrix); megatron's local one is not.
        fused_attention=_fused_attention(gpt.decoder.layers[0].self_attention.core_attention)
        if len(gpt.decoder.layers) else True)


def _fused_attention(core_attention) -> bool:
    from megatron_longact.models.attention import SDPADotProductAttention

    return isinstance(core_attention, SDPADotProductAttention) or type(core_attention).__name__.startswith("TE")


def _default_memory_budget(device) -> int | None:
    """85% of the free memory of a CUDA device; None (unbounded) elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.85 * free)


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2**64 / golden ratio, odd)
_MASK64 = (1 << 64) - 1


def _as_int64(x: int) -> int:
    """A 64-bit pattern as the signed value an int64 tensor holds."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer, elementwise on int64 bit patterns (products wrap mod 2**64)."""
    x = (x ^ _shift_right(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def row_keys(seed: int, sample_ids: Sequence[int]) -> torch.Tensor:
    """Per-row stream keys, int64 [B]: a function of (seed, sample id) only."""
    return _mix64(torch.tensor([_as_int64(seed * _GOLDEN + int(s)) for s in sample_ids],
                               dtype=torch.long))


def row_uniforms(keys_B: torch.Tensor, draws_B: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per row: draw number ``draws_B`` of each row's stream.

    A counter-based generator (SplitMix64 of key + draw x golden increment, top 53 bits), so all
    rows draw in one vectorised call and a row's numbers depend only on its key and draw index,
    never on the batch it sits in or how many forwards it took to reach that draw."""
    bits = _mix64(keys_B + draws_B.long() * _as_int64(_GOLDEN))
    return _shift_right(bits, 11).double() * 2.0 ** -53


def _length_groups(lengths: list[int], spread: int) -> list[list[int]]:
    """Rows grouped so that prompt lengths within a group differ by at most ``spread``
    (deterministic: every rank of a model-parallel group forms the same groups)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    parts: list[list[int]] = []
    for i in order:
        if parts and lengths[i] - lengths[parts[-1][0]] <= spread:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def _merge_outputs(outs: list, parts: list[list[int]], batch: int, width: int, pad_id: int) -> GenerationOutput:
    """Put sub-batch results back in the caller's row order, in a buffer of the full width."""
    n_new = outs[0].responses.shape[1]
    merged = GenerationOutput(
        tokens=torch.full((batch, width), pad_id, dtype=torch.long),
        prompt_lengths=torch.zeros(batch, dtype=torch.long),
        responses=torch.full((batch, n_new), pad_id, dtype=torch.long),
        response_lengths=torch.zeros(batch, dtype=torch.long),
        log_probs=torch.zeros(batch, n_new, dtype=torch.float32),
        truncated=torch.zeros(batch, dtype=torch.bool),
    )
    for out, part in zip(outs, parts):
        rows = torch.tensor(part)
        merged.tokens[rows, : out.tokens.shape[1]] = out.tokens
        for name in ("prompt_lengths", "responses", "response_lengths", "log_probs", "truncated"):
            getattr(merged, name)[rows] = getattr(out, name)
    return merged


# Largest prefill mask (bytes, one bool per row, query and key) the left-padded path builds; longer
# mixed-length batches take the column-fed path, which needs no mask.
MAX_PREFILL_MASK_BYTES = 64 * 2**20


def _left_padded_ok(gpt, batch: int, prompt_len: int, check_size: bool = True) -> bool:
    """Whether this model can decode left-padded rows. Padding is hidden by an attention mask, so
    the core attention must honour a given mask in every forward: megatron's local attention and
    the SDPA one do; Transformer Engine's ignores it under its causal and no-mask types. Positions
    need nothing: see :func:`generate` (RoPE only sees position differences)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_longact.models.attention import SDPADotProductAttention

    if getattr(gpt, "position_embedding_type", None) != "rope" or gpt.config.flash_decode:
        return False
    if not all(isinstance(layer.self_attention.core_attention, (DotProductAttention, SDPADotProductAttention))
               for layer in gpt.decoder.layers):
        return False
    return not check_size or batch * prompt_len * prompt_len <= MAX_PREFILL_MASK_BYTES


# --------------------------------------------------------------------------------------------------
# Generation


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, eos_id: int, pad_id: int,
             vocab_size: int, sample_ids: Sequence[int] | None = None,
             groups: ModelParallelGroups | None = None, kv_cache: bool = True,
             max_prompt_spread: int | None = None, bucket: int = 64,
             memory_budget: int | str | None = "auto", padding: str = "auto",
             share_prompts: bool = True) -> GenerationOutput:
    """Generate a response for each prompt (token ids, BOS included by the caller).

    ``model`` is this rank's chunk (GPTModel, or wrapped in Float16Module / DDP). ``vocab_size`` is
    the tokenizer's: logits of ids at or above it are never sampled. ``sample_ids`` name the rows'
    random streams (default: ``dp_rank * 2**32 + row``); pass global ids, e.g. ``prompt * n + k``
    for n samples per prompt, to make sampling independent of the layout and of batching.
    Every rank of a model-parallel group must call this with the same prompts. See the module
    docstring for the algorithm, padding and log-prob conventions.

    ``padding`` (KV cache only): ``"left"`` right-aligns the prompts behind an attention mask (one
    prefill, one forward per new token), ``"right"`` feeds the part of a prompt beyond the shortest
    one column per step, ``"auto"`` takes left padding when the lengths differ and the model's
    attention and the mask's size allow it (module docstring). Right-padded, prompts whose lengths
    differ by more than ``max_prompt_spread`` tokens (default: ``max_new_tokens``) run as separate
    sub-batches one after the other, since a wide spread costs more than another pass. ``bucket``
    (full recompute only) rounds the forward width up.

    ``share_prompts`` (KV cache only): the prefill runs once per distinct prompt and its cache is
    copied to the rows that repeat it (:func:`_prefill`); the results are those of a prefill of
    every row.

    ``memory_budget`` (bytes; ``"auto"``: 85% of the free CUDA memory, unbounded on the CPU; None:
    unbounded) bounds the rows of each sub-batch by :func:`generation_bytes_per_row`; a budget
    smaller than one row is an error naming both numbers. Rows keep their own random streams, so
    the results do not depend on the split.
    """
    model = _single_chunk(model)
    from megatron_longact.models.builder import unwrap

    cp = getattr(getattr(unwrap(model), "config", None), "context_parallel_size", 1)
    if cp > 1:
        # CP ranks hold different parts of each sequence; megatron's static KV-cache decode has no
        # CP path (Transformer Engine's CP attention asserts on it). The trainer's pre-flight check
        # refuses such runs before any model is built; this guards direct callers.
        raise NotImplementedError(f"generate: the model runs with context_parallel_size={cp}; native "
                                  "generation does not run under context parallelism (use "
                                  "rollout.engine: vllm)")
    groups = groups or ModelParallelGroups.from_parallel_state()
    prompts = [list(map(int, p)) for p in prompts]
    n_new = sampling.max_new_tokens
    batch = len(prompts)
    if batch == 0:
        empty = torch.zeros(0, n_new, dtype=torch.long)
        return GenerationOutput(torch.zeros(0, n_new, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                empty, torch.zeros(0, dtype=torch.long), empty.float(),
                                torch.zeros(0, dtype=torch.bool))
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}]: empty; a prompt needs at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if sample_ids is not None and len(sample_ids) != batch:
        raise ValueError(f"sample_ids: got {len(sample_ids)} ids for {batch} prompts")
    check_positive("bucket", bucket)
    if padding not in ("auto", "left", "right"):
        raise ValueError(f"padding: got {padding!r}, expected 'auto', 'left' or 'right'")
    gpt = unwrap(model)
    lengths_B = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = int(lengths_B.max()) + n_new
    max_len = int(getattr(gpt, "max_sequence_length", width))
    if width > max_len:
        raise ValueError(f"longest prompt ({int(lengths_B.max())} tokens) + max_new_tokens ({n_new}) = "
                         f"{width} exceeds the model's max_sequence_length {max_len}")
    if vocab_size > gpt.vocab_size:
        raise ValueError(f"vocab_size: tokenizer vocabulary {vocab_size} is larger than the model's "
                         f"(padded) vocabulary {gpt.vocab_size}")

    ids = list(sample_ids) if sample_ids is not None else [groups.dp_rank * 2**32 + i for i in range(batch)]
    device = next(gpt.parameters()).device
    budget = _default_memory_budget(device) if memory_budget == "auto" else memory_budget
    if budget is not None:
        # Every rank of the model-parallel group computes the same split from the same numbers;
        # with "auto" the free memory differs per rank, so take the group's minimum.
        if memory_budget == "auto":
            budget = int(collectives.all_reduce_values([float(budget)], groups.tp, op="min")[0])
            if groups.pp_size > 1:
                budget = int(collectives.all_reduce_values([float(budget)], groups.pp, op="min")[0])
        prefill = int(lengths_B.max()) if kv_cache else width
        per_row = _model_bytes_per_row(gpt, groups, width, prefill)
        rows = budget // per_row
        if rows < 1:
            raise ValueError(f"memory_budget: {budget} bytes is less than one row of generation needs "
                             f"({per_row} bytes for {width} positions); shorten the prompts or "
                             "max_new_tokens, or free device memory")
        if rows < batch:
            parts = [list(range(i, min(i + rows, batch))) for i in range(0, batch, rows)]
            outs = [generate(model, [prompts[i] for i in part], sampling, eos_id=eos_id, pad_id=pad_id,
                             vocab_size=vocab_size, sample_ids=[ids[i] for i in part], groups=groups,
                             kv_cache=kv_cache, max_prompt_spread=max_prompt_spread, bucket=bucket,
                             memory_budget=None, padding=padding, share_prompts=share_prompts)
                    for part in parts]
            return _merge_outputs(outs, parts, batch, width, pad_id)
    prompt_len = int(lengths_B.max())
    if padding == "left" and not (kv_cache and _left_padded_ok(gpt, batch, prompt_len, check_size=False)):
        raise ValueError("padding: 'left' needs the KV cache and a core attention that honours an "
                         "attention mask (model.core_attention sdpa or megatron, not Transformer Engine)")
    left_padded = padding == "left" or (
        padding == "auto" and kv_cache and int(lengths_B.min()) < prompt_len
        and _left_padded_ok(gpt, batch, prompt_len))
    if kv_cache and not left_padded:
        spread = n_new if max_prompt_spread is None else max_prompt_spread
        check_positive("max_prompt_spread", spread, allow_zero=True)
        parts = _length_groups(lengths_B.tolist(), spread)
        if len(parts) > 1:
            outs = [generate(model, [prompts[i] for i in part], sampling, eos_id=eos_id, pad_id=pad_id,
                             vocab_size=vocab_size, sample_ids=[ids[i] for i in part], groups=groups,
                             kv_cache=True, max_prompt_spread=width, memory_budget=None,
                             padding="right", share_prompts=share_prompts)
                    for part in parts]
            return _merge_outputs(outs, parts, batch, width, pad_id)

    keys_B = row_keys(sampling.seed, ids)

    tokens_BW = torch.full((batch, width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens_BW[i, : len(p)] = torch.tensor(p)
    log_probs_BN = torch.zeros(batch, n_new, dtype=torch.float32)
    generated_B = torch.zeros(batch, dtype=torch.long)
    done_B = torch.zeros(batch, dtype=torch.bool)
    hit_eos_B = torch.zeros(batch, dtype=torch.bool)

    def choose(logits_BVl: torch.Tensor | None, rows_B: torch.Tensor) -> torch.Tensor:
        """Sample for the rows ``rows_B`` (bool mask); returns [B, 2] (token, log-prob) on all ranks."""
        values = None
        if groups.is_last_stage:
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            full = logits_BVl.contiguous()
            if groups.tp_size > 1 and full.shape[-1] != gpt.vocab_size:
                full = gather_from_tensor_model_parallel_region(full, group=groups.tp)
            logits_BV = full[:, :vocab_size].float()
            # One uniform per row: the draw numbered by the tokens the row has made so far. The
            # draw runs where the logits are (on a GPU: no copy of [B, V] logits to the host and no
            # host softmax per step); only the chosen tokens and their log-probs cross.
            uniforms = (row_uniforms(keys_B, generated_B).to(logits_BV.device)
                        if sampling.temperature > 0 else None)
            tok, lp = sample_tokens(logits_BV, sampling, uniforms)
            values = torch.stack([tok.double(), lp.double()], dim=1)
        return _share_from_last_stage(values, (batch, 2), groups, device).cpu()

    def record(col_B: torch.Tensor, rows_B: torch.Tensor, chosen: torch.Tensor) -> None:
        """Write the chosen tokens of sampling rows at their columns and update the row states."""
        rows = torch.nonzero(rows_B).flatten()
        tok = chosen[rows, 0].long()
        k = generated_B[rows]
        tokens_BW[rows, col_B[rows]] = tok
        log_probs_BN[rows, k] = chosen[rows, 1].float()
        generated_B[rows] = k + 1
        eos = (tok == eos_id) & (not sampling.ignore_eos)
        hit_eos_B[rows] |= eos
        done_B[rows] |= eos | (k + 1 >= n_new)

    with _inference_mode(model):
        if left_padded:
            from megatron.core.inference.contexts import StaticInferenceContext

            # Rows right-aligned at the longest prompt (see the docstring): every row's next token
            # goes to the same column, so one prefill and one forward per new token serve all
            # rows. Padding columns are hidden from every query but their own (so that no softmax
            # row is empty and their cached keys and values stay finite).
            pad_B = prompt_len - lengths_B
            keys_BW = torch.arange(width)[None, :] >= pad_B[:, None]
            left_BP = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
            for i, p in enumerate(prompts):
                left_BP[i, prompt_len - len(p):] = torch.tensor(p)
            causal_PP = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
            eye_PP = torch.eye(prompt_len, dtype=torch.bool)
            hidden_B1PP = ~((causal_PP[None] & keys_BW[:, None, :prompt_len]) | eye_PP[None]).unsqueeze(1)
            context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=width)
            context.materialize_only_last_token_logits = True
            logits = _prefill(model, left_BP.to(device), context, groups.is_last_stage, share_prompts,
                              attention_mask=hidden_B1PP.to(device), pad_B=pad_B)
            end = prompt_len
            context.increment_sequence_len_offset(end)
            context.enable_decode_mode()
            while True:
                rows_B = ~done_B
                chosen = choose(logits, rows_B)
                record(lengths_B + generated_B, rows_B, chosen)
                if bool(done_B.all()):
                    break
                # Finished rows keep being fed (their results are ignored).
                step_B1 = chosen[:, :1].long().to(device)
                logits = _forward_rows(model, step_B1, None, context, groups.is_last_stage,
                                       attention_mask=(~keys_BW[:, None, None, :end + 1]).to(device))
                context.increment_sequence_len_offset(1)
                end += 1
        elif kv_cache:
            from megatron.core.inference.contexts import StaticInferenceContext

            context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=width)
            context.materialize_only_last_token_logits = True
            start, end = 0, int(lengths_B.min())
            while True:
                window = tokens_BW[:, start:end].to(device)
                if start == 0:
                    logits = _prefill(model, window, context, groups.is_last_stage, share_prompts)
                else:
                    logits = _forward_rows(model, window, None, context, groups.is_last_stage)
                context.increment_sequence_len_offset(end - start)
                # Rows past their prompt (and not finished) sample column `end`; the others are
                # teacher-forced with their prompt token or finished.
                rows_B = (lengths_B <= end) & ~done_B
                if rows_B.any():
                    chosen = choose(logits, rows_B)
                    record(torch.full((batch,), end), rows_B, chosen)
                if bool(done_B.all()):
                    break
                if end >= int(lengths_B.max()):
                    context.enable_decode_mode()
                start, end = end, end + 1
        else:
            col_B = lengths_B.clone()  # next column to fill, per row
            while not bool(done_B.all()):
                rows_B = ~done_B
                need = int(col_B[rows_B].max())
                seq = min(width, -(-need // bucket) * bucket)
                pos_B = (col_B - 1).clamp(max=seq - 1)
                logits = _forward_rows(model, tokens_BW[:, :seq].to(device), pos_B, None,
                                       groups.is_last_stage)
                chosen = choose(logits, rows_B)
                record(col_B, rows_B, chosen)
                col_B = torch.where(rows_B, col_B + 1, col_B)

    responses_BN = torch.full((batch, n_new), pad_id, dtype=torch.long)
    for i in range(batch):
        n, p = int(generated_B[i]), int(lengths_B[i])
        responses_BN[i, :n] = tokens_BW[i, p:p + n]
    return GenerationOutput(tokens=tokens_BW, prompt_lengths=lengths_B, responses=responses_BN,
                            response_lengths=generated_B.clone(), log_probs=log_probs_BN,
                            truncated=~hit_eos_B)


# --------------------------------------------------------------------------------------------------
# Teacher-forced log-probs


def sequence_log_probs(model, tokens_BS: torch.Tensor, *, vocab_size: int, temperature: float = 1.0,
                       lengths: torch.Tensor | None = None, micro_batch_size: int | None = None,
                       with_grad: bool = False,
                       groups: ModelParallelGroups | None = None, cp_group=None) -> torch.Tensor:
    """Per-token log-probs of given sequences: ``out[i, t] = log p(tokens[i, t+1] | tokens[i, :t+1])``,
    [B, S-1] fp32, from temperature-scaled logits over the first ``vocab_size`` ids.

    ``tokens_BS`` are right-padded sequences starting at position 0 (as :func:`generate` returns
    them); with ``lengths`` entries whose target lies at or beyond a row's length are set to 0.
    Target ids at or above ``vocab_size`` (padding) are clamped into the vocabulary so that padded
    positions stay finite; mask them with ``lengths`` or the response mask.

    ``with_grad=False`` (old-policy and reference log-probs): forward-only through megatron's
    schedule in micro-batches of ``micro_batch_size`` rows (default: all), under ``torch.no_grad``;
    the result is broadcast from the last pipeline stage, so every rank of the model-parallel group
    returns it. ``with_grad=True``: one direct forward keeping the autograd graph; only without
    pipeline parallelism (with PP, gradients flow through megatron's schedule: call
    :func:`vocab_parallel_log_probs` in the forward step's loss function instead). The model's
    train/eval mode is left as the caller set it.

    ``cp_group`` (context parallelism, ``with_grad=False`` only): every CP rank passes the same full
    rows, padded to a multiple of 2 x CP (:func:`megatron_longact.training.batching.padded_length`);
    each runs its load-balanced part (targets shifted before the split, so each position has its
    target) and the parts are gathered back over the group.
    """
    model = _single_chunk(model)
    groups = groups or ModelParallelGroups.from_parallel_state()
    if tokens_BS.dim() != 2 or tokens_BS.shape[1] < 2:
        raise ValueError(f"tokens: expected [batch, seq >= 2] ids, got shape {tuple(tokens_BS.shape)}")
    batch, seq = tokens_BS.shape
    from megatron_longact.models.builder import unwrap

    gpt = unwrap(model)
    cp = collectives.size(cp_group) if cp_group is not None else 1
    if cp > 1 and (with_grad or seq % (2 * cp)):
        raise ValueError(f"tokens: under context parallelism ({cp} ranks) sequence_log_probs needs "
                         f"with_grad=False and a length that is a multiple of {2 * cp}, got {seq}")
    if gpt.config.sequence_parallel and (seq // cp) % groups.tp_size:
        raise ValueError(f"tokens: sequence length {seq} / CP {cp} must be a multiple of the "
                         f"tensor-parallel size {groups.tp_size} under sequence parallelism; pad the batch")
    device = next(gpt.parameters()).device
    tokens_BS = tokens_BS.to(device)
    targets_BS = tokens_BS[:, 1:].clamp(max=vocab_size - 1)

    if with_grad:
        if groups.pp_size > 1:
            raise ValueError("sequence_log_probs(with_grad=True) needs pipeline_model_parallel_size 1; "
                             "under pipeline parallelism compute vocab_parallel_log_probs in the "
                             "forward step's loss function")
        logits = model(tokens_BS, _position_ids(tokens_BS), None)
        out = vocab_parallel_log_probs(logits[:, :-1, :], targets_BS, vocab_size=vocab_size,
                                       temperature=temperature)
    else:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_longact.training.batching import cp_positions, gather_from_cp, shift_left

        mbs = micro_batch_size or batch
        check_positive("micro_batch_size", mbs)
        n_mb = -(-batch // mbs)
        padded = torch.cat([tokens_BS, tokens_BS[:1].expand(n_mb * mbs - batch, seq)]) \
            if n_mb * mbs != batch else tokens_BS
        # Targets at the full width (the last column's is a placeholder), then this CP rank's part.
        cp_rank = collectives.rank(cp_group) if cp > 1 else 0
        pos_L = cp_positions(seq, cp, cp_rank, device=device)
        inputs = torch.stack([padded, shift_left(padded, 0).clamp(max=vocab_size - 1)], dim=1)[:, :, pos_L]

        def forward_step(data_iterator, chunk):
            pair = next(data_iterator)
            tokens, targets = pair[:, 0], pair[:, 1]

            def to_log_probs(output_BLVl, non_loss_data=False):  # called on the last stage only
                return vocab_parallel_log_probs(output_BLVl, targets, vocab_size=vocab_size,
                                                temperature=temperature)

            return chunk(tokens, pos_L.unsqueeze(0).expand_as(tokens), None), to_log_probs

        with torch.no_grad():
            store = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(inputs.split(mbs)), model=[model],
                num_microbatches=n_mb, seq_length=seq, micro_batch_size=mbs, forward_only=True,
                collect_non_loss_data=True,
            )
            values = torch.cat(store)[:batch] if groups.is_last_stage else None
            local = _share_from_last_stage(values, (batch, seq // cp), groups, device).float()
            out = gather_from_cp(local, cp_group if cp > 1 else None)[:, :seq - 1]
    if lengths is not None:
        keep = torch.arange(1, seq, device=out.device).unsqueeze(0) < lengths.to(out.device).unsqueeze(1)
        out = torch.where(keep, out, torch.zeros_like(out))
    return out
