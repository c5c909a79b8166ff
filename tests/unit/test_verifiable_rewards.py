"""Verifiable reward kinds (services/reward/verifiable.py) on hand-made cases, member weights
in the aggregate, and pass@k against a hand computation (Chen et al. 2021)."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from services.core.config import ScorerConfig
from services.reward.aggregate import aggregate_scores
from services.reward.scorers import build_scorer
from services.reward.stats import mean_pass_at_k, pass_at_k
from services.reward.verifiable import math_verify_correct, normalize_answer, reference_text, regex_answer

MATH_CASES = [  # (completion, reference, extract, correct?)
    ("3 + 4 = 7\n#### 7", "7", "auto", True),
    ("So the total is 1,234 apples.", "1234", "auto", True),  # thousands separator
    ("#### 1,234", "1,234", "number", True),
    ("She owes -12 dollars, so -12", "-12", "number", True),  # a negative answer
    ("She owes 12 dollars", "-12", "number", False),
    ("half of it: \\boxed{\\frac{1}{2}}", "0.5", "auto", True),  # LaTeX fraction against a decimal
    ("half of it: 1/2", "\\frac{1}{2}", "number", True),
    ("we get \\boxed{3} and then 5", "3", "boxed", True),  # the boxed answer, not the last number
    ("we get 3 and then 5", "3", "boxed", False),  # nothing boxed
    ("we get 3 and then 5", "5", "number", True),  # the last number
    ("Tom has 2 + 3 = 5 pens.\n#### 5", "Tom has 2 + 3 = 5 pens.\n#### 5", "auto", True),  # a GSM8K reference
    ("the answer is 42", 42.0, "auto", True),  # a number that went through JSON (Struct)
    ("no answer here", "7", "auto", False),
]


@pytest.mark.parametrize("completion, reference, extract, correct", MATH_CASES)
def test_math_verify_cases(completion, reference, extract, correct):
    assert math_verify_correct(completion, reference, extract) is correct


def test_reference_and_normalisation_by_hand():
    assert reference_text(42.0) == "42" and reference_text(2.5) == "2.5"
    assert reference_text("5 - 2 = 3\n#### 3") == "3"
    assert normalize_answer("  The  Answer: 1,234. ") == "the answer: 1234"
    assert normalize_answer("$12") == "12" and normalize_answer("12,34") == "12,34"  # not a thousands separator
    assert regex_answer("a: 3, then a: 4", r"a: (\d+)") == "4" and regex_answer("x", r"\d") is None
    assert regex_answer("ANSWER 7", r"ANSWER \d") == "ANSWER 7"  # no group: the whole match


def score(kind: str, completions, answers, **fields):
    scorer = build_scorer(ScorerConfig(kind=kind, **fields), 0)
    return scorer.score(["q"] * len(completions), completions, {"answer": answers} if answers is not None else {})


def test_exact_match_regex_and_the_format_term():
    assert score("exact_match", [" Paris. ", "paris", "Lyon"], ["Paris"] * 3) == [1.0, 1.0, 0.0]
    assert score("exact_match", [" Paris. "], ["Paris"], normalize=False) == [0.0]
    assert score("regex", ["so x = -3", "x = 4", "none"], ["-3", "-3", "-3"], pattern=r"x = (-?\d+)") == [1.0, 0.0, 0.0]
    fmt = score("regex", ["<answer>4</answer>", "4"], None, pattern=r"<answer>.*</answer>", answer_key=None)
    assert fmt == [1.0, 0.0]  # no answer_key: a format reward
    with_term = score("math_verify", ["#### 7", "7", "#### 8"], ["7", "7", "7"], format_pattern=r"####", format_weight=0.25)
    assert with_term == [1.25, 1.0, 0.25]


def test_member_weights_scale_scores_before_the_aggregate():
    members, names = [[1.0, 0.0], [0.5, 0.5]], ["verifier", "rm"]
    mean = aggregate_scores(members, names, "mean", 1.0, weights=[2.0, 1.0])
    assert mean.scores == [1.25, 0.25] and mean.member_scores == members  # (2*1 + .5)/2, (0 + .5)/2
    assert aggregate_scores(members, names, "wco", 1.0, weights=[2.0, 1.0]).scores == [0.5, 0.0]
    uwo = aggregate_scores(members, names, "uwo", 1.0, weights=[2.0, 1.0]).scores
    assert uwo == pytest.approx([1.25 - math.sqrt(((2 - 1.25) ** 2 + (0.5 - 1.25) ** 2) / 1), 0.25 - math.sqrt(
        ((0 - 0.25) ** 2 + (0.5 - 0.25) ** 2) / 1)])


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c correct) that hold a correct one, by enumeration."""
    flags = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_by_hand_and_by_enumeration():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k)), (n, c, k)
    assert mean_pass_at_k([[True, False, False, False], [False] * 4], 2) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_soft_overlong_penalty_by_hand():
    from services.reward.aggregate import soft_overlong_penalty

    # max 32 tokens, buffer 8: free up to 24, then linear to -1 at 32
    assert [soft_overlong_penalty(n, 32, 8, 1.0) for n in (1, 24, 25, 28, 32)] == [0.0, 0.0, -0.125, -0.5, -1.0]
    assert soft_overlong_penalty(30, 32, 8, 0.5) == pytest.approx(-0.375)
    assert soft_overlong_penalty(40, 32, 8, 1.0) == -1.0 and soft_overlong_penalty(32, 32, 0, 1.0) == 0.0


def test_generation_controls_reach_the_sampling_spec_and_bad_ones_are_refused():
    from pydantic import ValidationError

    from services.core.config import FlywheelConfig
    from services.rollout.worker import SamplingSpec

    cfg = FlywheelConfig(rollout={"top_k": 5, "min_tokens": 2, "max_tokens": 16, "stop": ["\n\n", "####"]})
    spec = SamplingSpec.from_config(cfg, n=3, temperature=0.0)
    assert (spec.top_k, spec.min_tokens, spec.max_tokens, spec.stop, spec.n, spec.temperature) == (
        5, 2, 16, ("\n\n", "####"), 3, 0.0)
    with pytest.raises(ValidationError, match=r"min_tokens \(20\) is more than max_tokens \(16\)"):
        FlywheelConfig(rollout={"min_tokens": 20, "max_tokens": 16})
    with pytest.raises(ValidationError, match=r"reward.overlong_buffer \(16\) must be below rollout.max_tokens"):
        FlywheelConfig(rollout={"max_tokens": 16}, reward={"overlong_buffer": 16})
    with pytest.raises(ValidationError, match="format_weight"):
        ScorerConfig(kind="math_verify", format_weight=1.0)  # a format term of 1 would pass as a correct answer
