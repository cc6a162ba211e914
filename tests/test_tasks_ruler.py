"""RULER-style generators: lengths, answer presence and uniqueness, determinism, scoring, bad input.

Length tolerance (what ``tasks/ruler.py`` promises): the rendered input plus ``max_new_tokens`` never
exceeds ``target_length`` and falls short by less than one haystack unit. With the byte tokenizer the
units are at most: a noise sentence 32 bytes, an essay word 16, a distractor needle 100 (UUID keys
and values), three copies of an uncommon word in the numbered cwe list 48, one fwe word 8.
"""

import collections
import re
from pathlib import Path

import pytest

from megatron_longact.config import ConfigError
from megatron_longact.data.jsonl import RecordError, read_task_records, write_jsonl
from megatron_longact.data.tokenizer import ByteTokenizer, PromptConfig, render_prompt
from megatron_longact.tasks import haystack as hs
from megatron_longact.tasks.ruler import (
    RULER_TASKS,
    SYNTHETIC_TASKS,
    RulerConfig,
    TargetTooSmall,
    generate_ruler,
    generate_sample,
    get_task,
    string_match_all,
    string_match_part,
    zipf_counts,
)
from megatron_longact.tasks.suite import evaluate

DATA = Path(__file__).parent / "data"
TOK = ByteTokenizer()

TOLERANCE = {
    "niah_single_1": 32, "vt": 32,                     # noise sentences
    "niah_multikey_2": 100, "niah_multikey_3": 100,    # distractor needles
    "cwe": 48, "fwe": 8,
}
ESSAY_TOLERANCE = 16


class WordTokenizer(ByteTokenizer):
    """A word-level stand-in for a BPE tokenizer: counts are not additive in bytes."""

    def __init__(self):
        super().__init__()
        self.name = "words"

    def encode(self, text):
        return [hash(w) % 1000 for w in re.findall(r"\w+|[^\w\s]", text)]


def _check_length(record, target):
    total = record["num_tokens"] + record["max_new_tokens"]
    assert total <= target
    assert record["metadata"]["budget"] == target - record["max_new_tokens"]
    gap = record["metadata"]["budget"] - record["num_tokens"]
    assert 0 <= gap <= TOLERANCE.get(record["task"], ESSAY_TOLERANCE), (record["task"], gap)


def _context(record):
    # The question follows the last newline of the prompt; everything before it is the context.
    return record["prompt"].rsplit("\n", 1)[0]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS + ("niah_single_words",))
@pytest.mark.parametrize("template,target", [("full", 2048), ("compact", 512)])
def test_synthetic_tasks_hit_length_and_answers_are_unique(task, template, target):
    cfg = RulerConfig(tasks=[task], lengths=[target], num_samples=2, template=template)
    for record in generate_ruler(cfg, TOK):
        _check_length(record, target)
        assert record["num_tokens"] == len(TOK.encode(render_prompt(record, TOK))) + 1  # + BOS
        context, refs = _context(record), record["references"]
        meta = record["metadata"]
        if task.startswith("niah"):
            for needle in meta["needles"]:
                assert context.count(needle) == 1
            for ref in refs:
                assert context.count(ref) == 1, ref
            expected = {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
            assert len(refs) == expected and len(set(refs)) == expected
        elif task == "vt":
            names = meta["chains"][0]
            assert refs == names and len(set(names)) == len(names)
            assert context.count(f"VAR {names[0]} = {meta['values'][0]}.") == 1
            for a, b in zip(names, names[1:]):
                assert context.count(f"VAR {b} = VAR {a}.") == 1
                assert context.index(f"VAR {a} ") < context.index(f"VAR {b} = VAR {a}.")
        elif task == "cwe":
            counts = collections.Counter(re.findall(r"[a-z]+", context.split("\n", 1)[-1]))
            common = {counts[w] for w in refs}
            assert common == {meta["freq_common"]}
            others = [c for w, c in counts.items() if w not in refs and len(w) == 6]
            assert others and max(others) < meta["freq_common"]
        elif task == "fwe":
            words = [w for w in re.findall(r"[a-z]+", context) if len(w) == 6]
            counts = collections.Counter(words)
            ranked = counts.most_common()
            assert [w for w, _ in ranked[:3]] == refs
            assert ranked[2][1] > ranked[3][1]


@pytest.mark.parametrize("task,target", [
    ("niah_single_1", 128), ("niah_single_2", 128), ("niah_single_words", 128), ("niah_single_1", 256),
    ("niah_single_2", 256), ("niah_multikey_2", 256), ("niah_multiquery", 256), ("vt", 256), ("fwe", 256),
])
def test_compact_template_fits_tiny_contexts(task, target):
    cfg = RulerConfig(tasks=[task], lengths=[target], num_samples=3, template="compact", number_digits=4,
                      vt_num_hops=2, num_needles=2)
    for record in generate_ruler(cfg, TOK):
        _check_length(record, target)
        assert record["max_new_tokens"] <= 32  # short answers for tiny models
        assert all(ref in record["prompt"] for ref in record["references"])


def test_long_context_and_non_byte_tokenizer():
    cfg = RulerConfig(tasks=["niah_single_2", "niah_multikey_1"], lengths=[32768], num_samples=1)
    for record in generate_ruler(cfg, TOK):
        _check_length(record, 32768)
    tok = WordTokenizer()
    cfg = RulerConfig(tasks=["niah_single_1", "niah_single_2", "cwe"], lengths=[1500], num_samples=2)
    for record in generate_ruler(cfg, tok):
        assert record["num_tokens"] + record["max_new_tokens"] <= 1500
        assert record["metadata"]["budget"] - record["num_tokens"] <= 20
        assert record["metadata"]["tokenizer"] == "words"


def test_raw_prompt_counts_and_chat_prompt_counts_differ():
    cfg = RulerConfig(tasks=["niah_single_1"], lengths=[512], num_samples=1)
    chat = generate_ruler(cfg, TOK, PromptConfig(chat="auto"))[0]
    raw = generate_ruler(cfg, TOK, PromptConfig(chat="none", add_bos=False))[0]
    assert raw["num_tokens"] == len(TOK.encode(render_prompt(raw, TOK, PromptConfig(chat="none"))))
    # The chat wrapper costs tokens, so the chat record carries less haystack for the same target.
    assert chat["metadata"]["fill_units"] <= raw["metadata"]["fill_units"]


def test_deterministic_and_seeded():
    cfg = RulerConfig(tasks=["niah_multivalue", "cwe"], lengths=[1024], num_samples=2)
    assert generate_ruler(cfg, TOK) == generate_ruler(cfg, TOK)
    other = generate_ruler(RulerConfig(tasks=["niah_multivalue", "cwe"], lengths=[1024], num_samples=2,
                                       seed=7), TOK)
    assert [r["references"] for r in other] != [r["references"] for r in generate_ruler(cfg, TOK)]
    a = generate_sample("niah_single_3", 1024, 5, cfg, TOK)
    assert a["id"] == "ruler/niah_single_3/1024/5" and a == generate_sample("niah_single_3", 1024, 5, cfg, TOK)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a["references"][0])


def test_fixed_depth_places_needle():
    start = generate_ruler(RulerConfig(tasks=["niah_single_1"], lengths=[1024], num_samples=1, depth=0.0), TOK)[0]
    end = generate_ruler(RulerConfig(tasks=["niah_single_1"], lengths=[1024], num_samples=1, depth=1.0), TOK)[0]
    needle = start["metadata"]["needles"][0]
    context = _context(start).split("\n", 1)[1]
    assert context.startswith(needle)
    assert _context(end).endswith(end["metadata"]["needles"][0])


def test_qa_tasks_from_local_files():
    cfg = RulerConfig(tasks=["qa_1", "qa_2"], lengths=[1024], num_samples=4,
                      squad_path=str(DATA / "squad_sample.json"), hotpotqa_path=str(DATA / "hotpotqa_sample.json"))
    records = generate_ruler(cfg, TOK)
    assert len(records) == 8
    for record in records:
        assert record["metric"] == "part"
        assert record["num_tokens"] + record["max_new_tokens"] <= 1024
        assert any(ref in record["prompt"] for ref in record["references"])
        assert record["metadata"]["question"] in record["prompt"]
    # Unanswerable SQuAD questions are skipped.
    assert not any("warden's dog" in r["prompt"] for r in records)
    # The sample files are tiny: a long target cannot be filled and says so.
    with pytest.raises(ValueError, match="too few documents"):
        generate_ruler(RulerConfig(tasks=["qa_1"], lengths=[8192], num_samples=1,
                                   squad_path=str(DATA / "squad_sample.json")), TOK)


def test_qa_file_errors(tmp_path):
    bad = tmp_path / "squad.json"
    bad.write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    cfg = RulerConfig(tasks=["qa_1"], lengths=[512], num_samples=1, squad_path=str(bad))
    with pytest.raises(RecordError, match=r"data\[0\]\.paragraphs\[0\]: missing field 'context'"):
        generate_ruler(cfg, TOK)
    bad.write_text('{"data": [')
    with pytest.raises(RecordError, match="squad.json:1: not valid JSON"):
        generate_ruler(cfg, TOK)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate_ruler(RulerConfig(tasks=["qa_1"], lengths=[512], num_samples=1,
                                   squad_path=str(tmp_path / "none.json")), TOK)


def test_config_and_task_errors():
    known = "known tasks: cwe, fwe, niah_multikey_1"
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'; " + known):
        get_task("niah_single_9")
    with pytest.raises(ConfigError, match=r"ruler.tasks\[1\]: unknown task 'needle'; known tasks: cwe"):
        RulerConfig(tasks=["vt", "needle"])
    with pytest.raises(ConfigError, match="ruler.squad_path: required by task qa_1"):
        RulerConfig(tasks=["qa_1"])
    with pytest.raises(ConfigError, match="ruler.template"):
        RulerConfig(template="short")
    with pytest.raises(ConfigError, match="ruler.cwe_freq_common"):
        RulerConfig(cwe_freq_common=3, cwe_freq_uncommon=3)
    with pytest.raises(ConfigError, match=r"ruler.lengths\[1\]"):
        RulerConfig(lengths=[128, 0])
    with pytest.raises(TargetTooSmall, match="target_length 64 is too small.*template='compact'"):
        generate_ruler(RulerConfig(tasks=["niah_multiquery"], lengths=[64], num_samples=1), TOK)
    assert set(SYNTHETIC_TASKS) < set(RULER_TASKS)


def test_haystack_invariants():
    import random

    hs.check_word_lists()
    text = " ".join(hs.Stream(hs.essay_words(random.Random(3))).take(5000)) + " ".join(hs.NOISE_SENTENCES)
    assert text.isascii()
    assert not re.search(r"[0-9-]|[A-Z]{2}", text)


def test_zipf_counts_have_unique_top_three():
    for total in (0, 5, 37, 400, 5000):
        counts = zipf_counts(total, 2.0)
        assert counts[0] > counts[1] > counts[2] > counts[3]
        assert sum(counts) >= total
        assert all(a >= b for a, b in zip(counts[3:], counts[4:]))


def test_ruler_scoring():
    refs = ["1234567", "7654321"]
    assert string_match_all("The numbers are 1234567 and 7654321.", refs) == 1.0
    assert string_match_all("1234567", refs) == 0.5
    assert string_match_all("nothing", refs) == 0.0
    assert string_match_part("It is 7654321", refs) == 1.0
    assert string_match_part("It is 765432", refs) == 0.0
    assert string_match_all("Brave-Lantern", ["brave-lantern"]) == 1.0  # case-insensitive


def test_records_round_trip_and_oracle_evaluation(tmp_path):
    cfg = RulerConfig(tasks=["niah_single_1", "vt"], lengths=[256, 512], num_samples=2, template="compact")
    records = generate_ruler(cfg, TOK)
    path = tmp_path / "ruler.jsonl"
    assert write_jsonl(path, records) == 8
    loaded = read_task_records(path)
    assert loaded == records
    answers = {render_prompt(r, TOK): r["answer"] for r in loaded}
    results = evaluate(loaded, lambda prompts: [answers[p] for p in prompts], tokenizer=TOK, batch_size=3)
    summary = results.summary["ruler"]
    assert summary["overall"] == 100.0
    assert summary["lengths"] == ["256", "512"]
    assert summary["tasks"]["vt"] == {"256": 100.0, "512": 100.0}
    half = evaluate(loaded, lambda prompts: ["no idea"] * len(prompts), tokenizer=TOK)
    assert half.summary["ruler"]["overall"] == 0.0


def test_malformed_jsonl_names_file_line_and_field(tmp_path):
    records = generate_ruler(RulerConfig(tasks=["niah_single_1"], lengths=[256], num_samples=2,
                                         template="compact"), TOK)
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, records)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:-5] + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not valid JSON"):
        read_task_records(path)
    broken = dict(records[1])
    del broken["references"]
    write_jsonl(path, [records[0], broken])
    with pytest.raises(RecordError, match=r"bad.jsonl:2: record has no field 'references'"):
        read_task_records(path)
    broken = dict(records[1], num_tokens="12")
    write_jsonl(path, [broken])
    with pytest.raises(RecordError, match=r"bad.jsonl:1: field 'num_tokens' is str '12', expected int"):
        read_task_records(path)
    broken = dict(records[1], metric="fuzzy")
    write_jsonl(path, [broken])
    with pytest.raises(RecordError, match=r"bad.jsonl:1: field 'metric' is 'fuzzy', expected one of"):
        read_task_records(path)
