"""Checks on everything a run reads, done before any process group or model exists.

``longact-train`` calls :func:`check_run` right after the config validated: the output and
checkpoint folders, the checkpoint to resume from (manifest, TP/PP layout and model shape), the
tokenizer, every data record (schema and length against the model's context), the evaluation
lengths and the reward function (importable, callable as ``(response, record)``, and a dry call
on one record returning a value in the declared range [0, 1]). Each failure is one
:class:`~megatron_longact.errors.UsageError` (or the reading module's own error) that names the
field, file or record.

Records longer than the context are refused, not silently dropped: the error names the first one
and how many there are, so that the data set is fixed once rather than shrinking unnoticed.

The results (tokenizer, records) are returned so that the trainer does not read the data twice.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_longact.errors import UsageError



def sequence_layout(cfg, parallel):
    """The padding layout the trainer will use (training.batching), before initialize() decided
    sequence parallelism: on when TP > 1 unless set, the larger padding of the two."""
    from megatron_longact.training.batching import SequenceLayout

    tp = parallel.tensor_model_parallel_size
    sp = parallel.sequence_parallel if parallel.sequence_parallel is not None else tp > 1
    return SequenceLayout(tp=tp, cp=parallel.context_parallel_size, sequence_parallel=bool(sp),
                          fp8=cfg.model.fp8 != "none")


@dataclass
class Checked:
    tokenizer: object
    records: list | None


def _check_writable_dir(field: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{field}: {path} is a file, expected a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{field}: {probe} (a parent of {path}) is a file, expected a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{field}: {probe} is not writable")


def check_paths(cfg) -> None:
    _check_writable_dir("output.dir", Path(cfg.output.dir))
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output.dir) / "checkpoints"
    _check_writable_dir("checkpoint.dir", ckpt_dir)


def check_resume(cfg, parallel) -> None:
    """The checkpoint to resume from exists, is complete and fits this run's TP/PP and model."""
    from megatron_longact import checkpoint

    how = cfg.checkpoint.resume
    if how == "none" or cfg.train.mode not in ("sft", "rl"):
        return
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output.dir) / "checkpoints"
    if how == "auto":
        if root.is_dir() and any(p.name.startswith(".old_iter_") for p in root.iterdir()):
            return  # an interrupted re-save: the trainer restores it first, then checks
        folder = checkpoint.resolve_auto(root)
        if folder is None:
            return
    else:
        folder = Path(how)
    checkpoint.check_layout(folder, parallel.tensor_model_parallel_size,
                            parallel.pipeline_model_parallel_size, checkpoint.model_shape(cfg.model))


def check_tokenizer(cfg):
    from megatron_longact.data.tokenizer import load_tokenizer

    tcfg = cfg.data.tokenizer
    if tcfg.kind != "byte":
        path = Path(tcfg.path).expanduser()
        if not path.exists():
            raise UsageError(f"data.tokenizer.path: {path} does not exist")
        if path.is_dir() and not any(path.iterdir()):
            raise UsageError(f"data.tokenizer.path: {path} is an empty folder; expected a tokenizer "
                             f"({'tokenizer.json' if tcfg.kind == 'tokenizers' else 'tokenizer files'})")
    try:
        tokenizer = load_tokenizer(tcfg)
    except (UsageError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party loader failing on a user's files
        raise UsageError(f"data.tokenizer.path: {tcfg.path} could not be loaded as a {tcfg.kind} "
                         f"tokenizer ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({tokenizer.vocab_size})")
    return tokenizer


def check_rollout_layout(cfg) -> None:
    """One clear error, before any model exists, for a run that would generate under context
    parallelism with the native (megatron) engine: megatron's KV-cache decode does not run under
    CP (Transformer Engine's CP attention asserts on it). Covers RL rollouts and the end-of-run
    evaluation."""
    cp = cfg.parallel.context_parallel_size
    engine = getattr(getattr(cfg, "rollout", None), "engine", "megatron")
    if cp == 1 or engine != "megatron":
        return
    if cfg.train.mode == "rl":
        what = "RL rollouts"
    elif cfg.evaluation.lengths:
        what = "the evaluation at the end of the run (evaluation.lengths)"
    else:
        return
    raise UsageError(f"parallel.context_parallel_size: {cp} with {what}: native generation does not "
                     "run under context parallelism; use rollout.engine: vllm"
                     + ("" if cfg.train.mode == "rl" else " or set evaluation.lengths: []"))


def check_lm_layout(cfg, parallel) -> None:
    """LM mode feeds fixed-length batches of ``train.seq_length`` tokens, which must already be a
    length the layout accepts; LM mode does not split batches over CP ranks."""
    if cfg.train.mode != "lm":
        return
    if parallel.context_parallel_size > 1:
        raise UsageError(f"parallel.context_parallel_size: {parallel.context_parallel_size} in train.mode "
                         "lm; the LM smoke-test loop does not split batches over context-parallel "
                         "ranks (use mode sft or rl, or context_parallel_size 1)")
    from megatron_longact.config import ConfigError
    from megatron_longact.training.batching import check_length

    try:
        check_length(cfg.train.seq_length, sequence_layout(cfg, parallel), "train.seq_length")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def check_records(cfg, tokenizer, parallel=None) -> list | None:
    """Read the data file (jsonl/parquet) and check every record's length, or generate the ruler
    records (built to fit their target length by construction)."""
    from megatron_longact.data.tokenizer import build_model_input, encode_completion

    data = cfg.data
    if data.source == "ruler":
        from megatron_longact.tasks.ruler import generate_ruler

        try:
            return generate_ruler(data.ruler, tokenizer, data.prompt)
        except ValueError as exc:  # TargetTooSmall and bad task settings name the task and length
            raise UsageError(f"data.ruler: {' '.join(str(exc).split())}") from None
    path = Path(data.path)
    if not path.is_file():
        raise UsageError(f"data.path: {path} does not exist" if not path.exists()
                         else f"data.path: {path} is not a file")
    if data.source == "jsonl":
        from megatron_longact.data.jsonl import read_task_records

        records = read_task_records(path)
    else:
        records = _read_parquet(path)
    if not records:
        raise UsageError(f"data.path: {path} holds no records")
    if data.max_prompt_length is not None:
        return records  # the trainer filters or truncates long prompts (data.prompt_overflow)
    from megatron_longact.training.batching import SequenceLayout, padded_length

    limit = cfg.model.max_position_embeddings
    rl_new = cfg.rl.max_new_tokens if cfg.train.mode == "rl" else 0
    layout = sequence_layout(cfg, parallel) if parallel is not None else SequenceLayout()
    too_long = []
    for i, rec in enumerate(records):
        prompt = len(build_model_input(rec, tokenizer, data.prompt).ids)
        answer = len(encode_completion(rec["answer"], tokenizer)) if cfg.sft.steps or cfg.train.mode == "sft" else 0
        need = padded_length(prompt + max(answer, rl_new), layout)
        if need > limit:
            too_long.append((i, rec.get("id", "?"), need))
    if too_long:
        i, rid, need = too_long[0]
        where = f"line {i + 1}" if data.source == "jsonl" else f"row {i}"
        raise UsageError(f"data.path: {path} {where} (record {rid!r}) needs {need} positions with its "
                         f"answer or rl.max_new_tokens, more than model.max_position_embeddings={limit}; "
                         f"{len(too_long)} of {len(records)} records are too long: shorten or remove "
                         f"them, or raise the limit")
    return records


def _read_parquet(path: Path) -> list[dict]:
    from megatron_longact.data.jsonl import check_task_record

    try:
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a file that is not parquet
        raise UsageError(f"data.path: {path} is not a readable parquet file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    records = table.to_pylist()
    for i, record in enumerate(records):
        check_task_record(record, f"{path}: row {i}")
    return records


def check_evaluation(cfg) -> None:
    limit = cfg.model.max_position_embeddings
    for i, length in enumerate(cfg.evaluation.lengths):
        if length > limit:
            raise UsageError(f"evaluation.lengths[{i}]: {length} is longer than the model's context "
                             f"(model.max_position_embeddings={limit})")


def check_reward(cfg, records, tokenizer) -> None:
    """The reward function takes ``(response, record)`` and returns a score in [0, 1]; tried on
    one record (its reference answer as the response) so that a broken reward fails now, not
    after the SFT phase."""
    from megatron_longact.tasks.rewards import Reward

    if cfg.train.mode != "rl":
        return
    reward = Reward(cfg.rl.reward)
    fn, name = reward.score_fn, cfg.rl.reward.function
    try:
        inspect.signature(fn).bind("response", {})
    except TypeError as exc:
        raise UsageError(f"rl.reward.function: {name} cannot be called as fn(response, record) "
                         f"({exc})") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): the dry call below decides
    if records:
        record = records[0]
    else:
        from dataclasses import replace

        from megatron_longact.tasks.ruler import generate_ruler

        small = replace(cfg.data.ruler, num_samples=1, tasks=list(cfg.data.ruler.tasks)[:1],
                        lengths=list(cfg.data.ruler.lengths)[:1])
        record = generate_ruler(small, tokenizer, cfg.data.prompt)[0]
    try:
        value = fn(record["answer"], record)
    except Exception as exc:  # noqa: BLE001 - the user's function failing on a real record
        raise UsageError(f"rl.reward.function: {name} raised {type(exc).__name__} on record "
                         f"{record.get('id', '?')!r}: {' '.join(str(exc).split())[:200]}") from None
    if isinstance(value, bool):
        value = float(value)  # as Reward.score reads it
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise UsageError(f"rl.reward.function: {name} returned {value!r} for record "
                         f"{record.get('id', '?')!r}; expected a number in [0, 1]")


def check_run(cfg, parallel) -> Checked:
    """All of the above, in the order a user would fix them."""
    from megatron_longact.rollout.base import check_rollout

    check_rollout(cfg)
    check_paths(cfg)
    check_evaluation(cfg)
    check_rollout_layout(cfg)
    check_lm_layout(cfg, parallel)
    if cfg.train.mode not in ("sft", "rl"):
        return Checked(tokenizer=None, records=None)
    if cfg.model.params_dtype == "fp16":
        # megatron's DistributedOptimizer cannot save after its loss scaler skipped a step (an
        # optimizer state without a step counter); bf16 needs no loss scaling.
        raise UsageError("model.params_dtype: fp16 is not supported for sft/rl training (saving a "
                         "checkpoint after a loss-scaler skip fails inside megatron); use bf16")
    check_resume(cfg, parallel)
    tokenizer = check_tokenizer(cfg)
    records = check_records(cfg, tokenizer, parallel)
    check_reward(cfg, records, tokenizer)
    return Checked(tokenizer=tokenizer, records=records)
