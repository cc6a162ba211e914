"""Evaluation over a suite of task records, independent of any model.

``evaluate`` takes the records (from ``build_suite`` or ``data.jsonl.read_task_records``) and a
``generate_fn(prompts: list[str]) -> list[str]`` that maps rendered model inputs to completions; the
model side only has to provide that function. Prompts are rendered by
``data.tokenizer.render_prompt`` (the function training uses) and responses are scored by
``tasks.rewards.task_score`` (the function the RL reward uses), so evaluation, training prompts and
rewards cannot drift apart.

``write_report`` writes ``results.md`` (RULER: task x length table with the per-length average;
LongBench v2: the official overall / easy / hard / short / medium / long row), ``results.json``
(summary and every sample's prediction and score) and, given a log directory, TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from megatron_longact.config import ConfigError, check_positive
from megatron_longact.data.tokenizer import PromptConfig, Tokenizer, render_prompt
from megatron_longact.tasks import longbench_v2 as lb
from megatron_longact.tasks import ruler
from megatron_longact.tasks.longbench_v2 import LongBenchV2Config, build_longbench_v2_records, extract_choice
from megatron_longact.tasks.rewards import task_score
from megatron_longact.tasks.ruler import RulerConfig, generate_ruler

GenerateFn = Callable[..., list[str]]

SUITES: dict[str, Callable[..., list[dict]]] = {
    "ruler": lambda cfg, tokenizer, prompt: generate_ruler(cfg.ruler, tokenizer, prompt),
    "longbench-v2": lambda cfg, tokenizer, prompt: build_longbench_v2_records(cfg.longbench_v2, tokenizer, prompt),
}


@dataclass
class SuiteConfig:
    """Which suite to evaluate and its settings."""

    name: str = "ruler"
    """``ruler`` (generated at ``ruler.lengths``) or ``longbench-v2`` (read from
    ``longbench_v2.path``)."""
    ruler: RulerConfig = field(default_factory=RulerConfig)
    longbench_v2: LongBenchV2Config = field(default_factory=LongBenchV2Config)

    def __post_init__(self) -> None:
        if self.name not in SUITES:
            raise ConfigError(f"suite.name: got {self.name!r}, expected one of {sorted(SUITES)}")
        if self.name == "longbench-v2" and not self.longbench_v2.path:
            raise ConfigError("suite.longbench_v2.path: required for suite longbench-v2 (local data.json)")


def build_suite(cfg: SuiteConfig, tokenizer: Tokenizer, prompt: PromptConfig | None = None) -> list[dict]:
    """The task records of the suite ``cfg`` names."""
    return SUITES[cfg.name](cfg, tokenizer, prompt)


@dataclass
class SampleResult:
    """One record's outcome. ``score`` is in [0, 1]; ``extracted`` is the chosen letter for
    multiple-choice records (None when no letter could be read) and None otherwise."""

    id: str
    suite: str
    task: str
    groups: dict[str, str]
    score: float
    prediction: str
    references: list[str]
    extracted: str | None = None


@dataclass
class EvalResults:
    """Per-sample results and per-suite summaries (percentages)."""

    samples: list[SampleResult]
    summary: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "samples": [asdict(s) for s in self.samples]}


def evaluate(
    records: Sequence[Mapping[str, Any]],
    generate_fn: GenerateFn,
    *,
    tokenizer: Tokenizer | None = None,
    prompt: PromptConfig | None = None,
    batch_size: int = 8,
    pass_max_new_tokens: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResults:
    """Generate a completion for every record, score it, and summarise per suite.

    ``generate_fn(prompts)`` receives rendered model inputs (chat template applied when ``prompt``
    asks for it; the answer prefix is already at the end) and returns one completion per prompt,
    without the prompt. Records are batched in order; with ``pass_max_new_tokens`` batches never mix
    records with different ``max_new_tokens`` and the function is called as
    ``generate_fn(prompts, max_new_tokens=n)``. BOS is not part of the text: a model-side
    ``generate_fn`` encodes each prompt with ``data.tokenizer.encode_prompt_text(text, tokenizer,
    prompt)``, which adds it exactly as training does. ``progress(done, total)`` is called after each
    batch.
    """
    check_positive("batch_size", batch_size)
    prompt = prompt or PromptConfig()
    if prompt.chat != "none" and tokenizer is None:
        # Without a tokenizer there is no chat template; be explicit rather than silently raw.
        raise ValueError("evaluate: pass the tokenizer, or prompt=PromptConfig(chat='none') for raw prompts")

    if pass_max_new_tokens:
        # One budget per call: group records by max_new_tokens, keeping their order within a group.
        groups: dict[int, list[int]] = {}
        for i, record in enumerate(records):
            groups.setdefault(int(record["max_new_tokens"]), []).append(i)
        batches = [g[j:j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
    else:
        batches = [list(range(j, min(j + batch_size, len(records)))) for j in range(0, len(records), batch_size)]

    predictions: list[str | None] = [None] * len(records)
    done = 0
    for batch in batches:
        texts = [render_prompt(records[i], tokenizer, prompt) for i in batch]
        if pass_max_new_tokens:
            outputs = generate_fn(texts, max_new_tokens=int(records[batch[0]]["max_new_tokens"]))
        else:
            outputs = generate_fn(texts)
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(texts):
            got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
            raise ValueError(f"generate_fn returned {got} outputs for {len(texts)} prompts; expected a list "
                             "with one string per prompt")
        for i, out in zip(batch, outputs):
            if not isinstance(out, str):
                raise ValueError(f"generate_fn returned {type(out).__name__} for record "
                                 f"{records[i]['id']}; expected a string")
            predictions[i] = out
        done += len(batch)
        if progress is not None:
            progress(done, len(records))

    samples = []
    for record, prediction in zip(records, predictions):
        extracted = None
        if record["metric"] == "choice":
            mode = record.get("metadata", {}).get("answer_extraction", "lenient")
            extracted = extract_choice(prediction, mode)
        samples.append(SampleResult(
            id=record["id"],
            suite=record["suite"],
            task=record["task"],
            groups=dict(record.get("groups", {})),
            score=float(task_score(prediction, record)),
            prediction=prediction,
            references=list(record["references"]),
            extracted=extracted,
        ))
    return EvalResults(samples=samples, summary=summarize(samples))


def _pct(values: Sequence[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 2) if values else None


def summarize_ruler(samples: Sequence[SampleResult]) -> dict[str, Any]:
    """Task x length scores (percent), the per-length average over tasks, and the overall mean."""
    cells: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        cells.setdefault(s.task, {}).setdefault(s.groups.get("length", "?"), []).append(s.score)
    lengths = sorted({length for by_len in cells.values() for length in by_len}, key=_length_key)
    tasks = {task: {length: _pct(by_len[length]) for length in lengths if length in by_len}
             for task, by_len in cells.items()}
    average = {}
    for length in lengths:
        scores = [t[length] for t in tasks.values() if length in t]
        average[length] = round(sum(scores) / len(scores), 2)
    all_cells = [v for t in tasks.values() for v in t.values()]
    return {
        "tasks": tasks,
        "lengths": lengths,
        "average": average,
        "overall": round(sum(all_cells) / len(all_cells), 2),
        "num_samples": len(samples),
    }


def _length_key(length: str):
    return (0, int(length)) if length.isdigit() else (1, length)


def summarize_generic(samples: Sequence[SampleResult]) -> dict[str, Any]:
    """Per-task mean score (percent) for suites without a dedicated table."""
    by_task: dict[str, list[float]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s.score)
    return {
        "tasks": {t: _pct(v) for t, v in by_task.items()},
        "overall": _pct([s.score for s in samples]),
        "num_samples": len(samples),
    }


def summarize(samples: Sequence[SampleResult]) -> dict[str, dict[str, Any]]:
    """One summary per suite present in ``samples``."""
    by_suite: dict[str, list[SampleResult]] = {}
    for s in samples:
        by_suite.setdefault(s.suite, []).append(s)
    out: dict[str, dict[str, Any]] = {}
    for suite, group in by_suite.items():
        if suite == ruler.SUITE:
            out[suite] = summarize_ruler(group)
        elif suite == lb.SUITE:
            out[suite] = lb.summarize_longbench_v2(
                [{"score": s.score, "groups": s.groups, "extracted": s.extracted} for s in group]
            )
        else:
            out[suite] = summarize_generic(group)
    return out


# --------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_markdown(results: EvalResults, title: str = "Evaluation results") -> str:
    """Markdown tables of ``results.summary``."""
    lines = [f"# {title}", ""]
    for suite, summary in results.summary.items():
        if suite == ruler.SUITE:
            lengths = summary["lengths"]
            lines += ["## RULER", "", "| Task | " + " | ".join(lengths) + " |",
                      "| --- | " + " | ".join("---:" for _ in lengths) + " |"]
            for task, by_len in summary["tasks"].items():
                lines.append(f"| {task} | " + " | ".join(_fmt(by_len.get(length)) for length in lengths) + " |")
            lines.append("| **Average** | " + " | ".join(_fmt(summary["average"][length]) for length in lengths)
                         + " |")
            lines += ["", f"Overall: {_fmt(summary['overall'])} over {summary['num_samples']} samples.", ""]
        elif suite == lb.SUITE:
            cols = ["overall", *lb.DIFFICULTIES, *lb.LENGTHS]
            lines += ["## LongBench v2", "",
                      "| " + " | ".join(c.capitalize() for c in cols) + " |",
                      "| " + " | ".join("---:" for _ in cols) + " |",
                      "| " + " | ".join(_fmt(summary[c]) for c in cols) + " |",
                      "",
                      f"Samples: {summary['counts']['overall']}; no answer extracted: {summary['unanswered']}; "
                      f"overall with unanswered counted as a 1/4 guess: {_fmt(summary['overall_compensated'])}.",
                      ""]
        else:
            lines += [f"## {suite}", "", "| Task | Score |", "| --- | ---: |"]
            for task, score in summary["tasks"].items():
                lines.append(f"| {task} | {_fmt(score)} |")
            lines += ["", f"Overall: {_fmt(summary['overall'])} over {summary['num_samples']} samples.", ""]
    return "\n".join(lines)


def scalars(results: EvalResults, prefix: str = "eval") -> dict[str, float]:
    """Flat ``tag -> value`` view of the summaries, as logged to TensorBoard."""
    out: dict[str, float] = {}
    for suite, summary in results.summary.items():
        if suite == ruler.SUITE:
            for task, by_len in summary["tasks"].items():
                for length, value in by_len.items():
                    out[f"{prefix}/ruler/{task}/{length}"] = value
            for length, value in summary["average"].items():
                out[f"{prefix}/ruler/average/{length}"] = value
            out[f"{prefix}/ruler/overall"] = summary["overall"]
        elif suite == lb.SUITE:
            for key in ("overall", *lb.DIFFICULTIES, *lb.LENGTHS, "overall_compensated"):
                if summary[key] is not None:
                    out[f"{prefix}/{suite}/{key}"] = summary[key]
        else:
            for task, value in summary["tasks"].items():
                out[f"{prefix}/{suite}/{task}"] = value
            out[f"{prefix}/{suite}/overall"] = summary["overall"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def write_report(
    results: EvalResults,
    out_dir: str | Path,
    *,
    log_dir: str | Path | None = None,
    step: int = 0,
    title: str = "Evaluation results",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.md`` and ``results.json`` under ``out_dir``; TensorBoard scalars under ``log_dir``.

    ``extra`` (e.g. the model path and config) is stored under ``"run"`` in the JSON. Returns the
    paths written, keyed ``markdown``, ``json`` and (with a log dir) ``tensorboard``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text(format_markdown(results, title) + "\n", encoding="utf-8")
    payload = {"run": dict(extra or {}), **results.to_dict()}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for tag, value in scalars(results).items():
                writer.add_scalar(tag, value, global_step=step)
        finally:
            writer.close()
        paths["tensorboard"] = Path(log_dir)
    return paths
