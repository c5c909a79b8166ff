"""Statistics of reward-model scores: pure functions of lists of floats (numpy for quantiles).

Pairwise accuracy against labels and against the gold order, disagreement between ensemble
members, and per-prompt reward variance (Razin et al. 2025). Used by the reward-model
evaluation (services/reward/evaluation.py) and by the driver (reward variance per step,
variance-based prompt selection), and pass@k of verifiable rewards.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence
from statistics import fmean

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def pairwise_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs scored chosen > rejected; an exact tie counts one half."""
    if not chosen:
        return float("nan")
    return fmean(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))


def gold_order_accuracy(
    chosen: list[float], rejected: list[float], gold_chosen: list[float], gold_rejected: list[float]
) -> float:
    """Share of pairs whose scores order the two responses as the gold reward does (the
    noiseless ordering, whatever the label says); a score tie counts one half."""
    flipped = [(r, c) if gc < gr else (c, r) for c, r, gc, gr in zip(chosen, rejected, gold_chosen, gold_rejected)]
    return pairwise_accuracy([a for a, _ in flipped], [b for _, b in flipped])


def order_disagreement(member_chosen: list[list[float]], member_rejected: list[list[float]]) -> float:
    """Share of pairs on which the members do not all prefer the same response."""
    n = len(member_chosen[0])
    if n == 0:
        return float("nan")
    votes = [{c[i] > r[i] for c, r in zip(member_chosen, member_rejected)} for i in range(n)]
    return fmean(1.0 if len(v) > 1 else 0.0 for v in votes)


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = fmean(x), fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def mean_pairwise_correlation(member_scores: list[list[float]]) -> float | None:
    """Mean Pearson correlation over all member pairs; None with a single member."""
    k = len(member_scores)
    if k < 2:
        return None
    return fmean(pearson(member_scores[i], member_scores[j]) for i in range(k) for j in range(i + 1, k))


def centered_member_std(member_scores: list[list[float]]) -> float:
    """Mean over responses of the (K-1) std across members, each member's scores first
    shifted to mean 0 (a Bradley-Terry reward's offset is arbitrary)."""
    if len(member_scores) < 2:
        return 0.0
    centred = [[s - fmean(member) for s in member] for member in member_scores]
    return fmean(statistics.stdev(column) for column in zip(*centred))


def variance_by_prompt(prompt_ids: Sequence[Hashable], scores: Sequence[float]) -> dict:
    """Unbiased variance of the scores of each prompt's samples, for prompts with >= 2
    samples (in the order the prompts first appear)."""
    groups: dict = {}
    for pid, score in zip(prompt_ids, scores):
        groups.setdefault(pid, []).append(float(score))
    return {pid: statistics.variance(values) for pid, values in groups.items() if len(values) >= 2}


def per_prompt_variance(scores: list[float], n: int) -> list[float]:
    """Unbiased variance of each consecutive group of n scores (n responses of one prompt)."""
    if n < 2 or len(scores) % n:
        raise ValueError(f"{len(scores)} scores do not split into groups of n = {n} >= 2")
    return list(variance_by_prompt([i // n for i in range(len(scores))], scores).values())


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method)."""
    import numpy as np

    return float(np.quantile(values, q))


def summarize_variances(variances: list[float], threshold: float) -> dict[str, float]:
    """Mean, quantiles and the share below ``threshold`` of per-prompt reward variances."""
    return {
        "mean": fmean(variances),
        **{f"p{round(q * 100)}": quantile(variances, q) for q in QUANTILES},
        "fraction_below_threshold": fmean(1.0 if v < threshold else 0.0 for v in variances),
    }


def variance_summary(scores: list[float], n: int, threshold: float) -> dict[str, float]:
    """Razin et al.'s reward variance per prompt, summarised; ``scores`` are n per prompt."""
    variances = per_prompt_variance(scores, n)
    total = statistics.variance(scores)
    return {
        **summarize_variances(variances, threshold),
        "within_prompt_share": fmean(variances) / total if total > 0 else float("nan"),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k of the n samples, drawn without replacement,
    hold at least one correct one; computed as a product, without large binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct_by_prompt: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts, each with its own n samples (their correctness)."""
    return fmean(pass_at_k(len(flags), sum(map(bool, flags)), k) for flags in correct_by_prompt)



def variance_record(variances: dict, threshold: float) -> dict[str, float]:
    """metrics.jsonl's ``reward/var_*`` figures of per-prompt reward variances (none: {})."""
    if not variances:
        return {}
    stats = summarize_variances(list(variances.values()), threshold)
    return {"reward/var_mean": stats["mean"], "reward/var_p10": stats["p10"], "reward/var_p50": stats["p50"],
            "reward/var_frac_below": stats["fraction_below_threshold"]}


__all__ = [
    "pass_at_k", "mean_pass_at_k",
    "pairwise_accuracy", "gold_order_accuracy", "order_disagreement", "pearson", "mean_pairwise_correlation",
    "centered_member_std", "variance_by_prompt", "per_prompt_variance", "quantile", "summarize_variances",
    "variance_summary", "variance_record",
]
