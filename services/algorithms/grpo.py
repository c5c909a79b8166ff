"""GRPO (Shao et al. 2024): group-normalised outcome advantages, clipped policy loss, no critic."""

from __future__ import annotations

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.config import POLICY_GRADIENT_SETTINGS
from services.core.learner_batches import LearnerBatch


@ALGORITHMS.register("grpo")
class GRPO(Algorithm):
    settings = POLICY_GRADIENT_SETTINGS | {"scale_rewards_by_std", "drop_zero_variance_groups"}
    group_relative = True
    group_reason = "advantages are relative to the group"

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        a = x.cfg.algorithm
        return batches.grpo_batch(
            x.trajectories, x.scores, x.cfg.rollout.n_samples, x.pad_id, a.scale_rewards_by_std,
            a.drop_zero_variance_groups, old_logprobs=x.old, ref_logprobs=x.ref, sampler=x.tis_sampler,
        )
