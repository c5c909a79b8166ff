"""The environment interface of multi-turn rollouts, and the checks around a user's environment.

An environment is a plain Python class, one instance per episode:

- ``reset(row) -> str | list[dict]``: the first observation for a dataset row (a dict of its
  columns, with ``prompt``): text, or chat messages (``{"role": ..., "content": ...}``);
- ``step(completion_text) -> (observation, reward, info)`` after each policy turn: the next
  observation (text, shown to the policy as a tool or user turn), or None when the episode
  is over; a per-turn reward or None; a dict of figures (``tool_calls``, ``tool_errors``).

It is named like a python scorer: ``path/to/file.py:Class`` or ``package.module:Class``, or a
built-in name (``ENVIRONMENTS``). An environment that raises, returns the wrong types, or is
not a class is an ``EnvironmentError`` naming the environment, the call and the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.core.errors import UserError
from services.core.registry import Registry
from services.reward.scorers import load_python_function

ENVIRONMENTS: Registry = Registry("environment", "rollout.environment.name", modules=("services.environments.tool_env",))


class EnvironmentFailure(RuntimeError):
    """An environment's own error or wrong answer (names the environment, the call and the row)."""


@dataclass(frozen=True)
class StepResult:
    observation: str | None  # None: the episode is over
    reward: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.observation is None


def environment_class(spec: str, field_name: str = "rollout.environment.name") -> type:
    """The class for ``spec``: a built-in name or ``file.py:Class`` / ``module:Class``; UserError otherwise."""
    if spec in ENVIRONMENTS.names():
        return ENVIRONMENTS.get(spec)
    if ":" not in spec:
        raise UserError(f"{field_name}: no built-in environment {spec!r} (built in: {', '.join(ENVIRONMENTS.names())}); "
                        "or give 'path/to/file.py:Class'")
    cls = load_python_function(spec, field_name)
    if not isinstance(cls, type) or not callable(getattr(cls, "reset", None)) or not callable(getattr(cls, "step", None)):
        raise UserError(f"{field_name}: {spec!r} is not a class with reset(row) and step(completion_text)")
    return cls


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise EnvironmentFailure(f"{where} returned {type(value).__name__} {str(value)[:80]!r}, not text or a non-empty "
                             "list of {'role': str, 'content': str} messages")


def checked_reset(env: Any, name: str, row: dict, row_id: str) -> list[dict[str, str]]:
    """``env.reset(row)`` as chat messages; EnvironmentFailure names what went wrong."""
    where = f"environment {name!r} reset on row {row_id!r}"
    try:
        first = env.reset(row)
    except Exception as exc:  # noqa: BLE001 - the user's code: named, never swallowed
        raise EnvironmentFailure(f"{where} raised {type(exc).__name__}: {exc}") from exc
    return _messages(first, where)


def checked_step(env: Any, name: str, completion: str, row_id: str, turn: int) -> StepResult:
    """``env.step(completion)`` as a StepResult; EnvironmentFailure names what went wrong."""
    where = f"environment {name!r} step {turn} on row {row_id!r}"
    try:
        answer = env.step(completion)
    except Exception as exc:  # noqa: BLE001 - the user's code: named, never swallowed
        raise EnvironmentFailure(f"{where} raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(answer, tuple) and len(answer) == 3):
        raise EnvironmentFailure(f"{where} returned {type(answer).__name__}, not (observation, reward, info)")
    observation, reward, info = answer
    if observation is not None and not isinstance(observation, str):
        raise EnvironmentFailure(f"{where}: the observation is {type(observation).__name__}, not text or None")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
        raise EnvironmentFailure(f"{where}: the reward is {type(reward).__name__}, not a number or None")
    if not isinstance(info, dict):
        raise EnvironmentFailure(f"{where}: info is {type(info).__name__}, not a dict")
    return StepResult(observation, None if reward is None else float(reward), info)
