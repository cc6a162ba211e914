"""Strict JSON Lines reading and writing, and the task record schema.

A bad line is an error that names the file, the line number and (for a schema problem) the field, so
that a user can open the file at that line and fix it. Blank lines are skipped (editors and ``cat``
leave them at the end of files); everything else must be one JSON object per line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

FieldTypes = Mapping[str, "type | tuple[type, ...]"]


class RecordError(ValueError):
    """A data file or record is malformed; the message names the file, line (or index) and field."""


def _type_names(tp) -> str:
    types = tp if isinstance(tp, tuple) else (tp,)
    names = ["null" if t is type(None) else t.__name__ for t in types]
    return " or ".join(names)


def check_fields(record: Any, required: FieldTypes | Sequence[str], where: str) -> None:
    """Raise RecordError unless ``record`` is an object with every required field of the right type.

    ``required`` is a list of field names, or a mapping from field name to a type (or tuple of types).
    ``where`` locates the record, e.g. ``"data.jsonl:12"``.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    items = required.items() if isinstance(required, Mapping) else ((name, None) for name in required)
    for name, tp in items:
        if name not in record:
            names = list(required)
            raise RecordError(f"{where}: record has no field {name!r} (required fields: {', '.join(names)})")
        value = record[name]
        if tp is not None and not _is_instance(value, tp):
            raise RecordError(
                f"{where}: field {name!r} is {type(value).__name__} {_short(value)}, expected {_type_names(tp)}"
            )


def _is_instance(value: Any, tp) -> bool:
    types = tp if isinstance(tp, tuple) else (tp,)
    # bool is an int in Python, but true/false is never what a numeric field means.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def iter_jsonl(path: str | os.PathLike, required: FieldTypes | Sequence[str] = ()) -> Iterator[dict]:
    """Yield the objects of a JSONL file, checking each against ``required`` (see ``check_fields``)."""
    for lineno, record in _numbered(path):
        check_fields(record, required, f"{path}:{lineno}")
        yield record


def read_jsonl(path: str | os.PathLike, required: FieldTypes | Sequence[str] = ()) -> list[dict]:
    """All objects of a JSONL file (see ``iter_jsonl``)."""
    return list(iter_jsonl(path, required))


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write one object per line (ASCII-escaped) atomically; returns the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    # Write then rename, so a reader never sees a half-written file after a crash.
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


# The schema every task generator writes and every consumer (RL data loader, evaluation) reads.
TASK_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,              # unique within a suite, e.g. "ruler/niah_single_1/4096/0"
    "suite": str,           # "ruler" or "longbench_v2"
    "task": str,            # task name within the suite
    "prompt": str,          # user turn: instructions, context and question
    "answer_prefix": str,   # start of the answer turn (may be empty)
    "answer": str,          # a canonical correct completion after answer_prefix (SFT target)
    "references": list,     # reference answers (strings) used by the scorer
    "metric": str,          # "all", "part", "exact" or "choice" (see tasks.rewards)
    "max_new_tokens": int,  # generation budget for this record
    "num_tokens": int,      # tokens of the rendered prompt under the generating tokenizer
    "groups": dict,         # report dimensions, e.g. {"length": "4096"} or {"difficulty": "hard"}
    "metadata": dict,       # task-specific details (needle depths, keys, source ids, ...)
}

METRICS = ("all", "part", "exact", "choice")


def check_task_record(record: Any, where: str) -> None:
    """Check one task record against ``TASK_RECORD_FIELDS`` and the allowed metric names."""
    check_fields(record, TASK_RECORD_FIELDS, where)
    if record["metric"] not in METRICS:
        raise RecordError(f"{where}: field 'metric' is {record['metric']!r}, expected one of {list(METRICS)}")
    refs = record["references"]
    if not refs or not all(isinstance(r, str) for r in refs):
        raise RecordError(f"{where}: field 'references' must be a non-empty list of strings")


def read_task_records(path: str | os.PathLike) -> list[dict]:
    """Read task records written by the generators, checking every line against the schema."""
    records = []
    for lineno, record in _numbered(path):
        check_task_record(record, f"{path}:{lineno}")
        records.append(record)
    return records


def _numbered(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {path} does not exist")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line "
                                  f"is {raw[exc.start]:#04x}); JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); each line must "
                    "hold one complete JSON object"
                ) from None
