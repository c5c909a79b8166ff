"""Nash-MD (Munos et al. 2024, "Nash learning from human feedback"), its policy-gradient form:
each sample y of a prompt is rewarded by how likely a pairwise preference model
(``reward.preference``) prefers it to an opponent drawn from the geometric mixture
pi^(1-beta) * ref^beta (beta: ``algorithm.mixture_coef``), minus 1/2; the KL to the
reference is a loss term (``kl_coef``, the paper's tau).

The opponent is not sampled from a second engine: the group's other samples, drawn from pi,
are importance-weighted by (ref / pi)^beta (self-normalised, ``rl_variants.mixture_weights``),
which targets that mixture exactly as the group grows; with few samples per prompt it is a
coarse estimate of it. Preferences are asked both ways round and averaged, so a model that
favours one position does not bias the advantage. Registers its estimator and algorithm.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.algorithms.online_ipo import compare_rows
from services.core.config import POLICY_GRADIENT_SETTINGS
from services.core.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs, outcome_on_tokens
from services.core.learner_batches import LearnerBatch
from services.core.rl_variants import nash_md_advantages


@ADVANTAGE_ESTIMATORS.register("preference_margin")
def preference_margin(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """A = P(the sample wins) - 1/2, with ``x.sequence_rewards`` holding the win probabilities."""
    return outcome_on_tokens(x.sequence_rewards - 0.5, x.mask)


def preference_matrix(x: StepInputs, n: int) -> Tensor:
    """[G, n, n]: P(y_i preferred to y_j) within each prompt group, from the preference model
    asked for every ordered pair (i, j), i != j, averaged with 1 - P(y_j preferred to y_i)."""
    groups = len(x.trajectories) // n
    pairs = [(g * n + i, g * n + j) for g in range(groups) for i in range(n) for j in range(n) if i != j]
    p = compare_rows(x, pairs)
    asked = torch.full((groups, n, n), 0.5, dtype=torch.float64)
    for (i, j), value in zip(pairs, p):
        asked[i // n, i % n, j % n] = value
    return (asked + 1.0 - asked.transpose(1, 2)) / 2


@ALGORITHMS.register("nash_md")
class NashMD(Algorithm):
    settings = POLICY_GRADIENT_SETTINGS | {"mixture_coef"}
    # the update is a REINFORCE step on each sample's sequence log-probability
    defaults = {"loss_agg_mode": "seq-mean-token-sum"}
    group_relative = True
    group_reason = "the opponent is another sample of the prompt"
    needs_preference: ClassVar[bool] = True

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        n, beta = x.cfg.rollout.n_samples, x.cfg.algorithm.mixture_coef
        preference = preference_matrix(x, n)
        ref = batches.sequence_sums(x.ref, x.tokens).double().view(-1, n)
        policy = batches.sequence_sums(x.sampler, x.tokens).double().view(-1, n)
        advantages, weights = nash_md_advantages(preference, ref, policy, beta)
        won = (advantages + 0.5).flatten().tolist()
        batch, stats = batches.grpo_batch(x.trajectories, won, n, x.pad_id, old_logprobs=x.old, ref_logprobs=x.ref,
                                          sampler=x.tis_sampler, estimator="preference_margin")
        ess = 1.0 / (weights ** 2).sum(dim=-1)  # effective number of opponents per sample, 1 .. n - 1
        stats.update({"reward/preference_vs_mixture": sum(won) / len(won),
                      "nash/opponent_ess_mean": float(ess.mean()), "nash/advantage_abs_mean": float(advantages.abs().mean())})
        return batch, stats
