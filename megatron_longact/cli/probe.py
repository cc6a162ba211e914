"""``longact-probe --model DIR [--data SPEC] [--lengths 1024,4096] [options]``: measure whether a
model has the massive Q/K channels LongAct relies on, before training it (docs/probe.md).

``--model`` is a Hugging Face folder (Qwen3, Qwen2/Qwen2.5, Llama 3; config.json + safetensors), a
trainer checkpoint (folder or checkpoint root, as ``longact-eval --checkpoint`` takes it) or a
``longact-convert hf-to-mcore`` folder. The model is loaded into a megatron-core GPTModel through
the project's weight mapping (one process; CUDA when available, else the CPU runtime layer) and the
trainer's statistics collector measures Q and K before and after RoPE, and V as a control.

``--data``: ``ruler`` (generated RULER-style records, ``--tasks``), ``text:FILE`` (windows of a
local text file), ``longbench-v2:FILE`` (a local LongBench v2 data.json, middle-truncated to each
length) or ``records:FILE`` (a JSONL file of task records; the longest records that fit each
length); a bare path is taken by its suffix (.txt/.md text, .json LongBench v2, .jsonl records).

Writes ``probe.md``, ``probe.json``, ``stats.pt`` (the pooled statistics) and three PNG figures under
``--out``. Every input is checked (model folder, architecture, lengths against the model's context,
data file, tokenizer) before the model is built; a bad one ends with one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_longact.config import ConfigError, check_choice
from megatron_longact.errors import ArgumentParser, UsageError, cli_entry

PROG = "longact-probe"


def parse_args(argv=None):
    p = ArgumentParser(prog=PROG, description="Measure whether a model has the massive Q/K "
                       "channels LongAct relies on, with V as a control (docs/probe.md).")
    p.add_argument("--model", required=True,
                   help="Hugging Face folder, trainer checkpoint or longact-convert hf-to-mcore folder")
    p.add_argument("--data", default="ruler",
                   help="ruler | text:FILE | longbench-v2:FILE | records:FILE (default ruler)")
    p.add_argument("--lengths", default="1024,4096", help="context lengths in tokens, comma-separated (default 1024,4096)")
    p.add_argument("--samples", type=int, default=4, help="inputs per length (default 4)")
    p.add_argument("--tasks", default="niah_single_1", help="RULER tasks for --data ruler")
    p.add_argument("--tokenizer", help="'byte' or a local tokenizer folder (default: the model "
                                       "folder's own, or the run config's for a megatron checkpoint)")
    p.add_argument("--config", help="run config for a megatron checkpoint without a saved one")
    p.add_argument("--stat", choices=("mean_abs", "rms", "max_abs"),
                   help="per-channel statistic (default: the run config's longact.stat, else mean_abs)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"),
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--bands", type=int, default=4, help="RoPE frequency bands (default 4)")
    p.add_argument("--band-top", type=float, default=0.05,
                   help="fraction of top channels whose bands are counted (default 0.05)")
    p.add_argument("--out", help="output folder (default probe/<model folder name>)")
    p.add_argument("--title", help="title of the report (default: the model path)")
    return p.parse_args(argv)


@dataclass
class ProbeConfig:
    """What ``longact-probe`` measures, on what (filled from the command line; fields named as the
    flags, which the errors name)."""

    model: str
    """Hugging Face folder, trainer checkpoint (folder or root) or hf-to-mcore folder."""
    data: str = "ruler"
    """ruler | text:FILE | longbench-v2:FILE | records:FILE, or a path taken by its suffix."""
    lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    """Context lengths in tokens (at least 16; at most the model's max_position_embeddings)."""
    samples: int = 4
    """Inputs per length."""
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    """RULER tasks (``data: ruler``)."""
    tokenizer: str | None = None
    """``byte`` or a local tokenizer folder; None: the model folder's or the run config's."""
    config: str | None = None
    """Run config for a megatron checkpoint (a trainer checkpoint's saved one otherwise)."""
    stat: str | None = None
    """mean_abs | rms | max_abs; None: the run config's longact.stat, else mean_abs."""
    dtype: str | None = None
    """bf16 | fp32 | fp16 compute dtype for a Hugging Face folder; None: the checkpoint's."""
    bands: int = 4
    """RoPE frequency bands of the pair index."""
    band_top: float = 0.05
    """Fraction of each layer's top channels whose bands are counted."""
    out: str | None = None
    """Output folder; None: probe/<model folder name>."""
    title: str | None = None

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 16:
            raise ConfigError(f"--lengths: got {self.lengths}, expected lengths of 16 tokens or more")
        self.lengths = sorted(set(self.lengths))
        if self.samples < 1:
            raise ConfigError(f"--samples: got {self.samples}, expected a positive number of inputs")
        if not self.tasks:
            raise ConfigError("--tasks: empty; give at least one RULER task")
        if self.stat is not None:
            check_choice("--stat", self.stat, ("mean_abs", "rms", "max_abs"))
        if self.dtype is not None:
            check_choice("--dtype", self.dtype, ("bf16", "fp32", "fp16"))
        if self.bands < 1:
            raise ConfigError(f"--bands: got {self.bands}, expected a positive number")
        if not 0.0 < self.band_top <= 1.0:
            raise ConfigError(f"--band-top: got {self.band_top}, expected a fraction in (0, 1]")


@dataclass
class Plan:
    """Everything checked before the model is built."""

    model_cfg: object
    load: Callable
    inputs: dict[int, list[list[int]]]
    stat: str
    source: str
    kind: str
    data: str
    out: Path
    bands: int
    band_top: float
    title: str


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lengths: got {text!r}, expected comma-separated integers such as "
                         "1024,4096") from None
    return values


def _resolve_model(args):
    """(kind, ModelConfig, loader, tokenizer config or None, prompt config, run config or None)."""
    from megatron_longact.convert.checkpoint import META_FILE, check_compatible, read_meta
    from megatron_longact.data.tokenizer import PromptConfig
    from megatron_longact.run_config import load_run_config
    from megatron_longact.trained import find_trainer_checkpoint, run_config_for

    path = Path(args.model)
    if not path.exists():
        raise UsageError(f"--model {path}: does not exist; expected a Hugging Face model folder, a "
                         "trainer checkpoint or a longact-convert hf-to-mcore folder")
    if not path.is_dir():
        raise UsageError(f"--model {path}: not a directory")
    if (path / "config.json").is_file():
        from megatron_longact.convert import hf as hfmap
        from megatron_longact.convert.checkpoint import load_hf_weights

        hf = hfmap.HFCheckpoint(path)
        cfg = hfmap.model_config_from_hf(hf.config)
        hf.check_complete(cfg)
        return ("hf", cfg, lambda m, c: load_hf_weights(m, hf, c, tp_rank=0, tp_size=1),
                None, PromptConfig(), None)
    from megatron_longact.cli.eval import _checkpoint_loader

    trained = find_trainer_checkpoint(path)
    if trained is not None:
        run = load_run_config(run_config_for(trained, args.config, PROG), [])
        load = _checkpoint_loader(str(trained), run.model, trained)
        return "trainer", run.model, lambda m, c: load(m), run.data.tokenizer, run.data.prompt, run
    if (path / META_FILE).is_file():
        stored, _ = read_meta(path)
        run = None
        if args.config:
            run = load_run_config(args.config, [])
            check_compatible(stored, run.model, str(path))
        cfg = run.model if run else stored
        load = _checkpoint_loader(str(path), cfg)
        return ("mcore", cfg, lambda m, c: load(m), run.data.tokenizer if run else None,
                run.data.prompt if run else PromptConfig(), run)
    raise UsageError(f"--model {path}: neither a Hugging Face model folder (no config.json) nor a "
                     f"trainer checkpoint nor a longact-convert hf-to-mcore folder (no {META_FILE})")


def _tokenizer(args, kind: str, model_dir: Path, run_tok):
    from megatron_longact.data.tokenizer import TokenizerConfig, load_tokenizer

    if args.tokenizer == "byte":
        tcfg = TokenizerConfig(kind="byte")
    elif args.tokenizer:
        if not Path(args.tokenizer).is_dir():
            raise UsageError(f"--tokenizer {args.tokenizer}: not a directory; expected 'byte' or a "
                             "local tokenizer folder")
        tcfg = TokenizerConfig(kind="hf", path=args.tokenizer)
    elif run_tok is not None:
        tcfg = run_tok
    elif kind == "hf" and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tcfg = TokenizerConfig(kind="hf", path=str(model_dir))
    else:
        raise UsageError(f"--tokenizer: {model_dir} has no tokenizer files; give --tokenizer DIR "
                         "(a local tokenizer folder) or --tokenizer byte")
    return load_tokenizer(tcfg)


def _data_spec(text: str) -> tuple[str, str | None]:
    kinds = ("ruler", "text", "longbench-v2", "records")
    if text == "ruler":
        return "ruler", None
    if ":" in text and text.split(":", 1)[0] in kinds:
        kind, path = text.split(":", 1)
    else:
        suffix = Path(text).suffix
        kind = {".txt": "text", ".md": "text", ".json": "longbench-v2", ".jsonl": "records"}.get(suffix)
        if kind is None:
            raise UsageError(f"--data: got {text!r}, expected ruler, text:FILE, longbench-v2:FILE or "
                             "records:FILE (or a .txt/.md, .json or .jsonl path)")
        path = text
    if not Path(path).is_file():
        raise UsageError(f"--data {text}: {path} is not a file")
    return kind, path


def build_inputs(kind: str, path: str | None, lengths: list[int], samples: int, tokenizer, prompt,
                 *, tasks: list[str] | None = None, ruler_template=None) -> dict[int, list[list[int]]]:
    """Token ids of ``samples`` inputs for each length (at most that many tokens each)."""
    from megatron_longact.data.tokenizer import build_model_input
    from megatron_longact.probe import text_windows

    out: dict[int, list[list[int]]] = {}
    if kind == "text":
        ids = tokenizer.encode(Path(path).read_text(encoding="utf-8"))
        for L in lengths:
            if len(ids) < L:
                raise UsageError(f"--data {path}: {len(ids)} tokens, fewer than the length {L}; give "
                                 "a longer text or shorter --lengths")
            out[L] = text_windows(ids, L, samples)
        return out
    if kind == "ruler":
        from megatron_longact.tasks.ruler import RulerConfig, generate_ruler

        base = dict(ruler_template or {})
        for L in lengths:
            rcfg = RulerConfig(**{**base, "tasks": tasks or ["niah_single_1"], "lengths": [L],
                                  "num_samples": samples})
            try:
                records = generate_ruler(rcfg, tokenizer, prompt)
            except ValueError as exc:
                raise UsageError(f"--lengths {L}: {exc}") from None
            out[L] = [build_model_input(r, tokenizer, prompt).ids[-L:] for r in records]
        return out
    if kind == "longbench-v2":
        from megatron_longact.tasks.longbench_v2 import LongBenchV2Config, build_longbench_v2_records

        for L in lengths:
            try:
                records = build_longbench_v2_records(
                    LongBenchV2Config(path=path, max_length=L, limit=samples), tokenizer, prompt)
            except ValueError as exc:
                raise UsageError(f"--lengths {L}: {exc}") from None
            out[L] = [build_model_input(r, tokenizer, prompt).ids[-L:] for r in records]
        return out
    from megatron_longact.data.jsonl import read_task_records

    records = read_task_records(path)
    encoded = sorted((build_model_input(r, tokenizer, prompt).ids for r in records), key=len, reverse=True)
    for L in lengths:
        fit = [ids for ids in encoded if len(ids) <= L][:samples]
        if not fit:
            raise UsageError(f"--data {path}: no record fits in {L} tokens (shortest has "
                             f"{len(encoded[-1]) if encoded else 0})")
        out[L] = fit
    return out


def prepare(argv=None) -> Plan:
    """Parse and check everything; no process group and no model yet."""
    a = parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("longact-probe runs in one process (TP=PP=1); start it without torchrun")
    args = ProbeConfig(model=a.model, data=a.data, lengths=_int_list(a.lengths), samples=a.samples,
                       tasks=[t.strip() for t in a.tasks.split(",") if t.strip()],
                       tokenizer=a.tokenizer, config=a.config, stat=a.stat, dtype=a.dtype,
                       bands=a.bands, band_top=a.band_top, out=a.out, title=a.title)
    lengths = args.lengths
    data_kind, data_path = _data_spec(args.data)
    kind, cfg, load, run_tok, prompt, run = _resolve_model(args)
    if args.dtype and kind != "hf":
        raise UsageError("--dtype: only for a Hugging Face folder; a megatron checkpoint is probed "
                         "in the dtype of its run config (model.params_dtype=... with --config)")
    cfg = dataclasses.replace(cfg, recompute="none", fp8="none",
                              **({"params_dtype": args.dtype} if args.dtype else {}))
    if cfg.kv_channels % 2 or cfg.kv_channels // 2 < args.bands:
        raise UsageError(f"--bands: {args.bands} bands need a head dimension of at least "
                         f"{2 * args.bands} (the model's is {cfg.kv_channels})")
    limit = cfg.max_position_embeddings
    too_long = [L for L in lengths if L > limit]
    if too_long:
        raise UsageError(f"--lengths: {','.join(map(str, too_long))} exceed the model's context "
                         f"(max_position_embeddings={limit}); give lengths up to {limit}")
    tokenizer = _tokenizer(args, kind, Path(args.model), run_tok)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"--tokenizer: {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size {cfg.vocab_size}")
    ruler_template = None
    if run is not None:
        ruler_template = {"template": run.data.ruler.template, "number_digits": run.data.ruler.number_digits}
    inputs = build_inputs(data_kind, data_path, lengths, args.samples, tokenizer, prompt,
                          tasks=args.tasks, ruler_template=ruler_template)
    stat = args.stat or (run.longact.stat if run is not None else "mean_abs")
    out = Path(args.out) if args.out else Path("probe") / Path(args.model).resolve().name
    return Plan(cfg, load, inputs, stat, str(args.model), kind, args.data, out, args.bands,
                args.band_top, args.title or f"longact-probe: {args.model}")


def run(plan: Plan, runtime) -> dict:
    """Build and load the model, collect, analyze and write the report; returns the paths."""
    import torch

    from megatron_longact.longact.layout import QKGeometry
    from megatron_longact.models.builder import build_model
    from megatron_longact import probe
    from megatron_longact.probe_report import write_report

    cfg = plan.model_cfg
    model, tconfig = build_model(cfg, runtime.parallel)
    plan.load(model, cfg)
    model.eval()
    forward = model
    if tconfig.bf16 or tconfig.fp16:
        from megatron.core.transformer.module import Float16Module

        forward = Float16Module(tconfig, model)
        forward.eval()
    geometry = QKGeometry.from_transformer_config(tconfig)
    start = time.monotonic()

    def progress(length, done, total):
        print(f"{PROG}: length {length}: {done}/{total} inputs ({time.monotonic() - start:.1f}s)",
              flush=True)

    col = probe.collect(model, forward, plan.inputs, geometry, plan.stat, runtime.device, progress)
    report, pooled = probe.analyze(col, head_dim=geometry.head_dim, base=cfg.rotary_base,
                                   llama3_factor=cfg.rope_scaling_factor if cfg.rope_scaling else None,
                                   stat=plan.stat, bands=plan.bands, band_top=plan.band_top)
    report["model"] = {"source": plan.source, "kind": plan.kind, "family": cfg.family,
                       "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
                       "num_query_groups": cfg.num_query_groups, "head_dim": geometry.head_dim,
                       "rotary_base": cfg.rotary_base, "rope_scaling": cfg.rope_scaling,
                       "params_dtype": cfg.params_dtype, "qk_layernorm": cfg.qk_layernorm}
    report["data"] = plan.data
    report["device"] = str(runtime.device)
    report["seconds"] = round(time.monotonic() - start, 2)
    report["flat"] = {"q": probe.flat_shares(geometry.q_channels),
                      "k": probe.flat_shares(geometry.k_channels)}
    plan.out.mkdir(parents=True, exist_ok=True)
    torch.save(probe.stats_to_save(pooled), plan.out / "stats.pt")
    return write_report(report, pooled, plan.out, title=plan.title)


@cli_entry(PROG)
def main(argv=None) -> int:
    from megatron_longact.runtime import ParallelConfig, destroy, initialize

    try:
        plan = prepare(argv)
    except (ValueError, NotImplementedError, ImportError) as exc:
        # ConfigError, RecordError and the tokenizer's errors are ValueErrors naming the input.
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    runtime = initialize(ParallelConfig(), seed=0)
    print(f"{PROG}: {plan.source} ({plan.kind}, {plan.model_cfg.family}, {plan.model_cfg.num_layers} "
          f"layers) data={plan.data} lengths={sorted(plan.inputs)} stat={plan.stat} "
          f"device={runtime.device}", flush=True)
    try:
        paths = run(plan, runtime)
    finally:
        destroy()
    print(f"wrote {paths['markdown']}, {paths['json']} and {len(paths['figures'])} figures in "
          f"{paths['markdown'].parent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
