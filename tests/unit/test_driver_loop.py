"""The driver's loop on in-process fakes of its services (tests/fakes.py): the metrics
contract, syncs and policy versions, each prompt once per epoch, the streaming staleness
bound, stale samples dropped and never trained on, the train-inference gap monitor catching
an engine that ignores syncs, and checkpoint/resume repeating the same steps. No Ray, vLLM or
DeepSpeed: the real-stack runs of these paths are the e2e tests."""

from __future__ import annotations

import logging
import math
import signal

import pytest

from services.core import toy_world
from services.core.config_loading import load_config
from services.core.errors import RunStopped
from services.core.metrics import read_metrics
from services.driver.checkpoint import CheckpointStore
from services.driver.driver import Driver
from services.driver.prompt_data import toy_eval_rows
from services.rpc.trajectory_io import read_trajectories
from tests.fakes import FakeLearner, FakeRollout, fake_policy_dir, fake_services, token_logprob

REQUIRED = [
    "step", "policy_version", "reward/mean", "reward/std", "gold/mean", "train/kl", "train/loss",
    "rollout/response_length_mean", "timing/step_s", "timing/rollout_s", "timing/train_s", "timing/sync_s",
    "timing/reward_s", "timing/reference_s", "perf/generated_tokens_per_s", "perf/train_tokens_per_s",
    "perf/share/rollout", "perf/share/scoring", "perf/share/reference", "perf/share/training", "perf/share/sync",
    "perf/share/driver",
]


def run(tmp_path, *overrides, out="run", make=None, stop_after=None, resume=None, held_out=False):
    """``held_out``: evaluate on the toy world's held-out prompts (4 of them)."""
    policy = fake_policy_dir(tmp_path / "policy")
    cfg = load_config("grpo-toy", [f"model.path={policy}", "rollout.prompts_per_step=4", "data.toy_size=8",
                                   "rollout.n_samples=2", *overrides])
    driver = Driver(cfg, tmp_path / out, policy, eval_prompts=toy_eval_rows(cfg)[:4] if held_out else None)
    make = make or fake_services()
    driver.build(make)
    try:
        records = driver.run(progress=False, stop_after=stop_after, resume=resume)
    finally:
        driver.shutdown()
    return records, make.made


def ledger(out) -> dict[int, list[tuple]]:
    """Every trained-on trajectory (``metrics.dump_rollouts``) by step: prompt, sample, tokens, version."""
    steps: dict[int, list[tuple]] = {}
    for r in read_trajectories(out / "rollouts.pb"):
        t = r.trajectory
        steps.setdefault(r.step, []).append((t.prompt_id, t.sample_index, tuple(t.response_ids), t.policy_version))
    return steps


GAP = ["rollout/logprob_gap_max", "rollout/logprob_gap_mean", "rollout/logprob_gap_ratio_outside"]


def test_on_policy_loop_metrics_versions_and_prompts(tmp_path):
    records, made = run(tmp_path, "algorithm.total_steps=4", "rollout.logprob_gap_every=3")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["policy_version"] for r in records] == [1, 2, 3, 4]
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in logged] == records  # plus a wall-clock time
    for record in records:
        for key in REQUIRED:
            assert key in record and math.isfinite(record[key]), key
        on_path = sum(record[f"timing/{k}_s"] for k in ("rollout", "score", "train", "sync"))
        assert on_path <= record["timing/step_s"]
        assert record["perf/share/driver"] == pytest.approx(1 - on_path / record["timing/step_s"])
        assert record["timing/reward_s"] <= record["timing/score_s"] and record["timing/reference_s"] <= record["timing/score_s"]
    # one optimizer step per batch in fp32: the learner's forward for the old log-probs runs only where the
    # gap is measured (steps 1 and 4); the sampler's log-probs are the old ones elsewhere
    measured = [r for r in records if "rollout/logprob_gap_max" in r]
    assert [r["step"] for r in measured] == [1, 4] and made.learner.logprob_calls == 2
    assert all(set(GAP) <= set(r) and r["rollout/logprob_gap_max"] < 1e-6 for r in measured)  # held the version
    assert made.rollout.synced == [1, 2, 3]  # before steps 2, 3 and 4
    for version, (trained_from, batch) in enumerate(made.learner.trained):
        assert trained_from == version and batch.size == 8  # 4 prompts x 2 samples
        assert {t.policy_version for t in made.rollout.generated[version]} == {version}
    # 8 prompts, 4 per step: every prompt once in steps 1-2 and again once in steps 3-4
    ids = [sorted({t.prompt_id for t in batch}) for batch in made.rollout.generated]
    assert sorted(ids[0] + ids[1]) == sorted(ids[2] + ids[3]) and len(set(ids[0] + ids[1])) == 8
    assert (tmp_path / "run" / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    assert all(service.shut_down for service in made.started)


def test_streaming_never_trains_on_trajectories_staler_than_allowed(tmp_path):
    records, made = run(tmp_path, "algorithm.total_steps=6", "algorithm.max_staleness=1", "rollout.logprob_gap_every=2")
    staleness = [r["rollout/staleness_max"] for r in records]
    assert max(staleness) <= 1
    assert staleness.count(1) >= 4  # the next batch really was sampled while the learner trained
    assert [r["step"] for r in records if "rollout/logprob_gap_max" in r] == [1, 3, 5]  # the probe's steps
    assert all(r["rollout/logprob_gap_max"] < 1e-6 for r in records if "rollout/logprob_gap_max" in r)
    assert [r["policy_version"] for r in records] == list(range(1, 7))


def test_max_staleness_4_trains_each_batch_four_versions_after_the_weights_that_sampled_it(tmp_path):
    records, made = run(tmp_path, "algorithm.total_steps=10", "algorithm.max_staleness=4", "rollout.logprob_gap_every=3",
                        "metrics.dump_rollouts=true")
    assert [r["policy_version"] for r in records] == list(range(1, 11))
    # the batch for step s was sampled by version max(0, s - 5), so trained on 0, 1, 2, 3, then 4 versions late
    assert [{t.policy_version for t in batch} for batch in made.rollout.generated] == [{max(0, s - 5)} for s in range(1, 11)]
    assert [r["rollout/staleness_max"] for r in records] == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4]
    assert [r["rollout/staleness_mean"] for r in records] == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4]
    assert [version for version, _ in made.learner.trained] == list(range(10))
    assert made.rollout.synced == [1, 2, 3, 4, 5]  # before sampling the batches of steps 6 .. 10
    # the ledger: 8 prompts, 4 per step, every prompt once in each pair of steps, in the order drawn
    trained = ledger(tmp_path / "run")
    assert sorted(trained) == list(range(1, 11))
    ids = [sorted(p for p, k, _, _ in trained[step] if k == 0) for step in range(1, 11)]
    for first, second in zip(ids[::2], ids[1::2]):
        assert sorted(first + second) == sorted(set(first + second)) and len(first + second) == 8
    assert [{v for *_, v in trained[s]} for s in range(1, 11)] == [{max(0, s - 5)} for s in range(1, 11)]
    # the gap probe waits for the batch queued at the step, sampled by the learner's version then: steps 1
    # and 4 (7 and 10 queue none, as the run ends at 10)
    assert [r["step"] for r in records if "rollout/logprob_gap_max" in r] == [1, 4]
    assert all(r["rollout/logprob_gap_max"] < 1e-6 for r in records if "rollout/logprob_gap_max" in r)
    assert all(r["perf/share/driver"] >= 0 and "timing/rollout_wait_s" in r for r in records)


def test_streaming_with_tis_cap_takes_the_ratio_against_the_learner_and_weights_by_the_sampler(tmp_path):
    records, made = run(tmp_path, "algorithm.total_steps=6", "algorithm.max_staleness=2", "algorithm.tis_cap=2",
                        "rollout.logprob_gap_every=0")
    assert made.learner.logprob_calls == 6  # the learner's forward for the old log-probs on every step
    for step, (version, batch) in enumerate(made.learner.trained, start=1):
        sampled = max(0, step - 3)
        mask = batch.tokens.response_mask.bool()
        ids = batch.tokens.input_ids[mask]
        expected_old = -0.1 * (1 + ids % 5).float() - 0.01 * version  # the fake learner's log-probs now
        assert batch.old_logprobs[mask].tolist() == pytest.approx(expected_old.tolist())
        assert batch.sampler_logprobs[mask].tolist() == pytest.approx([token_logprob(int(t), sampled) for t in ids])
    assert [r["rollout/staleness_max"] for r in records] == [0, 1, 2, 2, 2, 2]
    # the learner's log-probs of a batch sampled by an older version are no train-inference gap: none is logged
    assert not any("rollout/logprob_gap_max" in r for r in records)


def test_stale_samples_are_dropped_and_never_trained_on(tmp_path):
    records, made = run(tmp_path, "algorithm.total_steps=3", make=fake_services(stale_groups=1))
    assert [r["rollout/dropped_stale"] for r in records] == [0, 2, 2]  # one group of 2 labelled v-1 from step 2
    assert [batch.size for _, batch in made.learner.trained] == [8, 6, 6]


class FrozenEngine(FakeRollout):
    """Labels its samples with the synced version but keeps sampling with version 0's
    weights: the defect the sync-invariant tests exist for."""

    def generate_with_stats(self, prompts):
        trajectories, stats = super().generate_with_stats(prompts)
        for t in trajectories:
            t.logprobs = [token_logprob(token, 0) for token in t.response_ids]
        return trajectories, stats


def test_the_gap_monitor_catches_an_engine_that_ignores_syncs(tmp_path, caplog):
    def make(cfg, policy_dir, needs_critic, optimizer_steps):
        services = fake_services()(cfg, policy_dir, needs_critic, optimizer_steps)
        services.rollout = FrozenEngine(cfg.rollout.n_samples)
        services.started[-1] = services.rollout
        make.made = services
        return services

    with caplog.at_level(logging.WARNING):
        records, _ = run(tmp_path, "algorithm.total_steps=3", "rollout.logprob_gap_every=1", make=make)
    gaps = [r["rollout/logprob_gap_max"] for r in records]
    assert gaps[0] < 1e-6 and gaps[1] == pytest.approx(0.01, abs=1e-6) and gaps[2] == pytest.approx(0.02, abs=1e-6)
    assert [r["rollout/logprob_gap_alarm"] for r in records] == [0.0, 1.0, 1.0]
    assert sum("log-prob" in m or "logprob" in m for m in caplog.messages) == 1  # once per streak


@pytest.mark.parametrize("staleness", [0, 1, 4], ids=["on-policy", "streaming", "staleness-4"])
def test_stopped_and_resumed_run_repeats_the_same_steps(staleness, tmp_path):
    overrides = ["algorithm.total_steps=8", f"algorithm.max_staleness={staleness}", "checkpoint.keep_last=1",
                 "metrics.dump_rollouts=true"]
    whole, whole_made = run(tmp_path, *overrides, out="whole")
    first, _ = run(tmp_path, *overrides, out="split", stop_after=3)
    assert [r["step"] for r in first] == [1, 2, 3]
    with (tmp_path / "split" / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "reward/me')  # as if a crash had cut the next record short
    checkpoint = CheckpointStore(tmp_path / "split" / "checkpoints").latest()
    second, second_made = run(tmp_path, *overrides, out="split", resume=checkpoint)
    assert [r["step"] for r in second] == [4, 5, 6, 7, 8]
    assert [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")] == list(range(1, 9))
    for a, b in zip(whole[3:], second):
        assert set(a) == set(b)
        for key in a:
            if not key.startswith(("timing/", "perf/")):  # wall-clock figures
                assert b[key] == a[key], (a["step"], key)
    # the resumed run sampled exactly the batches the whole run sampled for steps 4-6
    def samples(batches):
        return [[(t.prompt_id, t.sample_index, t.response_ids, t.policy_version) for t in batch] for batch in batches]

    # the batches for steps 4 .. 3 + staleness came from the checkpoint, not from the engine
    assert samples(second_made.rollout.generated) == samples(whole_made.rollout.generated[3 + staleness:])
    assert ledger(tmp_path / "split") == ledger(tmp_path / "whole")  # nothing in flight lost or trained twice


@pytest.mark.parametrize("staleness", [0, 1, 4], ids=["on-policy", "streaming", "staleness-4"])
def test_held_out_evaluation_runs_on_the_latest_weights_and_changes_no_training(tmp_path, staleness):
    common = ["algorithm.total_steps=5", f"algorithm.max_staleness={staleness}", "eval.n_samples=3"]
    records, made = run(tmp_path, *common, "algorithm.eval_every=2", out="eval", held_out=True)
    plain, plain_made = run(tmp_path, *common, out="plain")
    evaluated = [r["step"] for r in records if "eval/reward_mean" in r]
    assert evaluated == [2, 4, 5]  # every 2 steps and after the last
    logged = read_metrics(tmp_path / "eval" / "metrics.jsonl")
    baseline = logged[0]  # and before the first step, as step 0
    assert baseline["step"] == 0 and baseline["policy_version"] == 0 and "eval/gold_mean" in baseline
    assert [r["step"] for r in logged[1:]] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert len(made.rollout.evaluated) == 4
    for record, samples in zip([baseline] + [r for r in records if r["step"] in evaluated], made.rollout.evaluated):
        assert len(samples) == 4 * 3  # 4 held-out prompts x eval.n_samples
        assert {t.policy_version for t in samples} == {record["policy_version"]}  # the learner's latest weights
        gold = toy_world.gold_reward([t.prompt for t in samples], [t.response for t in samples])
        assert record["eval/gold_mean"] == pytest.approx(sum(gold) / len(gold))
        assert record["eval/member/gold"] == pytest.approx(record["eval/gold_mean"])  # the fake's gold member
        assert record["eval/prompts"] == 4 and math.isfinite(record["eval/reward_mean"])
    first = [(t.prompt_id, t.response) for t in made.rollout.evaluated[0]]
    assert all([(t.prompt_id, t.response) for t in later] == first for later in made.rollout.evaluated[1:])  # same seeds
    assert {t.prompt_id for t in made.rollout.evaluated[0]}.isdisjoint(
        {t.prompt_id for batch in made.rollout.generated for t in batch})  # held out: never trained on
    train_view = lambda m: [[(t.prompt_id, t.response, t.policy_version) for t in b] for b in m.rollout.generated]  # noqa: E731
    assert train_view(made) == train_view(plain_made)  # the same batches as without evaluation
    assert [r["reward/mean"] for r in records] == [r["reward/mean"] for r in plain]


def learner_signalled_during_step(signals: list[int], at_step: int = 2) -> type:
    """A FakeLearner that gets ``signals``, one after the other, during train step ``at_step``
    (as if a user pressed Ctrl-C, or Ray stopped the job, while the learner trained)."""

    class Signalled(FakeLearner):
        def train_step(self, batch, spec):
            if self.policy_version + 1 == at_step:
                for signum in signals:
                    signal.raise_signal(signum)
            return super().train_step(batch, spec)

    return Signalled


@pytest.fixture
def ctrl_c_enabled():
    """SIGINT as in a terminal's foreground job (a shell's background job starts with it ignored,
    and the driver then leaves it so); the handlers as they were before the test."""
    before = {signum: signal.signal(signum, handler) for signum, handler in
              ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_first_ctrl_c_or_sigterm_ends_the_run_after_the_step_with_a_checkpoint(signum, tmp_path, capsys,
                                                                                 ctrl_c_enabled):
    with pytest.raises(RunStopped) as stopped:
        run(tmp_path, "algorithm.total_steps=5", make=fake_services(learner_class=learner_signalled_during_step([signum])))
    assert stopped.value.exit_code == 128 + signum  # 130 for Ctrl-C, as a shell reports it; 143 for SIGTERM
    assert f"stopped by {signal.Signals(signum).name} after step 2" in str(stopped.value) and "--resume" in str(stopped.value)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert CheckpointStore(tmp_path / "run" / "checkpoints").latest().name == "step-000002"
    assert "stopping after this step, with a checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, ctrl_c_enabled):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "algorithm.total_steps=5",
            make=fake_services(learner_class=learner_signalled_during_step([signal.SIGINT, signal.SIGINT])))
    assert CheckpointStore(tmp_path / "run" / "checkpoints").latest() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_started_with_ctrl_c_ignored_leaves_it_ignored(tmp_path, ctrl_c_enabled):
    """`flywheel train ... &` from a script: the shell starts it with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    records, _ = run(tmp_path, "algorithm.total_steps=3",
                     make=fake_services(learner_class=learner_signalled_during_step([signal.SIGINT])))
    assert [r["step"] for r in records] == [1, 2, 3]  # not stopped
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
