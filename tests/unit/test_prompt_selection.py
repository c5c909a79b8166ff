"""Variance-based prompt selection: probabilities by hand, the floor, exploration first."""

import random
from collections import Counter

import pytest

from services.driver.prompt_selection import (
    VarianceSelectedPrompts,
    draw_without_replacement,
    selection_probabilities,
)
from services.reward.stats import variance_by_prompt


def test_probabilities_by_hand():
    # N = 4, floor 0.2: each gets 0.05 plus 0.8 * v / 10
    p = selection_probabilities({"a": 0.0, "b": 1.0, "c": 4.0, "d": 5.0}, floor=0.2)
    assert p == pytest.approx({"a": 0.05, "b": 0.13, "c": 0.37, "d": 0.45})
    assert sum(p.values()) == pytest.approx(1.0)


def test_floor_keeps_zero_variance_prompts_alive():
    p = selection_probabilities({"flat": 0.0, "busy": 2.0}, floor=0.1)
    assert p["flat"] == pytest.approx(0.05)  # floor / N
    assert selection_probabilities({"flat": 0.0, "busy": 2.0}, floor=0.0)["flat"] == 0.0
    # every estimate 0: uniform
    assert selection_probabilities({"a": 0.0, "b": 0.0}, floor=0.0) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError):
        selection_probabilities({"a": 1.0}, floor=1.5)


def test_draw_without_replacement_frequencies():
    rng = random.Random(0)
    probs = {"a": 0.7, "b": 0.2, "c": 0.1}
    firsts = Counter(draw_without_replacement(probs, 1, rng)[0] for _ in range(20000))
    assert firsts["a"] / 20000 == pytest.approx(0.7, abs=0.02)
    assert firsts["c"] / 20000 == pytest.approx(0.1, abs=0.01)
    pair = draw_without_replacement(probs, 3, rng)
    assert sorted(pair) == ["a", "b", "c"]


def _source(n=6, floor=0.1, seed=1):
    return VarianceSelectedPrompts([{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(n)], seed=seed, floor=floor)


def test_unseen_prompts_are_drawn_first():
    source = _source()
    first = [p.id for p in source.next_batch(4)]
    second = [p.id for p in source.next_batch(4)]
    assert len(set(first)) == 4
    assert set(second[:2]) == {f"p{i}" for i in range(6)} - set(first)  # the two never drawn, first


def test_selection_follows_observed_variance():
    source = _source(floor=0.1)
    source.next_batch(6)
    source.observe({"p0": 9.0, "p1": 0.0, "p2": 0.0, "p3": 0.0, "p4": 0.0, "p5": 1.0})
    counts = Counter(p.id for _ in range(3000) for p in source.next_batch(1))
    # p0: 0.1/6 + 0.9 * 0.9 = 0.8267; p1: 0.1/6 = 0.0167; p5: 0.0167 + 0.09 = 0.1067
    assert counts["p0"] / 3000 == pytest.approx(0.8267, abs=0.025)
    assert counts["p5"] / 3000 == pytest.approx(0.1067, abs=0.02)
    assert 0 < counts["p1"] / 3000 < 0.04


def test_state_round_trip_draws_the_same():
    # the weighted draw must not depend on set iteration order (string hashing, how the set
    # of drawn prompts was built): a resumed source draws what the original would have
    for seed in range(20):
        a = _source(seed=seed)
        a.next_batch(6)
        a.observe({"p0": 1.0, "p3": 2.0})
        b = _source(seed=seed)
        b.load_state_dict(a.state_dict())
        assert [p.id for p in a.next_batch(3)] == [p.id for p in b.next_batch(3)]
        a.observe({"p1": 0.5})
        b.observe({"p1": 0.5})
        assert [p.id for p in a.next_batch(4)] == [p.id for p in b.next_batch(4)]


def test_variance_by_prompt_groups_by_id():
    v = variance_by_prompt(["a", "b", "a", "b", "c"], [1.0, 2.0, 3.0, 2.0, 5.0])
    assert v == {"a": 2.0, "b": 0.0}  # c has one sample: no estimate
