"""DAPO data side: soft overlong punishment, overlong filtering, dynamic sampling."""

import pytest
import torch

from megatron_longact.rl.dapo import (
    DynamicSampler,
    DynamicSamplingExhausted,
    dynamic_sample,
    informative_groups,
    overlong_filter,
    soft_overlong_punishment,
)


def test_soft_overlong_punishment_hand_values():
    # L_max = 20, L_cache = 4: no penalty up to 16 tokens, then (16 - |y|) / 4 down to -1 at 20, and
    # -1 beyond: 10 -> 0, 16 -> 0, 17 -> -0.25, 18 -> -0.5, 20 -> -1, 21 -> -1.
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(soft_overlong_punishment(lengths, max_len=20, cache_len=4), expected)
    torch.testing.assert_close(soft_overlong_punishment(lengths, 20, 4, penalty_factor=0.5), expected / 2)
    # The paper's setting: 16384 expected + 4096 cache = 20480; 18432 is half-way: -0.5.
    assert soft_overlong_punishment(torch.tensor([18432]), 20480, 4096).item() == -0.5


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_len=0, cache_len=4), "max_len"),
    (dict(max_len=20, cache_len=0), "cache_len"),
    (dict(max_len=20, cache_len=21), "cache_len"),
    (dict(max_len=20.5, cache_len=4), "max_len"),
    (dict(max_len=20, cache_len=4, penalty_factor=-1.0), "penalty_factor"),
])
def test_soft_overlong_punishment_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        soft_overlong_punishment(torch.tensor([10]), **kwargs)


def test_overlong_filter():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    truncated = torch.tensor([True, False, True])
    torch.testing.assert_close(overlong_filter(mask, truncated), torch.tensor([[0, 0, 0], [1, 1, 0], [0, 0, 0]]))
    assert overlong_filter(mask.bool(), truncated).dtype == torch.bool
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter(mask, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter(mask, torch.tensor([True, False]))


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="rewards: got shape"):
        informative_groups(torch.ones(3))


class ScriptedGenerator:
    """sample_fn returning prepared batches of named groups, one per call."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.calls = 0

    def __call__(self):
        names, rewards = self.batches[min(self.calls, len(self.batches) - 1)]
        self.calls += 1
        return names, torch.tensor(rewards)


MIXED, SOLVED, FAILED = [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]


def test_dynamic_sampling_fills_batch_and_discards_surplus():
    # Try 1 keeps b only (a solved, c failed); try 2 keeps d and e, which completes the 3 groups;
    # f is surplus. 6 generated, 2 dropped.
    gen = ScriptedGenerator([
        (["a", "b", "c"], [SOLVED, MIXED, FAILED]),
        (["d", "e", "f"], [MIXED, [1.0, 0.0], MIXED]),
    ])
    result = DynamicSampler(gen, num_groups=3, max_tries=5).sample()
    assert result.groups == ["b", "d", "e"]
    torch.testing.assert_close(result.rewards, torch.tensor([MIXED, MIXED, [1.0, 0.0]]))
    assert (result.num_tries, result.num_generated, result.num_dropped, result.num_surplus) == (2, 6, 2, 1)
    assert result.history == [1, 3] and not result.exhausted
    assert gen.calls == 2


def test_dynamic_sampling_cap_raises_with_counts():
    # Tries: (a, b) keeps none; (c, d) keeps c; the generator repeats its last batch, so try 3 keeps
    # c again: 2 of 4 groups, 6 generated, 4 dropped.
    gen = ScriptedGenerator([(["a", "b"], [SOLVED, FAILED]), (["c", "d"], [MIXED, SOLVED])])
    with pytest.raises(DynamicSamplingExhausted, match=r"2 of num_groups=4 groups after max_tries=3 calls "
                                                        r"of sample_fn \(6 groups generated, 4 dropped") as err:
        dynamic_sample(gen, num_groups=4, max_tries=3)
    assert err.value.result.groups == ["c", "c"] and err.value.result.exhausted
    assert gen.calls == 3


def test_dynamic_sampling_partial_and_empty():
    result = dynamic_sample(ScriptedGenerator([(["a"], [SOLVED])]), num_groups=2, max_tries=2,
                            allow_partial=True)
    assert result.exhausted and result.groups == [] and result.rewards.shape == (0, 2)


def test_dynamic_sampling_bad_inputs():
    with pytest.raises(ValueError, match="max_tries: got 0"):
        DynamicSampler(lambda: None, num_groups=2, max_tries=0)
    with pytest.raises(ValueError, match="num_groups: got 0"):
        DynamicSampler(lambda: None, num_groups=0, max_tries=1)
    with pytest.raises(ValueError, match="sample_fn: got int"):
        DynamicSampler(3, num_groups=1, max_tries=1)
    with pytest.raises(ValueError, match="sample_fn: try 1 returned list"):
        dynamic_sample(lambda: ["a"], num_groups=1, max_tries=1)
    with pytest.raises(ValueError, match=r"sample_fn: try 1 returned 2 groups and rewards \[3, 2\]"):
        dynamic_sample(lambda: (["a", "b"], torch.zeros(3, 2)), num_groups=1, max_tries=1)
    gen = ScriptedGenerator([(["a"], [SOLVED]), (["b"], [[0.0, 1.0, 1.0]])])
    with pytest.raises(ValueError, match="try 2 returned groups of 3 responses, expected 2"):
        dynamic_sample(gen, num_groups=1, max_tries=2)
