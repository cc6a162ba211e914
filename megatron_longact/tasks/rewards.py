"""Verifiable rewards for RL on the long-context tasks, and the per-record scorer evaluation uses.

A score function takes ``(response, record)`` and returns a number in [0, 1]; ``task_score`` is the
default and is exactly the metric the evaluation reports, so the RL reward and the benchmark number
agree by construction:

- ``all``    RULER ``string_match_all``: fraction of references contained in the response;
- ``part``   RULER ``string_match_part``: 1 when any reference is contained (QA);
- ``exact``  SQuAD-normalised exact match with any reference;
- ``choice`` LongBench v2: the extracted letter equals the reference letter.

Before scoring, a ``<think>...</think>`` block is dropped (an unclosed one scores as no answer), so
a reasoning model is not rewarded for values it merely mentions while thinking. This is a departure
from RULER, whose models did not think out loud.

``Reward`` turns a score into the training reward: optionally all-or-nothing (the ``all`` metric is
fractional otherwise), then either kept in [0, 1] (``zero_one``) or mapped linearly to [-1, 1]
(``plus_minus_one``: +1 correct, -1 wrong, DAPO's rule-based reward). Any ``module:function`` with the
score signature can replace ``task_score``.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from megatron_longact.config import ConfigError, check_choice
from megatron_longact.data.jsonl import METRICS
from megatron_longact.tasks.longbench_v2 import choice_score, strip_thinking
from megatron_longact.tasks.ruler import string_match_all, string_match_part

ScoreFn = Callable[[str, Mapping[str, Any]], float]

DEFAULT_SCORE_FUNCTION = "megatron_longact.tasks.rewards:task_score"
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(response: str, record: Mapping[str, Any]) -> float:
    """1.0 when the normalised response equals any normalised reference."""
    pred = normalize_answer(strip_thinking(response))
    return 1.0 if any(pred == normalize_answer(r) for r in record["references"]) else 0.0


def contained_match(response: str, record: Mapping[str, Any]) -> float:
    """RULER's substring match: fraction of references found (``all``) or any found (otherwise)."""
    text = strip_thinking(response)
    if record.get("metric") == "all":
        return string_match_all(text, record["references"])
    return string_match_part(text, record["references"])


def choice_match(response: str, record: Mapping[str, Any]) -> float:
    """Multiple choice: the letter read from the response equals the reference letter."""
    return choice_score(response, dict(record))


def prefix_match(response: str, record: Mapping[str, Any]) -> float:
    """Dense shaping score for small models: the longest common prefix of the stripped response
    and the best reference, as a fraction of that reference's length (1.0 = exact answer first).

    Not a benchmark metric: it gives partial credit for a partly right answer (e.g. 2 of 3 digits),
    so that a tiny model's rewards are not all zero. Use ``task_score`` to evaluate.
    """
    text = strip_thinking(response).strip()
    best = 0.0
    for ref in record["references"]:
        ref = str(ref).strip()
        if not ref:
            continue
        n = 0
        while n < min(len(ref), len(text)) and text[n] == ref[n]:
            n += 1
        best = max(best, n / len(ref))
    return best


_BY_METRIC: dict[str, ScoreFn] = {
    "all": contained_match,
    "part": contained_match,
    "exact": exact_match,
    "choice": choice_match,
}


def task_score(response: str, record: Mapping[str, Any]) -> float:
    """The record's own metric (its ``metric`` field) applied to ``response``; in [0, 1]."""
    metric = record.get("metric")
    fn = _BY_METRIC.get(metric)
    if fn is None:
        raise ValueError(
            f"record {record.get('id', '?')}: metric {metric!r} is not one of {list(METRICS)}"
        )
    return fn(response, record)


def load_function(path: str, field: str = "reward.function") -> Callable:
    """Import ``module:function``; each failure names the import path and what is expected."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(
            f"{field}: got {path!r}, expected an import path 'module:function', e.g. {DEFAULT_SCORE_FUNCTION!r}"
        )
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import module {module_name!r} ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field}: {path!r} is not callable (its type is {type(obj).__name__})")
    return obj


@dataclass
class RewardConfig:
    """How a response to a task record becomes a scalar reward."""

    function: str = DEFAULT_SCORE_FUNCTION
    """Score function ``module:function`` with signature ``(response: str, record: dict) -> float``
    returning a value in [0, 1]."""
    convention: Literal["zero_one", "plus_minus_one"] = "zero_one"
    """``zero_one``: reward = score; ``plus_minus_one``: reward = 2 * score - 1 (DAPO: +1 / -1)."""
    all_or_nothing: bool = False
    """Reward 1 only for a perfect score (every reference of a multi-answer task found)."""

    def __post_init__(self) -> None:
        check_choice("reward.convention", self.convention, ("zero_one", "plus_minus_one"))
        load_function(self.function)  # fail at config time, not in the middle of a rollout


class Reward:
    """Callable reward built from a ``RewardConfig``: ``reward(response, record) -> float``."""

    def __init__(self, cfg: RewardConfig | None = None) -> None:
        self.cfg = cfg or RewardConfig()
        self.score_fn: ScoreFn = load_function(self.cfg.function)

    def score(self, response: str, record: Mapping[str, Any]) -> float:
        """The raw score in [0, 1], checked."""
        value = self.score_fn(response, record)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"score function {self.cfg.function} returned {value!r} for record "
                f"{record.get('id', '?')}; expected a number in [0, 1]"
            )
        return float(value)

    def shape(self, score: float) -> float:
        """Map a score in [0, 1] to the configured reward."""
        if self.cfg.all_or_nothing:
            score = 1.0 if score >= 1.0 else 0.0
        if self.cfg.convention == "plus_minus_one":
            return 2.0 * score - 1.0
        return score

    def __call__(self, response: str, record: Mapping[str, Any]) -> float:
        return self.shape(self.score(response, record))

    def batch(self, responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        if len(responses) != len(records):
            raise ValueError(f"got {len(responses)} responses for {len(records)} records; expected one each")
        return [self(r, rec) for r, rec in zip(responses, records)]


def compute_rewards(responses: Sequence[str], records: Sequence[Mapping[str, Any]],
                    cfg: RewardConfig | None = None) -> list[float]:
    """Rewards for a batch of responses (one per record)."""
    return Reward(cfg).batch(responses, records)
