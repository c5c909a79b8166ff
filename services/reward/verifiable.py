"""Verifiable rewards: scorer kinds that check a completion against a reference-answer column.

- ``math_verify``: Hugging Face's ``math-verify`` parses the completion's final answer
  (``extract``: the last ``\\boxed{}`` or LaTeX/number, only a ``\\boxed{}``, or the last
  number/expression) and checks it against ``answer_key`` mathematically (1/2 = 0.5, 1,234 = 1234);
- ``exact_match``: the whole completion equals the column (after ``normalize``);
- ``regex``: ``pattern``'s last match in the completion (its first group, else the whole
  match) equals the column; with ``answer_key: null`` any match scores 1 (a format reward).

Each scores 1.0 or 0.0, plus ``format_weight`` when ``format_pattern`` is found in the
completion. A reference answer in GSM8K's form ("worked solution #### 42") counts from the
last ``####`` on. These kinds register in ``SCORER_KINDS`` (services/reward/scorers.py).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from services.reward.scorers import SCORER_KINDS, Scorer

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def reference_text(value: Any) -> str:
    """A reference-answer cell as text: 42.0 (a number that went through JSON) is '42', and a
    GSM8K answer keeps what follows its last '####'."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, thousands separators, a leading '$' and trailing
    '.' / '!' / '?' removed: ' The answer: 1,234. ' -> 'the answer: 1234'."""
    text = _THOUSANDS.sub("", " ".join(text.split()).casefold())
    return text.strip().lstrip("$").rstrip(".!?").strip()


def format_bonus(completion: str, pattern: str | None, weight: float) -> float:
    return weight if pattern and re.search(pattern, completion, re.DOTALL) else 0.0


def _extraction(extract: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    if extract == "boxed":
        return [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    if extract == "number":
        return [ExprExtractionConfig()]
    return [LatexExtractionConfig(), ExprExtractionConfig()]


def math_verify_correct(completion: str, reference: Any, extract: str = "auto") -> bool:
    """Whether the completion's final answer equals the reference, by ``math-verify``. Its
    timeouts use SIGALRM, which only the main thread may set; elsewhere they are off (a stuck
    member is restarted after reward.timeout_s)."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(reference_text(reference), parsing_timeout=timeout)
    if not gold:
        gold = parse(f"${reference_text(reference)}$", parsing_timeout=timeout)
    answer = parse(completion, extraction_config=_extraction(extract), parsing_timeout=timeout)
    return bool(gold and answer and verify(gold, answer, timeout_seconds=timeout))


def regex_answer(completion: str, pattern: str) -> str | None:
    """The last match of ``pattern`` in the completion: its first group, else the whole match."""
    matches = list(re.finditer(pattern, completion, re.DOTALL))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.re.groups else last.group(0)


class VerifiableScorer(Scorer):
    """Shared by the three kinds: the reference column, and the optional format term."""

    verifiable = True

    def __init__(self, name: str, answer_key: str | None, format_pattern: str | None = None,
                 format_weight: float = 0.1):
        super().__init__(name)
        self.answer_key, self.format_pattern, self.format_weight = answer_key, format_pattern, format_weight

    @classmethod
    def from_config(cls, cfg, name, field):
        return cls(name, cfg.answer_key, cfg.format_pattern, cfg.format_weight, **cls.settings(cfg))

    @classmethod
    def settings(cls, cfg) -> dict:
        return {}

    @classmethod
    def columns_needed(cls, cfg) -> list[str]:
        return [cfg.answer_key] if cfg.answer_key else []

    def correct(self, completion: str, reference: Any) -> bool:
        raise NotImplementedError

    def compute(self, prompts, completions, columns):
        if self.answer_key is not None and self.answer_key not in columns:
            raise KeyError(f"no column '{self.answer_key}' (answer_key) among the prompt columns: "
                           f"{', '.join(sorted(columns)) or 'none'}")
        references = columns.get(self.answer_key) if self.answer_key else [None] * len(completions)
        return [
            float(self.correct(c, r)) + format_bonus(c, self.format_pattern, self.format_weight)
            for c, r in zip(completions, references)
        ]


@SCORER_KINDS.register("math_verify")
class MathVerifyScorer(VerifiableScorer):
    def __init__(self, *args, extract: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.extract = extract

    @classmethod
    def settings(cls, cfg) -> dict:
        return {"extract": cfg.extract}

    def correct(self, completion, reference):
        return reference is not None and math_verify_correct(completion, reference, self.extract)


@SCORER_KINDS.register("exact_match")
class ExactMatchScorer(VerifiableScorer):
    def __init__(self, *args, normalize: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalize = normalize

    @classmethod
    def settings(cls, cfg) -> dict:
        return {"normalize": cfg.normalize}

    def same(self, answer: str, reference: Any) -> bool:
        expected = reference_text(reference)
        if self.normalize:
            return normalize_answer(answer) == normalize_answer(expected)
        return answer.strip() == expected

    def correct(self, completion, reference):
        return reference is not None and self.same(completion, reference)


@SCORER_KINDS.register("regex")
class RegexScorer(ExactMatchScorer):
    def __init__(self, *args, pattern: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.pattern = pattern

    @classmethod
    def settings(cls, cfg) -> dict:
        return {"normalize": cfg.normalize, "pattern": cfg.pattern}

    def correct(self, completion, reference):
        answer = regex_answer(completion, self.pattern)
        if answer is None:
            return False
        return True if self.answer_key is None else reference is not None and self.same(answer, reference)


__all__ = [
    "MathVerifyScorer", "ExactMatchScorer", "RegexScorer", "math_verify_correct", "normalize_answer",
    "reference_text", "regex_answer",
]
