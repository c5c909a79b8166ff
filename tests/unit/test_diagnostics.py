"""The likelihood-displacement alarm: raised after `patience` negative steps in a row."""

import logging

import pytest

from services.driver.diagnostics import LikelihoodDisplacementMonitor


def test_alarm_after_patience_negative_steps(caplog):
    monitor = LikelihoodDisplacementMonitor(patience=3)
    deltas = [-0.1, -0.2, 0.05, -0.1, -0.1, -0.3, -0.2, 0.1]
    with caplog.at_level(logging.WARNING, logger="flywheel.diagnostics"):
        records = [monitor.update(step, d) for step, d in enumerate(deltas, start=1)]
    assert [r["dpo/displacement_streak"] for r in records] == [1, 2, 0, 1, 2, 3, 4, 0]
    assert [r["dpo/displacement_alarm"] for r in records] == [0, 0, 0, 0, 0, 1, 1, 0]
    assert [r["dpo/chosen_logp_delta"] for r in records] == deltas
    warnings = [r for r in caplog.records if "likelihood displacement" in r.getMessage()]
    assert len(warnings) == 1 and "step 6" in warnings[0].getMessage()  # once per streak


def test_patience_must_be_positive():
    with pytest.raises(ValueError):
        LikelihoodDisplacementMonitor(0)
