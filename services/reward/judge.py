"""LLM-as-judge (RLAIF) reward scorer, ``reward.scorers[].kind: judge``.

A judge model reads a rubric (``template``) filled with the prompt, the completion and, where
the rubric asks for it, the reference answer (the prompt column ``answer_key``), and answers in
a few tokens, greedily. ``score_pattern``'s first group, at its last match in that answer, is
the score:

- ``judge_mode: grade``: a number in ``score_range`` [lo, hi], scored (x - lo) / (hi - lo);
- ``judge_mode: compare``: a verdict, ``A`` (the completion, answer A, wins: 1.0), ``B`` (the
  reference answer, answer B, wins: 0.0) or ``tie`` (0.5), in any letter case.

An answer the pattern does not match, a number outside the range or a word that is no
verdict is a :class:`JudgeAnswerError` (a ScorerOutputError) naming the member, the sample
and the judge's raw text: never a 0 or a default, so a judge that drifts off its format fails
the step instead of quietly steering the policy.

The judge is reached one of two ways (services/reward/judge_backends.py): ``path``, a local
model directory served by a vLLM engine inside the member's own Ray actor, or ``address``, an
OpenAI-compatible endpoint's ``/completions``. Defaults and config checks are in
services/core/judge_settings.py. As an ensemble member it is aggregated like any other
(mean / wco / uwo).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from services.core.config import ScorerConfig
from services.core.errors import UserError
from services.core.model_files import check_model_files
from services.core.judge_settings import (
    DEFAULT_PATTERNS, DEFAULT_TEMPLATES, PLACEHOLDER, VERDICTS, is_template_file, template_problem,
)
from services.reward.judge_backends import EndpointJudge, EngineJudge
from services.reward.scorers import SCORER_KINDS, Scorer, ScorerError, ScorerOutputError, bearer_token, required_path
from services.reward.verifiable import regex_answer

SHOWN_CHARS = 400  # of a judge's raw answer in an error message


class JudgeAnswerError(ScorerOutputError):
    """A judge's answer that gives no score: ``index`` is the sample, ``raw`` the answer."""

    def __init__(self, message: str, index: int, raw: str):
        super().__init__(message)
        self.index, self.raw = index, raw

    def __reduce__(self):  # pickled whole: Ray sends a member's error back to the caller
        return type(self), (str(self), self.index, self.raw)


def shown(raw: str) -> str:
    """A judge's answer for a message: quoted, control characters escaped, long ones cut."""
    return repr(raw if len(raw) <= SHOWN_CHARS else raw[:SHOWN_CHARS] + "...")


def render(template: str, prompt: str, completion: str, reference: str | None = None) -> str:
    """The rubric with its ``{prompt}``, ``{completion}`` and ``{reference}`` filled in, in one
    pass (a completion that contains "{reference}" stays as written); other braces stay."""
    values = {"prompt": prompt, "completion": completion, "reference": reference}

    def fill(match: re.Match) -> str:
        value = values.get(match.group(1))
        if value is None:  # an unknown name is refused by the config; {reference} without a reference here
            raise ValueError(f"the rubric's {match.group(0)} has no value")
        return value

    return PLACEHOLDER.sub(fill, template)


def parse_grade(raw: str, pattern: str, lo: float, hi: float) -> float:
    """The score in a grading answer mapped from [lo, hi] to [0, 1]; ValueError saying why not."""
    captured = regex_answer(raw, pattern)
    if captured is None:
        raise ValueError(f"does not match score_pattern {pattern!r}")
    try:
        value = float(captured.strip())
    except ValueError:
        raise ValueError(f"captured {captured!r}, not a number (score_pattern {pattern!r})") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"scores {value:g}, outside score_range [{lo:g}, {hi:g}]")
    return (value - lo) / (hi - lo)


def parse_verdict(raw: str, pattern: str) -> float:
    """A comparing answer's verdict as the completion's score: A 1.0, B 0.0, tie 0.5."""
    captured = regex_answer(raw, pattern)
    if captured is None:
        raise ValueError(f"does not match score_pattern {pattern!r}")
    verdict = captured.strip().casefold()
    if verdict not in VERDICTS:
        raise ValueError(f"captured {captured!r}, not a verdict (A, B or tie) (score_pattern {pattern!r})")
    return VERDICTS[verdict]


def template_text(cfg: ScorerConfig, field: str) -> str:
    """The rubric: ``template`` inline, the file it names, or the mode's default; a file's
    text is checked as the config checks an inline one (UserError naming ``field.template``)."""
    if cfg.template is None:
        return DEFAULT_TEMPLATES[cfg.judge_mode]
    if not is_template_file(cfg.template):
        return cfg.template
    path = Path(cfg.template).expanduser()
    if not path.is_file():
        raise UserError(f"{field}.template: no rubric file '{cfg.template}' (an inline rubric needs a {{completion}} "
                        "placeholder)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{field}.template: could not read the rubric file '{cfg.template}': {exc}") from None
    problem = template_problem(text, cfg.judge_mode)
    if problem:
        raise UserError(f"{field}.template: the rubric file '{cfg.template}' {problem}")
    return text


def needs_reference(template: str, mode: str) -> bool:
    return mode == "compare" or "reference" in PLACEHOLDER.findall(template)


@SCORER_KINDS.register("judge")
class JudgeScorer(Scorer):
    """Scores each sample by a judge model's answer to the rubric (see the module's docstring).

    ``backend`` has ``complete(texts) -> list[str]``, the judge's answers in order:
    ``EngineJudge`` (a local vLLM engine) or ``EndpointJudge`` (an OpenAI-compatible URL).
    """

    def __init__(self, name: str, backend: Any, template: str, mode: str = "grade", pattern: str | None = None,
                 score_range: tuple[float, float] = (1.0, 10.0), answer_key: str | None = "answer"):
        super().__init__(name)
        self.backend, self.template, self.mode = backend, template, mode
        self.pattern = pattern or DEFAULT_PATTERNS[mode]
        self.lo, self.hi = score_range
        self.answer_key = answer_key if needs_reference(template, mode) else None

    @classmethod
    def resolve(cls, cfg, field):
        """A rubric file is read into ``template`` (the actor may run elsewhere); the model
        directory must exist and becomes absolute; the token variable must be set. Nothing
        is loaded or contacted."""
        template = template_text(cfg, field)
        if needs_reference(template, cfg.judge_mode) and not cfg.answer_key:
            raise UserError(f"{field}.answer_key: the rubric shows {{reference}}: name the prompt column with the "
                            "reference answer")
        update: dict[str, Any] = {"template": template} if cfg.template is not None else {}
        if cfg.path:
            path = Path(required_path(cfg, field)).expanduser()
            if not path.is_dir():
                raise UserError(f"{field}.path: no judge model directory at '{cfg.path}'")
            check_model_files(path, f"{field}.path")
            update["path"] = str(path.resolve())
        else:
            bearer_token(cfg.token_env, cfg.address, field)
        return cfg.model_copy(update=update) if update else cfg

    @classmethod
    def from_config(cls, cfg, name, field):
        who = f"reward scorer '{name}'"
        if cfg.path:
            backend = EngineJudge(who, cfg.path, f"{field}.path", cfg.max_length, cfg.judge_max_tokens, cfg.seed,
                                  cfg.batch_size)
        else:
            backend = EndpointJudge(who, cfg.address, cfg.judge_model, cfg.judge_max_tokens, cfg.seed,
                                    cfg.batch_size, cfg.timeout_s, cfg.retries,
                                    bearer_token(cfg.token_env, cfg.address, field))
        return cls(name, backend, template_text(cfg, field), cfg.judge_mode, cfg.score_pattern, cfg.score_range,
                   cfg.answer_key)

    @classmethod
    def columns_needed(cls, cfg):
        """``answer_key`` when the rubric shows the reference answer."""
        template = template_text(cfg, "reward.scorers[]")
        return [cfg.answer_key] if cfg.answer_key and needs_reference(template, cfg.judge_mode) else []

    @classmethod
    def actor_env(cls, cfg):
        """The endpoint's token variable; for a local judge, its vLLM engine core in the actor's
        own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the rollout actors do, unless
        this process sets it): fewer processes to start, none left behind by a killed actor."""
        if cfg.path:
            return {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}
        return {cfg.token_env: os.environ[cfg.token_env]} if cfg.token_env and os.environ.get(cfg.token_env) else {}

    def rubrics(self, prompts: list[str], completions: list[str], columns) -> list[str]:
        """The filled-in rubric of every sample, as the judge reads it."""
        references: list[str | None] = [None] * len(prompts)
        if self.answer_key is not None:
            if self.answer_key not in columns:
                raise ScorerError(f"reward scorer '{self.name}': the rubric shows {{reference}} but the prompts have "
                                  f"no column '{self.answer_key}' (answer_key); columns: "
                                  f"{', '.join(sorted(columns)) or 'none'}")
            references = []
            for i, value in enumerate(columns[self.answer_key]):
                if value is None:
                    raise ScorerError(f"reward scorer '{self.name}': sample {i} has no reference answer "
                                      f"(column '{self.answer_key}' is null)")
                references.append(str(int(value)) if isinstance(value, float) and value.is_integer() else str(value))
        return [render(self.template, p, c, r) for p, c, r in zip(prompts, completions, references)]

    def judge_texts(self, prompts, completions, columns=None) -> list[str]:
        """The judge's raw answers, one per sample, before parsing."""
        return self.backend.complete(self.rubrics(list(prompts), list(completions), dict(columns or {})))

    def parse(self, answers: list[str]) -> list[float]:
        """Every answer's score in [0, 1]; JudgeAnswerError on the first one that gives none,
        with its index, its raw text and how many answers failed."""
        scores, failures = [], []
        for i, raw in enumerate(answers):
            try:
                if self.mode == "compare":
                    scores.append(parse_verdict(raw, self.pattern))
                else:
                    scores.append(parse_grade(raw, self.pattern, self.lo, self.hi))
            except ValueError as exc:
                failures.append((i, raw, str(exc)))
        if failures:
            i, raw, why = failures[0]
            more = f" ({len(failures)} of {len(answers)} answers gave no score)" if len(failures) > 1 else ""
            raise JudgeAnswerError(
                f"reward scorer '{self.name}': the judge's answer to sample {i} {why}{more}; the judge's raw text: "
                f"{shown(raw)}", i, raw,
            )
        return scores

    def compute(self, prompts, completions, columns):
        return self.parse(self.judge_texts(prompts, completions, columns))

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


__all__ = ["JudgeScorer", "JudgeAnswerError", "render", "parse_grade", "parse_verdict", "template_text"]
