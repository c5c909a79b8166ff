"""Combining the scores of a reward ensemble's members: :class:`EnsembleScores` (aggregate,
member scores, their spread) and :func:`aggregate_scores` (mean, wco or uwo, per
``reward.aggregate``). No scorers and no Ray here: the in-process ensemble, the Ray reward
service, the gRPC client's answers and the reward-model evaluation all share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class EnsembleScores:
    """Aggregated scores [N] plus what metrics need: member scores [K][N] and their std [N];
    member_steps: a process-reward member's per-step scores [N][steps], by member name."""

    scores: list[float]
    member_scores: list[list[float]]
    member_std: list[float]
    member_names: list[str]
    member_steps: dict[str, list[list[float]]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Batch means for metrics.jsonl (``reward/`` group)."""
        n = max(len(self.scores), 1)
        out = {
            "reward/mean": sum(self.scores) / n,
            "reward/member_std": sum(self.member_std) / n,
        }
        for name, member in zip(self.member_names, self.member_scores):
            out[f"reward/member/{name}"] = sum(member) / n
        return out


    def take(self, rows: Sequence[int]) -> "EnsembleScores":
        """The scores of ``rows``, in that order."""
        return EnsembleScores([self.scores[i] for i in rows], [[m[i] for i in rows] for m in self.member_scores],
                              [self.member_std[i] for i in rows], list(self.member_names),
                              {name: [steps[i] for i in rows] for name, steps in self.member_steps.items()})

    @staticmethod
    def concat(parts: Sequence["EnsembleScores"], member_names: Sequence[str]) -> "EnsembleScores":
        """``parts`` one after another (members ``member_names``, also when there is no part)."""
        return EnsembleScores(
            [s for p in parts for s in p.scores],
            [[s for p in parts for s in p.member_scores[k]] for k in range(len(member_names))],
            [s for p in parts for s in p.member_std], list(member_names),
            {name: [row for p in parts for row in p.member_steps[name]] for name in (parts[0].member_steps if parts else {})},
        )


def aggregate_scores(
    member_scores: Sequence[Sequence[float]], member_names: Sequence[str], mode: str, uwo_lambda: float,
    weights: Sequence[float] | None = None,
) -> EnsembleScores:
    """Combine member scores [K][N] with ``rl_math.aggregate_ensemble`` (float64), each member's
    scores first multiplied by its weight (``reward.scorers[].weight``); the member scores kept
    for metrics are the unweighted ones."""
    import torch

    from services.core.rl_math import aggregate_ensemble

    member_scores = [list(map(float, m)) for m in member_scores]
    if len(member_scores) != len(member_names) or not member_scores:
        raise ValueError(f"{len(member_scores)} member score lists for {len(member_names)} names")
    n = len(member_scores[0])
    if any(len(m) != n for m in member_scores):
        raise ValueError(f"members returned different lengths: {[len(m) for m in member_scores]}")
    if n == 0:
        return EnsembleScores([], [[] for _ in member_scores], [], list(member_names))
    scaled = torch.tensor(member_scores, dtype=torch.float64)
    if weights is not None:
        if len(weights) != len(member_scores):
            raise ValueError(f"{len(weights)} weights for {len(member_scores)} members")
        scaled = scaled * torch.tensor(list(weights), dtype=torch.float64)[:, None]
    scores, std = aggregate_ensemble(scaled, mode, uwo_lambda)
    return EnsembleScores(scores.tolist(), member_scores, std.tolist(), list(member_names))


def soft_overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to ``max_tokens - buffer``
    tokens, then falling linearly to ``-factor`` at ``max_tokens`` (and below it past that)."""
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    return -factor * min(length - start, buffer) / buffer if length <= max_tokens else -factor


__all__ = ["EnsembleScores", "aggregate_scores", "soft_overlong_penalty"]
