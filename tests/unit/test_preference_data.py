"""Toy preference labels, splits and bootstrap resamples; bad preference files exit 2."""

import math

import pytest

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.core.toy_world import gold_reward
from services.reward.preference_data import (
    bootstrap_sample,
    bt_preference_probability,
    label_noise_rate,
    label_pairs,
    split_pairs,
    user_preference_pairs,
)


def test_bt_probability():
    assert bt_preference_probability(1.0, 0.0, 2.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert bt_preference_probability(0.3, 0.3, 5.0) == 0.5


def test_label_pairs_drops_ties_and_flips_at_the_bradley_terry_rate():
    prompt = "list 4 colors:"
    # gold: "red blue green yellow" = 1.0, "red" = 0.25, "blue" = 0.25 (a tie)
    good, bad, tie = " red blue green yellow", " red", " blue"
    assert gold_reward([prompt] * 3, [good, bad, tie]) == [1.0, 0.25, 0.25]
    n, beta = 4000, 2.0
    pairs = label_pairs([prompt] * (n + 2), [good] * n + [bad, good], [bad] * n + [tie, good], beta, seed=0)
    assert len(pairs) == n  # the tie and the identical pair are gone
    wrong = label_noise_rate(pairs)
    expected = 1 - bt_preference_probability(1.0, 0.25, beta)  # 0.182
    assert abs(wrong - expected) < 0.02
    for p in pairs:
        assert gold_reward([prompt], [p["chosen"]])[0] == p["gold_chosen"]
        assert gold_reward([prompt], [p["rejected"]])[0] == p["gold_rejected"]


def test_split_and_bootstrap():
    pairs = [{"i": i} for i in range(100)]
    train, heldout = split_pairs(pairs, 0.1, seed=3)
    assert len(train) == 90 and len(heldout) == 10
    assert sorted(p["i"] for p in train + heldout) == list(range(100))
    assert split_pairs(pairs, 0.1, seed=3) == (train, heldout)
    sample = bootstrap_sample(1000, seed=1)
    assert len(sample) == 1000 and all(0 <= i < 1000 for i in sample)
    assert sample == bootstrap_sample(1000, seed=1) != bootstrap_sample(1000, seed=2)
    # a bootstrap resample keeps about 1 - 1/e of the distinct items
    assert abs(len(set(sample)) / 1000 - (1 - math.exp(-1))) < 0.05
    assert label_noise_rate(pairs) is None


def _cfg(source):
    return FlywheelConfig.model_validate({"data": {"source": str(source)}})


def test_user_pairs_missing_key_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl:2: missing key 'rejected' \(set by data.rejected_key"):
        user_preference_pairs(_cfg(path))


def test_user_pairs_identical_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "same", "rejected": "same "}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl:3: 'chosen' and 'rejected' are identical"):
        user_preference_pairs(_cfg(path))


def test_user_pairs_parquet_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "y"]}), path)
    with pytest.raises(UserError, match=r"pairs.parquet: row 1: 'chosen' and 'rejected' are identical"):
        user_preference_pairs(_cfg(path))


def test_user_pairs_custom_keys(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"q": "a", "good": "b", "bad": "c"}\n')
    cfg = FlywheelConfig.model_validate(
        {"data": {"source": str(path), "prompt_key": "q", "chosen_key": "good", "rejected_key": "bad"}}
    )
    row = user_preference_pairs(cfg)[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("a", "b", "c")


def test_bt_probability_does_not_overflow_for_large_beta():
    assert bt_preference_probability(0.0, 1.0, 1e4) == 0.0
    assert bt_preference_probability(1.0, 0.0, 1e4) == 1.0
