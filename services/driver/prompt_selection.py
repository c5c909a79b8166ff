"""Prompt selection by reward variance (``data.selection: reward_variance``).

Razin et al. (2025): when the reward barely varies across a prompt's samples, the policy
gradient on that prompt vanishes, however accurate the reward model. So spend rollouts
where the reward still varies:

- a prompt never drawn yet is drawn before any other (exploration first, in the source's
  seeded epoch order); one drawn but not scored yet counts with the average estimate;
- a seen prompt i is drawn with probability ``floor / N + (1 - floor) * v_i / sum_j v_j``,
  where v_i is its most recent per-prompt reward variance and ``floor`` =
  ``data.selection_floor``: every prompt keeps at least ``floor / N``, so a prompt whose
  estimate is stale or 0 is still revisited. All estimates 0 means uniform.

Within one batch prompts are drawn without replacement.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from services.driver.prompt_source import PromptSource


def selection_probabilities(variances: Mapping[str, float], floor: float) -> dict[str, float]:
    """Probability of drawing each seen prompt (ids -> latest variance estimate)."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    n = len(variances)
    if n == 0:
        return {}
    if any(v < 0 for v in variances.values()):
        raise ValueError("reward variances must be >= 0")
    total = sum(variances.values())
    if total <= 0:
        return {pid: 1.0 / n for pid in variances}
    return {pid: floor / n + (1.0 - floor) * v / total for pid, v in variances.items()}


def draw_without_replacement(probabilities: Mapping[str, float], k: int, rng: random.Random) -> list[str]:
    """k ids drawn one after another, each in proportion to its probability among those left."""
    left = dict(probabilities)
    out: list[str] = []
    while left and len(out) < k:
        ids = list(left)
        choice = rng.choices(ids, weights=[left[i] for i in ids])[0]
        out.append(choice)
        del left[choice]
    return out


class VarianceSelectedPrompts(PromptSource):
    """A PromptSource whose batches follow :func:`selection_probabilities`; feed it each
    step's per-prompt reward variances with :meth:`observe`."""

    def __init__(self, items, seed: int = 0, shuffle: bool = True, floor: float = 0.1):
        super().__init__(items, seed=seed, shuffle=shuffle)
        self.floor = floor
        self.variances: dict[str, float] = {}
        self._draws = 0
        self._drawn: set[str] = set()
        self._by_id = {item.id: item for item in self.items}

    @property
    def prompts_drawn(self) -> int:
        """How many distinct prompts were drawn so far."""
        return len(self._drawn)

    def observe(self, variances: Mapping[str, float]) -> None:
        """Record the latest reward-variance estimate of the prompts just scored."""
        for pid, v in variances.items():
            if pid in self._by_id:
                self.variances[pid] = max(float(v), 0.0)

    def next_batch(self, n: int) -> list:
        if n < 0:
            raise ValueError(f"next_batch needs n >= 0, got {n}")
        rng = random.Random(f"variance-selection-{self._seed}-{self._draws}")
        self._draws += 1
        unseen_in_order = [pid for pid in self.epoch_order(0) if pid not in self._drawn]
        chosen = unseen_in_order[: min(n, len(self))]
        # drawn but not scored yet (in flight with max_staleness > 0): the average estimate
        pending = sum(self.variances.values()) / len(self.variances) if self.variances else 1.0
        # in the source's order, not the set's: set order varies with string hashing and with
        # how the set was built, and the weighted draw must be the same after a resume
        seen = {pid: self.variances.get(pid, pending) for pid in self._by_id if pid in self._drawn and pid not in chosen}
        chosen += draw_without_replacement(selection_probabilities(seen, self.floor), n - len(chosen), rng)
        while len(chosen) < n:  # a batch larger than the prompt set repeats prompts
            chosen.append(rng.choice(list(self._by_id)))
        self._drawn.update(chosen)
        return [self._by_id[pid] for pid in chosen]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(), "variances": dict(self.variances), "draws": self._draws,
            "drawn": sorted(self._drawn),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.variances = {k: float(v) for k, v in state.get("variances", {}).items()}
        self._draws = int(state.get("draws", 0))
        self._drawn = set(state.get("drawn", []))


__all__ = [
    "selection_probabilities", "draw_without_replacement", "VarianceSelectedPrompts",
]
