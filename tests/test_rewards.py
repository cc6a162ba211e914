"""Verifiable rewards: metrics, conventions, pluggable score functions and their errors."""

import pytest

from megatron_longact.config import ConfigError
from megatron_longact.tasks.rewards import (
    Reward,
    RewardConfig,
    compute_rewards,
    contained_match,
    exact_match,
    load_function,
    normalize_answer,
    task_score,
)

ALL = {"id": "r/1", "metric": "all", "references": ["1234567", "7654321"]}
PART = {"id": "r/2", "metric": "part", "references": ["the Tamsey", "Tamsey river"]}
EXACT = {"id": "r/3", "metric": "exact", "references": ["The Copper Bell"]}
CHOICE = {"id": "r/4", "metric": "choice", "references": ["B"], "metadata": {"answer_extraction": "lenient"}}


def always_half(response, record):
    return 0.5


def out_of_range(response, record):
    return 3.0


NOT_CALLABLE = 42


def test_task_score_by_metric():
    assert task_score("1234567 and 7654321", ALL) == 1.0
    assert task_score("only 7654321", ALL) == 0.5
    assert task_score("It flows past: the tamsey.", PART) == 1.0
    assert task_score("the Thames", PART) == 0.0
    assert task_score("  a copper bell! ", EXACT) == 1.0
    assert task_score("a copper bell, I think", EXACT) == 0.0
    assert task_score("The correct answer is (B)", CHOICE) == 1.0
    assert task_score("The correct answer is (C)", CHOICE) == 0.0
    with pytest.raises(ValueError, match="record r/9: metric 'bleu' is not one of"):
        task_score("x", {"id": "r/9", "metric": "bleu", "references": ["x"]})


def test_thinking_is_not_rewarded():
    assert contained_match("<think>maybe 1234567 or 7654321</think>I do not know", ALL) == 0.0
    assert contained_match("<think>hmm</think> 1234567, 7654321", ALL) == 1.0
    assert contained_match("<think>1234567 7654321 and I ran out of tokens", ALL) == 0.0
    assert exact_match("<think>x</think>The copper bell.", EXACT) == 1.0


def test_normalize_answer():
    assert normalize_answer("The  Copper, Bell!") == "copper bell"


def test_conventions_and_all_or_nothing():
    responses = ["1234567 7654321", "1234567", "none"]
    records = [ALL] * 3
    assert compute_rewards(responses, records) == [1.0, 0.5, 0.0]
    assert compute_rewards(responses, records, RewardConfig(convention="plus_minus_one")) == [1.0, 0.0, -1.0]
    strict = RewardConfig(convention="plus_minus_one", all_or_nothing=True)
    assert compute_rewards(responses, records, strict) == [1.0, -1.0, -1.0]
    assert compute_rewards(responses, records, RewardConfig(all_or_nothing=True)) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="got 2 responses for 3 records"):
        compute_rewards(responses[:2], records)


def test_pluggable_score_function():
    reward = Reward(RewardConfig(function=f"{__name__}:always_half", convention="plus_minus_one"))
    assert reward("anything", ALL) == 0.0
    assert reward.score("anything", ALL) == 0.5
    assert load_function("megatron_longact.tasks.rewards:task_score") is task_score
    bad = Reward.__new__(Reward)
    bad.cfg = RewardConfig()
    bad.score_fn = out_of_range
    with pytest.raises(ValueError, match=r"returned 3.0 for record r/1; expected a number in \[0, 1\]"):
        bad("x", ALL)


def test_bad_import_paths():
    with pytest.raises(ConfigError, match="expected an import path 'module:function'"):
        RewardConfig(function="megatron_longact.tasks.rewards.task_score")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        RewardConfig(function="no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        RewardConfig(function="megatron_longact.tasks.rewards:nope")
    with pytest.raises(ConfigError, match="is not callable \\(its type is int\\)"):
        RewardConfig(function=f"{__name__}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="reward.convention"):
        RewardConfig(convention="signed")


def test_prefix_match_gives_partial_credit():
    from megatron_longact.tasks.rewards import prefix_match

    record = {"references": ["677"], "metric": "all"}
    assert prefix_match(" 677", record) == 1.0
    assert prefix_match("670", record) == pytest.approx(2 / 3)
    assert prefix_match("7", record) == 0.0
    assert prefix_match("", record) == 0.0
    assert prefix_match("4", {"references": ["12", "45"]}) == 0.5
