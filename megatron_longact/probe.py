"""``longact-probe``: does a model have the massive Q/K channels LongAct relies on? (docs/probe.md)

The model (a Hugging Face folder, a trainer checkpoint or a ``longact-convert hf-to-mcore`` folder)
is loaded into a megatron-core GPTModel through the project's weight mapping, fed inputs of several
context lengths one at a time (batch 1, every token counted), and measured with the trainer's own
statistics collector (:class:`megatron_longact.longact.stats.StatsCollector`): Q and K before RoPE
(outputs of ``q_layernorm`` / ``k_layernorm``), after RoPE (the ``core_attention`` inputs, RoPE pair
norms) and V as a control (the ``core_attention`` value input; LongAct never selects V channels).

Per statistic (``q_pre``, ``q_post``, ``k_pre``, ``k_post``, ``v``), per layer and per length:

- *concentration*: the share of the layer's summed statistic held by its top 1% / 5% / 30% of
  channels (a flat layer gives 0.01 / 0.05 / 0.30) and the largest / median ratio;
- *RoPE bands*: where the top channels sit within the head. Channel ``d`` of a head (dimension D)
  is rotated with ``d + D/2`` (or ``d - D/2``) at frequency ``theta_i = base^(-2i/D)``, i = d mod
  D/2; the pair indices are cut into ``bands`` equal bands, band 0 the highest frequencies (short
  wavelengths), the last band the lowest. For V the same index is reported as a control (V is not
  rotated, so a flat histogram is expected there);
- *stability*: Jaccard similarity of the top-30% channel sets (the default LongAct selection,
  :func:`megatron_longact.longact.selection.select_rows`) between inputs of one length and between
  lengths.

Pure functions of statistics tensors are at the top (tested on their own); model loading and
collection below; the report and figures in :mod:`megatron_longact.probe_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from megatron_longact.longact.state import jaccard_L
from megatron_longact.longact.selection import keep_count, select_rows

KINDS = ("q_pre", "q_post", "k_pre", "k_post", "v")
TOP_FRACTIONS = (0.01, 0.05, 0.30)


# ---------------------------------------------------------------------------------------------
# Statistics of statistics (pure)
# ---------------------------------------------------------------------------------------------

def concentration(t_LC: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: ``share_top1`` / ``share_top5`` / ``share_top30`` (share of the summed statistic
    held by the top ``keep_count(C, f)`` channels) and ``top_median`` (largest / median)."""
    x = t_LC.double()
    C = x.shape[1]
    ordered = x.sort(dim=1, descending=True).values
    total = ordered.sum(dim=1).clamp(min=1e-30)
    out = {}
    for frac in TOP_FRACTIONS:
        n = keep_count(C, frac)
        out[f"share_top{round(frac * 100)}"] = (ordered[:, :n].sum(dim=1) / total).tolist()
    med = x.median(dim=1).values.clamp(min=1e-30)
    out["top_median"] = (ordered[:, 0] / med).tolist()
    return out


def pair_index(head_dim: int) -> torch.Tensor:
    """[D] RoPE pair (frequency) index i of each dimension of a head (rotate-half layout)."""
    return torch.arange(head_dim) % (head_dim // 2)


def band_of(head_dim: int, bands: int) -> torch.Tensor:
    """[D] band of each dimension of a head: 0 = highest frequency, ``bands - 1`` = lowest."""
    return pair_index(head_dim) * bands // (head_dim // 2)


def wavelengths(head_dim: int, base: float, llama3_factor: float | None = None) -> torch.Tensor:
    """[D/2] RoPE wavelength in tokens (2 pi / theta_i) of each pair index; with Llama-3 scaling
    (megatron's fixed low/high frequency factors 1 and 4, original context 8192) when a factor is
    given."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = base ** (-2.0 * i / head_dim)
    if llama3_factor is not None:
        low_wl, high_wl = 8192 / 1.0, 8192 / 4.0
        wl = 2 * math.pi / inv_freq
        smooth = (8192 / wl - 1.0) / (4.0 - 1.0)
        mid = (1 - smooth) * inv_freq / llama3_factor + smooth * inv_freq
        inv_freq = torch.where(wl > low_wl, inv_freq / llama3_factor,
                               torch.where(wl < high_wl, inv_freq, mid))
    return 2 * math.pi / inv_freq


def band_histogram(t_LC: torch.Tensor, head_dim: int, bands: int, top_fraction: float) -> torch.Tensor:
    """[L, bands] fraction of each layer's top ``top_fraction`` channels that fall in each band."""
    L, C = t_LC.shape
    keep = select_rows(t_LC.float(), keep_count(C, top_fraction), "topk")
    band_C = band_of(head_dim, bands).repeat(C // head_dim)
    counts = torch.zeros(L, bands, dtype=torch.float64)
    for b in range(bands):
        counts[:, b] = (keep & (band_C == b)).sum(dim=1).double()
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def top_set(t_LC: torch.Tensor, keep_ratio: float = 0.30) -> torch.Tensor:
    """[L, C] bool: the channels LongAct's default selection keeps (top ``keep_ratio`` per layer)."""
    return select_rows(t_LC.float(), keep_count(t_LC.shape[1], keep_ratio), "topk")


def mean_pairwise_jaccard(stats: list[torch.Tensor], keep_ratio: float = 0.30) -> list[float] | None:
    """[L] mean Jaccard similarity of the top-``keep_ratio`` sets over all pairs of ``stats``."""
    if len(stats) < 2:
        return None
    sets = [top_set(t, keep_ratio) for t in stats]
    jac = torch.stack([jaccard_L(a, b) for a, b in combinations(sets, 2)])
    return jac.mean(dim=0).tolist()


def pool(stats: list[torch.Tensor], tokens: list[int], stat: str) -> torch.Tensor:
    """The statistic over the tokens of several inputs from each input's own statistic."""
    if stat == "max_abs":
        return torch.stack(stats).amax(dim=0)
    w = torch.tensor(tokens, dtype=torch.float64)
    x = torch.stack([s.double() for s in stats])
    if stat == "rms":
        return ((x ** 2 * w[:, None, None]).sum(0) / w.sum()).sqrt().float()
    return ((x * w[:, None, None]).sum(0) / w.sum()).float()


def top_channels(t_C: torch.Tensor, head_dim: int, bands: int, waves: torch.Tensor, n: int) -> list[dict]:
    """The ``n`` largest channels of one layer with their head, dimension, pair, band and
    wavelength."""
    med = float(t_C.median()) or 1e-30
    order = torch.argsort(t_C.double(), descending=True, stable=True)[:n]
    band = band_of(head_dim, bands)
    pairs = pair_index(head_dim)
    return [{"channel": int(c), "head": int(c) // head_dim, "dim": int(c) % head_dim,
             "pair": int(pairs[int(c) % head_dim]), "band": int(band[int(c) % head_dim]),
             "wavelength": float(waves[int(pairs[int(c) % head_dim])]),
             "value": float(t_C[c]), "over_median": float(t_C[c]) / med} for c in order]


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------

class _StopAfterDecoder(Exception):
    """Raised by a hook once the decoder layers ran: logits are not needed."""


@dataclass
class Collected:
    """Per-input statistics: ``per_input[length][kind]`` is a list of [L, C] tensors, one per input;
    ``tokens[length]`` the token count of each input."""

    per_input: dict[int, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)


def collect(gpt_model, forward_model, inputs: dict[int, list[list[int]]], geometry, stat: str,
            device, progress=None) -> Collected:
    """Run each input through ``forward_model`` (``gpt_model`` possibly wrapped) once and read the
    trainer's statistics collectors after every forward pass."""
    from megatron_longact.longact.stats import StatsCollector

    pre = StatsCollector([gpt_model], geometry, stat=stat, point="pre_rope")
    post = StatsCollector([gpt_model], geometry, stat=stat, point="post_rope", collect_v=True)

    def stop(module, args, output):
        raise _StopAfterDecoder

    handle = gpt_model.decoder.register_forward_hook(stop)
    params = [p for p in gpt_model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    out = Collected()
    try:
        for length, seqs in inputs.items():
            out.per_input[length] = {k: [] for k in KINDS}
            out.tokens[length] = []
            for n, ids in enumerate(seqs):
                tokens = torch.tensor([ids], dtype=torch.long, device=device)
                pos = torch.arange(len(ids), device=device).unsqueeze(0)
                # The collectors count only forwards with grad mode on (update passes); no
                # parameter requires grad, so no graph is built.
                with torch.enable_grad():
                    try:
                        forward_model(tokens, pos, None)
                    except _StopAfterDecoder:
                        pass
                a, b = pre.reduce(), post.reduce()
                for kind, t in (("q_pre", a.q_LC), ("k_pre", a.k_LC), ("q_post", b.q_LC),
                                ("k_post", b.k_LC), ("v", b.v_LC)):
                    out.per_input[length][kind].append(t.float())
                out.tokens[length].append(len(ids))
                if progress:
                    progress(length, n + 1, len(seqs))
    finally:
        handle.remove()
        pre.remove_hooks()
        post.remove_hooks()
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return out


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------

def analyze(col: Collected, *, head_dim: int, base: float, llama3_factor: float | None, stat: str,
            bands: int = 4, band_top: float = 0.05, n_top: int = 8) -> tuple[dict, dict]:
    """The report (JSON-able dict) and the pooled statistics per length and kind (tensors)."""
    waves = wavelengths(head_dim, base, llama3_factor)
    lengths = sorted(col.per_input)
    pooled = {L: {k: pool(col.per_input[L][k], col.tokens[L], stat) for k in KINDS} for L in lengths}
    by_length = {}
    for L in lengths:
        entry = {"inputs": len(col.tokens[L]), "tokens": col.tokens[L]}
        for k in KINDS:
            c = concentration(pooled[L][k])
            c["bands"] = band_histogram(pooled[L][k], head_dim, bands, band_top).tolist()
            c["jaccard_across_inputs"] = mean_pairwise_jaccard(col.per_input[L][k])
            entry[k] = c
        by_length[str(L)] = entry
    across_lengths = {k: mean_pairwise_jaccard([pooled[L][k] for L in lengths]) for k in KINDS}
    longest = lengths[-1]
    # The most concentrated layer: highest top-1% share of K before RoPE at the longest length
    # (the statistic LongAct selects on by default is Q and K pre-RoPE; K has fewer channels).
    k_share = by_length[str(longest)]["k_pre"]["share_top1"]
    layer = max(range(len(k_share)), key=lambda i: (k_share[i], -i))
    most = {"layer": layer, "length": longest, "selected_by": "k_pre share_top1",
            "top_channels": {k: top_channels(pooled[longest][k][layer], head_dim, bands, waves, n_top)
                             for k in KINDS}}
    band_edges = [(b * (head_dim // 2) // bands, (b + 1) * (head_dim // 2) // bands - 1)
                  for b in range(bands)]
    report = {
        "stat": stat,
        "lengths": lengths,
        "bands": [{"band": b, "pairs": list(edge), "wavelength_tokens": [float(waves[edge[0]]),
                                                                         float(waves[edge[1]])]}
                  for b, edge in enumerate(band_edges)],
        "band_top_fraction": band_top,
        "by_length": by_length,
        "jaccard_across_lengths": across_lengths,
        "most_concentrated": most,
        "summary": summarize(by_length, lengths),
    }
    return report, pooled


def summarize(by_length: dict, lengths: list[int]) -> dict:
    """Headline numbers per kind at each length: mean and max over layers of the top-1% share and
    of the top/median ratio, the share of top channels in the lower-frequency half of the bands,
    and the ratio of the Q/K numbers to V's in the same layer."""
    out = {}
    for L in lengths:
        e = by_length[str(L)]
        row = {}
        for k in KINDS:
            s1, tm = e[k]["share_top1"], e[k]["top_median"]
            bands = torch.tensor(e[k]["bands"])
            half = bands.shape[1] // 2
            row[k] = {"share_top1_mean": sum(s1) / len(s1), "share_top1_max": max(s1),
                      "top_median_mean": sum(tm) / len(tm), "top_median_max": max(tm),
                      "low_freq_half": float(bands[:, half:].sum(dim=1).mean())}
        for k in ("q_pre", "k_pre", "q_post", "k_post"):
            ratios = [a / max(b, 1e-30) for a, b in zip(e[k]["top_median"], e["v"]["top_median"])]
            row[k]["top_median_over_v_max"] = max(ratios)
        out[str(L)] = row
    return out


def flat_shares(C: int) -> dict[str, float]:
    """The top-k shares of a layer whose channels are all equal (the baseline of a report)."""
    return {f"share_top{round(f * 100)}": keep_count(C, f) / C for f in TOP_FRACTIONS}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def text_windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over ``ids`` (they overlap only when
    the text is shorter than ``count * length`` tokens)."""
    last = len(ids) - length
    starts = [round(last * j / max(count - 1, 1)) for j in range(count)] if count > 1 else [0]
    return [ids[s:s + length] for s in starts]


def stats_to_save(pooled: dict) -> dict:
    return {str(L): {k: t.clone() for k, t in kinds.items()} for L, kinds in pooled.items()}


def default_out(model: str) -> Path:
    return Path("probe") / Path(model).resolve().name
