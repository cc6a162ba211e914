"""Trainer checkpoints as inputs of the other tools (``longact-eval``, ``longact-convert``).

A trainer checkpoint holds weights, optimizer state and objects but not the model's shape; the run
config says that. The trainer therefore keeps the resolved run config beside its checkpoints, as
``RUN_CONFIG_FILE`` in the checkpoint root, so a checkpoint folder alone is enough to rebuild the
model, its tokenizer, its prompt template and its task settings.

Checkpoints are found through the public functions of :mod:`megatron_longact.checkpoint`
(``verify``, ``latest_valid``), never by folder names, so that the folder naming can change.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from megatron_longact.config import ConfigError, to_dict

RUN_CONFIG_FILE = "run_config.yaml"


def write_run_config(ckpt_root: str | Path, cfg) -> Path:
    """Write ``cfg`` (a RunConfig) as ``<ckpt_root>/run_config.yaml``, atomically (rank 0 only)."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (RUN_CONFIG_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, root / RUN_CONFIG_FILE)
    return root / RUN_CONFIG_FILE


def find_trainer_checkpoint(path: str | Path) -> Path | None:
    """The trainer checkpoint ``path`` names: a checkpoint folder (checked against its manifest)
    or a checkpoint root (its newest valid checkpoint). None when ``path`` is not a trainer
    checkpoint at all (e.g. a ``longact-convert hf-to-mcore`` folder); CheckpointError when it
    is one but damaged, or a root without a valid checkpoint."""
    from megatron_longact import checkpoint
    from megatron_longact.convert.checkpoint import META_FILE

    path = Path(path)
    if not path.is_dir() or (path / META_FILE).is_file():
        return None
    if (path / checkpoint.MANIFEST).is_file():
        checkpoint.verify(path)
        return path
    latest = checkpoint.latest_valid(path)
    if latest is None and (path / RUN_CONFIG_FILE).is_file():
        raise checkpoint.CheckpointError(f"{path}: a checkpoint root without a complete, valid "
                                         "checkpoint")
    return latest


def saved_run_config(folder: str | Path) -> Path | None:
    """The run config saved with the trainer checkpoint ``folder`` (in its root), or None."""
    candidate = Path(folder).parent / RUN_CONFIG_FILE
    return candidate if candidate.is_file() else None


def run_config_for(folder: Path, config_arg: str | None, tool: str) -> str:
    """The run config to use with trainer checkpoint ``folder``: ``--config`` when given, else the
    one saved with it; ConfigError naming both when there is neither."""
    if config_arg:
        return config_arg
    saved = saved_run_config(folder)
    if saved is None:
        raise ConfigError(f"{tool}: {folder} is a training checkpoint without a saved "
                          f"{RUN_CONFIG_FILE} beside it; pass --config with the run config that "
                          "trained it")
    return str(saved)
