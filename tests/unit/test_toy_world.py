"""The toy world's gold and verifier rewards, checked against hand-computed values."""

import pytest

from services.core import toy_world as tw


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" apple mango plum", 1.0),  # k=3, 3 distinct fruits, 3 words: (3 - 0) / 3
        (" apple mango", 2 / 3),  # hits 2, words 2: 2/3
        (" apple apple plum", (2 - 0.5 * 1) / 3),  # repeat: hits 2, words 3
        (" apple tiger plum", (2 - 0.5 * 1) / 3),  # off-topic word
        (" apple mango plum peach", (3 - 0.5 * 1) / 3),  # one word too many
        (" apple mango plum peach grape lemon", (3 - 0.5 * 3) / 3),
        ("", 0.0),
        (" hammer saw", (0 - 0.5 * 2) / 3),
    ],
)
def test_list_gold_reward_by_hand(completion, expected):
    assert tw.list_gold_reward("list 3 fruits:", completion) == pytest.approx(expected)


def test_gold_reward_peaks_at_exact_count_and_falls_with_length():
    prompt = "list 4 colors:"
    words = tw.TOPICS["colors"]
    rewards = [tw.list_gold_reward(prompt, " " + " ".join(words[:n])) for n in range(1, 9)]
    assert max(rewards) == rewards[3] == 1.0  # exactly 4 words
    assert rewards[:4] == sorted(rewards[:4])  # more is better up to k
    assert rewards[3:] == sorted(rewards[3:], reverse=True)  # then worse


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [("12+7=", "19", 1.0), ("12+7=", " 19 ", 1.0), ("12+7=", "18", 0.0), ("9-9=", "0", 1.0), ("20-3=", "17x", 0.0)],
)
def test_arithmetic_exact_match(prompt, completion, expected):
    assert tw.arithmetic_reward(prompt, completion) == expected


def test_gold_reward_dispatches_on_prompt_shape():
    assert tw.gold_reward(["list 2 animals:", "3+4="], [" cat dog", "7"]) == [1.0, 1.0]


def test_bad_prompts_raise():
    with pytest.raises(ValueError):
        tw.list_gold_reward("name 3 fruits", "apple")
    with pytest.raises(ValueError):
        tw.arithmetic_answer("3*4=")


def test_tasks_are_deterministic_and_well_formed():
    for task in tw.TASKS.values():
        first, again = task.prompts(50, seed=3), task.prompts(50, seed=3)
        assert first == again
        assert len({p.id for p in first}) == 50
        assert task.prompts(50, seed=4) != first
        rows = task.sft_rows(200, seed=0)
        assert all(set(r) == {"prompt", "response"} for r in rows)
        assert len(task.reward([r["prompt"] for r in rows], [r["response"] for r in rows])) == 200
    answers = [tw.arithmetic_answer(r["prompt"]) for r in tw.TASKS["arithmetic"].sft_rows(200, 0)]
    assert min(answers) >= 0 and max(answers) <= 2 * tw.MAX_OPERAND


def test_sft_corpus_is_noisy_and_mostly_short():
    """The spurious length feature: most demonstrations are shorter than requested."""
    rows = tw.TASKS["preference"].sft_rows(2000, seed=0)
    short = sum(len(r["response"].split()) < int(r["prompt"].split()[1]) for r in rows)
    gold = tw.TASKS["preference"].reward([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert 0.4 < short / len(rows) < 0.8
    assert 0.2 < sum(gold) / len(gold) < 0.7  # imperfect demonstrations leave room for RL
    mixed = tw.sft_corpus(["preference", "arithmetic"], 100, seed=0)
    assert len(mixed) == 200 and mixed == tw.sft_corpus(["preference", "arithmetic"], 100, seed=0)
