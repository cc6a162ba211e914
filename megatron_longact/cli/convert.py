"""``longact-convert``: Hugging Face <-> megatron-core distributed checkpoints of model weights.

    longact-convert hf-to-mcore HF_DIR OUT_DIR [--family qwen3|qwen2|llama3] [model.key=value ...]
    longact-convert mcore-to-hf CKPT_DIR OUT_DIR [--max-shard-size 5GB]
    longact-convert mcore-to-hf TRAINER_CKPT OUT_DIR [--config RUN.yaml] [--hf-source HF_DIR]

hf-to-mcore runs in one process (TP=PP=1) and the checkpoint loads under any TP/PP; under
torchrun with ``--tp``/``--pp`` each rank converts only its stage and shard, which splits the
host memory a 70B conversion needs. mcore-to-hf runs in one process; it reads a checkpoint written
by hf-to-mcore, or the model weights of a training checkpoint (with the run config that says which
model it holds (by default the one the trainer saved beside its checkpoints) and, optionally, the Hugging Face folder the run started from for config.json and
the tokenizer). Supported: Qwen3 (dense), Qwen2/Qwen2.5 and Llama 3 safetensors checkpoints.
"""

from __future__ import annotations

import re
import sys

from megatron_longact.config import ConfigError, parse_overrides
from megatron_longact.errors import ArgumentParser, cli_entry

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``1.5G`` / ``1024`` -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--max-shard-size: got {text!r}, expected a size such as 5GB or 500MB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def parse_args(argv=None):
    p = ArgumentParser(prog="longact-convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> megatron distributed checkpoint")
    a.add_argument("src", help="Hugging Face model folder (config.json + safetensors)")
    a.add_argument("dst", help="output checkpoint folder")
    a.add_argument("--family", choices=("qwen3", "qwen2", "llama3"), default=None,
                   help="architecture family; default: from config.json model_type")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion run")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the conversion run")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a.add_argument("overrides", nargs="*",
                   help="ModelConfig fields HF does not describe, "
                        "e.g. model.make_vocab_size_divisible_by=256")
    b = sub.add_parser("mcore-to-hf", help="megatron distributed checkpoint -> Hugging Face folder")
    b.add_argument("src", help="checkpoint folder written by hf-to-mcore, or a training checkpoint "
                               "(folder or checkpoint root: its newest valid checkpoint)")
    b.add_argument("--config", default=None,
                   help="run (or model) config; default for a training checkpoint: its saved run config")
    b.add_argument("--hf-source", default=None,
                   help="Hugging Face folder whose config.json and tokenizer files to reuse")
    b.add_argument("dst", help="output Hugging Face folder")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def _model_overrides(pairs: list[str]) -> dict:
    raw = parse_overrides(pairs)
    unknown = sorted(set(raw) - {"model"})
    if unknown:
        raise ConfigError(f"override {unknown[0]}: only model.* fields can be overridden here")
    return raw.get("model", {})


@cli_entry("longact-convert")
def main(argv=None) -> int:
    from pathlib import Path

    from megatron_longact.runtime import ParallelConfig, destroy, initialize, read_dist_env

    from megatron_longact.checkpoint import CheckpointError

    args = parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            overrides = _model_overrides(args.overrides)
            parallel = ParallelConfig(tensor_model_parallel_size=args.tp,
                                      pipeline_model_parallel_size=args.pp)
            # Fail on a bad folder or config before any process group exists.
            from megatron_longact.convert.hf import HFCheckpoint, model_config_from_hf

            hf = HFCheckpoint(args.src)
            cfg = model_config_from_hf(hf.config, args.family, **overrides)
            hf.check_complete(cfg)
            cfg.check_layout(args.tp, args.pp)
        else:
            from megatron_longact.convert.checkpoint import META_FILE, read_meta
            from megatron_longact.run_config import load_run_config
            from megatron_longact.trained import find_trainer_checkpoint, run_config_for

            max_shard = parse_size(args.max_shard_size)
            trained = find_trainer_checkpoint(args.src)
            if trained is not None:
                args.src = str(trained)
                args.config = run_config_for(trained, args.config, "longact-convert")
            model_cfg = load_run_config(args.config).model if args.config else None
            if (Path(args.src) / META_FILE).is_file():
                read_meta(args.src)
            elif model_cfg is None:
                raise ConfigError(f"{args.src}: no {META_FILE}, so not written by hf-to-mcore; for a "
                                  "training checkpoint pass --config with the run config")
            elif not (Path(args.src) / "metadata.json").is_file():
                raise ConfigError(f"{args.src}: no metadata.json; expected a megatron distributed "
                                  "checkpoint")
            parallel = ParallelConfig()
            if read_dist_env().world_size != 1:
                raise ConfigError("mcore-to-hf runs in one process; start it without torchrun/srun")
        if Path(args.dst).exists() and not args.overwrite:
            raise ConfigError(f"{args.dst} exists; pass --overwrite to replace it")
        parallel = parallel.resolve(read_dist_env().world_size)
    except (ConfigError, FileNotFoundError, CheckpointError) as exc:
        print(f"longact-convert: {exc}", file=sys.stderr)
        return 2

    from megatron_longact.convert.checkpoint import hf_to_mcore, mcore_to_hf

    runtime = initialize(parallel)
    try:
        if args.command == "hf-to-mcore":
            cfg = hf_to_mcore(args.src, args.dst, runtime.parallel, family=args.family,
                              model_overrides=overrides, overwrite=args.overwrite)
        else:
            cfg = mcore_to_hf(args.src, args.dst, runtime.parallel, model_cfg=model_cfg,
                              hf_source_dir=args.hf_source, max_shard_bytes=max_shard,
                              overwrite=args.overwrite)
    finally:
        destroy()
    if runtime.rank == 0:
        n = cfg.num_parameters()
        size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        print(f"longact-convert: {args.command} {cfg.family} {cfg.num_layers} layers, {size} "
              f"parameters (padded vocab {cfg.padded_vocab_size}) -> {args.dst}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
