"""DAPO's dynamic sampling (Yu et al. 2025): prompt groups whose rewards all tie give no
gradient, so they are dropped and the batch is refilled with new prompts until it holds
``rollout.prompts_per_step`` groups with varied rewards, or ``algorithm.max_refills``
refills have been drawn (then the step trains on fewer groups, counted in metrics).

``fill_groups`` is the loop on plain callables (unit-tested with hand-counted draws); the
driver passes it its rollout-and-reward step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import stdev
from typing import Generic, TypeVar

from services.algorithms.batches import ZERO_STD_TOL
from services.core.batch_types import Trajectory
from services.core.rl_variants import refill_prompts
from services.reward.aggregate import EnsembleScores

G = TypeVar("G")


@dataclass
class Filled(Generic[G]):
    """The groups to train on (at most the target, in draw order) and the loop's figures."""

    groups: list[G]
    refills: int
    prompts_drawn: int
    dropped_tied: int
    surplus: int

    def stats(self, target: int) -> dict[str, float]:
        """For metrics.jsonl: refills drawn, prompts drawn in all, groups dropped for tied
        rewards, varied groups left over beyond the target, and how many the batch lacks."""
        return {
            "train/refills": float(self.refills), "train/refill_prompts_drawn": float(self.prompts_drawn),
            "train/groups_dropped_zero_var": float(self.dropped_tied), "train/groups_surplus": float(self.surplus),
            "train/groups_short": float(target - len(self.groups)),
        }


def fill_groups(draw: Callable[[int], Sequence[G]], varied: Callable[[G], bool], target: int,
                max_refills: int) -> Filled[G]:
    """``draw(k)``: k new prompt groups (sampled and scored); ``varied(group)``: its rewards
    differ. Draws ``target`` groups, then refills sized by ``refill_prompts`` while fewer
    than ``target`` varied groups are kept and refills are left."""
    kept: list[G] = []
    drawn = dropped = refills = 0
    size = target
    while True:
        batch = list(draw(size))
        drawn += len(batch)
        for group in batch:
            if varied(group):
                kept.append(group)
            else:
                dropped += 1
        missing = target - len(kept)
        if missing <= 0 or refills >= max_refills:
            break
        refills += 1
        size = refill_prompts(missing, len(kept), drawn, target)
    return Filled(kept[:target], refills, drawn, dropped, max(0, len(kept) - target))


@dataclass
class ScoredGroup:
    """One prompt's samples with their rows of the ensemble's scores and the rewards trained
    on (the aggregate plus environment rewards and the overlong penalty)."""

    trajectories: list[Trajectory]
    ensemble: EnsembleScores
    rewards: list[float]

    def varied(self) -> bool:
        """Its rewards differ (group std above ``batches.ZERO_STD_TOL``, as GRPO's drop uses)."""
        return len(self.rewards) > 1 and stdev(self.rewards) > ZERO_STD_TOL


def split_groups(trajectories: Sequence[Trajectory], ensemble: EnsembleScores,
                 rewards: Sequence[float]) -> list[ScoredGroup]:
    """Consecutive runs of one prompt_id as ScoredGroups (the pool returns a prompt's samples together)."""
    groups: list[ScoredGroup] = []
    start = 0
    for end in range(1, len(trajectories) + 1):
        if end == len(trajectories) or trajectories[end].prompt_id != trajectories[start].prompt_id:
            rows = list(range(start, end))
            groups.append(ScoredGroup(list(trajectories[start:end]), ensemble.take(rows), [rewards[i] for i in rows]))
            start = end
    return groups


def join_groups(groups: Sequence[ScoredGroup], member_names: Sequence[str]) -> tuple[list[Trajectory], EnsembleScores]:
    """The groups' trajectories in order, and their ensemble rows joined."""
    trajectories = [t for g in groups for t in g.trajectories]
    return trajectories, EnsembleScores.concat([g.ensemble for g in groups], member_names)


def filled_rollout(
    rollout: Callable[[int], tuple[list[Trajectory], float, dict]],
    rewards: Callable[[list[Trajectory]], tuple[EnsembleScores, list[float]]],
    target: int, max_refills: int,
) -> tuple[list[Trajectory], float, dict, tuple[EnsembleScores, dict]]:
    """A batch of ``target`` prompt groups with varied rewards, by ``fill_groups`` over
    ``rollout(k)`` (k prompts' trajectories, seconds, the pool's figures) scored by
    ``rewards(trajectories)`` (the ensemble's scores, the rewards trained on). Returns the
    kept trajectories, the seconds it all took, the pool's figures (requeued prompts summed
    over the draws) and (the kept rows' ensemble scores, ``Filled.stats``)."""
    started, pool_stats, names = time.perf_counter(), {}, []

    def draw(count: int) -> list[ScoredGroup]:
        trajectories, _, stats = rollout(count)
        requeued = pool_stats.get("rollout/requeued_prompts", 0.0) + stats.get("rollout/requeued_prompts", 0.0)
        pool_stats.update(stats, **{"rollout/requeued_prompts": requeued})
        ensemble, trained = rewards(trajectories)
        names[:] = ensemble.member_names
        return split_groups(trajectories, ensemble, trained)

    filled = fill_groups(draw, ScoredGroup.varied, target, max_refills)
    trajectories, ensemble = join_groups(filled.groups, names)
    return trajectories, time.perf_counter() - started, pool_stats, (ensemble, filled.stats(target))
