"""Figures a person can read: the saliency heatmap and the per-layer top/median ratio over steps.

Heatmap (``saliency_figure``): one panel for Q and one for K; rows are layers (layer 0 at the
top), columns are channels in global order (head-major: head h covers columns h*d .. h*d+d-1,
thin grey lines separate heads). The colour is the channel's statistic divided by its layer's
median, on a fixed logarithmic scale from 1/4 to 64 (``RATIO_RANGE``), the same at every step, so
figures of different steps compare directly and a "massive" channel (tens of times its layer's
median) is bright whatever the model's absolute scale. Kept (updated) channels are marked with a
white dot (with more channels than ``MAX_COLUMNS``, columns are max-pooled in groups and a dot
means at least half of the group is kept). The title gives the step and the keep ratio.

Ratio plot (``ratio_figure``): the largest statistic over the median, per layer, for Q and K,
against the step: LongAct's premise is that this ratio is large and stable; the history lives in
``ratio_history.json`` next to the PNGs, so a resumed run continues its curves.

Both are written as PNGs in the run folder (``figures/``) and, when a writer is given, to
TensorBoard (``longact/saliency_heatmap``, ``longact/top_median_ratio``). matplotlib's Agg backend
is used: no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

RATIO_RANGE = (0.25, 64.0)
MAX_COLUMNS = 256


def _pool(x_LC: np.ndarray, factor: int, how: str) -> np.ndarray:
    L, C = x_LC.shape
    if factor <= 1:
        return x_LC
    pad = (-C) % factor
    if pad:
        fill = np.zeros((L, pad)) if how == "mean" else np.full((L, pad), -np.inf)
        x_LC = np.concatenate([x_LC, fill], axis=1)
    blocks = x_LC.reshape(L, -1, factor)
    return blocks.mean(axis=2) if how == "mean" else blocks.max(axis=2)


def _ratio_to_median(t_LC: torch.Tensor) -> np.ndarray:
    x = t_LC.detach().double().cpu().numpy()
    med = np.median(x, axis=1, keepdims=True)
    return x / np.where(med > 0, med, 1.0)


def top_median_ratio(t_LC: torch.Tensor) -> list[float]:
    """Per layer: largest channel statistic / median channel statistic."""
    x = t_LC.detach().double().cpu()
    med = x.median(dim=1).values.clamp_min(1e-30)
    return (x.max(dim=1).values / med).tolist()


def saliency_figure(q_LC, k_LC, q_keep_LC, k_keep_LC, *, step: int, keep_ratio: float,
                    head_dim: int | None = None):
    """The heatmap as a matplotlib Figure (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    L = q_LC.shape[0]
    widths = [-(-t.shape[1] // -(-t.shape[1] // MAX_COLUMNS)) for t in (q_LC, k_LC)]
    widths = [max(w, 24) for w in widths]
    fig, axes = plt.subplots(1, 2, figsize=(13, 2.2 + min(0.3 * max(L, 4), 8.0)), squeeze=False,
                             gridspec_kw={"width_ratios": widths}, layout="constrained")
    norm = LogNorm(vmin=RATIO_RANGE[0], vmax=RATIO_RANGE[1], clip=True)
    image = None
    for ax, name, t, keep in ((axes[0, 0], "Q", q_LC, q_keep_LC), (axes[0, 1], "K", k_LC, k_keep_LC)):
        ratio = _ratio_to_median(t)
        C = ratio.shape[1]
        factor = -(-C // MAX_COLUMNS)
        shown = np.clip(_pool(ratio, factor, "max"), RATIO_RANGE[0], RATIO_RANGE[1])
        image = ax.imshow(shown, aspect="auto", cmap="magma", norm=norm, interpolation="nearest",
                          extent=(-0.5, shown.shape[1] - 0.5, L - 0.5, -0.5))
        if keep is not None:
            kept = _pool(keep.detach().double().cpu().numpy(), factor, "mean") >= 0.5
            rows, cols = np.nonzero(kept)
            ax.scatter(cols, rows, s=(4 if L > 32 else 12) if shown.shape[1] > 96 else 14, c="white",
                       marker="o", linewidths=0, label="kept (updated) channel" if factor == 1 else
                       "kept (updated): at least half of the channel group")
        if head_dim and 1 < C // head_dim <= 32:
            for h in range(1, C // head_dim):
                ax.axvline(h * head_dim / factor - 0.5, color="0.6", linewidth=0.5)
        unit = f" (groups of {factor})" if factor > 1 else ""
        ax.set_title(f"{name}: {C} channels{unit}", fontsize=10)
        ax.set_xlabel(f"{name} channel{' group' if factor > 1 else ''} (head-major)")
        ax.set_ylabel("layer")
        ax.set_yticks(range(L) if L <= 16 else range(0, L, max(1, L // 16)))
    fig.suptitle(f"LongAct saliency at step {step}, keep ratio {keep_ratio:g}"
                 f"{'' if q_keep_LC is not None else ' (no mask yet: all channels updated)'}",
                 fontsize=12)
    bar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, pad=0.02)
    bar.set_label("statistic / layer median\n(log scale, fixed 1/4 .. 64)", fontsize=9)
    if q_keep_LC is not None:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        leg = fig.legend(handles, labels, loc="outside lower center", fontsize=9, facecolor="0.25",
                         labelcolor="white", markerscale=2.0, frameon=True)
        leg.get_frame().set_alpha(0.9)
    return fig


def ratio_figure(history: list[dict]):
    """Per-layer top/median ratio of Q and K against the step, from ``history`` entries
    ``{"step": s, "q": [per layer], "k": [per layer]}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [h["step"] for h in history]
    L = len(history[0]["q"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes, ("q", "k")):
        for i in range(L):
            ax.plot(steps, [h[name][i] for h in history], color=cmap(i / max(L - 1, 1)),
                    marker="o" if len(steps) < 20 else None, markersize=3, linewidth=1.2,
                    label=f"layer {i}" if L <= 12 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name.upper()}: largest / median channel statistic", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top / median (log scale)")
    if L <= 12:
        axes[1].legend(fontsize=8, ncol=2, loc="best")
    else:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, L - 1))
        fig.colorbar(sm, ax=axes.tolist(), fraction=0.03, pad=0.02).set_label("layer")
    fig.suptitle("LongAct: per-layer top/median ratio over steps", fontsize=12)
    return fig


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def log_saliency_figures(controller, step: int, keep_ratio: float, out_dir: str | Path,
                         writer=None, wandb=None) -> dict[str, Path]:
    """Write the heatmap of ``controller``'s last statistics and the ratio plot (PNG, TensorBoard,
    W&B); returns the PNG paths ({} when there are no statistics yet). Rank 0 only."""
    import matplotlib.pyplot as plt

    stats = controller.last_stats
    if stats is None:
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = controller.state
    fig = saliency_figure(stats.q_LC, stats.k_LC, state.q_keep_LC, state.k_keep_LC, step=step,
                          keep_ratio=keep_ratio, head_dim=getattr(controller.geometry, "head_dim", None))
    paths = {"heatmap": out / f"saliency_step{step:07d}.png"}
    fig.savefig(paths["heatmap"], dpi=110, bbox_inches="tight")
    if writer is not None:
        writer.add_image("longact/saliency_heatmap", _figure_to_array(fig), step, dataformats="HWC")
    plt.close(fig)

    hist_path = out / "ratio_history.json"
    history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
    history = [h for h in history if h["step"] < step]  # a resumed run rewrites its future
    history.append({"step": step, "q": top_median_ratio(stats.q_LC), "k": top_median_ratio(stats.k_LC)})
    hist_path.write_text(json.dumps(history))
    fig = ratio_figure(history)
    paths["ratio"] = out / "top_median_ratio.png"
    fig.savefig(paths["ratio"], dpi=110, bbox_inches="tight")
    if writer is not None:
        writer.add_image("longact/top_median_ratio", _figure_to_array(fig), step, dataformats="HWC")
    plt.close(fig)
    if wandb is not None:
        for key, path in paths.items():
            wandb.log_image(f"longact/{key}", str(path), step)
    return paths
