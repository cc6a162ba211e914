"""Per-step LongAct metrics (docs/method.md, "What is logged") and the saliency heatmap image."""

from __future__ import annotations

import numpy as np
import torch

from megatron_longact.longact.state import MaskState
from megatron_longact.longact.stats import GlobalStats


def stat_extremes(stats: GlobalStats) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the largest and the median statistic of Q and of K: ``{"q": (top_L, median_L),
    "k": ...}``, on the statistics' device (no host sync). What the metrics keep of a step."""
    return {which: (t.max(dim=1).values, t.median(dim=1).values)
            for which, t in (("q", stats.q_LC), ("k", stats.k_LC))}


def step_metrics(state: MaskState, stats) -> dict[str, float]:
    """Scalars a logger can consume, tagged ``longact/...``; ``stats`` is the step's
    :class:`GlobalStats` or its :func:`stat_extremes`.

    kept_fraction_{q,k}: fraction of channels updated (sanity: keep_ratio once masking starts);
    churn_{q,k}/layer_i and their means: Jaccard similarity with the previous mask (1 = unchanged);
    stat_top_{q,k}/layer_i and stat_median_{q,k}/layer_i: the largest and median statistic.
    """
    out: dict[str, float] = {"longact/mask_active": float(state.active)}
    if state.active:
        out["longact/kept_fraction_q"] = float(state.q_keep_LC.numpy().mean())
        out["longact/kept_fraction_k"] = float(state.k_keep_LC.numpy().mean())
        for which, jac in (("q", state.churn_q_L), ("k", state.churn_k_L)):
            if jac is None:  # no earlier mask to compare with
                continue
            out[f"longact/churn_{which}_mean"] = float(jac.mean())
            for i, v in enumerate(jac.tolist()):
                out[f"longact/churn_{which}/layer_{i}"] = v
    else:
        out["longact/kept_fraction_q"] = 1.0
        out["longact/kept_fraction_k"] = 1.0
    extremes = stats if isinstance(stats, dict) else stat_extremes(stats)
    for which, (top, med) in extremes.items():
        for i, (t, m) in enumerate(zip(top.tolist(), med.tolist())):
            out[f"longact/stat_top_{which}/layer_{i}"] = t
            out[f"longact/stat_median_{which}/layer_{i}"] = m
    return out


# Anchor colours of a perceptually ordered dark-to-bright map (black, purple, orange, yellow).
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                    dtype=np.float64)


def _colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 by linear interpolation between the anchors."""
    pos = np.clip(x, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def _pool_columns(t_LC: np.ndarray, max_cols: int) -> np.ndarray:
    """Max-pool channels into at most ``max_cols`` columns (keeps outlier channels visible)."""
    L, C = t_LC.shape
    if C <= max_cols:
        return t_LC
    factor = -(-C // max_cols)
    pad = factor * max_cols - C
    padded = np.concatenate([t_LC, np.zeros((L, pad))], axis=1) if pad else t_LC
    return padded.reshape(L, -1, factor).max(axis=2)


def saliency_heatmap(q_LC: torch.Tensor, k_LC: torch.Tensor, *, max_cols: int = 1024,
                     row_px: int = 4) -> np.ndarray:
    """Layers x channels heatmap of the statistics as an RGB image [H, W, 3] uint8.

    Rows are layers (top = first layer, ``row_px`` pixels each), the Q channels come first, then a
    white separator column, then the K channels. Colour is log(1 + stat) scaled to the image max,
    so the few high-magnitude channels stand out. For TensorBoard:
    ``writer.add_image(tag, img, step, dataformats="HWC")``.
    """
    parts = []
    for t in (q_LC, k_LC):
        x = np.log1p(np.clip(t.detach().double().cpu().numpy(), 0.0, None))
        parts.append(_pool_columns(x, max_cols))
    top = max(float(p.max()) for p in parts) or 1.0
    imgs = [_colormap(p / top) for p in parts]
    sep = np.full((imgs[0].shape[0], 1, 3), 255, dtype=np.uint8)
    img = np.concatenate([imgs[0], sep, imgs[1]], axis=1)
    return np.repeat(img, row_px, axis=0)
