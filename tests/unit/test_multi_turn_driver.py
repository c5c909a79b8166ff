"""The driver's loop on multi-turn episodes, on in-process fakes (tests/fakes.py): environment
tokens are context only in what the learner trains on, the sampler's, reference's and
learner's log-probs line up on the policy tokens (the train-inference gap is 0 only then),
the environment's rewards are added, and the episode metrics are logged. The real engine's
episodes are tests/integration/test_multi_turn.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.core.config_loading import load_config
from services.driver.driver import Driver
from tests.fakes import FakeRollout, fake_policy_dir, fake_services

ENV_TOKENS = [60, 61, 62]  # an environment turn (a tool result), between two policy turns


class FakeEpisodes(FakeRollout):
    """Each sampled response becomes a two-turn episode: the response, an environment turn,
    the response again (the second policy turn); log-probs of the policy tokens only."""

    def generate_with_stats(self, prompts, sampling=None):
        trajectories, stats = super().generate_with_stats(prompts, sampling)
        episodes = []
        for t in trajectories:
            n = len(t.response_ids)
            episodes.append(dataclasses.replace(
                t, response_ids=t.response_ids + ENV_TOKENS + t.response_ids, logprobs=t.logprobs * 2,
                loss_mask=[1] * n + [0] * len(ENV_TOKENS) + [1] * n,
                turns=[("policy", 0, n), ("environment", n, n + 3), ("policy", n + 3, 2 * n + 3)],
                env_reward=0.5, env_info={"turns": 2.0, "tool_calls": 1.0, "tool_errors": 0.0, "env_s": 0.01,
                                          "env_errors": 0.0}))
        (self.generated if sampling is None else self.evaluated)[-1] = episodes
        return episodes, stats


def test_environment_tokens_are_context_only_and_every_log_prob_lines_up(tmp_path):
    policy = fake_policy_dir(tmp_path / "policy")
    cfg = load_config("grpo-toy", [f"model.path={policy}", "rollout.prompts_per_step=4", "data.toy_size=8",
                                   "rollout.n_samples=2", "algorithm.total_steps=2", "rollout.logprob_gap_every=1",
                                   "rollout.environment.name=tools"])
    plain = Driver(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"environment": None})}),
                   tmp_path / "plain", policy)
    driver = Driver(cfg, tmp_path / "run", policy)
    made = {}
    for name, d, rollout in (("plain", plain, FakeRollout), ("episodes", driver, FakeEpisodes)):
        make = fake_services(rollout_class=rollout)
        d.build(make)
        try:
            made[name] = (d.run(progress=False), make.made)
        finally:
            d.shutdown()
    records, services = made["episodes"]
    for (version, batch), episodes in zip(services.learner.trained, services.rollout.generated):
        tokens = batch.tokens
        for row, t in enumerate(episodes):
            start = len(t.prompt_ids)
            mask = tokens.response_mask[row, start:start + len(t.response_ids)].tolist()
            assert mask == t.loss_mask  # 0 on the environment's tokens
            trained = tokens.input_ids[row][tokens.response_mask[row].bool()].tolist()
            assert trained == [i for i, m in zip(t.response_ids, t.loss_mask) if m]  # the ids sampled, nothing else
            # the reference's log-probs (it saw every token) are kept on the policy's tokens only
            ref = batch.ref_logprobs[row][tokens.response_mask[row].bool()]
            torch.testing.assert_close(ref, torch.tensor([-0.1 * (1 + i % 5) - 0.05 for i in trained]))
    for record, plain_record in zip(records, made["plain"][0]):
        assert record["rollout/logprob_gap_max"] < 1e-6  # sampler and learner agree token for token on the mask
        assert record["rollout/turns_mean"] == 2.0 and record["rollout/tool_calls_mean"] == 1.0
        assert record["rollout/env_errors"] == 0.0 and record["rollout/tool_errors"] == 0.0
        assert record["rollout/episode_tokens_p50"] > 3
        assert record["reward/mean"] == pytest.approx(plain_record["reward/mean"] + 0.5)  # the environment's reward
        assert "rollout/turns_mean" not in plain_record
