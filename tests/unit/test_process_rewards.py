"""Process rewards on hand-made steps: splitting, min / last reduction, each step's score on
the token that ends it (a hand-made tokenizer), a python PRM member through the ensemble,
and PPO's GAE on step rewards worked out by hand."""

from __future__ import annotations

import pytest
import torch

from services.algorithms import batches
from services.core.batch_types import Trajectory, pad_response_values
from services.core.config import FlywheelConfig, RewardConfig, ScorerConfig
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.reward.ensemble import RewardEnsemble
from services.reward.process_steps import (
    reduce_steps, split_steps, step_ends, step_reward_rows, step_token_rewards, token_at,
)
from services.reward.scorers import ScorerOutputError

# a hand-made tokenizer: token id k is the string PIECES[k]
PIECES = ["a", "b", "\n", "cd", "e\n", "f", " ", "g"]


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_steps_split_and_their_ends():
    assert split_steps("x\ny\nz", "\n") == ["x", "y", "z"]
    assert split_steps("x\ny\n", "\n") == ["x", "y", ""]  # str.split: a trailing delimiter, an empty step
    assert split_steps("", "\n") == [""] and split_steps("x", "\n") == ["x"]
    assert split_steps("a; b;; c", "; ") == ["a", "b;", "c"]
    # "x\ny\nz": step 1 ends past its newline (2), step 2 at 4, the last at the end (5)
    assert step_ends("x\ny\nz", "\n") == [2, 4, 5]
    assert step_ends("x\ny\n", "\n") == [2, 4, 4] and step_ends("", "\n") == [0]
    assert reduce_steps([0.5, -1.0, 2.0], "min") == -1.0 and reduce_steps([0.5, -1.0, 2.0], "last") == 2.0
    with pytest.raises(ValueError, match="no step scores"):
        reduce_steps([], "min")


def test_each_step_score_lands_on_the_token_that_ends_it():
    # tokens: a b \n cd e\n f -> text "ab\ncde\nf"; steps "ab", "cde", "f" end at chars 3, 7, 8
    ids = [0, 1, 2, 3, 4, 5]
    text = decode(ids)
    assert text == "ab\ncde\nf" and step_ends(text, "\n") == [3, 7, 8]
    # prefix lengths 1 2 3 5 7 8: char 3 is reached by token 2, char 7 by token 4, char 8 by token 5
    assert [token_at(end, lambda k: len(decode(ids[:k])), len(ids)) for end in (3, 7, 8)] == [2, 4, 5]
    assert step_token_rewards(text, ids, [0.5, -1.0, 2.0], "\n", decode) == [0, 0, 0.5, 0, -1.0, 2.0]
    # "e\n" holds a step's last letter and its delimiter: the step still ends on it
    assert step_token_rewards("cde\n", [3, 4], [1.5, 0.25], "\n", decode) == [0.0, 1.75]
    # steps "f", "", "": the empty last one ends with the completion, on the token of the one before it
    assert step_token_rewards("f\n\n", [5, 2, 2], [1.0, 2.0, 4.0], "\n", decode) == [0.0, 1.0, 6.0]
    rows = step_reward_rows([text, "g"], [ids, [7]], [[0.5, -1.0, 2.0], [3.0]], [-0.25, 0.0], "\n", decode)
    assert rows == [[0, 0, 0.5, 0, -1.0, 1.75], [3.0]]
    with pytest.raises(ValueError, match="2 step scores for 3 steps"):
        step_token_rewards(text, ids, [1.0, 2.0], "\n", decode)


PRM = '''
def prm(prompts, completions, **columns):
    """one score per line: 1 for a line with a digit, -1 otherwise"""
    return [[1.0 if any(ch.isdigit() for ch in line) else -1.0 for line in c.split("\\n")] for c in completions]

def wrong_count(prompts, completions, **columns):
    return [[1.0] for c in completions]
'''


def test_a_python_process_reward_member_in_the_ensemble(tmp_path):
    (tmp_path / "prm.py").write_text(PRM)
    member = ScorerConfig(kind="python", path=f"{tmp_path / 'prm.py'}:prm", name="prm", step_delimiter="\n",
                          step_reduce="min")
    outcome = ScorerConfig(kind="python", path=f"{tmp_path / 'prm.py'}:prm", name="last", step_delimiter="\n",
                           step_reduce="last")
    ensemble = RewardEnsemble(RewardConfig(scorers=[member, outcome], aggregate="mean"))
    scores = ensemble.score(["q", "q"], ["2 + 2\nso 4", "hmm\nit is 4"])
    assert scores.member_steps == {"prm": [[1.0, 1.0], [-1.0, 1.0]], "last": [[1.0, 1.0], [-1.0, 1.0]]}
    assert scores.member_scores == [[1.0, -1.0], [1.0, 1.0]]  # min, last
    assert scores.scores == [1.0, 0.0]
    kept = scores.take([1])
    assert kept.member_steps == {"prm": [[-1.0, 1.0]], "last": [[-1.0, 1.0]]}
    wrong = RewardEnsemble(RewardConfig(scorers=[member.model_copy(update={"path": f"{tmp_path / 'prm.py'}:wrong_count"})]))
    with pytest.raises(ScorerOutputError, match=r"'prm': wrong number of scores: expected 2, got 1 \(the step scores "
                                                r"of completion 0: 2 steps at '\\n'\)"):
        wrong.score(["q"], ["a\nb"])


def test_step_rewards_config_is_checked():
    with pytest.raises(ValueError, match="step_delimiter is empty"):
        ScorerConfig(kind="python", path="x.py:f", step_delimiter="")
    with pytest.raises(UserError, match="'math_verify' does not use step_delimiter"):
        load_config("grpo-math", ["reward.scorers=[{kind: math_verify, step_delimiter: ';'}]"])
    with pytest.raises(UserError, match="step_rewards needs reward.scorers to be one process reward"):
        load_config("ppo-toy", ["algorithm.step_rewards=true"])
    with pytest.raises(UserError, match="'grpo' does not use step_rewards"):
        load_config("grpo-toy", ["algorithm.step_rewards=true"])
    cfg = FlywheelConfig.model_validate({
        "algorithm": {"name": "ppo", "step_rewards": True},
        "reward": {"scorers": [{"kind": "python", "path": "x.py:f", "step_delimiter": "\n"}]}})
    assert cfg.algorithm.step_rewards


def test_ppo_gae_on_step_rewards_by_hand():
    trajectory = Trajectory(prompt_id="p", prompt="q", prompt_ids=[9, 9], response=decode([0, 1, 2, 3, 4, 5]),
                            response_ids=[0, 1, 2, 3, 4, 5], logprobs=[-1.0] * 6, finish_reason="stop",
                            policy_version=0, sample_index=0)
    tokens = batches.build_tokens([trajectory], pad_id=0)
    rows = step_reward_rows([trajectory.response], [trajectory.response_ids], [[0.5, -1.0, 2.0]], [0.0], "\n", decode)
    placed = pad_response_values(rows, tokens)
    zeros = torch.zeros_like(placed)
    sampler = batches.sampler_logprobs([trajectory], tokens)
    batch, stats = batches.ppo_batch([trajectory], [reduce_steps([0.5, -1.0, 2.0], "min")], zeros, sampler, sampler,
                                     gamma=1.0, lam=1.0, kl_coef=0.1, kl_estimator="k1", kl_in_reward=True, pad_id=0,
                                     whiten_advantages=False, step_rewards=placed)
    # values 0, gamma = lam = 1, no KL (ref = old): the advantage is the sum of the step rewards from
    # token t on: tokens 0-2 see 0.5 - 1 + 2 = 1.5, tokens 3-4 see 1.0, token 5 sees 2.0
    mask = batch.tokens.response_mask.bool()
    assert batch.advantages[mask].tolist() == [1.5, 1.5, 1.5, 1.0, 1.0, 2.0]
    assert stats["reward/score_mean"] == -1.0  # the completion's score (min) is still what metrics show
