"""Channel selection: the LongAct mask from global statistics (docs/method.md, "The mask").

Pure functions of tensors in the global channel space; no communication. Every rank calls them
with bit-identical statistics and gets bit-identical masks. Ties break toward the lower global
channel index (stable sorts), so the result does not depend on the parallel layout.
"""

from __future__ import annotations

import math
import zlib

import torch

from megatron_longact.longact.layout import QKGeometry


def keep_count(n: int, keep_ratio: float) -> int:
    """Channels kept out of ``n``: round(keep_ratio * n), at least 1 and at most n."""
    return max(1, min(n, int(math.floor(keep_ratio * n + 0.5))))


def _keep_highest(x_NC: torch.Tensor, k: int) -> torch.Tensor:
    """[N, C] bool: the k highest entries of each row, ties resolved toward the lower index.

    Selection (kthvalue) instead of a full sort: the k-th largest value is the threshold, every
    entry above it is kept, and of the entries equal to it the lowest-indexed fill the rest.
    """
    C = x_NC.shape[1]
    thr = torch.kthvalue(x_NC, C - k + 1, dim=1, keepdim=True).values
    above = x_NC > thr
    tie = x_NC == thr
    need = k - above.sum(dim=1, keepdim=True)
    return above | (tie & (torch.cumsum(tie, dim=1) <= need))


def select_rows(scores_NC: torch.Tensor, k: int, strategy: str, *, seed: int = 0) -> torch.Tensor:
    """[N, C] bool: keep ``k`` channels in each row of ``scores_NC`` by ``strategy``, on the
    scores' device. Every operation is exact (selection, comparisons, integer counts), so a GPU and
    the CPU select the same channels from the same scores.

    topk keeps the highest scores, bottomk the lowest (ties: lower index first), random a seeded
    uniformly random set of k per row, none keeps everything.
    """
    N, C = scores_NC.shape
    if strategy == "none":
        return torch.ones(N, C, dtype=torch.bool, device=scores_NC.device)
    if strategy == "random":  # drawn on the host, so that every device draws the same set
        gen = torch.Generator().manual_seed(seed)
        return _keep_highest(torch.rand(N, C, generator=gen).to(scores_NC.device), k)
    if strategy == "topk":
        return _keep_highest(scores_NC, k)
    if strategy == "bottomk":
        return _keep_highest(-scores_NC, k)
    raise ValueError(f"longact.strategy: got {strategy!r}, expected one of topk, bottomk, random, none")


def select_channels(q_LC: torch.Tensor, k_LC: torch.Tensor, geometry: QKGeometry, *,
                    keep_ratio: float, scope: str, strategy: str, seed: int = 0,
                    step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Global channel masks ``(q_keep_LC, k_keep_LC)`` (True = update) from statistics.

    scope ``layer``: top-k within each layer, separately for Q and K; ``head``: within each query
    head and each key group (k = round(keep_ratio * head_dim)); ``model``: one selection over all
    layers' Q channels and one over all K channels. The random strategy is seeded by
    (seed, step, Q/K), so a recomputed random mask is a fresh draw of the same size.
    """
    L, D = geometry.num_layers, geometry.head_dim
    for name, t, C in (("q", q_LC, geometry.q_channels), ("k", k_LC, geometry.k_channels)):
        if tuple(t.shape) != (L, C):
            raise ValueError(f"LongAct {name} statistics: shape {tuple(t.shape)}, expected ({L}, {C})")
        if not torch.isfinite(t).all():
            bad = torch.nonzero(~torch.isfinite(t).all(dim=1)).flatten().tolist()
            raise ValueError(f"LongAct {name} statistics are not finite in layers {bad}")

    def one(t_LC: torch.Tensor, tag: int) -> torch.Tensor:
        C = t_LC.shape[1]
        if scope == "layer":
            view = t_LC
        elif scope == "head":
            view = t_LC.reshape(L * (C // D), D)
        elif scope == "model":
            view = t_LC.reshape(1, L * C)
        else:
            raise ValueError(f"longact.scope: got {scope!r}, expected one of layer, head, model")
        sub_seed = zlib.crc32(f"{seed}:{step}:{tag}".encode())
        mask = select_rows(view.float(), keep_count(view.shape[1], keep_ratio), strategy, seed=sub_seed)
        return mask.reshape(L, C)

    return one(q_LC, 0), one(k_LC, 1)
