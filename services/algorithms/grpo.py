"""GRPO (Shao et al. 2024): group-normalised outcome advantages, clipped policy loss, no critic;
and the variants that differ from it only in settings:

- DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28), token-level loss, no KL term, dynamic
  sampling (tied groups dropped, the batch refilled: ``services.driver.dynamic_sampling``);
  its soft overlong penalty is ``reward.overlong_buffer``;
- Dr. GRPO (Liu et al. 2025): advantages not divided by the group std, and each sequence's
  token sum (no division by its length) averaged over sequences.
"""

from __future__ import annotations

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.config import POLICY_GRADIENT_SETTINGS
from services.core.learner_batches import LearnerBatch

GROUP_SETTINGS = frozenset({"scale_rewards_by_std", "drop_zero_variance_groups", "dynamic_sampling", "max_refills"})


@ALGORITHMS.register("grpo")
class GRPO(Algorithm):
    settings = POLICY_GRADIENT_SETTINGS | GROUP_SETTINGS
    group_relative = True
    group_reason = "advantages are relative to the group"

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        a = x.cfg.algorithm
        return batches.grpo_batch(
            x.trajectories, x.scores, x.cfg.rollout.n_samples, x.pad_id, a.scale_rewards_by_std,
            a.drop_zero_variance_groups or a.dynamic_sampling, old_logprobs=x.old, ref_logprobs=x.ref,
            sampler=x.tis_sampler,
        )


@ALGORITHMS.register("dapo")
class DAPO(GRPO):
    defaults = {"clip_range": 0.2, "clip_range_high": 0.28, "loss_agg_mode": "token-mean", "kl_coef": 0.0,
                "dynamic_sampling": True}


@ALGORITHMS.register("dr_grpo")
class DrGRPO(GRPO):
    defaults = {"scale_rewards_by_std": False, "loss_agg_mode": "seq-mean-token-sum"}
