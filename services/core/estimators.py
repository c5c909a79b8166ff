"""Advantage estimators and policy losses by name, each with one signature (verl's
``core_algos`` registers them the same way). The formulas are ``rl_math``'s; this module
only gives them a uniform shape so that an algorithm picks them by name.

Advantage estimator: ``fn(x: AdvantageInputs) -> (advantages [B, T], returns [B, T])``,
zero off the response tokens. Outcome estimators (grpo, rloo) read ``x.sequence_rewards``
and put the sequence advantage on every response token; token-level ones (gae) read
``x.token_rewards``.

Policy loss: ``fn(logprobs [B, T], old_logprobs [B, T], advantages [B, T], mask [B, T],
settings: AlgorithmConfig, is_weights [B, T] | None) -> (loss scalar, stats of detached
scalars)``; ``settings`` is the algorithm section as the loss applies it (``LossSpec.algorithm``:
clip_range, clip_range_high, dual_clip, loss_agg_mode, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from services.core import rl_math
from services.core.config import AlgorithmConfig
from services.core.registry import Registry

# an algorithm module (services/algorithms/) may register its own estimator or loss
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator", "algorithm.name", package="services.algorithms")
POLICY_LOSSES: Registry = Registry("policy loss", "algorithm.policy_loss", package="services.algorithms")


@dataclass(frozen=True)
class AdvantageInputs:
    """sequence_rewards [B]: each row's outcome reward (also for an empty response);
    token_rewards [B, T]: reward on response tokens (the outcome on the last, minus any
    per-token KL penalty); mask [B, T]: response tokens; group_size: rows i*g .. i*g+g-1 answer one prompt;
    values [B, T] | None: critic values V(state before token t) (GAE only);
    gamma, lam: GAE discount and trace decay; scale_by_std: GRPO's division by the group std."""

    sequence_rewards: Tensor
    token_rewards: Tensor
    mask: Tensor
    group_size: int = 1
    values: Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95
    scale_by_std: bool = True


def outcome_on_tokens(sequence_advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """[B] sequence advantages on every response token of [B, T]; returns = advantages."""
    adv = sequence_advantages[:, None].float() * mask.bool()
    return adv, adv


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """(r_i - mean_g) / (std_g + eps), or r_i - mean_g without ``scale_by_std``."""
    adv = rl_math.grpo_advantages(x.sequence_rewards, x.group_size, scale_by_std=x.scale_by_std)
    return outcome_on_tokens(adv, x.mask)


@ADVANTAGE_ESTIMATORS.register("gae")
def gae(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation against the critic's values (needs ``values``)."""
    if x.values is None:
        raise ValueError("the gae advantage estimator needs critic values")
    return rl_math.gae_advantages(x.token_rewards, x.values, x.mask, x.gamma, x.lam)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
             settings: AlgorithmConfig, is_weights: Tensor | None = None) -> tuple[Tensor, dict]:
    """The clipped surrogate (with optional dual clip), ``rl_math.ppo_policy_loss``."""
    return rl_math.ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_low=settings.clip_range,
        clip_high=settings.clip_range_high, dual_clip=settings.dual_clip, agg_mode=settings.loss_agg_mode,
        is_weights=is_weights,
    )
