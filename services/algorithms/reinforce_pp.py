"""REINFORCE++ (Hu et al. 2025): no critic; the outcome on the last token and a per-token KL
penalty in the reward, returns-to-go whitened over the whole batch, the clipped policy loss.
``reinforce_pp_baseline`` subtracts each prompt group's mean outcome first (n >= 2 samples).
Registers its advantage estimator and both algorithms."""

from __future__ import annotations

from torch import Tensor

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.config import POLICY_GRADIENT_SETTINGS
from services.core.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs
from services.core.learner_batches import LearnerBatch
from services.core.rl_variants import reinforce_pp_advantages


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Whitened returns-to-go of ``x.token_rewards``; with ``group_size`` > 1 the group's mean
    outcome (``x.sequence_rewards``) is subtracted from the last token's reward first."""
    group = x.group_size if x.group_size > 1 else None
    return reinforce_pp_advantages(x.token_rewards, x.mask, x.gamma, group, x.sequence_rewards)


@ALGORITHMS.register("reinforce_pp")
class ReinforcePP(Algorithm):
    settings = POLICY_GRADIENT_SETTINGS | {"gamma", "kl_in_reward"}
    # the paper's token-level KL in the reward (OpenRLHF's k1 estimator, coefficient 0.01), gamma 1
    defaults = {"kl_in_reward": True, "kl_coef": 0.01, "kl_estimator": "k1", "gamma": 1.0}

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        a = x.cfg.algorithm
        return batches.reinforce_pp_batch(
            x.trajectories, x.scores, x.ref, x.old, a.gamma, a.kl_coef, a.kl_estimator, a.kl_in_reward, x.pad_id,
            group_size=x.cfg.rollout.n_samples if self.group_relative else None, sampler=x.tis_sampler,
        )


@ALGORITHMS.register("reinforce_pp_baseline")
class ReinforcePPBaseline(ReinforcePP):
    group_relative = True
    group_reason = "the baseline is the mean outcome of the prompt's samples"
