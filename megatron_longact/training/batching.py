"""Padding and context-parallel splitting of training and log-prob batches.

One function, :func:`padded_length`, decides how long a batch's rows are for the active layout;
:func:`pad_batch` builds the right-padded tokens; :func:`split_for_cp` cuts a full-sequence tensor
to this context-parallel rank's part and :func:`gather_from_cp` puts per-rank parts back.

Length rules (each a multiple the padded length S must be of; S is the smallest length >= the
longest row that is a multiple of all of them):

    always                      16 (``BASE``: fewer distinct shapes for the kernels and the schedule)
    context parallelism (CP)    2 * CP: megatron's load-balanced split cuts each row into 2 * CP
                                equal chunks
    sequence parallelism (SP)   CP * TP: each CP rank's S / CP tokens are split over TP ranks
    FP8 (Transformer Engine)    16 * CP * (TP with SP, else 1): TE's FP8 GEMMs need the token count
                                of a rank's input (S / CP / TP x micro-batch with SP) to be a
                                multiple of 8, and of 16 for some kernels; making the per-row count
                                a multiple of 16 makes it so for every micro-batch size

Context-parallel layout (megatron's ``get_batch_on_this_cp_rank``): a row of S tokens is cut into
2 * CP chunks of S / (2 * CP); CP rank r holds chunks r and 2 * CP - 1 - r, in that order, so that
every rank gets the same share of causal-attention work. Tokens, labels, loss masks, response
masks, LongAct token masks, old and reference log-probs and position ids are all cut the same way.
Labels are shifted *before* the split (``labels[t] = tokens[t + 1]``), so each rank has the target
of every position it holds; RoPE under CP uses the global positions of the rank's chunks (megatron's
rotary embedding slices its table the same way, ``rope_utils.get_pos_emb_on_this_cp_rank``).

Shape suffixes: B rows, S full padded length, L = S / CP local length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_longact.config import ConfigError
from megatron_longact.runtime import collectives

BASE = 16


@dataclass(frozen=True)
class SequenceLayout:
    """What the padded length depends on."""

    tp: int = 1
    """Tensor-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    sequence_parallel: bool = False
    """Sequence parallelism over the TP group."""
    fp8: bool = False
    """Transformer Engine FP8 linear layers."""

    def __post_init__(self):
        for name in ("tp", "cp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: got {value!r}, expected an integer >= 1")

    @classmethod
    def of(cls, parallel, model_cfg=None) -> "SequenceLayout":
        """The layout of a resolved :class:`~megatron_longact.runtime.ParallelConfig` (after
        :func:`~megatron_longact.runtime.initialize`, which decides sequence parallelism) and a
        :class:`~megatron_longact.models.config.ModelConfig` (for ``fp8``)."""
        return cls(tp=parallel.tensor_model_parallel_size, cp=parallel.context_parallel_size,
                   sequence_parallel=bool(parallel.sequence_parallel),
                   fp8=model_cfg is not None and getattr(model_cfg, "fp8", "none") != "none")

    @property
    def required(self) -> int:
        """What the kernels need: every sequence length must be a multiple of this (the rules of
        the module docstring without ``BASE``)."""
        tp_split = self.tp if self.sequence_parallel else 1
        m = math.lcm(2 * self.cp if self.cp > 1 else 1, self.cp * tp_split)
        if self.fp8:
            m = math.lcm(m, 16 * self.cp * tp_split)
        return m

    @property
    def multiple(self) -> int:
        """Every padded length is a multiple of this: :attr:`required` and ``BASE``."""
        return math.lcm(BASE, self.required)

    def describe(self) -> str:
        parts = [f"TP={self.tp}" + (" with sequence parallelism" if self.sequence_parallel else ""),
                 f"CP={self.cp}"]
        if self.fp8:
            parts.append("FP8")
        return ", ".join(parts)


def padded_length(length: int, layout: SequenceLayout) -> int:
    """The smallest length >= ``length`` that ``layout`` accepts (module docstring)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: got {length!r}, expected an integer >= 1")
    m = layout.multiple
    return -(-length // m) * m


def check_length(length: int, layout: SequenceLayout, field: str) -> None:
    """ConfigError naming ``field`` unless ``length`` meets :attr:`SequenceLayout.required` (for
    fixed-length batches such as ``train.seq_length`` in LM mode and in the planner)."""
    m = layout.required
    if length % m:
        raise ConfigError(f"{field}: {length} is not a multiple of {m}, which {layout.describe()} "
                          f"needs (the next valid length is {-(-length // m) * m})")


def pad_batch(seqs: list[list[int]], pad_id: int, max_len: int,
              layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, S]`` tokens and a ``[B, S]`` bool mask of the real tokens, S the
    :func:`padded_length` of the longest row. ConfigError when S exceeds ``max_len`` (the model's
    ``max_position_embeddings``)."""
    width = padded_length(max(len(s) for s in seqs), layout)
    if width > max_len:
        raise ConfigError(f"a batch needs {width} positions ({layout.describe()} pads to a multiple "
                          f"of {layout.multiple}), more than model.max_position_embeddings={max_len}; "
                          "shorten the tasks or raise the limit")
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        valid[i, :len(s)] = True
    return tokens, valid


def shift_left(x_BS: torch.Tensor, fill) -> torch.Tensor:
    """``out[:, t] = x[:, t + 1]``, the last column ``fill``: labels from tokens, and masks in
    prediction space (column t is the prediction of token t + 1), at the full length S so that the
    CP split cuts them like the tokens."""
    tail = torch.full((x_BS.shape[0], 1), fill, dtype=x_BS.dtype, device=x_BS.device)
    return torch.cat([x_BS[:, 1:], tail], dim=1)


def cp_positions(seq: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of CP rank ``cp_rank``'s L = seq / cp_size tokens, in its local order."""
    if cp_size == 1:
        return torch.arange(seq, device=device)
    if seq % (2 * cp_size):
        raise ValueError(f"sequence length {seq} is not a multiple of 2 x context_parallel_size = "
                         f"{2 * cp_size}; pad the batch with padded_length()")
    chunk = seq // (2 * cp_size)
    first = cp_rank * chunk
    second = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def split_for_cp(x_BS: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's part ``[B, L, ...]`` of a full-sequence tensor ``[B, S, ...]`` (dim 1 is the
    sequence), as megatron's ``get_batch_on_this_cp_rank`` cuts it."""
    if cp_size == 1:
        return x_BS
    return x_BS.index_select(1, cp_positions(x_BS.shape[1], cp_size, cp_rank, device=x_BS.device))


def gather_from_cp(x_BL: torch.Tensor, cp_group) -> torch.Tensor:
    """The full-sequence ``[B, S, ...]`` tensor from every CP rank's ``[B, L, ...]`` part (inverse
    of :func:`split_for_cp`), on every rank of ``cp_group``. Not differentiable (log-probs of
    frozen forwards). Each position is written by exactly one rank and zeros elsewhere, so the sum
    over the group is exact."""
    cp_size = collectives.size(cp_group) if cp_group is not None else 1
    if cp_size == 1:
        return x_BL
    cp_rank = collectives.rank(cp_group)
    seq = x_BL.shape[1] * cp_size
    full = torch.zeros((x_BL.shape[0], seq) + tuple(x_BL.shape[2:]), dtype=x_BL.dtype, device=x_BL.device)
    full[:, cp_positions(seq, cp_size, cp_rank, device=x_BL.device)] = x_BL
    return collectives.all_reduce(full, cp_group)
