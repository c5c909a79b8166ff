"""Partial rollouts (rollout.partial_tokens): responses cut at the piece's budget, carried and
continued under newer weights with their tokens' log-probs and versions; the staleness bound
counted from the first token; prompt groups trained on once each; exact resume. On the fakes
of tests/fakes.py, whose sampler gives token t under version v the log-prob token_logprob(t, v),
so the log-prob of every token says which version sampled it."""

from __future__ import annotations

import pytest

from services.core.batch_types import Trajectory
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.driver.checkpoint import CheckpointStore
from services.driver.partial_rollouts import UNFINISHED, PartialRollouts
from services.rollout.worker import PromptItem
from services.rpc.trajectory_io import read_trajectories
from tests.fakes import FakeRollout, fake_services, token_logprob
from tests.unit.test_driver_loop import ledger, run


class LongTailRollout(FakeRollout):
    max_words = 12  # 1 .. 12 words: most pieces of 3 leave some responses unfinished


def cfg_for(*overrides):
    return load_config("grpo-toy", ["algorithm.max_staleness=3", "rollout.partial_tokens=3", "rollout.max_tokens=10",
                                    "rollout.n_samples=2", *overrides])


def test_a_rollout_cuts_carries_and_continues_responses_under_the_next_version():
    cfg = cfg_for()
    engine, partial = LongTailRollout(2), PartialRollouts(cfg)
    items = [PromptItem(id=f"p{i}", prompt=f"prompt {i}", seed=100 * i) for i in range(4)]
    first, stats = partial.generate(items, 0, engine.generate_with_stats)
    requests = engine.generated[0]
    assert all(len(t.response_ids) <= 3 for t in requests)  # the first piece: at most partial_tokens each
    finished_ids = {t.prompt_id for t in first}
    assert stats["rollout/partial_groups_finished"] == len(finished_ids) >= 1
    assert stats["rollout/partial_groups_finished"] + stats["rollout/partial_groups_carried"] == 4
    assert all(t.finish_reason == "stop" and t.version_spans is None for t in first)
    carried = {g.item.id: [t.response_ids for t in g.samples] for g in partial.groups}
    assert set(carried) == {f"p{i}" for i in range(4)} - finished_ids
    engine.version = 1  # the engines took newer weights
    second, _ = partial.generate([], 1, engine.generate_with_stats)
    for t in second:
        if t.version_spans is None:
            continue
        (start0, v0), (start1, v1) = t.version_spans
        assert (start0, v0, v1) == (0, 0, 1) and t.response_ids[:start1] == carried[t.prompt_id][t.sample_index]
        assert t.policy_version == 0  # the version of the first token: the staleness counts from there
        assert t.logprobs == [token_logprob(tok, 0) for tok in t.response_ids[:start1]] + [
            token_logprob(tok, 1) for tok in t.response_ids[start1:]]
    assert any(t.version_spans for t in second)
    assert all(t.finish_reason != UNFINISHED and len(t.response_ids) <= 10 for t in second)


def test_a_response_that_would_pass_the_staleness_bound_is_finished_without_the_cut():
    cfg = cfg_for("algorithm.max_staleness=2")
    engine, partial = LongTailRollout(2), PartialRollouts(cfg)
    partial.generate([PromptItem(id=f"p{i}", prompt=f"prompt {i}", seed=7 * i) for i in range(8)], 0,
                     engine.generate_with_stats)
    assert partial.groups, "some group should be carried"
    engine.version = 1
    done, _ = partial.generate([], 1, engine.generate_with_stats)
    assert partial.groups == []  # version 1 - 0 >= 2 - 1: every carried response finished under version 1
    continued = [t for t in done if t.version_spans]
    assert continued and len(engine.generated) == 2  # one round: no piece cut at partial_tokens
    assert all(t.finish_reason == "stop" or (t.finish_reason == "length" and len(t.response_ids) == 10)
               for t in continued)


def test_a_rollout_with_no_group_finished_runs_another_round_under_the_same_weights():
    calls = []

    def generate(requests):  # every first piece is cut at its budget; every continuation stops after one token
        calls.append([(r.n, r.max_tokens, r.prompt_ids) for r in requests])
        out = []
        for r in requests:
            for k in range(r.n):
                fresh = r.prompt_ids is None
                ids = [20] * r.max_tokens if fresh else [21]
                out.append(Trajectory(prompt_id=r.id, prompt=r.prompt, prompt_ids=r.prompt_ids or [1, 2], response="x",
                                      response_ids=ids, logprobs=[-1.0] * len(ids),
                                      finish_reason="length" if fresh else "stop", policy_version=0, sample_index=k))
        return out, {}

    partial = PartialRollouts(cfg_for())
    done, stats = partial.generate([PromptItem(id="a", prompt="prompt a", seed=3)], 0, generate)
    assert stats["rollout/partial_rounds"] == 2 and [t.response_ids for t in done] == [[20, 20, 20, 21]] * 2
    assert calls[0] == [(2, 3, None)]  # n samples, a piece of partial_tokens
    assert calls[1] == [(1, 3, [1, 2, 20, 20, 20])] * 2  # each continued from its prompt and piece, by another piece
    assert all(t.version_spans is None and t.finish_reason == "stop" for t in done)  # one version sampled both


def test_config_refuses_partial_rollouts_it_cannot_bound():
    with pytest.raises(UserError, match=r"set algorithm.max_staleness >= 2 \(got 1\)"):
        load_config("grpo-toy", ["algorithm.max_staleness=1", "rollout.partial_tokens=4"])
    with pytest.raises(UserError, match="rollout.stop"):
        load_config("grpo-toy", ["algorithm.max_staleness=2", "rollout.partial_tokens=4", "rollout.stop=[x]"])
    with pytest.raises(UserError, match=r"learner.num_ranks \(4\) must divide rollout.n_samples \(2\)"):
        load_config("grpo-toy", ["algorithm.max_staleness=2", "rollout.partial_tokens=4", "rollout.n_samples=2",
                                 "learner.num_ranks=4"])
    with pytest.raises(UserError, match="partial_tokens: Input should be greater than 0"):
        load_config("grpo-toy", ["algorithm.max_staleness=2", "rollout.partial_tokens=0"])


PARTIAL = ["algorithm.max_staleness=3", "rollout.partial_tokens=2", "rollout.max_tokens=10", "metrics.dump_rollouts=true",
           "rollout.logprob_gap_every=0"]


def test_the_driver_trains_each_group_once_within_the_bound_with_each_tokens_own_log_prob(tmp_path):
    records, made = run(tmp_path, "algorithm.total_steps=8", *PARTIAL, make=fake_services(rollout_class=LongTailRollout))
    assert [r["policy_version"] for r in records] == list(range(1, 9))
    assert max(r["rollout/staleness_max"] for r in records) <= 3
    assert any(r["rollout/partial_continued_fraction"] > 0 for r in records)
    trained = ledger(tmp_path / "run")
    groups = [(p, v) for step in sorted(trained) for p, k, _, v in trained[step] if k == 0]
    assert len(groups) == len(set(groups))  # no group trained twice
    assert sum(r["rollout/trajectories"] for r in records) == 2 * len(groups)
    spanned = 0
    for record in read_trajectories(tmp_path / "run" / "rollouts.pb"):  # each token's log-prob: its span's version
        t = record.trajectory
        spans = t.version_spans or [(0, t.policy_version)]
        spanned += len(spans) > 1
        versions = [next(v for start, v in reversed(spans) if start <= i) for i in range(len(t.response_ids))]
        assert t.logprobs == [token_logprob(tok, v) for tok, v in zip(t.response_ids, versions)]
        assert spans[0] == (0, t.policy_version) and record.step - 1 - t.policy_version <= 3
    assert spanned > 0


def test_a_run_with_partial_rollouts_resumes_exactly(tmp_path):
    make = lambda: fake_services(rollout_class=LongTailRollout)  # noqa: E731
    overrides = ["algorithm.total_steps=8", *PARTIAL, "checkpoint.keep_last=1"]
    whole, _ = run(tmp_path, *overrides, out="whole", make=make())
    run(tmp_path, *overrides, out="split", stop_after=3, make=make())
    checkpoint = CheckpointStore(tmp_path / "split" / "checkpoints").latest()
    second, _ = run(tmp_path, *overrides, out="split", resume=checkpoint, make=make())
    assert [r["step"] for r in second] == [4, 5, 6, 7, 8]
    for a, b in zip(whole[3:], second, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(("timing/", "perf/"))} == {
            k: v for k, v in b.items() if not k.startswith(("timing/", "perf/"))}
    assert ledger(tmp_path / "split") == ledger(tmp_path / "whole")
