"""Online DPO (Guo et al. 2024): per prompt group, the best and worst sample make a pair;
DPO / IPO loss against the reference. CHES scores of the pairs (Razin et al. 2024) are
logged and can filter the pairs most likely to lower log p(chosen)."""

from __future__ import annotations

from services.algorithms import batches
from services.algorithms.base import ALGORITHMS, Algorithm, StepInputs
from services.core.config import PAIR_SETTINGS
from services.core.learner_batches import LearnerBatch
from services.core.rl_math import ches_keep_mask, ches_scores


@ALGORITHMS.register("online_dpo")
class OnlineDPO(Algorithm):
    settings = PAIR_SETTINGS
    loss_kind = "dpo"
    group_relative = True
    group_reason = "a pair needs two responses"
    tracks_displacement = True

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        a = x.cfg.algorithm
        chosen, rejected, stats = batches.dpo_pairs(x.trajectories, x.scores, x.cfg.rollout.n_samples, x.pad_id)
        if not chosen:
            return None, stats
        if a.ches_log or a.ches_filter_top > 0:
            chosen, rejected = self._ches(x, chosen, rejected, stats)
        ref_rows = batches.sequence_sums(x.ref, x.tokens)
        index = {id(t): i for i, t in enumerate(x.trajectories)}
        batch = batches.dpo_batch(
            chosen, rejected,
            ref_rows[[index[id(t)] for t in chosen]], ref_rows[[index[id(t)] for t in rejected]], x.pad_id,
        )
        return batch, stats

    @staticmethod
    def _ches(x: StepInputs, chosen: list, rejected: list, stats: dict) -> tuple[list, list]:
        """CHES of each pair under the learner; drops the top ``algorithm.ches_filter_top`` share when set."""
        ches = ches_scores(
            x.learner.response_hidden_sums(batches.build_tokens(chosen, x.pad_id)),
            x.learner.response_hidden_sums(batches.build_tokens(rejected, x.pad_id)),
        )
        keep = ches_keep_mask(ches, x.cfg.algorithm.ches_filter_top)
        stats.update({
            "dpo/ches_mean": float(ches.mean()), "dpo/ches_max": float(ches.max()),
            "dpo/ches_kept_mean": float(ches[keep].mean()), "dpo/ches_dropped": float((~keep).sum()),
        })
        stats["train/pairs"] = float(keep.sum())
        kept = keep.tolist()
        return [c for c, k in zip(chosen, kept) if k], [r for r, k in zip(rejected, kept) if k]
