"""The reward of tests/bench/bench_vs_trl.py, one function for both systems: 1.0 where the
completion's final answer equals the GSM8K ``answer`` column by math-verify, else 0.0.
Flywheel calls it as a ``python`` scorer, TRL's GRPOTrainer as a reward function; TRL passes a
conversational completion as a list of messages, Flywheel the completion's text."""

from __future__ import annotations

from services.reward.verifiable import math_verify_correct


def completion_text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correct(prompts, completions, answer, **_columns) -> list[float]:
    return [float(math_verify_correct(completion_text(c), a)) for c, a in zip(completions, answer)]
