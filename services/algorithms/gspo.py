"""GSPO (Zheng et al. 2025): GRPO's group-normalised advantages with a sequence-level,
length-normalised importance ratio and sequence-level clipping (``rl_variants.gspo_policy_loss``),
the paper's clip ranges 3e-4 / 4e-4, no KL term. Registers its policy loss and algorithm."""

from __future__ import annotations

from torch import Tensor

from services.algorithms.base import ALGORITHMS
from services.algorithms.grpo import GROUP_SETTINGS, GRPO
from services.core.config import AlgorithmConfig, POLICY_GRADIENT_SETTINGS
from services.core.estimators import POLICY_LOSSES
from services.core.rl_variants import gspo_policy_loss


@POLICY_LOSSES.register("gspo")
def gspo(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
         settings: AlgorithmConfig, is_weights: Tensor | None = None) -> tuple[Tensor, dict]:
    """``rl_variants.gspo_policy_loss`` with the algorithm section's clip ranges and aggregation."""
    return gspo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=settings.clip_range,
                            clip_high=settings.clip_range_high, agg_mode=settings.loss_agg_mode, is_weights=is_weights)


@ALGORITHMS.register("gspo")
class GSPO(GRPO):
    policy_loss = "gspo"
    settings = (POLICY_GRADIENT_SETTINGS - {"dual_clip"}) | GROUP_SETTINGS
    defaults = {"clip_range": 3e-4, "clip_range_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean", "kl_coef": 0.0}
