"""Process rewards: a completion cut into steps by a delimiter, one score per step (a PRM,
Lightman et al. 2023; Wang et al. 2024), the step scores reduced to one sequence score (min
or last), and each step's score placed on the token where the step ends (PPO's step rewards).

Pure functions on strings and lists; the tokenizer is a callable so the unit tests can use a
hand-made one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REDUCTIONS = ("min", "last")


def split_steps(completion: str, delimiter: str) -> list[str]:
    """The completion's steps: ``completion.split(delimiter)``, Python's own rule (a
    completion that ends with the delimiter has an empty last step; "" is one empty step)."""
    if not delimiter:
        raise ValueError("the step delimiter is empty")
    return completion.split(delimiter)


def step_ends(completion: str, delimiter: str) -> list[int]:
    """Character offset just past each step: its delimiter included, the last step ending
    where the completion does."""
    ends, offset = [], 0
    for step in split_steps(completion, delimiter)[:-1]:
        offset += len(step) + len(delimiter)
        ends.append(offset)
    return ends + [len(completion)]


def reduce_steps(step_scores: Sequence[float], how: str) -> float:
    """One sequence score from a completion's step scores: the worst step (min) or the last."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown step reduction {how!r}; allowed: {', '.join(REDUCTIONS)}")
    if not step_scores:
        raise ValueError("no step scores")
    return float(min(step_scores)) if how == "min" else float(step_scores[-1])


def token_at(char_end: int, prefix_chars: Callable[[int], int], n_tokens: int) -> int:
    """The first token index k whose decoded prefix ``prefix_chars(k + 1)`` (characters in
    the first k + 1 tokens' text) reaches ``char_end``; the last token if none does. Binary
    search: ``prefix_chars`` grows with k."""
    if n_tokens <= 0:
        raise ValueError("no tokens")
    lo, hi = 0, n_tokens - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if prefix_chars(mid + 1) >= char_end:
            hi = mid
        else:
            lo = mid + 1
    return lo


def step_token_rewards(
    completion: str, response_ids: Sequence[int], step_scores: Sequence[float], delimiter: str,
    decode: Callable[[Sequence[int]], str],
) -> list[float]:
    """Per-response-token rewards: each step's score on the token where the step ends (scores
    of steps ending on the same token add up), 0 elsewhere. ``decode(ids)``: the text of
    those token ids, as the engine detokenised ``completion``."""
    ends = step_ends(completion, delimiter)
    if len(ends) != len(step_scores):
        raise ValueError(f"{len(step_scores)} step scores for {len(ends)} steps")
    rewards = [0.0] * len(response_ids)
    if not response_ids:
        return rewards
    cache: dict[int, int] = {}

    def prefix_chars(k: int) -> int:
        if k not in cache:
            cache[k] = len(decode(response_ids[:k]))
        return cache[k]

    for end, score in zip(ends, step_scores):
        rewards[token_at(end, prefix_chars, len(response_ids))] += float(score)
    return rewards


def step_reward_rows(
    completions: Sequence[str], response_ids: Sequence[Sequence[int]], step_scores: Sequence[Sequence[float]],
    extras: Sequence[float], delimiter: str, decode: Callable[[Sequence[int]], str],
) -> list[list[float]]:
    """``step_token_rewards`` of each completion, plus its ``extras`` (rewards that are not
    the process member's: an environment's, the overlong penalty) on its last token."""
    rows = []
    for text, ids, steps, extra in zip(completions, response_ids, step_scores, extras, strict=True):
        row = step_token_rewards(text, ids, steps, delimiter, decode)
        if row:
            row[-1] += float(extra)
        rows.append(row)
    return rows
