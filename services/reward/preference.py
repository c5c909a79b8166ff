"""Pairwise preference models, P(a preferred to b | prompt), for online IPO
(``services/algorithms/online_ipo.py``), per ``reward.preference``:

- ``bt``: Bradley-Terry over the rewards the run trains on, sigmoid((r(a) - r(b)) / temperature);
- ``python``: a function ``fn(prompts, completions_a, completions_b, **columns)`` returning
  one probability in [0, 1] per pair (a preference model that need not be transitive).

A python function runs in a reward member's Ray actor, supervised like scoring
(``RewardService.compare``); it is imported before Ray starts too (``check_preference``), so
a bad path fails at once. Every output is checked: a wrong count, a non-number, or a value
outside [0, 1] is an error naming ``reward.preference`` and the pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from services.core.config import PreferenceConfig
from services.reward.scorers import Columns, ScorerError, ScorerOutputError, load_python_function

FIELD = "reward.preference"


class PreferenceModel:
    """``reward.preference`` as a callable model. ``remote``: where a python function runs
    instead of this process, ``remote(cfg, prompts, completions_a, completions_b, columns)``
    (the run passes ``RewardService.compare``: the function then runs in a supervised reward
    actor); None runs it here (that actor itself, the unit tests)."""

    def __init__(self, cfg: PreferenceConfig, remote: Callable[..., list[float]] | None = None):
        self.cfg, self.remote = cfg, remote
        self.fn = load_python_function(cfg.path, f"{FIELD}.path") if cfg.kind == "python" and remote is None else None

    def compare(self, prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str],
                columns: Columns, rewards_a: Sequence[float] = (), rewards_b: Sequence[float] = ()) -> list[float]:
        """P(a preferred to b) for each pair; ``rewards_*``: the rewards trained on (bt)."""
        n = len(prompts)
        if self.cfg.kind == "bt":
            return [sigmoid((ra - rb) / self.cfg.temperature) for ra, rb in zip(rewards_a, rewards_b, strict=True)]
        if self.remote is not None:
            return checked_probabilities(self.remote(self.cfg, prompts, completions_a, completions_b, columns), n)
        try:
            out = self.fn(list(prompts), list(completions_a), list(completions_b), **columns)
        except Exception as exc:
            raise ScorerError(f"{FIELD}: the preference function raised {type(exc).__name__}: {exc}") from exc
        return checked_probabilities(out, n)


def checked_probabilities(out: Any, n: int) -> list[float]:
    """``out`` as n floats in [0, 1], else ScorerOutputError naming the pair."""
    if hasattr(out, "tolist"):
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or len(out) != n:
        raise ScorerOutputError(f"{FIELD}: expected a list of {n} probabilities, got "
                                f"{len(out) if isinstance(out, Sequence) else type(out).__name__}")
    probabilities = []
    for i, value in enumerate(out):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ScorerOutputError(f"{FIELD}: pair {i}: P(a preferred to b) must be a number in [0, 1], got {value!r}")
        probabilities.append(float(value))
    return probabilities


def check_preference(cfg: PreferenceConfig) -> None:
    """Pre-flight: a python preference function imports (a UserError naming the field otherwise)."""
    if cfg.kind == "python":
        load_python_function(cfg.path, f"{FIELD}.path")


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
