"""Online IPO against a preference model (Calandriello et al. 2024; IPO: Azar et al. 2024):
the samples of each prompt are paired in order (0 with 1, 2 with 3, ...), a pairwise
preference model (``reward.preference``, ``services.reward.preference``) gives P(a preferred
to b) for each pair, and the loss pulls the pair's log-ratio margin h towards
(P - 1/2) / dpo_beta (``rl_variants.soft_ipo_loss``). Both samples are the current policy's
(the mixture parameter of IPO-MD / Nash-MD is 0 here: no geometric mixture with the
reference is sampled)."""

from __future__ import annotations

from typing import ClassVar

import torch

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.batch_types import trajectory_columns
from services.core.learner_batches import LearnerBatch


def sample_pairs(n_rows: int, group_size: int) -> list[tuple[int, int]]:
    """(a, b) row pairs: within each group of ``group_size`` rows, 0-1, 2-3, ... (an odd last row unpaired)."""
    return [(start + k, start + k + 1) for start in range(0, n_rows, group_size) for k in range(0, group_size - 1, 2)]


def compare_rows(x: StepInputs, pairs: list[tuple[int, int]]) -> list[float]:
    """P(row a preferred to row b) for each (a, b) of ``pairs`` from ``x.preference`` (the
    rewards trained on go with them, for Bradley-Terry)."""
    t = x.trajectories
    a, b = [t[i] for i, _ in pairs], [t[j] for _, j in pairs]
    return x.preference.compare([s.prompt for s in a], [s.response for s in a], [s.response for s in b],
                                trajectory_columns(a), [x.scores[i] for i, _ in pairs], [x.scores[j] for _, j in pairs])


@ALGORITHMS.register("online_ipo")
class OnlineIPO(Algorithm):
    settings = frozenset({"dpo_beta"})
    loss_kind = "dpo"
    group_relative = True
    group_reason = "a pair needs two responses"
    needs_preference: ClassVar[bool] = True

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        t = x.trajectories
        pairs = sample_pairs(len(t), x.cfg.rollout.n_samples)
        a, b = [t[i] for i, _ in pairs], [t[j] for _, j in pairs]
        p = compare_rows(x, pairs)
        ref_rows = batches.sequence_sums(x.ref, x.tokens)
        batch = batches.dpo_batch(a, b, ref_rows[[i for i, _ in pairs]], ref_rows[[j for _, j in pairs]], x.pad_id)
        batch.preference = torch.tensor(p, dtype=torch.float32)
        stats = {
            "train/pairs": float(len(pairs)), "reward/preference_mean": sum(p) / len(p),
            "reward/preference_decided": sum(abs(q - 0.5) > 0.4 for q in p) / len(p),  # P below 0.1 or above 0.9
        }
        return batch, stats
