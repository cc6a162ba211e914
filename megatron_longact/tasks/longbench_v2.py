"""LongBench v2 (Bai et al., 2024) from a local copy of its official ``data.json``.

What matches the official evaluation (THUDM/LongBench, ``pred.py`` and ``result.py``):

- the zero-shot prompt template (``PROMPT_TEMPLATE``), with context, question and choices stripped;
- over-long inputs keep their first and last halves by tokens (``truncate_middle``); the official
  script cuts the whole prompt, we cut the context by default (``truncation="context"``) so the
  question and choices always survive; ``truncation="prompt"`` reproduces the official cut;
- answer extraction: "The correct answer is (X)" then "The correct answer is X"
  (``answer_extraction="official"``); the default ``lenient`` adds fallbacks for models that answer
  "Answer: B", "(B)" or just "B", and drops a ``<think>...</think>`` block first;
- the table: accuracy in percent overall, by difficulty (easy / hard) and by length (short / medium /
  long), plus the "compensated" variant that counts an unanswered item as a 1/4 guess.

``max_length`` counts tokens of the user prompt before the chat template is applied, as the official
script does; its default (120000) is the official value for 128K-context models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from megatron_longact.config import ConfigError, check_choice, check_positive
from megatron_longact.data.jsonl import RecordError, check_fields, read_jsonl
from megatron_longact.data.tokenizer import PromptConfig, Tokenizer, build_model_input

SUITE = "longbench_v2"
TASK = "longbench_v2"

FIELDS = (
    "_id", "domain", "sub_domain", "difficulty", "length", "question",
    "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context",
)
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
CHOICES = ("A", "B", "C", "D")

PROMPT_TEMPLATE = """Please read the following text and answer the question below.

<text>
$DOC$
</text>

What is the correct answer to this question: $Q$
Choices:
(A) $C_A$
(B) $C_B$
(C) $C_C$
(D) $C_D$

Format your response as follows: "The correct answer is (insert answer here)"."""


@dataclass
class LongBenchV2Config:
    """Where the benchmark file is and how its items become records."""

    path: str | None = None
    """Local ``data.json`` (official JSON list) or a JSONL file with the same fields."""
    max_length: int = 120_000
    """Prompt tokens kept (first half + last half) for longer items."""
    truncation: Literal["context", "prompt"] = "context"
    """``context``: cut the middle of the context only; ``prompt``: cut the whole prompt (official)."""
    max_new_tokens: int = 128
    """Generation budget (official non-CoT setting: 128; thinking models need far more)."""
    answer_extraction: Literal["lenient", "official"] = "lenient"
    """How the chosen letter is read from a response (see ``extract_choice``)."""
    limit: int | None = None
    """Use only the first ``limit`` items (smoke tests)."""

    def __post_init__(self) -> None:
        check_positive("longbench_v2.max_length", self.max_length)
        check_choice("longbench_v2.truncation", self.truncation, ("context", "prompt"))
        check_positive("longbench_v2.max_new_tokens", self.max_new_tokens)
        check_choice("longbench_v2.answer_extraction", self.answer_extraction, ("lenient", "official"))
        check_positive("longbench_v2.limit", self.limit)


def load_longbench_v2(path: str | Path) -> list[dict]:
    """Read and check the items of a LongBench v2 file (JSON list, or JSONL with ``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LongBench v2 file {path} does not exist; point longbench_v2.path at a local copy of the "
            "official data.json"
        )
    required = {name: str for name in FIELDS}
    if path.suffix == ".jsonl":
        items = read_jsonl(path, required)
        where = [f"{path}: item {i}" for i in range(len(items))]
    else:
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(items, list):
            raise RecordError(f"{path}: expected a JSON list of items (the official data.json layout), "
                              f"got {type(items).__name__}")
        where = []
        for i, item in enumerate(items):
            label = f"{path}: item {i}"
            if isinstance(item, dict) and isinstance(item.get("_id"), str):
                label += f" (_id {item['_id']})"
            check_fields(item, required, label)
            where.append(label)
    for item, label in zip(items, where):
        for name, allowed in (("difficulty", DIFFICULTIES), ("length", LENGTHS), ("answer", CHOICES)):
            if item[name] not in allowed:
                raise RecordError(f"{label}: field {name!r} is {item[name]!r}, expected one of {list(allowed)}")
    return items


def format_prompt(item: dict, context: str | None = None) -> str:
    """The official zero-shot prompt of ``item`` (optionally with a replacement ``context``)."""
    doc = item["context"] if context is None else context
    # Sequential replace as in the official script: a question that happens to contain "$C_A$" is
    # not a concern for this data.
    return (
        PROMPT_TEMPLATE.replace("$DOC$", doc.strip())
        .replace("$Q$", item["question"].strip())
        .replace("$C_A$", item["choice_A"].strip())
        .replace("$C_B$", item["choice_B"].strip())
        .replace("$C_C$", item["choice_C"].strip())
        .replace("$C_D$", item["choice_D"].strip())
    )


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first ``max_length // 2`` and the last ``max_length - max_length // 2`` ids."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


def _truncated_prompt(item: dict, cfg: LongBenchV2Config, tokenizer: Tokenizer) -> tuple[str, int, bool]:
    """(prompt, tokens before truncation, truncated?)"""
    prompt = format_prompt(item)
    ids = tokenizer.encode(prompt)
    if len(ids) <= cfg.max_length:
        return prompt, len(ids), False
    if cfg.truncation == "prompt":
        return tokenizer.decode(truncate_middle(ids, cfg.max_length), skip_special_tokens=True), len(ids), True
    frame = len(tokenizer.encode(format_prompt(item, context="")))
    room = cfg.max_length - frame
    if room <= 0:
        raise ValueError(
            f"LongBench v2 item {item['_id']}: question and choices alone take {frame} tokens, more "
            f"than longbench_v2.max_length {cfg.max_length}"
        )
    context_ids = tokenizer.encode(item["context"].strip())
    context = tokenizer.decode(truncate_middle(context_ids, room), skip_special_tokens=True)
    return format_prompt(item, context=context), len(ids), True


def build_longbench_v2_records(cfg: LongBenchV2Config, tokenizer: Tokenizer,
                               prompt: PromptConfig | None = None) -> list[dict]:
    """Task records (``data.jsonl.TASK_RECORD_FIELDS``) for the items of ``cfg.path``."""
    if not cfg.path:
        raise ConfigError("longbench_v2.path: required; give the local path of the official data.json")
    items = load_longbench_v2(cfg.path)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    records = []
    for item in items:
        text, original_tokens, truncated = _truncated_prompt(item, cfg, tokenizer)
        record = {
            "id": f"{SUITE}/{item['_id']}",
            "suite": SUITE,
            "task": TASK,
            "prompt": text,
            "answer_prefix": "",
            "answer": f"The correct answer is ({item['answer']}).",
            "references": [item["answer"]],
            "metric": "choice",
            "max_new_tokens": cfg.max_new_tokens,
            "num_tokens": 0,
            "groups": {"difficulty": item["difficulty"], "length": item["length"]},
            "metadata": {
                "_id": item["_id"],
                "domain": item["domain"],
                "sub_domain": item["sub_domain"],
                "original_tokens": original_tokens,
                "truncated": truncated,
                "answer_extraction": cfg.answer_extraction,
            },
        }
        record["num_tokens"] = len(build_model_input(record, tokenizer, prompt).ids)
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# Answer extraction and scoring

_OFFICIAL = (
    re.compile(r"The correct answer is \(([A-D])\)"),
    re.compile(r"The correct answer is ([A-D])"),
)
# Tried in order after the official patterns. Each is anchored on wording that names an answer or on
# the very start of the response, and letters must be capitals, so "a B-tree" or "A good question"
# is not taken for a choice.
_LENIENT = (
    re.compile(r"(?i:correct answer is):?\s*\(?([A-D])\b"),
    re.compile(r"\b(?i:answer is):?\s*\(?([A-D])\b"),
    re.compile(r"\b(?i:answer):\s*\(?([A-D])\b"),
    re.compile(r"^\s*\(([A-D])\)"),
    re.compile(r"^\s*([A-D])(?:[.:)]|\s*$)"),
)
_PAREN_LETTER = re.compile(r"\(([A-D])\)")


def strip_thinking(text: str) -> str:
    """Drop a ``<think>...</think>`` block; an unclosed one means the model never answered."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return ""
    return text


def extract_choice(response: str, mode: Literal["lenient", "official"] = "lenient") -> str | None:
    """The letter A-D that ``response`` chooses, or None.

    ``official``: exactly LongBench v2's ``extract_answer`` (asterisks removed, then "The correct
    answer is (X)" or "The correct answer is X"). ``lenient``: a thinking block is dropped first, then
    the official patterns, then "answer is X", "Answer: X", a response that starts with the letter,
    and finally a single distinct "(X)" anywhere in the response.
    """
    check_choice("answer_extraction", mode, ("lenient", "official"))
    text = response.replace("*", "")
    if mode == "lenient":
        text = strip_thinking(text)
    for pattern in _OFFICIAL:
        match = pattern.search(text)
        if match:
            return match.group(1)
    if mode == "official":
        return None
    for pattern in _LENIENT:
        match = pattern.search(text)
        if match:
            return match.group(1)
    letters = set(_PAREN_LETTER.findall(text))
    if len(letters) == 1:
        return letters.pop()
    return None


def choice_score(response: str, record: dict) -> float:
    """1.0 when the extracted letter equals the record's reference letter."""
    mode = record.get("metadata", {}).get("answer_extraction", "lenient")
    return 1.0 if extract_choice(response, mode) == record["references"][0] else 0.0


def summarize_longbench_v2(samples: Sequence[dict]) -> dict[str, Any]:
    """The official accuracy table from per-sample dicts with ``score``, ``groups`` and ``extracted``.

    Percentages with one decimal as in ``result.py``; a group without samples is None.
    """
    def pct(values: list[float]) -> float | None:
        return round(100.0 * sum(values) / len(values), 1) if values else None

    def select(key: str | None, value: str | None, compensated: bool = False) -> list[float]:
        out = []
        for s in samples:
            if key is not None and s["groups"].get(key) != value:
                continue
            unanswered = s.get("extracted") is None
            out.append(0.25 if compensated and unanswered else float(s["score"]))
        return out

    summary: dict[str, Any] = {"overall": pct(select(None, None))}
    counts = {"overall": len(samples)}
    for d in DIFFICULTIES:
        summary[d] = pct(select("difficulty", d))
        counts[d] = len(select("difficulty", d))
    for length in LENGTHS:
        summary[length] = pct(select("length", length))
        counts[length] = len(select("length", length))
    summary["overall_compensated"] = pct(select(None, None, compensated=True))
    summary["unanswered"] = sum(1 for s in samples if s.get("extracted") is None)
    summary["counts"] = counts
    return summary
