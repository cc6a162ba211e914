"""LongBench v2: loading, prompt, truncation, answer extraction, the accuracy table, and reporting.

Uses tests/data/longbench_v2_sample.json, a hand-written sample in the official format (not the
benchmark).
"""

import json
from pathlib import Path

import pytest

from megatron_longact.config import ConfigError
from megatron_longact.data.jsonl import RecordError, check_task_record, write_jsonl
from megatron_longact.data.tokenizer import ByteTokenizer, PromptConfig, render_prompt
from megatron_longact.tasks.longbench_v2 import (
    LongBenchV2Config,
    build_longbench_v2_records,
    extract_choice,
    format_prompt,
    load_longbench_v2,
    summarize_longbench_v2,
    truncate_middle,
)
from megatron_longact.tasks.suite import SuiteConfig, build_suite, evaluate, format_markdown, scalars, write_report

SAMPLE = Path(__file__).parent / "data" / "longbench_v2_sample.json"
TOK = ByteTokenizer()


def test_load_sample_and_build_records():
    items = load_longbench_v2(SAMPLE)
    assert len(items) == 6 and all(i["_id"].startswith("TEST-SAMPLE-") for i in items)
    records = build_longbench_v2_records(LongBenchV2Config(path=str(SAMPLE)), TOK)
    for i, record in enumerate(records):
        check_task_record(record, f"record {i}")
    first = records[0]
    assert first["id"] == "longbench_v2/TEST-SAMPLE-0001"
    assert first["references"] == ["C"] and first["metric"] == "choice"
    assert first["groups"] == {"difficulty": "easy", "length": "short"}
    assert first["answer"] == "The correct answer is (C)."
    prompt = first["prompt"]
    assert prompt.startswith("Please read the following text and answer the question below.\n\n<text>\n")
    question = "What is the correct answer to this question: Which color was the door of the mill?"
    assert question + "\nChoices:\n(A) red\n" in prompt
    assert prompt.endswith('Format your response as follows: "The correct answer is (insert answer here)".')
    assert first["num_tokens"] == len(TOK.encode(render_prompt(first, TOK))) + 1
    assert not first["metadata"]["truncated"]
    assert len(build_longbench_v2_records(LongBenchV2Config(path=str(SAMPLE), limit=2), TOK)) == 2


def test_truncate_middle():
    assert truncate_middle(list(range(10)), 20) == list(range(10))
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_middle(list(range(10)), 5) == [0, 1, 7, 8, 9]


@pytest.mark.parametrize("mode", ["context", "prompt"])
def test_truncation_keeps_first_and_last_halves(mode):
    item = load_longbench_v2(SAMPLE)[5]  # the longest
    full = format_prompt(item)
    limit = 900
    assert len(TOK.encode(full)) > limit
    record = build_longbench_v2_records(LongBenchV2Config(path=str(SAMPLE), max_length=limit, truncation=mode),
                                        TOK)[5]
    prompt = record["prompt"]
    assert record["metadata"]["truncated"] and record["metadata"]["original_tokens"] == len(TOK.encode(full))
    assert len(TOK.encode(prompt)) <= limit
    assert prompt.startswith(full[:100])
    if mode == "context":
        # The question and choices always survive; the cut is inside the context.
        assert prompt.endswith(full[-300:])
        assert "(D) owl" in prompt
    else:
        assert len(TOK.encode(prompt)) == limit
        assert prompt.endswith(full[-(limit - limit // 2):])


def test_extract_choice_official_and_lenient():
    assert extract_choice("The correct answer is (B)") == "B"
    assert extract_choice("**The correct answer is C**") == "C"
    assert extract_choice("Reasoning... The correct answer is (D).", "official") == "D"
    assert extract_choice("Answer: B", "official") is None
    lenient = {
        "Answer: B": "B",
        "the answer is (A).": "A",
        "B": "B",
        "(C) because the text says so": "C",
        "D. The smith kept it.": "D",
        "<think>Maybe (A)? no.</think>The correct answer is (B)": "B",
        "I pick option (C) over the others.": "C",
        "A good question; I cannot tell.": None,
        "It is stored in a B-tree.": None,
        "Either (A) or (B).": None,
        "<think>The correct answer is (A)": None,  # never finished thinking
        "": None,
    }
    for response, expected in lenient.items():
        assert extract_choice(response) == expected, response


def test_accuracy_table_matches_official_layout():
    samples = [
        {"score": 1.0, "groups": {"difficulty": "easy", "length": "short"}, "extracted": "A"},
        {"score": 0.0, "groups": {"difficulty": "hard", "length": "short"}, "extracted": None},
        {"score": 1.0, "groups": {"difficulty": "hard", "length": "long"}, "extracted": "B"},
        {"score": 0.0, "groups": {"difficulty": "hard", "length": "medium"}, "extracted": "C"},
    ]
    summary = summarize_longbench_v2(samples)
    assert summary["overall"] == 50.0
    assert summary["easy"] == 100.0 and summary["hard"] == pytest.approx(33.3)
    assert (summary["short"], summary["medium"], summary["long"]) == (50.0, 0.0, 100.0)
    assert summary["overall_compensated"] == pytest.approx(56.2)  # (1 + 0.25 + 1 + 0) / 4
    assert summary["unanswered"] == 1 and summary["counts"]["hard"] == 3
    assert summarize_longbench_v2(samples[:1])["hard"] is None


def test_evaluate_and_write_report(tmp_path):
    records = build_suite(SuiteConfig(name="longbench-v2", longbench_v2=LongBenchV2Config(path=str(SAMPLE))), TOK)
    # A "model" that answers the easy items correctly and the hard ones with an unreadable reply.
    by_prompt = {render_prompt(r, TOK): r for r in records}
    calls = []

    def generate(prompts, max_new_tokens):
        calls.append((len(prompts), max_new_tokens))
        out = []
        for p in prompts:
            r = by_prompt[p]
            easy = r["groups"]["difficulty"] == "easy"
            out.append(f"The correct answer is ({r['references'][0]})" if easy else "I am not sure.")
        return out

    results = evaluate(records, generate, tokenizer=TOK, batch_size=4, pass_max_new_tokens=True)
    assert calls == [(4, 128), (2, 128)]
    summary = results.summary["longbench_v2"]
    assert (summary["overall"], summary["easy"], summary["hard"]) == (50.0, 100.0, 0.0)
    assert summary["unanswered"] == 3
    assert [s.extracted for s in results.samples] == ["C", None, "D", None, "C", None]

    paths = write_report(results, tmp_path / "out", log_dir=tmp_path / "tb", step=3, extra={"model": "test"})
    markdown = paths["markdown"].read_text()
    assert "| Overall | Easy | Hard | Short | Medium | Long |" in markdown
    assert "| 50.0 | 100.0 | 0.0 | 50.0 | 50.0 | 50.0 |" in markdown
    data = json.loads(paths["json"].read_text())
    assert data["run"] == {"model": "test"} and data["summary"]["longbench_v2"]["overall"] == 50.0
    assert len(data["samples"]) == 6 and data["samples"][0]["prediction"].startswith("The correct")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert scalars(results)["eval/longbench_v2/easy"] == 100.0


def test_evaluate_checks_generate_fn_output():
    records = build_longbench_v2_records(LongBenchV2Config(path=str(SAMPLE), limit=2), TOK)
    with pytest.raises(ValueError, match="generate_fn returned 1 outputs for 2 prompts"):
        evaluate(records, lambda prompts: ["x"], tokenizer=TOK)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        evaluate(records, lambda prompts: ["x"] * len(prompts))
    results = evaluate(records, lambda prompts: ["B"] * len(prompts), prompt=PromptConfig(chat="none"))
    assert results.summary["longbench_v2"]["counts"]["overall"] == 2


def test_mixed_suites_in_one_report(tmp_path):
    from megatron_longact.tasks.ruler import RulerConfig, generate_ruler

    cfg = RulerConfig(tasks=["niah_single_1"], lengths=[256], num_samples=2, template="compact")
    ruler = generate_ruler(cfg, TOK)
    lb = build_longbench_v2_records(LongBenchV2Config(path=str(SAMPLE), limit=2), TOK)
    results = evaluate(ruler + lb, lambda prompts: ["The correct answer is (C)"] * len(prompts), tokenizer=TOK)
    text = format_markdown(results)
    assert "## RULER" in text and "| niah_single_1 | 0.0 |" in text and "## LongBench v2" in text
    tags = scalars(results)
    assert tags["eval/ruler/niah_single_1/256"] == 0.0 and tags["eval/longbench_v2/overall"] == 50.0


def _write_items(path, items):
    path.write_text(json.dumps(items))
    return path


def test_bad_files_name_file_item_and_field(tmp_path):
    items = load_longbench_v2(SAMPLE)
    missing = dict(items[1])
    del missing["context"]
    path = _write_items(tmp_path / "data.json", [items[0], missing])
    where = r"data.json: item 1 \(_id TEST-SAMPLE-0002\)"
    with pytest.raises(RecordError, match=where + ": record has no field 'context'"):
        load_longbench_v2(path)
    _write_items(path, [dict(items[0], difficulty="medium")])
    allowed = r"expected one of \['easy', 'hard'\]"
    with pytest.raises(RecordError, match=r"item 0 .*field 'difficulty' is 'medium', " + allowed):
        load_longbench_v2(path)
    _write_items(path, [dict(items[0], answer="E")])
    with pytest.raises(RecordError, match="field 'answer' is 'E'"):
        load_longbench_v2(path)
    _write_items(path, {"not": "a list"})
    with pytest.raises(RecordError, match="expected a JSON list"):
        load_longbench_v2(path)
    path.write_text("[{")
    with pytest.raises(RecordError, match="data.json:1: not valid JSON"):
        load_longbench_v2(path)
    jsonl = tmp_path / "data.jsonl"
    write_jsonl(jsonl, items[:2])
    assert len(load_longbench_v2(jsonl)) == 2
    jsonl.write_text(jsonl.read_text() + "{broken\n")
    with pytest.raises(RecordError, match="data.jsonl:3: not valid JSON"):
        load_longbench_v2(jsonl)
    with pytest.raises(FileNotFoundError, match="official data.json"):
        load_longbench_v2(tmp_path / "nope.json")


def test_config_errors():
    with pytest.raises(ConfigError, match="longbench_v2.truncation"):
        LongBenchV2Config(truncation="middle")
    with pytest.raises(ConfigError, match="longbench_v2.path: required"):
        build_longbench_v2_records(LongBenchV2Config(), TOK)
    with pytest.raises(ConfigError, match="suite.longbench_v2.path: required"):
        SuiteConfig(name="longbench-v2")
    allowed = r"expected one of \['longbench-v2', 'ruler'\]"
    with pytest.raises(ConfigError, match=r"suite.name: got 'babilong', " + allowed):
        SuiteConfig(name="babilong")
