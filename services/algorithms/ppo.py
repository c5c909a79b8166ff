"""PPO (Schulman et al. 2017; Ouyang et al. 2022): a critic, GAE advantages, clipped policy loss."""

from __future__ import annotations

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.config import POLICY_GRADIENT_SETTINGS
from services.core.learner_batches import LearnerBatch


@ALGORITHMS.register("ppo")
class PPO(Algorithm):
    settings = POLICY_GRADIENT_SETTINGS | {"value_clip", "gamma", "lam", "kl_in_reward", "step_rewards"}
    needs_critic = True

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        a = x.cfg.algorithm
        return batches.ppo_batch(
            x.trajectories, x.scores, x.values, x.ref, x.old, a.gamma, a.lam, a.kl_coef, a.kl_estimator,
            a.kl_in_reward, x.pad_id, sampler=x.tis_sampler, step_rewards=x.step_rewards,
        )
