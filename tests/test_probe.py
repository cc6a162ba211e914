"""longact-probe: the statistics of statistics, the V control in the trainer's collector, a planted
massive W_K channel found with its band and share (checked against the Hugging Face model's own
projections), the megatron-checkpoint path, and bad input.

The planted models: a tiny Llama (no QK-norm, so the pre-RoPE key is the k_proj output), Qwen2
(QKV bias) and Qwen3 (QK-norm: the pre-RoPE key is the k_norm output) whose W_K row of group 1,
dimension 6 in layer 1 is scaled by 30. Dimension 6 of a 16-dim head is RoPE pair
6 of 8, the lowest-frequency band of 4. Expected: layer 1 is the most concentrated K layer, its top
K channel is 1 * 16 + 6 = 22 in band 3, and every per-channel statistic equals the one computed
from the HF model's q_proj / k_proj / v_proj outputs on the same token windows (RoPE keeps pair
norms, so the post-RoPE statistic is the pair norm of the projection).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_longact import probe
from megatron_longact.cli import probe as probe_cli
from tests.longact_fakes import fake_model, run_layers

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
GROUP, DIM, SCALE = 1, 6, 30.0
LENGTHS, SAMPLES = (64, 192), 3


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

def test_concentration_of_a_known_layer():
    t = torch.ones(2, 100)
    t[1, 7] = 101.0  # one channel holds 101 of the layer's 200
    c = probe.concentration(t)
    assert c["share_top1"] == pytest.approx([0.01, 101 / 200])
    assert c["share_top5"] == pytest.approx([0.05, 105 / 200])
    assert c["share_top30"] == pytest.approx([0.30, 130 / 200])
    assert c["top_median"] == pytest.approx([1.0, 101.0])
    assert probe.flat_shares(100) == pytest.approx({"share_top1": 0.01, "share_top5": 0.05,
                                                    "share_top30": 0.3})


def test_rope_bands_and_wavelengths():
    # D = 16: dims d and d + 8 share pair d mod 8; 4 bands of 2 pairs, band 0 = highest frequency.
    assert probe.pair_index(16).tolist() == [0, 1, 2, 3, 4, 5, 6, 7] * 2
    assert probe.band_of(16, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2
    w = probe.wavelengths(16, 10000.0)
    assert w[0] == pytest.approx(2 * torch.pi) and w[4] == pytest.approx(2 * torch.pi * 100.0)
    # Llama-3 scaling stretches only wavelengths above 8192 tokens (by the factor).
    w3 = probe.wavelengths(128, 500000.0, llama3_factor=8.0)
    plain = probe.wavelengths(128, 500000.0)
    assert w3[0] == pytest.approx(plain[0]) and w3[-1] == pytest.approx(8 * plain[-1])
    # Top 2 of 32 channels (2 groups x 16): channels 22 (dim 6, band 3) and 3 (dim 3, band 1).
    t = torch.ones(1, 32)
    t[0, 22], t[0, 3] = 9.0, 5.0
    assert probe.band_histogram(t, 16, 4, 2 / 32).tolist() == [[0.0, 0.5, 0.0, 0.5]]


def test_stability_and_pooling():
    a = torch.arange(10.0).reshape(1, 10)  # top 3: 7, 8, 9
    b = a.flip(1)  # top 3: 0, 1, 2
    assert probe.mean_pairwise_jaccard([a, a]) == [1.0]
    assert probe.mean_pairwise_jaccard([a, b]) == [0.0]
    assert probe.mean_pairwise_jaccard([a]) is None
    x, y = torch.tensor([[1.0, 3.0]]), torch.tensor([[4.0, 0.0]])
    assert probe.pool([x, y], [1, 3], "mean_abs").tolist() == [[3.25, 0.75]]
    assert probe.pool([x, y], [1, 3], "max_abs").tolist() == [[4.0, 3.0]]
    torch.testing.assert_close(probe.pool([x, y], [1, 3], "rms"),
                               torch.tensor([[(49 / 4) ** 0.5, (9 / 4) ** 0.5]]))
    assert probe.text_windows(list(range(10)), 4, 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]


# ---------------------------------------------------------------------------------------------
# V in the trainer's collector (additive; off by default)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["pre_rope", "post_rope"])
def test_collector_v_statistic(point):
    from megatron_longact.longact import QKGeometry
    from megatron_longact.longact.stats import StatsCollector

    geo = QKGeometry(num_layers=2, num_heads=4, num_groups=2, head_dim=4)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6, 2, 4, 4, generator=gen), torch.randn(2, 6, 2, 2, 4, generator=gen)
    model = fake_model(1, 2)  # its core attention is called with value = key
    plain = StatsCollector([model], geo, point=point)
    with_v = StatsCollector([model], geo, point=point, collect_v=True)
    run_layers(model, q, k)
    a, b = plain.reduce(), with_v.reduce()
    assert a.v_LC is None
    torch.testing.assert_close(a.q_LC, b.q_LC, rtol=0, atol=0)
    torch.testing.assert_close(a.k_LC, b.k_LC, rtol=0, atol=0)
    # V is |value| per channel (never pair-normed: V is not rotated), layout of the key channels.
    torch.testing.assert_close(b.v_LC, k.abs().mean(dim=(1, 2)).reshape(2, 8))
    assert len(with_v._handles) == len(plain._handles) + (2 if point == "pre_rope" else 0)


# ---------------------------------------------------------------------------------------------
# The planted channel, end to end
# ---------------------------------------------------------------------------------------------

def _tiny(family: str):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":  # QKV bias: the pre-RoPE statistic includes it
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" not in name:
                p.normal_(0.0, 0.15)
        model.model.layers[1].self_attn.k_proj.weight[GROUP * 16 + DIM] *= SCALE
    return model.eval()


def _text() -> str:
    import random

    from megatron_longact.tasks.haystack import essay_sentences

    it = essay_sentences(random.Random(0))
    return " ".join(next(it) for _ in range(60))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    dirs = {}
    for family in ("llama", "qwen2", "qwen3"):
        torch.manual_seed(0)
        dirs[family] = root / family
        _tiny(family).save_pretrained(dirs[family])
    (root / "text.txt").write_text(_text())
    return root, dirs


def _probe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megatron_longact.cli.probe", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def _hf_reference(model_dir: Path, text_file: Path) -> dict:
    """Pooled per-channel mean |x| of the HF model's projections on the probe's token windows."""
    from megatron_longact.data.tokenizer import ByteTokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = ByteTokenizer().encode(text_file.read_text())
    seen: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q_mod = getattr(attn, "q_norm", None) or attn.q_proj
        k_mod = getattr(attn, "k_norm", None) or attn.k_proj
        for name, mod in (("q", q_mod), ("k", k_mod), ("v", attn.v_proj)):
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, key=(i, name): seen.__setitem__(key, out.detach())))
    out = {}
    for L in LENGTHS:
        acc = {k: [] for k in probe.KINDS}
        for window in probe.text_windows(ids, L, SAMPLES):
            with torch.no_grad():
                model(torch.tensor([window]))
            for kind in probe.KINDS:
                rows = []
                for i in range(len(model.model.layers)):
                    x = seen[(i, kind[0])].reshape(L, -1, 16).float()  # [S, heads, D]
                    if kind.endswith("post"):
                        pair = torch.sqrt(x[..., :8] ** 2 + x[..., 8:] ** 2)
                        x = torch.cat([pair, pair], dim=-1)
                    rows.append(x.abs().mean(dim=0).reshape(-1))
                acc[kind].append(torch.stack(rows))
        out[L] = {k: torch.stack(v).mean(dim=0) for k, v in acc.items()}
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_planted_channel_is_found_with_its_band_and_share(planted, family):
    root, dirs = planted
    out = root / f"out_{family}"
    r = _probe(root, "--model", str(dirs[family]), "--data", "text:text.txt", "--lengths",
               ",".join(map(str, LENGTHS)), "--samples", str(SAMPLES), "--tokenizer", "byte",
               "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "probe.json").read_text())
    stats = torch.load(out / "stats.pt")
    ref = _hf_reference(dirs[family], root / "text.txt")
    channel = GROUP * 16 + DIM
    for L in LENGTHS:
        for kind in probe.KINDS:
            torch.testing.assert_close(stats[str(L)][kind], ref[L][kind], rtol=1e-4, atol=1e-5,
                                       msg=f"{family} {kind} @{L}")
        e = report["by_length"][str(L)]
        share = float(ref[L]["k_pre"][1, channel] / ref[L]["k_pre"][1].sum())
        assert e["k_pre"]["share_top1"][1] == pytest.approx(share, rel=1e-4)
        # QK-norm (Qwen3) divides the head by its RMS, which the planted channel dominates: it
        # keeps the channel on top with a smaller share (0.17-0.18 against V's 0.05 here; Llama 0.44-0.48).
        ratio = 2.5 if family == "qwen3" else 5
        assert e["k_pre"]["share_top1"][1] > ratio * e["k_pre"]["share_top1"][0]
        assert e["k_pre"]["share_top1"][1] > ratio * e["v"]["share_top1"][1]
    most = report["most_concentrated"]
    assert most["layer"] == 1
    top = most["top_channels"]["k_pre"][0]
    assert (top["channel"], top["head"], top["dim"], top["pair"], top["band"]) == (channel, GROUP, DIM, DIM, 3)
    # After RoPE the pair (6, 14) carries it; both are in band 3.
    assert {c["channel"] for c in most["top_channels"]["k_post"][:2]} == {channel, channel + 8}
    # Band 3 holds the top K channel of layer 1 (top 5% of 32 channels = 2: the planted one first).
    assert report["by_length"][str(LENGTHS[-1])]["k_pre"]["bands"][1][3] >= 0.5
    if family != "qwen3":  # no QK-norm: the planted channel dominates by about the scale
        assert top["over_median"] > 10
    for name in ("concentration_vs_length", "channel_profile", "rope_bands"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    md = (out / "probe.md").read_text()
    assert "| K pre-RoPE | 22 | 1 | 6 | 6 | 3 |" in md


def test_megatron_checkpoint_goes_through_the_same_path(planted):
    """hf-to-mcore of the Qwen3 model, probed as a megatron folder: the same statistics."""
    root, dirs = planted
    mcore = root / "qwen3_mcore"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "megatron_longact.cli.convert", "hf-to-mcore",
                        str(dirs["qwen3"]), str(mcore)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out_hf, out_mc = root / "cmp_hf", root / "cmp_mcore"
    for model, out in ((dirs["qwen3"], out_hf), (mcore, out_mc)):
        r = _probe(root, "--model", str(model), "--data", "text.txt", "--lengths", "64",
                   "--samples", "2", "--tokenizer", "byte", "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(out_hf / "stats.pt"), torch.load(out_mc / "stats.pt")
    for kind in probe.KINDS:
        torch.testing.assert_close(a["64"][kind], b["64"][kind], rtol=1e-5, atol=1e-6, msg=kind)
    assert json.loads((out_mc / "probe.json").read_text())["model"]["kind"] == "mcore"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model or process group
# ---------------------------------------------------------------------------------------------

def _forbid_heavy_work(monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("a process group or a model was created although the input is bad")

    import megatron_longact.models.builder as builder
    import megatron_longact.runtime as runtime

    monkeypatch.setattr(runtime, "initialize", must_not_run)
    monkeypatch.setattr(builder, "build_model", must_not_run)


def _unsupported(tmp: Path) -> Path:
    from safetensors.torch import save_file

    d = tmp / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 300, "max_position_embeddings": 512}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("case,expected", [
    ("missing-model", "--model"),
    ("unsupported-architecture", "model_type 'gpt2' is not supported"),
    ("length-beyond-context", "--lengths: 1024 exceed the model's context (max_position_embeddings=512)"),
    ("no-tokenizer", "--tokenizer:"),
    ("missing-data", "--data"),
    ("text-too-short", "fewer than the length 256"),
    ("bad-lengths", "--lengths: got '64,x'"),
    ("short-length", "--lengths: got [8]"),
    ("no-samples", "--samples: got 0"),
    ("band-top", "--band-top: got 1.5"),
])
def test_bad_input_is_one_line_and_exit_2(planted, tmp_path, monkeypatch, capsys, case, expected):
    root, dirs = planted
    _forbid_heavy_work(monkeypatch)
    (tmp_path / "short.txt").write_text("only a few words")
    llama = str(dirs["llama"])
    argv = {
        "missing-model": ["--model", str(tmp_path / "nothing")],
        "unsupported-architecture": ["--model", str(_unsupported(tmp_path)), "--tokenizer", "byte"],
        "length-beyond-context": ["--model", llama, "--tokenizer", "byte", "--lengths", "256,1024"],
        "no-tokenizer": ["--model", llama, "--lengths", "64"],
        "missing-data": ["--model", llama, "--tokenizer", "byte", "--data", f"text:{tmp_path}/no.txt"],
        "text-too-short": ["--model", llama, "--tokenizer", "byte", "--data",
                           f"text:{tmp_path}/short.txt", "--lengths", "256"],
        "bad-lengths": ["--model", llama, "--lengths", "64,x"],
        "short-length": ["--model", llama, "--lengths", "8"],
        "no-samples": ["--model", llama, "--samples", "0"],
        "band-top": ["--model", llama, "--band-top", "1.5"],
    }[case]
    assert probe_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("longact-probe: error:") and expected in err, err
