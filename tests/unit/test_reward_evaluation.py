"""Reward-model score statistics (services.reward.stats), checked against numbers worked out by hand."""

import math

import pytest

from services.reward.stats import (
    centered_member_std,
    gold_order_accuracy,
    mean_pairwise_correlation,
    order_disagreement,
    pairwise_accuracy,
    pearson,
    per_prompt_variance,
    quantile,
    variance_summary,
)


def test_pairwise_accuracy_counts_ties_as_half():
    # 1 > 0 right, 2 == 2 half, 3 < 4 wrong
    assert pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)


def test_gold_order_accuracy_ignores_wrong_labels():
    # pair 0: label agrees with gold and the scores too; pair 1: the label is wrong (gold
    # prefers 'rejected'), the scores side with gold -> right under gold, wrong under labels
    chosen, rejected = [1.0, 0.0], [0.0, 1.0]
    assert gold_order_accuracy(chosen, rejected, [1.0, 0.0], [0.0, 1.0]) == 1.0
    assert pairwise_accuracy(chosen, rejected) == 0.5


def test_order_disagreement():
    # pair 0: both members prefer chosen; pair 1: member 0 chosen, member 1 rejected
    assert order_disagreement([[1, 1], [1, 0]], [[0, 0], [0, 1]]) == 0.5


def test_pearson_and_mean_correlation():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    # pairs: (a,b)=1, (a,c)=-1, (b,c)=-1 -> -1/3
    assert mean_pairwise_correlation([[1, 2, 3], [2, 4, 6], [3, 2, 1]]) == pytest.approx(-1 / 3)
    assert mean_pairwise_correlation([[1, 2, 3]]) is None


def test_centered_member_std_removes_offsets():
    # centred: [-1, 1] and [0, 0]; std of (-1, 0) and of (1, 0) is sqrt(0.5)
    assert centered_member_std([[0, 2], [1, 1]]) == pytest.approx(math.sqrt(0.5))
    # a constant offset between members is no disagreement
    assert centered_member_std([[0, 1, 2], [10, 11, 12]]) == pytest.approx(0.0)
    assert centered_member_std([[1, 2]]) == 0.0


def test_per_prompt_variance_is_unbiased():
    # group (1, 3): mean 2, squares 1 + 1, / (n - 1) = 2; group (2, 2): 0
    assert per_prompt_variance([1, 3, 2, 2], 2) == [2.0, 0.0]
    with pytest.raises(ValueError):
        per_prompt_variance([1, 2, 3], 2)


def test_quantile_interpolates_linearly():
    assert quantile([4, 1, 3, 2], 0.25) == pytest.approx(1.75)
    assert quantile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert quantile([5], 0.9) == 5


def test_variance_summary_by_hand():
    summary = variance_summary([1, 3, 2, 2], 2, threshold=1.0)
    assert summary["mean"] == pytest.approx(1.0)
    assert summary["p50"] == pytest.approx(1.0)
    assert summary["p10"] == pytest.approx(0.2)
    assert summary["fraction_below_threshold"] == 0.5
    # all four scores: mean 2, unbiased variance (1 + 1 + 0 + 0) / 3; share = 1 / (2/3)
    assert summary["within_prompt_share"] == pytest.approx(1.5)
