"""The ``longact-probe`` report: ``probe.md``, ``probe.json`` and three PNG figures (docs/probe.md).

- ``concentration_vs_length.png``: top-1% share per layer (rows) and length (columns) for each
  statistic, one colour scale, plus the mean over layers against the length;
- ``channel_profile.png``: the most concentrated layer at the longest length, heads x dimension
  images of Q, K (pre-RoPE) and V, colour = statistic / layer median on a log scale;
- ``rope_bands.png``: where the top channels sit in RoPE frequency, per statistic, pooled over
  layers, at the longest length, against the flat share.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_longact.probe import KINDS

LABELS = {"q_pre": "Q pre-RoPE", "q_post": "Q post-RoPE", "k_pre": "K pre-RoPE",
          "k_post": "K post-RoPE", "v": "V (control)"}
COLOURS = {"q_pre": "#1f77b4", "q_post": "#6baed6", "k_pre": "#d62728", "k_post": "#fc9272",
           "v": "#555555"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def concentration_figure(report: dict):
    plt = _plt()
    lengths = report["lengths"]
    by = report["by_length"]
    grids = {k: np.array([by[str(L)][k]["share_top1"] for L in lengths]).T for k in KINDS}  # [layers, lengths]
    vmax = max(float(g.max()) for g in grids.values())
    layers = grids["k_pre"].shape[0]
    fig = plt.figure(figsize=(3.0 * len(KINDS), 3.2 + 0.18 * layers + 3.2), constrained_layout=True)
    gs = fig.add_gridspec(2, len(KINDS), height_ratios=[1.0 + 0.06 * layers, 1.0])
    im = None
    for j, k in enumerate(KINDS):
        ax = fig.add_subplot(gs[0, j])
        im = ax.imshow(grids[k], aspect="auto", origin="upper", cmap="magma", vmin=0.0, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(LABELS[k], fontsize=10)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45, fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        step = max(1, -(-layers // 12))
        ax.set_yticks(range(0, layers, step), [str(i) for i in range(0, layers, step)], fontsize=8)
        if j == 0:
            ax.set_ylabel("layer", fontsize=9)
    fig.colorbar(im, ax=fig.axes, location="right", shrink=0.9,
                 label="share of the layer's magnitude in its top 1% channels")
    ax = fig.add_subplot(gs[1, :])
    for k in KINDS:
        mean = [float(np.mean(by[str(L)][k]["share_top1"])) for L in lengths]
        top = [float(np.max(by[str(L)][k]["share_top1"])) for L in lengths]
        ax.plot(lengths, mean, "-o", color=COLOURS[k], label=f"{LABELS[k]} (mean over layers)")
        ax.plot(lengths, top, ":", color=COLOURS[k], label=f"{LABELS[k]} (max over layers)")
    flat = report["flat"]["k"]["share_top1"]
    ax.axhline(flat, color="black", lw=0.8, ls="--", label=f"flat K channels ({flat:.3f})")
    if len(lengths) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("top-1% share")
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.suptitle(f"Q/K concentration against context length ({report['stat']})", fontsize=12)
    return fig


def profile_figure(report: dict, pooled: dict, head_dim: int):
    plt = _plt()
    from matplotlib.colors import LogNorm

    most = report["most_concentrated"]
    layer, L = most["layer"], most["length"]
    kinds = ("q_pre", "k_pre", "v")
    mats = {}
    for k in kinds:
        t = pooled[L][k][layer].double().numpy()
        med = float(np.median(t)) or 1e-30
        mats[k] = (t / med).reshape(-1, head_dim)
    vmax = max(64.0, max(float(m.max()) for m in mats.values()))
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(7.0, 0.09 * head_dim + 3), 1.6 + sum(
        0.35 * m.shape[0] + 0.8 for m in mats.values())), constrained_layout=True,
        gridspec_kw={"height_ratios": [m.shape[0] + 2 for m in mats.values()]})
    im = None
    half = head_dim // 2
    for ax, k in zip(axes, kinds):
        m = np.clip(mats[k], 1.0 / 8, None)
        im = ax.imshow(m, aspect="auto", cmap="magma", norm=LogNorm(vmin=1.0 / 8, vmax=vmax),
                       interpolation="nearest")
        ax.axvline(half - 0.5, color="white", lw=0.8)
        rows = m.shape[0]
        step = max(1, -(-rows // 8))
        ax.set_yticks(range(0, rows, step), [str(i) for i in range(0, rows, step)], fontsize=7)
        ax.set_ylabel("head" if k.startswith("q") else "group", fontsize=8)
        ax.set_title(f"{LABELS[k]}", fontsize=9)
        ticks = sorted({0, half // 2, half - 1, half, half + half // 2, head_dim - 1})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    axes[-1].set_xlabel(f"dimension within the head (RoPE pairs d and d+{half}; pair index rises "
                        "toward lower frequency within each half)", fontsize=8)
    fig.colorbar(im, ax=list(axes), label="statistic / layer median (log)")
    fig.suptitle(f"Channel magnitudes of layer {layer} at {L} tokens (most concentrated K layer)",
                 fontsize=11)
    return fig


def bands_figure(report: dict):
    plt = _plt()
    L = report["lengths"][-1]
    e = report["by_length"][str(L)]
    bands = report["bands"]
    B = len(bands)
    fig, ax = plt.subplots(figsize=(8.5, 4.2), constrained_layout=True)
    width = 0.8 / len(KINDS)
    for j, k in enumerate(KINDS):
        share = np.array(e[k]["bands"]).mean(axis=0)
        ax.bar(np.arange(B) + (j - (len(KINDS) - 1) / 2) * width, share, width, label=LABELS[k],
               color=COLOURS[k])
    ax.axhline(1.0 / B, color="black", lw=0.8, ls="--", label=f"flat ({1.0 / B:.2f})")
    names = []
    for b in bands:
        lo, hi = b["wavelength_tokens"]
        names.append(f"band {b['band']}\npairs {b['pairs'][0]}-{b['pairs'][1]}\n"
                     f"wavelength {lo:.0f}-{hi:.0f}")
    ax.set_xticks(range(B), names, fontsize=8)
    ax.set_xlabel("RoPE frequency band (high frequency -> low frequency)")
    ax.set_ylabel(f"share of the top {report['band_top_fraction']:.0%} channels (mean over layers)")
    ax.set_title(f"Where the top channels sit in RoPE frequency ({L} tokens)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict, title: str) -> str:
    m = report["model"]
    lengths = report["lengths"]
    flat = report["flat"]
    lines = [f"# {title}", "",
             f"Model: `{m['source']}` ({m['kind']}, {m['family']}, {m['num_layers']} layers, "
             f"{m['num_attention_heads']} query heads, {m['num_query_groups']} key/value groups, head "
             f"dim {m['head_dim']}, RoPE base {m['rotary_base']:g}"
             + (", Llama-3 RoPE scaling" if m["rope_scaling"] else "") + f", {m['params_dtype']}). "
             f"Data: `{report['data']}`. Statistic: `{report['stat']}` per channel over every token "
             f"of each input. Device: {report['device']}; {report['seconds']} s.", "",
             "Inputs per length: " + ", ".join(
                 f"{L}: {report['by_length'][str(L)]['inputs']} "
                 f"({min(report['by_length'][str(L)]['tokens'])}-{max(report['by_length'][str(L)]['tokens'])} tokens)"
                 for L in lengths) + ".", "",
             "## Concentration against context length", "",
             f"Share of a layer's summed statistic held by its top 1% of channels (flat: Q "
             f"{flat['q']['share_top1']:.3f}, K {flat['k']['share_top1']:.3f}), and the largest / "
             "median channel ratio; mean and max over layers. The paper's claim: large in Q and K "
             "(growing with context), not in V.", "",
             "| length | statistic | top-1% mean | top-1% max | top-5% mean | top-30% mean | top/median mean | top/median max | max over layers of Q/K top-median / V's |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for L in lengths:
        e = report["by_length"][str(L)]
        s = report["summary"][str(L)]
        for k in KINDS:
            lines.append(
                f"| {L} | {LABELS[k]} | {_f(s[k]['share_top1_mean'])} | {_f(s[k]['share_top1_max'])} | "
                f"{_f(float(np.mean(e[k]['share_top5'])))} | {_f(float(np.mean(e[k]['share_top30'])))} | "
                f"{_f(s[k]['top_median_mean'], 1)} | {_f(s[k]['top_median_max'], 1)} | "
                f"{_f(s[k].get('top_median_over_v_max'), 2) if k != 'v' else '(control)'} |")
    Lmax = lengths[-1]
    e = report["by_length"][str(Lmax)]
    lines += ["", "![concentration](concentration_vs_length.png)", "",
              "## RoPE frequency of the top channels", "",
              f"Share of each layer's top {report['band_top_fraction']:.0%} channels per band at "
              f"{Lmax} tokens (mean over layers; flat {1 / len(report['bands']):.2f}). Band 0 holds "
              "the highest frequencies; wavelengths in tokens.", "",
              "| statistic | " + " | ".join(
                  f"band {b['band']} (pairs {b['pairs'][0]}-{b['pairs'][1]}, wavelength "
                  f"{b['wavelength_tokens'][0]:.0f}-{b['wavelength_tokens'][1]:.0f})" for b in report["bands"]) + " |",
              "| --- | " + " | ".join("---:" for _ in report["bands"]) + " |"]
    for k in KINDS:
        share = np.array(e[k]["bands"]).mean(axis=0)
        lines.append(f"| {LABELS[k]} | " + " | ".join(f"{x:.3f}" for x in share) + " |")
    lines += ["", "![bands](rope_bands.png)", "", "## Stability of the top-30% channel sets", "",
              "Mean Jaccard similarity of the top-30% sets (the channels LongAct would update), "
              "mean over layers: between inputs of one length, and between the pooled statistics "
              "of different lengths (a random 30% set gives about 0.18).", "",
              "| statistic | " + " | ".join(f"inputs @{L}" for L in lengths) + " | across lengths |",
              "| --- | " + " | ".join("---:" for _ in lengths) + " | ---: |"]
    for k in KINDS:
        cells = []
        for L in lengths:
            j = report["by_length"][str(L)][k]["jaccard_across_inputs"]
            cells.append("-" if j is None else f"{np.mean(j):.3f}")
        jl = report["jaccard_across_lengths"][k]
        lines.append(f"| {LABELS[k]} | " + " | ".join(cells) + f" | {'-' if jl is None else f'{np.mean(jl):.3f}'} |")
    most = report["most_concentrated"]
    lines += ["", f"## Most concentrated layer: {most['layer']} (highest K pre-RoPE top-1% share at "
              f"{most['length']} tokens)", "",
              "| statistic | channel | head/group | dim | RoPE pair | band | wavelength | value / layer median |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in KINDS:
        for c in most["top_channels"][k][:4]:
            lines.append(f"| {LABELS[k]} | {c['channel']} | {c['head']} | {c['dim']} | {c['pair']} | "
                         f"{c['band']} | {c['wavelength']:.0f} | {c['over_median']:.1f} |")
    lines += ["", "![profile](channel_profile.png)", "", f"## Per layer at {Lmax} tokens", "",
              "| layer | " + " | ".join(f"{LABELS[k]} top-1% | top/median" for k in KINDS) + " |",
              "| ---: | " + " | ".join("---: | ---:" for _ in KINDS) + " |"]
    for i in range(len(e["k_pre"]["share_top1"])):
        lines.append(f"| {i} | " + " | ".join(
            f"{e[k]['share_top1'][i]:.3f} | {e[k]['top_median'][i]:.1f}" for k in KINDS) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, pooled: dict, out: Path, *, title: str) -> dict:
    """Write probe.md, probe.json and the figures under ``out``; returns their paths."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, fig in (("concentration_vs_length", concentration_figure(report)),
                      ("channel_profile", profile_figure(report, pooled, report["model"]["head_dim"])),
                      ("rope_bands", bands_figure(report))):
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures[name] = path
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    (out / "probe.md").write_text(markdown(report, title))
    return {"markdown": out / "probe.md", "json": out / "probe.json", "figures": figures}
