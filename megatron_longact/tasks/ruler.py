"""RULER-style synthetic long-context tasks, generated offline at a target length in tokens.

Follows the task families and scoring of NVIDIA's RULER (Hsieh et al., 2024): needle-in-a-haystack
(single, multi-key, multi-value, multi-query), variable tracking (``vt``), common-words (``cwe``) and
frequent-words (``fwe``) extraction, and QA over SQuAD / HotpotQA files. The task names and default
sizes are RULER's, so averages are comparable in kind; the wording of the templates is our own.

Departures from RULER, all forced by working offline or chosen for tiny models:

- The essay haystack is generated locally (``tasks.haystack``) instead of Paul Graham essays.
- ``cwe`` and ``fwe`` use made-up pronounceable words of one length (``bakomi``), so no answer word
  is a substring of another and a substring match is exact.
- ``cwe`` lowers the frequency of the common words at short lengths so that they take at most half
  the budget; RULER's defaults (10 words x 30) assume a few thousand tokens.
- ``fwe`` sets word counts from a rounded Zipf law (exponent ``fwe_alpha``) and forces the top three
  counts to be strictly above the fourth, instead of sampling, so the answer is always unique.
- ``template="compact"`` drops most instructions so that tasks fit in 128-512 tokens for the tiny
  models trained on CPU; ``"full"`` is the RULER-like wording for real models.

Length: the rendered model input (``tokenizer.build_model_input`` with the given ``PromptConfig``:
chat template and BOS included) plus ``max_new_tokens`` when ``count_generation`` is set (RULER's
convention: prompt and answer fit in the context) never exceeds ``target_length``, and falls short of
it by less than one haystack unit: a noise sentence, an essay word, a distractor needle, a list word,
or a document for QA. Every record stores its ``budget`` and fill so tests can check this.

Scoring (``string_match_all`` / ``string_match_part``) is RULER's: case-insensitive substring match
of each reference in the prediction; ``all`` is the fraction of references found, ``part`` is 1 when
any reference is found.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from megatron_longact.config import ConfigError, check_choice, check_positive, check_range
from megatron_longact.data.jsonl import RecordError
from megatron_longact.data.tokenizer import PromptConfig, Tokenizer, build_model_input
from megatron_longact.tasks import haystack as hs

SUITE = "ruler"

# RULER's 11 synthetic tasks; qa_1 / qa_2 need local files and are opt-in.
SYNTHETIC_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
QA_TASKS = ("qa_1", "qa_2")


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class RulerConfig:
    """What to generate: tasks x lengths x samples, and the knobs of each task family."""

    tasks: list[str] = field(default_factory=lambda: list(SYNTHETIC_TASKS))
    """Task names from ``RULER_TASKS``; ``qa_1`` needs ``squad_path``, ``qa_2`` ``hotpotqa_path``."""
    lengths: list[int] = field(default_factory=lambda: [4096])
    """Target lengths in tokens of the given tokenizer."""
    num_samples: int = 100
    """Samples per task and length."""
    seed: int = 42
    template: Literal["full", "compact"] = "full"
    """``full``: RULER-like instructions; ``compact``: minimal wording for 128-512 token contexts."""
    number_digits: int = 7
    """Digits of number needles (RULER: 7)."""
    num_needles: int = 4
    """Keys of multikey / multiquery and values of multivalue (RULER: 4)."""
    depth: float | None = None
    """Fixed needle depth in [0, 1] (fraction of the haystack before the needle) for every needle;
    None draws a uniform depth per needle."""
    vt_num_chains: int = 1
    """Variable tracking: chains in the context; the first is asked about (RULER: 1)."""
    vt_num_hops: int = 4
    """Variable tracking: assignments after the first in each chain (RULER: 4)."""
    vt_value_digits: int = 5
    cwe_num_common: int = 10
    """Common words extraction: number of common words to find (RULER: 10)."""
    cwe_freq_common: int = 30
    """Occurrences of each common word at most (RULER: 30); lowered at short lengths."""
    cwe_freq_uncommon: int = 3
    """Occurrences of each uncommon word (RULER: 3)."""
    fwe_alpha: float = 2.0
    """Frequent words extraction: Zipf exponent of the word counts (RULER: 2.0)."""
    squad_path: str | None = None
    """Local SQuAD-format JSON (v1.1 or v2.0) for ``qa_1``."""
    hotpotqa_path: str | None = None
    """Local HotpotQA-format JSON (a list of questions with ``context``) for ``qa_2``."""
    max_new_tokens: int | None = None
    """Generation budget for every record; None: RULER's per-task budget (niah 128, vt 30, cwe 120,
    fwe 50, qa 32; raised to fit the reference answer) with ``full``, answer tokens + 8 with
    ``compact``."""
    count_generation: bool = True
    """Count ``max_new_tokens`` inside ``target_length`` (RULER's convention)."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("ruler.tasks: empty; choose from " + ", ".join(sorted(RULER_TASKS)))
        for i, name in enumerate(self.tasks):
            if name not in RULER_TASKS:
                raise ConfigError(f"ruler.tasks[{i}]: unknown task {name!r}; known tasks: "
                                  + ", ".join(sorted(RULER_TASKS)))
        if not self.lengths:
            raise ConfigError("ruler.lengths: empty; give at least one target length in tokens")
        for i, length in enumerate(self.lengths):
            check_positive(f"ruler.lengths[{i}]", length)
        check_positive("ruler.num_samples", self.num_samples)
        check_choice("ruler.template", self.template, ("full", "compact"))
        check_range("ruler.number_digits", self.number_digits, 1, 18)
        check_range("ruler.vt_value_digits", self.vt_value_digits, 1, 18)
        check_positive("ruler.num_needles", self.num_needles)
        if self.depth is not None:
            check_range("ruler.depth", self.depth, 0.0, 1.0)
        check_positive("ruler.vt_num_chains", self.vt_num_chains)
        check_positive("ruler.vt_num_hops", self.vt_num_hops, allow_zero=True)
        check_positive("ruler.cwe_num_common", self.cwe_num_common)
        check_positive("ruler.cwe_freq_uncommon", self.cwe_freq_uncommon)
        if self.cwe_freq_common <= self.cwe_freq_uncommon:
            raise ConfigError(
                f"ruler.cwe_freq_common: got {self.cwe_freq_common}, expected more than "
                f"ruler.cwe_freq_uncommon ({self.cwe_freq_uncommon}) so the common words are unique"
            )
        check_positive("ruler.fwe_alpha", self.fwe_alpha)
        check_positive("ruler.max_new_tokens", self.max_new_tokens)
        if "qa_1" in self.tasks and not self.squad_path:
            raise ConfigError("ruler.squad_path: required by task qa_1 (a local SQuAD-format JSON file)")
        if "qa_2" in self.tasks and not self.hotpotqa_path:
            raise ConfigError("ruler.hotpotqa_path: required by task qa_2 (a local HotpotQA-format JSON file)")


# --------------------------------------------------------------------------------------------------
# Scoring (RULER's)

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    """RULER's clean-up: control characters become newlines, then surrounding space is stripped."""
    return _CONTROL.sub("\n", text).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` that occur in ``prediction`` (case-insensitive)."""
    pred = postprocess_prediction(prediction).lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    pred = postprocess_prediction(prediction).lower()
    return 1.0 if any(r.lower() in pred for r in references) else 0.0


# --------------------------------------------------------------------------------------------------
# Per-sample machinery


class TargetTooSmall(ValueError):
    """The fixed parts of a task (instructions, needles, answer budget) exceed the target length."""


class _Sample:
    """State of one sample being generated: its rng, the token counter, and the length fitting."""

    def __init__(self, task: str, target_length: int, index: int, cfg: RulerConfig, tokenizer: Tokenizer,
                 prompt_cfg: PromptConfig, qa_sources: dict) -> None:
        self.task = task
        self.target_length = target_length
        self.index = index
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prompt_cfg = prompt_cfg
        self.qa_sources = qa_sources
        self.compact = cfg.template == "compact"
        # String seeds go through SHA-512 in random.Random, so they do not depend on PYTHONHASHSEED.
        self.seed = f"{cfg.seed}/{task}/{target_length}/{index}"
        self.rng = random.Random(self.seed)

    def rng_for(self, *parts: Any) -> random.Random:
        return random.Random("/".join([self.seed, *map(str, parts)]))

    def count(self, prompt: str, prefix: str) -> int:
        record = {"prompt": prompt, "answer_prefix": prefix}
        return len(build_model_input(record, self.tokenizer, self.prompt_cfg).ids)

    def generation_budget(self, references: Sequence[str], family_default: int) -> int:
        if self.cfg.max_new_tokens is not None:
            return self.cfg.max_new_tokens
        answer_tokens = len(self.tokenizer.encode(" " + ", ".join(references))) + 1  # + EOS
        # Tiny models trained on compact prompts answer with the values alone, so a small margin
        # suffices; real models often restate the question first, hence RULER's larger budgets.
        if self.compact:
            return answer_tokens + 8
        return max(family_default, answer_tokens + 16)

    def fit(self, build: Callable[[int], tuple[str, str]], max_new_tokens: int,
            limit: int | None = None) -> tuple[int, str, str, int, int]:
        """Largest ``n`` (haystack units) whose prompt fits; returns (n, prompt, prefix, tokens, budget)."""
        budget = self.target_length - (max_new_tokens if self.cfg.count_generation else 0)
        cache: dict[int, int] = {}

        def tokens(n: int) -> int:
            if n not in cache:
                cache[n] = self.count(*build(n))
            return cache[n]

        if tokens(0) > budget:
            reserve = max_new_tokens if self.cfg.count_generation else 0
            raise TargetTooSmall(
                f"ruler task {self.task}: target_length {self.target_length} is too small; the "
                f"instructions, question and needles alone take {tokens(0)} tokens"
                + (f" plus {reserve} reserved for the answer (max_new_tokens)" if reserve else "")
                + f"; use a target_length of at least {tokens(0) + reserve + 16}"
                + (" or ruler.template='compact'" if not self.compact else "")
            )
        n = _largest_fitting(tokens, budget, limit)
        prompt, prefix = build(n)
        return n, prompt, prefix, tokens(n), budget

    def record(self, *, prompt: str, prefix: str, references: list[str], metric: str, max_new_tokens: int,
               num_tokens: int, budget: int, fill: int, metadata: dict) -> dict:
        return {
            "id": f"{SUITE}/{self.task}/{self.target_length}/{self.index}",
            "suite": SUITE,
            "task": self.task,
            "prompt": prompt,
            "answer_prefix": prefix,
            "answer": " " + ", ".join(references) if metric == "all" else " " + references[0],
            "references": references,
            "metric": metric,
            "max_new_tokens": max_new_tokens,
            "num_tokens": num_tokens,
            "groups": {"length": str(self.target_length)},
            "metadata": {
                "target_length": self.target_length,
                "budget": budget,
                "fill_units": fill,
                "template": self.cfg.template,
                "tokenizer": self.tokenizer.name,
                "seed": self.seed,
                **metadata,
            },
        }


def _largest_fitting(tokens: Callable[[int], int], budget: int, limit: int | None) -> int:
    """Largest n in [0, limit] with tokens(n) <= budget, given tokens(0) <= budget.

    Token counts grow with n but not exactly linearly (BPE merges, chat templates), so the search
    guesses from the slope of a small probe, gallops to bracket the answer, then bisects; only counts
    that were actually measured are trusted, so the result never exceeds the budget.
    """
    probe = 16 if limit is None else min(16, limit)
    if probe == 0:
        return 0
    if tokens(probe) > budget:
        lo, hi = 0, probe
    else:
        slope = max((tokens(probe) - tokens(0)) / probe, 1e-3)
        guess = probe + int((budget - tokens(probe)) / slope)
        if limit is not None:
            guess = min(guess, limit)
        step = max(1, guess // 100)
        if tokens(guess) <= budget:
            lo = guess
            while True:
                if limit is not None and lo >= limit:
                    return limit
                m = lo + step if limit is None else min(lo + step, limit)
                if tokens(m) <= budget:
                    lo, step = m, step * 2
                else:
                    hi = m
                    break
        else:
            hi = guess
            while True:
                m = max(probe, hi - step)
                if m == probe or tokens(m) <= budget:
                    lo = m
                    break
                hi, step = m, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _insert_at_depths(units: list[str], inserts: list[tuple[float, str]],
                      boundary: Callable[[list[str], int], bool] | None = None) -> str:
    """Join ``units`` with spaces, placing each insert before unit ``round(depth * len(units))``.

    With ``boundary``, an insert moves back to the nearest position that starts a sentence.
    Inserts at the same position keep their order.
    """
    n = len(units)
    by_position: dict[int, list[str]] = {}
    for depth, text in inserts:
        pos = int(round(depth * n))
        if boundary is not None:
            while pos > 0 and not boundary(units, pos):
                pos -= 1
        by_position.setdefault(pos, []).append(text)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(by_position.get(i, ()))
        if i < n:
            parts.append(units[i])
    return " ".join(parts)


def _sentence_start(units: list[str], pos: int) -> bool:
    return units[pos - 1].endswith(".")


def _depths(sample: _Sample, count: int) -> list[float]:
    if sample.cfg.depth is not None:
        return [sample.cfg.depth] * count
    return [sample.rng.random() for _ in range(count)]


def _join_query(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------------
# Needle in a haystack

_KIND = {"numbers": ("number", "numbers"), "words": ("word", "words"), "uuids": ("UUID", "UUIDs")}


@dataclass(frozen=True)
class NiahSpec:
    haystack: Literal["noise", "essay", "needle"]
    key: Literal["words", "uuids"]
    value: Literal["numbers", "words", "uuids"]
    multi: Literal["single", "key", "value", "query"] = "single"


def _niah(sample: _Sample, spec: NiahSpec) -> dict:
    cfg, rng = sample.cfg, sample.rng
    draw = hs.UniqueDraw(rng)
    make_key = hs.word_key if spec.key == "words" else hs.uuid_value
    make_value = {
        "numbers": partial(hs.number_value, digits=cfg.number_digits),
        "words": hs.word_key,
        "uuids": hs.uuid_value,
    }[spec.value]
    num_keys = cfg.num_needles if spec.multi in ("key", "query") else 1
    num_values = cfg.num_needles if spec.multi == "value" else 1
    num_queries = cfg.num_needles if spec.multi == "query" else 1

    keys = [draw.draw(make_key) for _ in range(num_keys)]
    values = [[draw.draw(make_value) for _ in range(num_values)] for _ in keys]
    kind, kinds = _KIND[spec.value]

    def needle_text(key: str, value: str) -> str:
        if sample.compact:
            return f"The {kind} for {key} is {value}."
        return f"One special magic {kind} for {key} is: {value}."

    needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = sorted(_depths(sample, len(needles)))
    inserts = [(d, needle_text(k, v)) for d, (k, v) in zip(depths, needles)]
    query_idx = sorted(rng.sample(range(num_keys), num_queries))
    queries = [keys[i] for i in query_idx]
    references = [v for i in query_idx for v in values[i]]
    query = _join_query(queries)

    if spec.haystack == "noise":
        stream = hs.Stream(hs.noise_sentences())
        boundary = None
    elif spec.haystack == "essay":
        stream = hs.Stream(hs.essay_words(sample.rng_for("essay")))
        boundary = _sentence_start
    else:
        # A haystack of distractor needles: other keys with other values, all distinct from the real ones.
        distractors = hs.UniqueDraw(sample.rng_for("distractors"), used=draw.used)

        def distractor_needles():
            while True:
                yield needle_text(distractors.draw(make_key), distractors.draw(make_value))

        stream = hs.Stream(distractor_needles())
        boundary = None

    if sample.compact:
        asks = f"What is the {kind} for {query}?" if len(references) == 1 else f"What are the {kinds} for {query}?"
        prefix = "Answer:"
    else:
        asks = f"What are all the special magic {kinds} for {query} in the text above?"
        prefix = f"The special magic {kinds} for {query} in the text above are:"

    def build(n: int) -> tuple[str, str]:
        context = _insert_at_depths(stream.take(n), inserts, boundary)
        if sample.compact:
            return f"{context}\n{asks}", prefix
        return (
            f"Some special magic {kinds} are hidden in the text below. Read it carefully: you will be "
            f"asked for them afterwards.\n{context}\n{asks}",
            prefix,
        )

    max_new = sample.generation_budget(references, 128)
    n, prompt, prefix, ntok, budget = sample.fit(build, max_new)
    return sample.record(
        prompt=prompt, prefix=prefix, references=references, metric="all", max_new_tokens=max_new,
        num_tokens=ntok, budget=budget, fill=n,
        metadata={
            "haystack": spec.haystack,
            "keys": keys,
            "queries": queries,
            "depths": depths,
            "needles": [needle_text(k, v) for k, v in needles],
        },
    )


# --------------------------------------------------------------------------------------------------
# Variable tracking


def _variable_tracking(sample: _Sample) -> dict:
    cfg, rng = sample.cfg, sample.rng
    draw = hs.UniqueDraw(rng)
    chains: list[list[str]] = []
    chain_values: list[str] = []
    for _ in range(cfg.vt_num_chains):
        chains.append([draw.draw(hs.variable_name) for _ in range(cfg.vt_num_hops + 1)])
        chain_values.append(draw.draw(partial(hs.number_value, digits=cfg.vt_value_digits)))
    inserts: list[tuple[float, str]] = []
    for names, value in zip(chains, chain_values):
        # Sorted depths keep each chain in assignment order, so it can be followed top to bottom.
        depths = sorted(_depths(sample, len(names)))
        statements = [f"VAR {names[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        inserts.extend(zip(depths, statements))
    # Stable sort by depth: statements of different chains interleave, each chain stays in order.
    inserts.sort(key=lambda item: item[0])
    value = chain_values[0]
    references = list(chains[0])
    stream = hs.Stream(hs.noise_sentences())

    if sample.compact:
        prefix = "Answer:"
    else:
        prefix = f"Answer: The variables assigned the value {value} are:"

    def build(n: int) -> tuple[str, str]:
        context = _insert_at_depths(stream.take(n), inserts)
        if sample.compact:
            return f"{context}\nWhich variables equal {value}?", prefix
        return (
            "Track the chains of variable assignments hidden in the text below.\n"
            f"{context}\nQuestion: Which variables are assigned the value {value} in the text above?",
            prefix,
        )

    max_new = sample.generation_budget(references, 30)
    n, prompt, prefix, ntok, budget = sample.fit(build, max_new)
    return sample.record(
        prompt=prompt, prefix=prefix, references=references, metric="all", max_new_tokens=max_new,
        num_tokens=ntok, budget=budget, fill=n,
        metadata={"chains": chains, "values": chain_values},
    )


# --------------------------------------------------------------------------------------------------
# Common words extraction


def _common_words(sample: _Sample) -> dict:
    cfg = sample.cfg
    draw = hs.UniqueDraw(sample.rng)
    words = hs.Stream(iter(lambda: draw.draw(hs.pseudo_word), None))
    common = words.take(cfg.cwe_num_common)
    k = cfg.cwe_num_common
    prefix = "Answer:" if sample.compact else f"Answer: The {k} most common words in the list are:"

    def builder(freq_common: int) -> Callable[[int], tuple[str, str]]:
        def build(n: int) -> tuple[str, str]:
            uncommon = words.take(k + n)[k:]
            items = common * freq_common + uncommon * cfg.cwe_freq_uncommon
            sample.rng_for("order", freq_common, n).shuffle(items)
            if sample.compact:
                return " ".join(items) + f"\nWhich {k} words are most common?", prefix
            listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            return (
                "Below is a numbered list of words. Some words appear more often than others; remember "
                f"the most frequent ones.\n{listing}\nQuestion: What are the {k} most common words in the "
                "list above?",
                prefix,
            )
        return build

    references = list(common)
    max_new = sample.generation_budget(references, 120)
    budget = sample.target_length - (max_new if cfg.count_generation else 0)
    # Keep the common block to at most half the budget, so uncommon words fill the rest and the task
    # does not degenerate into "repeat every word" at short lengths.
    freq = cfg.cwe_freq_common
    while freq > cfg.cwe_freq_uncommon + 1 and sample.count(*builder(freq)(0)) > budget // 2:
        freq -= 1
    n, prompt, prefix, ntok, budget = sample.fit(builder(freq), max_new)
    return sample.record(
        prompt=prompt, prefix=prefix, references=references, metric="all", max_new_tokens=max_new,
        num_tokens=ntok, budget=budget, fill=n,
        metadata={"freq_common": freq, "freq_uncommon": cfg.cwe_freq_uncommon, "num_uncommon": n},
    )


# --------------------------------------------------------------------------------------------------
# Frequent words extraction

FWE_NUM_ANSWERS = 3


def zipf_counts(total: int, alpha: float, strict_top: int = FWE_NUM_ANSWERS) -> list[int]:
    """Word counts (rank order) following a rounded Zipf law and summing to about ``total``.

    The first ``strict_top`` counts are made strictly greater than the next one, so the most frequent
    words are unique; this can add a few words beyond ``total``.
    """
    zeta = sum(r ** -alpha for r in range(1, 10_000))
    counts: list[int] = []
    remaining, rank = total, 1
    while remaining > 0:
        c = min(max(1, round(total * rank ** -alpha / zeta)), remaining)
        counts.append(c)
        remaining -= c
        rank += 1
    while len(counts) < strict_top + 1:
        counts.append(1)
    for i in range(strict_top - 1, -1, -1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def _frequent_words(sample: _Sample) -> dict:
    cfg = sample.cfg
    draw = hs.UniqueDraw(sample.rng)
    vocab = hs.Stream(iter(lambda: draw.draw(hs.pseudo_word), None))
    prefix = "Answer:" if sample.compact else "Answer: The three most frequent coded words are:"
    minimum = sum(zipf_counts(0, cfg.fwe_alpha))

    def build(n: int) -> tuple[str, str]:
        counts = zipf_counts(minimum + n, cfg.fwe_alpha)
        words = vocab.take(len(counts))
        items = [w for w, c in zip(words, counts) for _ in range(c)]
        sample.rng_for("order", n).shuffle(items)
        text = " ".join(items)
        if sample.compact:
            return f"{text}\nWhich 3 words occur most often?", prefix
        return (
            "Read the coded text below and keep track of how often each coded word occurs.\n"
            f"{text}\nQuestion: Which three coded words occur most often in the text above?",
            prefix,
        )

    references = vocab.take(FWE_NUM_ANSWERS)
    max_new = sample.generation_budget(references, 50)
    n, prompt, prefix, ntok, budget = sample.fit(build, max_new)
    counts = zipf_counts(minimum + n, cfg.fwe_alpha)
    return sample.record(
        prompt=prompt, prefix=prefix, references=list(references), metric="all", max_new_tokens=max_new,
        num_tokens=ntok, budget=budget, fill=n,
        metadata={"top_counts": counts[: FWE_NUM_ANSWERS + 1], "num_words": sum(counts)},
    )


# --------------------------------------------------------------------------------------------------
# QA over local SQuAD / HotpotQA files


@dataclass
class QASource:
    """Documents and answerable questions read from one local QA file."""

    path: str
    docs: list[str]
    questions: list[dict]  # {"question": str, "answers": [str], "gold": [doc index]}


def _need(obj: Any, key: str, tp, where: str):
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise RecordError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, tp):
        names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
        raise RecordError(f"{where}.{key}: got {type(value).__name__}, expected {names}")
    return value


def _read_json(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def load_squad(path: str) -> QASource:
    """Read a SQuAD v1.1/v2.0 file; unanswerable questions (``is_impossible``) are skipped."""
    data = _read_json(path)
    docs: list[str] = []
    doc_index: dict[str, int] = {}
    questions: list[dict] = []
    articles = _need(data, "data", list, path)
    for a, article in enumerate(articles):
        where_a = f"{path}: data[{a}]"
        for p, paragraph in enumerate(_need(article, "paragraphs", list, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _need(paragraph, "context", str, where_p)
            if context not in doc_index:
                doc_index[context] = len(docs)
                docs.append(context)
            for q, qa in enumerate(_need(paragraph, "qas", list, where_p)):
                where_q = f"{where_p}.qas[{q}]"
                question = _need(qa, "question", str, where_q)
                if qa.get("is_impossible", False):
                    continue
                answers = _need(qa, "answers", list, where_q)
                texts = [_need(ans, "text", str, f"{where_q}.answers[{i}]") for i, ans in enumerate(answers)]
                texts = list(dict.fromkeys(t for t in texts if t.strip()))
                if texts:
                    questions.append({"question": question, "answers": texts, "gold": [doc_index[context]]})
    if not questions:
        raise RecordError(f"{path}: no answerable questions found in this SQuAD-format file")
    return QASource(path=path, docs=docs, questions=questions)


def load_hotpotqa(path: str) -> QASource:
    """Read a HotpotQA file: every paragraph of a question's ``context`` is a gold document (RULER)."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of HotpotQA questions, got {type(data).__name__}")
    docs: list[str] = []
    doc_index: dict[str, int] = {}
    questions: list[dict] = []
    for i, item in enumerate(data):
        where = f"{path}: [{i}]"
        question = _need(item, "question", str, where)
        answer = _need(item, "answer", str, where)
        gold = []
        for c, entry in enumerate(_need(item, "context", list, where)):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], list) and all(isinstance(s, str) for s in entry[1])):
                raise RecordError(f"{where}.context[{c}]: expected [title, [sentence, ...]]")
            text = f"{entry[0]}\n{''.join(entry[1])}"
            if text not in doc_index:
                doc_index[text] = len(docs)
                docs.append(text)
            gold.append(doc_index[text])
        if not gold:
            raise RecordError(f"{where}.context: empty; a question needs its paragraphs")
        questions.append({"question": question, "answers": [answer], "gold": gold})
    if not questions:
        raise RecordError(f"{path}: no questions found in this HotpotQA-format file")
    return QASource(path=path, docs=docs, questions=questions)


def _qa(sample: _Sample, source: Literal["squad", "hotpotqa"]) -> dict:
    cfg = sample.cfg
    path = cfg.squad_path if source == "squad" else cfg.hotpotqa_path
    key = (source, path)
    if key not in sample.qa_sources:
        sample.qa_sources[key] = load_squad(path) if source == "squad" else load_hotpotqa(path)
    src: QASource = sample.qa_sources[key]
    # The same question order at every length, so scores at different lengths compare like for like.
    order = list(range(len(src.questions)))
    random.Random(f"{cfg.seed}/{sample.task}/questions").shuffle(order)
    prefix = "Answer:"

    def builder(question: dict, pool: list[int]) -> Callable[[int], tuple[str, str]]:
        def build(n: int) -> tuple[str, str]:
            chosen = list(question["gold"]) + pool[:n]
            sample.rng_for("order", n).shuffle(chosen)
            docs = "\n\n".join(f"Document {i + 1}:\n{src.docs[d]}" for i, d in enumerate(chosen))
            if sample.compact:
                return f"{docs}\n\nQuestion: {question['question']}", prefix
            return (
                "Answer the question using the documents below. Reply with the answer only, no other "
                f"words.\n\n{docs}\n\nQuestion: {question['question']}",
                prefix,
            )
        return build

    # Try questions in order until one whose gold documents fit; short targets skip long paragraphs.
    last_error: TargetTooSmall | None = None
    for attempt in range(len(order)):
        question = src.questions[order[(sample.index + attempt) % len(order)]]
        gold = set(question["gold"])
        pool = [d for d in range(len(src.docs)) if d not in gold]
        sample.rng_for("pool").shuffle(pool)
        references = list(question["answers"])
        max_new = sample.generation_budget(references, 32)
        build = builder(question, pool)
        try:
            n, prompt, prefix, ntok, budget = sample.fit(build, max_new, limit=len(pool))
        except TargetTooSmall as exc:
            last_error = exc
            continue
        if n == len(pool) and pool:
            spare = budget - ntok
            mean_doc = (ntok - sample.count(*build(0))) / len(pool)
            if spare > mean_doc:
                raise ValueError(
                    f"ruler task {sample.task}: {path} holds too few documents for target_length "
                    f"{sample.target_length}: all {len(src.docs)} documents fill {ntok} of {budget} tokens; "
                    "use a larger file or a shorter length"
                )
        return sample.record(
            prompt=prompt, prefix=prefix, references=references, metric="part", max_new_tokens=max_new,
            num_tokens=ntok, budget=budget, fill=n,
            metadata={"source": source, "path": path, "question": question["question"],
                      "num_docs": n + len(question["gold"])},
        )
    raise TargetTooSmall(
        f"ruler task {sample.task}: no question in {path} has gold documents that fit in target_length "
        f"{sample.target_length}; {last_error}"
    )


# --------------------------------------------------------------------------------------------------
# Registry and entry points

RULER_TASKS: dict[str, Callable[[_Sample], dict]] = {
    "niah_single_1": partial(_niah, spec=NiahSpec("noise", "words", "numbers")),
    "niah_single_2": partial(_niah, spec=NiahSpec("essay", "words", "numbers")),
    "niah_single_3": partial(_niah, spec=NiahSpec("essay", "words", "uuids")),
    "niah_multikey_1": partial(_niah, spec=NiahSpec("essay", "words", "numbers", "key")),
    "niah_multikey_2": partial(_niah, spec=NiahSpec("needle", "words", "numbers", "key")),
    "niah_multikey_3": partial(_niah, spec=NiahSpec("needle", "uuids", "uuids", "key")),
    "niah_multivalue": partial(_niah, spec=NiahSpec("essay", "words", "numbers", "value")),
    "niah_multiquery": partial(_niah, spec=NiahSpec("essay", "words", "numbers", "query")),
    # Not in RULER's default set: word values instead of numbers (the issue asks for word needles).
    "niah_single_words": partial(_niah, spec=NiahSpec("essay", "words", "words")),
    "vt": _variable_tracking,
    "cwe": _common_words,
    "fwe": _frequent_words,
    "qa_1": partial(_qa, source="squad"),
    "qa_2": partial(_qa, source="hotpotqa"),
}


def get_task(name: str) -> Callable[[_Sample], dict]:
    """The generator registered as ``name``; an unknown name lists the known ones."""
    try:
        return RULER_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown RULER task {name!r}; known tasks: {', '.join(sorted(RULER_TASKS))}") from None


def generate_sample(task: str, target_length: int, index: int, cfg: RulerConfig, tokenizer: Tokenizer,
                    prompt: PromptConfig | None = None, *, _qa_sources: dict | None = None) -> dict:
    """One task record (see ``data.jsonl.TASK_RECORD_FIELDS``); deterministic in its arguments."""
    generator = get_task(task)
    sample = _Sample(task, target_length, index, cfg, tokenizer, prompt or PromptConfig(),
                     {} if _qa_sources is None else _qa_sources)
    return generator(sample)


def generate_ruler(cfg: RulerConfig, tokenizer: Tokenizer, prompt: PromptConfig | None = None) -> list[dict]:
    """Records for every task x length x sample in ``cfg`` (in that order).

    Pass the ``PromptConfig`` that training / evaluation will use, so lengths count the real model
    input (chat template and BOS included).
    """
    qa_sources: dict = {}
    records = []
    for task in cfg.tasks:
        for length in cfg.lengths:
            for index in range(cfg.num_samples):
                records.append(generate_sample(task, length, index, cfg, tokenizer, prompt,
                                               _qa_sources=qa_sources))
    return records
