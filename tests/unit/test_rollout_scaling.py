"""The elastic rollout pool's control: `flywheel scale` requests, the autoscaler's rule on a
step's figures (numbers worked by hand), and ``RolloutScaler`` applying both to a pool
(tests/fakes.py's, whose new workers join at once); the driver loop applying a request
written mid-run. The real pool's resize is tests/integration/test_rollout_pool.py; a run
scaled 1 -> 2 -> 1 on a multi-node cluster is tests/e2e/test_multinode.py."""

from __future__ import annotations

import json
import time

import pytest

from services.cli import main
from services.core.config import RolloutAutoscale
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.driver.rollout_scaling import (
    SCALE_REQUEST, RolloutScaler, autoscale_target, parse_scale_args, read_scale_request, write_scale_request,
)
from services.driver.driver import Driver
from tests.fakes import FakeLearner, FakeRollout, fake_policy_dir, fake_services

def run_driver(tmp_path, make, *overrides: str) -> list[dict]:
    """A toy GRPO run of the driver on ``make``'s in-process fakes, into tmp_path/run."""
    policy = fake_policy_dir(tmp_path / "policy")
    cfg = load_config("grpo-toy", [f"model.path={policy}", "rollout.prompts_per_step=4", "data.toy_size=8",
                                   "rollout.n_samples=2", *overrides])
    driver = Driver(cfg, tmp_path / "run", policy)
    driver.build(make)
    try:
        return driver.run(progress=False)
    finally:
        driver.shutdown()


AUTO = RolloutAutoscale(min_workers=1, max_workers=3, scale_up_share=0.5, scale_down_share=0.2, cooldown_steps=2)


@pytest.mark.parametrize("record, streaming, workers, want", [
    # on-policy: the rollout's share of the step decides both ways
    ({"timing/step_s": 10.0, "timing/rollout_s": 6.0}, False, 1, 2),   # 0.6 >= 0.5: add one
    ({"timing/step_s": 10.0, "timing/rollout_s": 6.0}, False, 3, 3),   # at max_workers
    ({"timing/step_s": 10.0, "timing/rollout_s": 3.0}, False, 2, 2),   # 0.3: in between, keep
    ({"timing/step_s": 10.0, "timing/rollout_s": 1.5}, False, 2, 1),   # 0.15 < 0.2: remove one
    ({"timing/step_s": 10.0, "timing/rollout_s": 1.5}, False, 1, 1),   # at min_workers
    # streaming: the wait for the next batch adds, the engines' busy share removes
    ({"timing/step_s": 10.0, "timing/rollout_s": 9.0, "timing/rollout_wait_s": 5.0}, True, 1, 2),
    ({"timing/step_s": 10.0, "timing/rollout_s": 9.0, "timing/rollout_wait_s": 0.2}, True, 2, 2),  # hidden: keep
    ({"timing/step_s": 10.0, "timing/rollout_s": 1.0, "timing/rollout_wait_s": 0.0}, True, 2, 1),  # idle engines
    ({"timing/step_s": 10.0, "timing/rollout_s": 0.0}, False, 2, 2),   # a resumed run's first batch: no figure
])
def test_autoscale_target(record, streaming, workers, want):
    assert autoscale_target(workers, record, streaming, AUTO) == want


def test_autoscale_settings_are_checked():
    with pytest.raises(ValueError, match="min_workers"):
        RolloutAutoscale(min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="scale_down_share"):
        RolloutAutoscale(max_workers=2, scale_up_share=0.3, scale_down_share=0.4)
    with pytest.raises(UserError, match=r"num_workers \(4\) is outside autoscale's min_workers..max_workers \(1..3\)"):
        load_config("grpo-toy", ["rollout.num_workers=4", "rollout.autoscale.max_workers=3"])


def test_scale_arguments_and_request_file(tmp_path):
    assert parse_scale_args(["rollout=3"]) == {"rollout": 3}
    for bad, says in (["rollout=0"], "at least 1"), (["rollout=two"], "whole number"), (["learner=2"], "one of rollout"):
        with pytest.raises(UserError, match=says):
            parse_scale_args(bad)
    with pytest.raises(UserError, match="no config.yaml"):
        write_scale_request(tmp_path, {"rollout": 2})
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert read_scale_request(tmp_path) is None
    first = json.loads(write_scale_request(tmp_path, {"rollout": 2}).read_text())
    second = read_scale_request(write_scale_request(tmp_path, {"rollout": 2}).parents[1])
    assert first["rollout"] == second["rollout"] == 2 and first["id"] != second["id"]  # each request is new
    (tmp_path / SCALE_REQUEST).write_text('{"rollout": "many"}')
    assert read_scale_request(tmp_path) is None  # not a request: left alone


def test_flywheel_scale_cli(tmp_path, capsys):
    assert main(["scale", str(tmp_path), "rollout=2"]) == 2  # not a run directory
    assert "no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["scale", str(tmp_path), "rollout=2"]) == 0
    assert read_scale_request(tmp_path)["rollout"] == 2
    assert main(["scale", str(tmp_path), "rollout=-1"]) == 2


def test_scaler_applies_each_request_once_and_autoscales_after_the_cooldown(tmp_path):
    cfg = load_config("grpo-toy", ["rollout.autoscale.max_workers=3", "rollout.autoscale.cooldown_steps=2"])
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    pool = FakeRollout(2)
    scaler = RolloutScaler(pool, cfg, tmp_path)
    busy = {"timing/step_s": 10.0, "timing/rollout_s": 8.0}  # rollout dominates: the autoscaler adds
    assert scaler.update(None) == {"rollout/workers_target": 1.0}  # no figures yet
    assert scaler.update(busy)["rollout/workers_target"] == 1.0  # cooldown: 1 quiet step of 2
    assert scaler.update(busy)["rollout/workers_target"] == 2.0
    assert scaler.update(busy)["rollout/workers_target"] == 2.0  # cooling down again
    write_scale_request(tmp_path, {"rollout": 1})  # the user's request wins over the autoscaler
    assert scaler.update(busy)["rollout/workers_target"] == 1.0
    assert scaler.update(busy)["rollout/workers_target"] == 1.0  # applied once; 1 step measured at 1 worker
    assert scaler.update(busy)["rollout/workers_target"] == 2.0  # 2 steps measured: the autoscaler again
    write_scale_request(tmp_path, {"rollout": 3})
    assert scaler.update(busy)["rollout/workers_target"] == 3.0
    assert pool.resized == [2, 1, 2, 3]
    # a resumed run (a new scaler) applies the latest request again: the size its user asked for
    again = FakeRollout(2)
    RolloutScaler(again, cfg, tmp_path).update(None)
    assert again.resized == [3]


def test_the_driver_applies_a_request_written_during_a_step(tmp_path):
    """Written while step 2 trains: steps 1-2 were generated by 1 worker, step 3 on by 3."""
    out = tmp_path / "run"

    class ScaledDuringStep2(FakeLearner):
        def train_step(self, batch, spec):
            if self.policy_version == 1:
                write_scale_request(out, {"rollout": 3})
            return super().train_step(batch, spec)

    make = fake_services(learner_class=ScaledDuringStep2)
    records = run_driver(tmp_path, make, "algorithm.total_steps=4")
    assert [r["rollout/workers"] for r in records] == [1, 1, 3, 3]
    assert [r["rollout/workers_target"] for r in records] == [1, 1, 3, 3]
    assert make.made.rollout.resized == [3]


def test_the_driver_autoscales_up_while_rollouts_dominate_and_down_while_engines_idle(tmp_path):
    """Rollouts that take 0.3 s (everything else here takes milliseconds) for the first 5
    batches, then none: with cooldown 1 the pool grows 1 -> 2 -> 3 (max_workers), then
    shrinks to 1 (min_workers) once the engines sit idle."""
    class SlowThenFast(FakeRollout):
        def generate_with_stats(self, prompts, sampling=None):
            if sampling is None and len(self.generated) < 5:
                time.sleep(0.3)
            return super().generate_with_stats(prompts, sampling)

    make = fake_services(rollout_class=SlowThenFast)
    records = run_driver(tmp_path, make, "algorithm.total_steps=10", "rollout.autoscale.max_workers=3",
                         "rollout.autoscale.cooldown_steps=1")
    # step k's rollout is decided on step k-1's figures; 1 step measured at each size before the next change
    assert [int(r["rollout/workers"]) for r in records] == [1, 2, 3, 3, 3, 3, 2, 1, 1, 1], records
    assert make.made.rollout.resized == [2, 3, 2, 1]
