"""The demo's gold-reward summary: first/last window means and the best trailing mean."""

import pytest

from services.demo import gold_gain, gold_peak


def test_gold_gain_and_peak_by_hand():
    golds = [0.1, 0.3, 0.5, 0.7, 0.2, 0.0]
    records = [{"step": i + 1, "gold/mean": g} for i, g in enumerate(golds)] + [{"step": 7}]  # a step without gold
    assert gold_gain(records, window=2) == (pytest.approx(0.2), pytest.approx(0.1))
    # trailing 2-step means: 0.1, 0.2, 0.4, 0.6, 0.45, 0.1 -> best 0.6, ending at step 4
    peak, step = gold_peak(records, window=2)
    assert peak == pytest.approx(0.6) and step == 4
