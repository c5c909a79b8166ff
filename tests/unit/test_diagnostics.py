"""The likelihood-displacement alarm (raised after `patience` negative steps in a row) and the
train-inference log-prob gap alarm (warns once per streak above its threshold)."""

import logging

import pytest

from services.driver.diagnostics import LikelihoodDisplacementMonitor, LogprobGapMonitor, step_shares


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


def test_logprob_gap_alarm_warns_once_per_streak(caplog):
    import torch

    monitor = LogprobGapMonitor(alarm=1e-3)
    maxima = [2e-6, 0.13, 0.2, 5e-7, 0.05, 1e-6]
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    with caplog.at_level(logging.WARNING, logger="flywheel.diagnostics"):
        # per step the three response tokens differ by 0, -m, +m/2: max m, mean m/2
        records = [monitor.update(step, step - 1, torch.tensor([[9.0, -1.0, -1.0 - m, -1.0 + m / 2]], dtype=torch.float64),
                                  torch.full((1, 4), -1.0, dtype=torch.float64), mask)
                   for step, m in enumerate(maxima, start=1)]
    assert [r["rollout/logprob_gap_alarm"] for r in records] == [0, 1, 1, 0, 1, 0]
    assert [r["rollout/logprob_gap_max"] for r in records] == pytest.approx(maxima, rel=1e-5)
    assert records[1]["rollout/logprob_gap_mean"] == pytest.approx(0.13 / 2, rel=1e-5)
    warnings = [r.getMessage() for r in caplog.records if "train-inference mismatch" in r.getMessage()]
    assert len(warnings) == 2  # steps 2 and 5 start a streak
    assert "step 2" in warnings[0] and "policy version 1" in warnings[0] and "0.13" in warnings[0]
    with pytest.raises(ValueError):
        LogprobGapMonitor(0.0)


def test_step_shares_on_policy_and_streaming():
    record = {"timing/step_s": 10.0, "timing/rollout_s": 2.0, "timing/score_s": 3.0, "timing/reward_s": 1.0,
              "timing/reference_s": 2.5, "timing/train_s": 4.0, "timing/sync_s": 0.5}
    shares = step_shares(record, streaming=False)
    assert shares == pytest.approx({
        "perf/share/rollout": 0.2, "perf/share/scoring": 0.1, "perf/share/reference": 0.25,
        "perf/share/training": 0.4, "perf/share/sync": 0.05,
        "perf/share/driver": 0.05,  # 10 - (2 + 3 + 4 + 0.5) = 0.5 s outside the phases
    })
    # streaming: the rollout (and the sync before it) ran beside training on the rollout thread; only the
    # 0.25 s the step waited for it is on its path
    streamed = step_shares({**record, "timing/rollout_wait_s": 0.25}, streaming=True)
    assert streamed["perf/share/rollout"] == pytest.approx(0.2)
    assert streamed["perf/share/driver"] == pytest.approx((10 - 0.25 - 3 - 4) / 10)
    assert step_shares({"timing/step_s": 0.0}, streaming=False) == {}
