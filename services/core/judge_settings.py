"""The LLM-as-judge scorer's settings (``reward.scorers[].kind: judge``): its default rubrics,
answer patterns and verdicts, and the checks ``ScorerConfig`` runs on them.

This module is pure (no IO, no imports from the reward layer) so that the config can check a
judge member at load time, and services/reward/judge.py reads the same constants.

Two modes:

- ``grade``: the rubric shows the prompt and the completion (and, if it has a ``{reference}``
  placeholder, the reference answer); the judge answers with a number that ``score_pattern``'s
  first group captures, and ``score_range`` [lo, hi] maps it to [0, 1];
- ``compare``: the rubric shows the completion as answer A and the reference answer (the
  prompt column ``answer_key``) as answer B; ``score_pattern``'s first group captures the
  verdict ``A`` (the completion wins: 1.0), ``B`` (the reference wins: 0.0) or ``tie`` (0.5),
  in any letter case.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

# {name} in a rubric; the known names are replaced, any other one is a config error (a typo
# such as {completon}); braces around anything else ({"score": 7}, "{ }") are plain text
PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
PLACEHOLDERS = ("prompt", "completion", "reference")

DEFAULT_TEMPLATES = {
    "grade": (
        "You are grading an answer to a request.\n\n"
        "Request:\n{prompt}\n\n"
        "Answer:\n{completion}\n\n"
        "Rate the answer's quality (correct, helpful, clear) on a scale from 1 (worst) to 10 (best). "
        'Reply with one line of the form "Score: N" and nothing else.\n'
    ),
    "compare": (
        "You are comparing two answers to the same request.\n\n"
        "Request:\n{prompt}\n\n"
        "Answer A:\n{completion}\n\n"
        "Answer B:\n{reference}\n\n"
        "Which answer is better (correct, helpful, clear)? "
        'Reply with one line: "Winner: A", "Winner: B" or "Winner: tie", and nothing else.\n'
    ),
}

DEFAULT_PATTERNS = {
    "grade": r"(?i)score\s*[:=]\s*(-?\d+(?:\.\d+)?)",
    "compare": r"(?i)winner\s*[:=]\s*\**\s*(A|B|tie)\b",
}

# compare mode: the verdict (case-folded) -> the completion's score
VERDICTS = {"a": 1.0, "b": 0.0, "tie": 0.5}

# what only one way of reaching the judge reads
PATH_ONLY = ("max_length",)
ADDRESS_ONLY = ("judge_model", "timeout_s", "retries", "token_env")


def is_template_file(template: str) -> bool:
    """A ``template`` with no ``{`` names a file holding the rubric (an inline rubric needs
    ``{completion}``), the convention of ``model.chat_template``."""
    return "{" not in template


def template_problem(text: str, mode: str) -> str | None:
    """What is wrong with a rubric's text for ``mode`` ("has no ..."), or None."""
    names = PLACEHOLDER.findall(text)
    unknown = sorted(set(names) - set(PLACEHOLDERS))
    if unknown:
        return (f"has an unknown placeholder {', '.join('{' + n + '}' for n in unknown)}; a rubric may use "
                f"{', '.join('{' + n + '}' for n in PLACEHOLDERS)}")
    if "completion" not in names:
        return "has no {completion} placeholder (where the completion to judge goes)"
    if mode == "compare" and "reference" not in names:
        return "has no {reference} placeholder, which judge_mode compare needs (answer B, the reference answer)"
    return None


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with a ``score_pattern`` ("is not ..."), or None: it must compile and
    have a group."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"is not a valid regular expression: {exc}"
    if compiled.groups < 1:
        return "has no group, (...), around the score or verdict to capture"
    return None


def url_problem(address: str) -> str | None:
    """What is wrong with a judge endpoint's base URL, or None."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"kind 'judge' needs address as an http(s) base URL such as http://127.0.0.1:8000/v1 (got {address!r})"
    try:
        parts.port
    except ValueError as exc:
        return f"bad port in {address!r}: {exc}"
    return None


def changed(cfg: Any, key: str) -> bool:
    """Whether ``cfg.key`` is off its default: a setting that one way of reaching the judge
    ignores may still appear at its default (a dumped config.yaml lists every field of a kind)."""
    return getattr(cfg, key) != type(cfg).model_fields[key].default


def judge_problem(cfg: Any) -> tuple[str, str] | None:
    """The first problem with a judge member's config as (field, message), or None. ``cfg``
    is a ``ScorerConfig`` of kind judge (duck-typed: the config layer imports this one)."""
    if bool(cfg.path) == bool(cfg.address):
        key = "address" if cfg.path else "path"
        both = " not both" if cfg.path else ""
        return key, (f"kind 'judge' needs path (a local judge model directory, served by vLLM) or address "
                     f"(an OpenAI-compatible base URL),{both or ' and neither is set'}")
    if cfg.address:
        problem = url_problem(cfg.address)
        if problem:
            return "address", problem
        if not cfg.judge_model:
            return "judge_model", "kind 'judge' with address needs judge_model (the model name the endpoint serves)"
    this, other, wrong = ("address", "path", PATH_ONLY) if cfg.address else ("path", "address", ADDRESS_ONLY)
    for key in wrong:
        if changed(cfg, key):
            return key, f"{key} is a setting of a judge at {other}; this judge uses {this}"
    if cfg.template is not None and not is_template_file(cfg.template):
        problem = template_problem(cfg.template, cfg.judge_mode)
        if problem:
            return "template", f"template {problem}"
    if cfg.score_pattern is not None:
        problem = pattern_problem(cfg.score_pattern)
        if problem:
            return "score_pattern", f"score_pattern {problem}"
    if cfg.judge_mode == "compare" and changed(cfg, "score_range"):
        return "score_range", "score_range is for judge_mode grade (compare maps verdicts to 1, 0 and 0.5)"
    inline = cfg.template if cfg.template is not None and not is_template_file(cfg.template) else None
    if not cfg.answer_key and (cfg.judge_mode == "compare" or (inline and "reference" in PLACEHOLDER.findall(inline))):
        return "answer_key", "a rubric with {reference} needs answer_key (the prompt column with the reference answer)"
    lo, hi = cfg.score_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        return "score_range", f"score_range needs [lo, hi] with lo < hi, both finite (got [{lo}, {hi}])"
    return None
