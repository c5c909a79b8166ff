"""RLOO (Ahmadian et al. 2024; Kool et al. 2019): REINFORCE with a leave-one-out baseline,
A_i = r_i - mean of the other samples' rewards for the same prompt, on every response token;
the clipped policy loss (on-policy with one minibatch the ratio is 1, so it is REINFORCE's
gradient), no critic. Registers its advantage estimator and its algorithm; nothing else in
the code names it."""

from __future__ import annotations

from torch import Tensor

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.config import POLICY_GRADIENT_SETTINGS
from services.core.learner_batches import LearnerBatch
from services.core import rl_math
from services.core.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs, outcome_on_tokens


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """``rl_math.rloo_advantages`` of the sequence rewards, on every response token."""
    return outcome_on_tokens(rl_math.rloo_advantages(x.sequence_rewards, x.group_size), x.mask)


@ALGORITHMS.register("rloo")
class RLOO(Algorithm):
    settings = POLICY_GRADIENT_SETTINGS | {"drop_zero_variance_groups", "dynamic_sampling", "max_refills"}
    group_relative = True
    group_reason = "the leave-one-out baseline needs another sample of the prompt"

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        a = x.cfg.algorithm
        return batches.grpo_batch(
            x.trajectories, x.scores, x.cfg.rollout.n_samples, x.pad_id,
            drop_zero_variance=a.drop_zero_variance_groups or a.dynamic_sampling, old_logprobs=x.old, ref_logprobs=x.ref,
            sampler=x.tis_sampler, estimator="rloo",
        )
