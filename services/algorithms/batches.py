"""Scored trajectories -> learner batches: group-relative (GRPO, RLOO), PPO (GAE), online DPO pairs.

Pure functions on torch tensors and ``rl_math`` (no Ray, no models). Per-token tensors
follow ``services.core.batch_types``: [B, T], aligned with ``input_ids`` positions, nonzero
only where ``response_mask`` is 1. Trajectories of one prompt come as consecutive groups
of ``group_size`` (sample_index 0..n-1). Stats are plain floats named for metrics.jsonl.
"""

from __future__ import annotations

from typing import Sequence

import torch

from services.core import rl_math
from services.core.batch_types import TokenBatch, Trajectory, pack_sequences, pad_response_values
from services.core.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs
from services.core.learner_batches import PairBatch, PolicyBatch

ZERO_STD_TOL = 1e-6  # a group whose reward std is at most this counts as all-tied


# ---------------------------------------------------------------------------
# validation and small helpers
# ---------------------------------------------------------------------------

def _check_nonempty(trajectories: Sequence[Trajectory]) -> None:
    if len(trajectories) == 0:
        raise ValueError("no trajectories")


def _check_len(name: str, values, n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} trajectories")


def _check_shape(name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the packed batch)")


def _check_groups(trajectories: Sequence[Trajectory], group_size: int) -> None:
    """group_size divides the count and each consecutive block shares one prompt_id."""
    if group_size < 1 or len(trajectories) % group_size:
        raise ValueError(f"{len(trajectories)} trajectories are not divisible into groups of {group_size}")
    for start in range(0, len(trajectories), group_size):
        ids = {t.prompt_id for t in trajectories[start : start + group_size]}
        if len(ids) != 1:
            raise ValueError(
                f"group at {start}..{start + group_size - 1} mixes prompts {sorted(ids)}: the samples of "
                "one prompt must be consecutive"
            )


def _scores(name: str, values, n: int) -> torch.Tensor:
    _check_len(name, values, n)
    out = torch.as_tensor(values, dtype=torch.float32).flatten()
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contain non-finite values")
    return out


# ---------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------

def complete_groups(trajectories: list[Trajectory], group_size: int) -> list[Trajectory]:
    """Only prompt groups that still have all ``group_size`` samples (after staleness drops)."""
    by_prompt: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_prompt.setdefault(t.prompt_id + f"@{t.policy_version}", []).append(t)
    return [t for group in by_prompt.values() if len(group) == group_size for t in group]


def filter_stale(
    trajectories: Sequence[Trajectory], learner_version: int, max_staleness: int
) -> tuple[list[Trajectory], int]:
    """Keep trajectories with ``learner_version - policy_version <= max_staleness``;
    returns (kept, dropped_count). A trajectory newer than the learner raises ValueError."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    kept = []
    for t in trajectories:
        if t.policy_version > learner_version:
            raise ValueError(
                f"trajectory {t.prompt_id}#{t.sample_index} has policy version {t.policy_version}, "
                f"newer than the learner's {learner_version}"
            )
        if learner_version - t.policy_version <= max_staleness:
            kept.append(t)
    return kept, len(trajectories) - len(kept)


def build_tokens(trajectories: Sequence[Trajectory], pad_id: int) -> TokenBatch:
    """Prompt + response of each trajectory, right-padded with ``pad_id``; a multi-turn
    episode's environment tokens are context only (``response_mask`` 0 there)."""
    _check_nonempty(trajectories)
    return pack_sequences([t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories], pad_id,
                          loss_masks=[t.loss_mask for t in trajectories])


def policy_token_values(values: list[list[float]], trajectories: Sequence[Trajectory]) -> list[list[float]]:
    """Per-response-token values (the reference's log-probs of every response token) -> those
    of the policy's tokens only, as ``build_tokens``'s ``response_mask`` holds them."""
    _check_len("values", values, len(trajectories))
    return [row if t.loss_mask is None else [v for v, m in zip(row, t.loss_mask, strict=True) if m]
            for row, t in zip(values, trajectories)]


def sampler_logprobs(trajectories: Sequence[Trajectory], tokens: TokenBatch) -> torch.Tensor:
    """The sampler's per-token log-probs at response positions, [B, T] (0 elsewhere)."""
    _check_len("trajectories", trajectories, tokens.size)
    for i, t in enumerate(trajectories):
        policy_tokens = len(t.response_ids) if t.loss_mask is None else sum(t.loss_mask)
        if len(t.logprobs) != policy_tokens:
            raise ValueError(f"trajectory {i}: {len(t.logprobs)} log-probs for {policy_tokens} policy tokens")
    return pad_response_values([list(t.logprobs) for t in trajectories], tokens)


def sequence_sums(per_token: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Sum over each sequence's response tokens: [B, T] -> [B]."""
    _check_shape("per_token", per_token, tokens.response_mask.shape)
    return rl_math.masked_sum(per_token, tokens.response_mask.bool(), dim=-1)


def kl_stats(
    sampler_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, tokens: TokenBatch, estimator: str
) -> dict[str, float]:
    """``rollout/kl``: token mean of ``estimator`` of KL(pi || ref); ``rollout/kl_seq``: mean
    over sequences of the summed k1 log-ratio (sequence-level KL, for sqrt-KL plots)."""
    mask = tokens.response_mask.bool()
    _check_shape("sampler_logprobs", sampler_logprobs, mask.shape)
    _check_shape("ref_logprobs", ref_logprobs, mask.shape)
    per_token = rl_math.kl_estimate(sampler_logprobs, ref_logprobs, estimator)
    seq = sequence_sums(sampler_logprobs - ref_logprobs, tokens)
    return {"rollout/kl": float(rl_math.masked_mean(per_token, mask)), "rollout/kl_seq": float(seq.mean())}


# ---------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------

def grpo_batch(
    trajectories: Sequence[Trajectory],
    rewards: Sequence[float],
    group_size: int,
    pad_id: int,
    scale_by_std: bool = True,
    drop_zero_variance: bool = False,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    sampler: torch.Tensor | None = None,
    estimator: str = "grpo",
) -> tuple[PolicyBatch | None, dict[str, float]]:
    """Group-relative advantages on every response token: the outcome advantage estimator
    ``estimator`` (``services.core.estimators``; grpo: ``rl_math.grpo_advantages``).

    ``old_logprobs`` / ``ref_logprobs`` / ``sampler`` (the sampler's log-probs, for the
    truncated-IS weights) are [B, T] over ``build_tokens(trajectories)``; old defaults to the
    sampler's log-probs. With ``drop_zero_variance`` groups whose rewards all tie are left out
    (their advantages are 0 anyway). Returns (a PolicyBatch with ``tokens``, ``old_logprobs``,
    ``advantages`` and ``ref_logprobs`` / ``sampler_logprobs`` if given; or None when every
    group was dropped, stats).
    """
    _check_nonempty(trajectories)
    r = _scores("rewards", rewards, len(trajectories))
    _check_groups(trajectories, group_size)
    tokens = build_tokens(trajectories, pad_id)
    shape = tokens.input_ids.shape
    if old_logprobs is None:
        old_logprobs = sampler_logprobs(trajectories, tokens)
    _check_shape("old_logprobs", old_logprobs, shape)
    optional = {"ref_logprobs": ref_logprobs, "sampler_logprobs": sampler}
    optional = {name: t for name, t in optional.items() if t is not None}
    for name, t in optional.items():
        _check_shape(name, t, shape)

    std = rl_math.group_reward_std(r, group_size)
    mask = tokens.response_mask.bool()
    adv, _ = ADVANTAGE_ESTIMATORS.get(estimator)(AdvantageInputs(
        sequence_rewards=r, token_rewards=torch.zeros(shape), mask=mask, group_size=group_size,
        scale_by_std=scale_by_std,
    ))
    keep_group = std > ZERO_STD_TOL if drop_zero_variance else torch.ones_like(std, dtype=torch.bool)
    stats = {
        "train/groups_kept": float(keep_group.sum()),
        "train/groups_dropped_zero_var": float((~keep_group).sum()),
        "reward/group_std_mean": float(std.mean()),
    }
    if not keep_group.any():
        return None, stats

    batch = PolicyBatch(tokens, old_logprobs=old_logprobs.float(), advantages=adv,
                        **{name: t.float() for name, t in optional.items()})
    rows = keep_group.repeat_interleave(group_size).nonzero().flatten()
    return batch.take(rows).trim(), stats


# ---------------------------------------------------------------------------
# PPO, REINFORCE++
# ---------------------------------------------------------------------------

def token_rewards(
    scores: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
    kl_coef: float, kl_estimator: str, kl_in_reward: bool, placed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: each row's score [B] on its last response token (or the
    rewards ``placed`` [B, T] already put on tokens: a process reward's steps), minus
    ``kl_coef * kl_estimate(old, ref)`` on every response token when ``kl_in_reward``.
    Returns (rewards, that penalty, the per-token KL estimate), all 0 off the mask."""
    zero = torch.zeros(())
    if placed is not None:
        _check_shape("step rewards", placed, mask.shape)
        rewards = torch.where(mask, placed.float(), zero)
    else:
        rewards = torch.zeros(mask.shape, dtype=torch.float32)
        rows = mask.any(dim=-1).nonzero().flatten()
        last = mask.long().cumsum(dim=-1).argmax(dim=-1)  # first position reaching the full count
        rewards[rows, last[rows]] = scores[rows]
    kl = torch.where(mask, rl_math.kl_estimate(old_logprobs, ref_logprobs, kl_estimator), zero)
    penalty = kl_coef * kl if kl_in_reward else torch.zeros_like(kl)
    return rewards - penalty, penalty, kl


def ppo_batch(
    trajectories: Sequence[Trajectory],
    scores: Sequence[float],
    values: torch.Tensor,
    ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    gamma: float,
    lam: float,
    kl_coef: float,
    kl_estimator: str,
    kl_in_reward: bool,
    pad_id: int,
    whiten_advantages: bool = True,
    sampler: torch.Tensor | None = None,
    step_rewards: torch.Tensor | None = None,
) -> tuple[PolicyBatch, dict[str, float]]:
    """GAE advantages from a terminal score, or from ``step_rewards`` [B, T] (a process
    reward's step scores on the tokens that end the steps), plus a per-token KL penalty if
    ``kl_in_reward``.

    Per-token reward r_t = score at the last response token, minus
    ``kl_coef * kl_estimate(old, ref)`` on every response token when ``kl_in_reward``.
    ``values``, ``ref_logprobs``, ``old_logprobs`` are [B, T] over ``build_tokens``. Returns
    (a PolicyBatch: tokens, old_logprobs, advantages (whitened if asked), returns, old_values,
    ref_logprobs when the KL is a loss term, and ``sampler`` (the sampler's log-probs [B, T],
    for the truncated-IS weights) as sampler_logprobs when given; stats).
    """
    _check_nonempty(trajectories)
    s = _scores("scores", scores, len(trajectories))
    tokens = build_tokens(trajectories, pad_id)
    shape = tokens.input_ids.shape
    for name, t in (("values", values), ("ref_logprobs", ref_logprobs), ("old_logprobs", old_logprobs)):
        _check_shape(name, t, shape)
    mask = tokens.response_mask.bool()
    zero = torch.zeros(())
    values = torch.where(mask, values.float(), zero)
    old_logprobs, ref_logprobs = old_logprobs.float(), ref_logprobs.float()

    rewards, penalty, kl = token_rewards(s, mask, old_logprobs, ref_logprobs, kl_coef, kl_estimator, kl_in_reward,
                                         placed=step_rewards)
    has_response = mask.any(dim=-1)
    adv, returns = ADVANTAGE_ESTIMATORS.get("gae")(AdvantageInputs(
        sequence_rewards=s, token_rewards=rewards, mask=mask, values=values, gamma=gamma, lam=lam,
    ))
    if whiten_advantages:
        adv = rl_math.masked_whiten(adv, mask)
    if sampler is not None:
        _check_shape("sampler_logprobs", sampler, shape)
    batch = PolicyBatch(
        tokens, old_logprobs=old_logprobs, advantages=adv, returns=returns, old_values=values,
        ref_logprobs=None if kl_in_reward else ref_logprobs, sampler_logprobs=None if sampler is None else sampler.float(),
    )
    seq_penalty = penalty.sum(dim=-1)
    stats = {
        "reward/score_mean": float(s.mean()),
        "reward/kl_penalty_mean": float(seq_penalty.mean()),
        "reward/total_mean": float((s * has_response - seq_penalty).mean()),
        "reward/kl_token_mean": float(rl_math.masked_mean(kl, mask)),
        "train/returns_mean": float(rl_math.masked_mean(returns, mask)),
        "train/values_mean": float(rl_math.masked_mean(values, mask)),
        "train/advantages_std": float(rl_math.masked_var(adv, mask).sqrt()),
        "train/empty_responses": float((~has_response).sum()),
    }
    return batch, stats


def reinforce_pp_batch(
    trajectories: Sequence[Trajectory], scores: Sequence[float], ref_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor, gamma: float, kl_coef: float, kl_estimator: str, kl_in_reward: bool, pad_id: int,
    group_size: int | None = None, sampler: torch.Tensor | None = None,
) -> tuple[PolicyBatch, dict[str, float]]:
    """REINFORCE++: the per-token rewards of ``token_rewards``, their returns-to-go whitened
    over the whole batch (``rl_variants.reinforce_pp_advantages``; with ``group_size`` the
    group mean outcome is subtracted first, REINFORCE++-baseline). No critic. The KL is in
    the reward with ``kl_in_reward``, else a loss term on ``ref_logprobs``."""
    _check_nonempty(trajectories)
    s = _scores("scores", scores, len(trajectories))
    if group_size is not None:
        _check_groups(trajectories, group_size)
    tokens = build_tokens(trajectories, pad_id)
    shape = tokens.input_ids.shape
    for name, t in (("ref_logprobs", ref_logprobs), ("old_logprobs", old_logprobs)) + (
            (("sampler_logprobs", sampler),) if sampler is not None else ()):
        _check_shape(name, t, shape)
    mask = tokens.response_mask.bool()
    old_logprobs, ref_logprobs = old_logprobs.float(), ref_logprobs.float()
    rewards, penalty, kl = token_rewards(s, mask, old_logprobs, ref_logprobs, kl_coef, kl_estimator, kl_in_reward)
    adv, returns = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(AdvantageInputs(
        sequence_rewards=s, token_rewards=rewards, mask=mask, gamma=gamma, group_size=group_size or 1,
    ))
    batch = PolicyBatch(tokens, old_logprobs=old_logprobs, advantages=adv,
                        ref_logprobs=None if kl_in_reward else ref_logprobs,
                        sampler_logprobs=None if sampler is None else sampler.float())
    stats = {
        "reward/score_mean": float(s.mean()), "reward/kl_penalty_mean": float(penalty.sum(dim=-1).mean()),
        "reward/kl_token_mean": float(rl_math.masked_mean(kl, mask)),
        "train/returns_mean": float(rl_math.masked_mean(returns, mask)),
        "train/returns_std": float(rl_math.masked_var(returns, mask).sqrt()),
    }
    return batch, stats


# ---------------------------------------------------------------------------
# online DPO
# ---------------------------------------------------------------------------

def dpo_pairs(
    trajectories: Sequence[Trajectory],
    scores: Sequence[float],
    group_size: int,
    pad_id: int | None = None,
) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
    """Per prompt group: chosen = highest score, rejected = lowest (first one on ties).
    Groups whose best and worst tie are dropped. ``pad_id`` is unused (no tokens built here).
    Returns (chosen, rejected, stats)."""
    _check_nonempty(trajectories)
    s = _scores("scores", scores, len(trajectories))
    _check_groups(trajectories, group_size)
    if group_size < 2:
        raise ValueError(f"online DPO needs group_size >= 2 to form pairs, got {group_size}")
    groups = s.view(-1, group_size)
    best, worst = groups.argmax(dim=1), groups.argmin(dim=1)
    margins = groups.max(dim=1).values - groups.min(dim=1).values
    keep = margins > ZERO_STD_TOL
    chosen, rejected = [], []
    for g in keep.nonzero().flatten().tolist():
        chosen.append(trajectories[g * group_size + int(best[g])])
        rejected.append(trajectories[g * group_size + int(worst[g])])
    stats = {
        "train/pairs": float(keep.sum()),
        "train/pairs_dropped_ties": float((~keep).sum()),
        "reward/pair_margin_mean": float(margins[keep].mean()) if keep.any() else 0.0,
    }
    return chosen, rejected, stats


def dpo_batch(
    chosen_trajs: Sequence[Trajectory],
    rejected_trajs: Sequence[Trajectory],
    ref_chosen_logps,
    ref_rejected_logps,
    pad_id: int,
) -> PairBatch:
    """Learner batch of pairs: ``chosen`` / ``rejected`` TokenBatches (``build_tokens``) and
    the reference's summed response log-probs [B] of each."""
    _check_nonempty(chosen_trajs)
    _check_len("rejected trajectories", rejected_trajs, len(chosen_trajs))
    ref_c = torch.as_tensor(ref_chosen_logps, dtype=torch.float32).flatten()
    ref_r = torch.as_tensor(ref_rejected_logps, dtype=torch.float32).flatten()
    _check_len("ref_chosen_logps", ref_c, len(chosen_trajs))
    _check_len("ref_rejected_logps", ref_r, len(chosen_trajs))
    for i, (c, r) in enumerate(zip(chosen_trajs, rejected_trajs)):
        if c.prompt_id != r.prompt_id:
            raise ValueError(f"pair {i}: chosen prompt {c.prompt_id!r} but rejected prompt {r.prompt_id!r}")
    return PairBatch(build_tokens(chosen_trajs, pad_id), build_tokens(rejected_trajs, pad_id), ref_c, ref_r)
