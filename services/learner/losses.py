"""Loss assembly for the RL learner: which loss terms a train step uses (``LossSpec``) and
how one micro-batch's terms are built from logits with the formulas in ``rl_math``.

Pure torch (no DeepSpeed, no Ray), so the pieces are unit-tested on their own.

Per-token alignment follows ``services.core.batch_types``: the value at position t belongs
to token t and comes from the model output at t-1 (position 0 holds 0). Values of the critic
use the same shift: ``values[:, t]`` is V(state before token t), read from position t-1.

Micro-batch weighting: a batch's loss is ``aggregate_loss`` over the whole batch. Each
micro-batch's aggregated loss is weighted by ``micro.loss_count / denominator``, where the
denominator is ``loss_count`` of the whole (mini)batch (response tokens for token-mean,
sequences with a response token for the seq-mean modes, pairs for DPO; see
``services.core.learner_batches``). The sum over micro-batches equals the whole-batch
aggregate exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from services.core import rl_math
from services.core.batch_types import TokenBatch
from services.core.learner_batches import LearnerBatch, PairBatch, PolicyBatch
from services.core.estimators import POLICY_LOSSES, PolicyLossSettings

KINDS = ("ppo", "dpo", "sft")


@dataclass
class LossSpec:
    """The loss of one train step.

    kind: "ppo" (clipped surrogate; PPO and GRPO), "dpo" (DPO / IPO on pairs) or "sft"
    (negative log-likelihood of the response tokens). kl_coef > 0 adds
    ``kl_coef * KL(pi || ref)`` as a loss term (needs ``ref_logprobs``); entropy_coef > 0
    subtracts ``entropy_coef * entropy``; value_clip / vf_coef configure the critic.
    tis_cap (ppo only) multiplies each token's policy loss by the truncated importance weight
    min(exp(old_logprobs - sampler_logprobs), tis_cap) (needs ``sampler_logprobs``).
    epochs / minibatch_size (ppo only): one train step makes ``epochs`` passes over the batch
    cut into minibatches of about ``minibatch_size`` rows, one optimizer step each (null: one
    minibatch, the whole batch); see ``plan_update``.
    """

    kind: str = "ppo"
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    ptx_coef: float = 0.0
    tis_cap: float | None = None
    epochs: int = 1
    minibatch_size: int | None = None
    policy_loss: str = "ppo_clip"  # ppo kind: the registered policy loss (services.core.estimators)

    def __post_init__(self) -> None:
        allowed = {
            "kind": KINDS, "agg_mode": rl_math.AGG_MODES,
            "kl_estimator": rl_math.KL_KINDS, "dpo_loss_type": rl_math.DPO_LOSS_TYPES,
        }
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(f"LossSpec.{name}={getattr(self, name)!r}; allowed: {', '.join(options)}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"LossSpec.dual_clip must be > 1, got {self.dual_clip}")
        if self.ptx_coef < 0:
            raise ValueError(f"LossSpec.ptx_coef must be >= 0, got {self.ptx_coef}")
        if self.ptx_coef and self.kind != "ppo":
            raise ValueError("LossSpec.ptx_coef: the pretraining-mix term goes with ppo/grpo updates only")
        if self.tis_cap is not None and (self.kind != "ppo" or not self.tis_cap > 0):
            raise ValueError(f"LossSpec.tis_cap must be > 0 and goes with ppo/grpo updates only, got {self.tis_cap}")
        if self.epochs < 1 or (self.minibatch_size is not None and self.minibatch_size < 1):
            raise ValueError(f"LossSpec.epochs and minibatch_size must be >= 1, got {self.epochs}, {self.minibatch_size}")
        if (self.epochs > 1 or self.minibatch_size is not None) and self.kind != "ppo":
            raise ValueError("LossSpec.epochs / minibatch_size: PPO minibatches go with ppo/grpo updates only")

    @classmethod
    def from_config(cls, cfg, kind: str, policy_loss: str = "ppo_clip") -> "LossSpec":
        """From a FlywheelConfig, the algorithm's loss family ``kind`` and its policy loss
        (``Algorithm.loss_kind`` / ``policy_loss``):
        the algorithm section plus learner.entropy_coef / vf_coef. With
        ``algorithm.kl_in_reward`` the KL goes into the reward, not the loss."""
        alg, learner = cfg.algorithm, cfg.learner
        return cls(
            kind=kind, clip_low=alg.clip_range, clip_high=alg.clip_range_high, dual_clip=alg.dual_clip,
            agg_mode=alg.loss_agg_mode, kl_coef=0.0 if alg.kl_in_reward or kind == "dpo" else alg.kl_coef,
            kl_estimator=alg.kl_estimator, entropy_coef=learner.entropy_coef, value_clip=alg.value_clip,
            vf_coef=learner.vf_coef, dpo_beta=alg.dpo_beta, dpo_loss_type=alg.dpo_loss,
            ptx_coef=alg.ptx_coef if kind == "ppo" else 0.0, tis_cap=alg.tis_cap if kind == "ppo" else None,
            epochs=alg.ppo_epochs if kind == "ppo" else 1,
            minibatch_size=alg.ppo_minibatch_size if kind == "ppo" else None, policy_loss=policy_loss,
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------
# per-token quantities from model outputs
# ---------------------------------------------------------------------------

def _shift(per_position: torch.Tensor) -> torch.Tensor:
    """[B, T-1] computed from positions 0..T-2 -> [B, T] aligned to tokens 1..T-1."""
    return torch.nn.functional.pad(per_position, (1, 0))


def per_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) at position t; [B, T] (position 0 is 0)."""
    return _shift(rl_math.logprobs_from_logits(logits[:, :-1], input_ids[:, 1:]))


def per_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution token t was drawn from, at position t; [B, T]."""
    return _shift(rl_math.entropy_from_logits(logits[:, :-1]))


def per_token_values(scores: torch.Tensor) -> torch.Tensor:
    """Critic head output [B, T] or [B, T, 1] -> V(state before token t) at position t."""
    if scores.dim() == 3:
        scores = scores.squeeze(-1)
    return _shift(scores[:, :-1].float())


# ---------------------------------------------------------------------------
# minibatches and their weights
# ---------------------------------------------------------------------------

def minibatch_bounds(rows: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous row ranges [start, stop) covering ``rows``, sizes differing by at
    most one (the first ``rows % count`` one larger, as ``torch.tensor_split``)."""
    bounds, start = [], 0
    for k in range(count):
        stop = start + rows // count + (1 if k < rows % count else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class UpdatePlan:
    """How one train step cuts each rank's batch into optimizer steps: ``epochs`` passes over
    the minibatches ``bounds`` (row ranges of the rank's batch, the same on every rank, in
    batch order: no shuffling, verl's default). ``denominators[k]`` is minibatch k's
    ``agg_count`` over all ranks and ``scale`` the number of ranks, so M ranks make the update
    of one rank holding the whole batch. The PPO-ptx rows are cut into as many parts
    (``ptx_bounds``, ``ptx_denominators``: response tokens of part k over all ranks)."""

    epochs: int
    bounds: tuple[tuple[int, int], ...]
    denominators: tuple[float, ...]
    scale: float = 1.0
    ptx_bounds: tuple[tuple[int, int], ...] = ()
    ptx_denominators: tuple[float, ...] = ()

    @property
    def optimizer_steps(self) -> int:
        return self.epochs * len(self.bounds)


def minibatch_count(rows: int, minibatch_size: int | None) -> int:
    """Minibatches of a batch of ``rows`` rows (sequences; pairs for DPO)."""
    return 1 if minibatch_size is None else max(1, -(-rows // minibatch_size))


def plan_update(shards: list[LearnerBatch], spec: LossSpec) -> UpdatePlan:
    """The ``UpdatePlan`` for the rank batches ``shards`` (equal row counts; one shard: a
    learner that holds the whole batch). The shards' ``ptx`` rows are cut likewise."""
    rows = shards[0].size
    count = minibatch_count(rows * len(shards), spec.minibatch_size)
    if count > rows:
        raise ValueError(
            f"minibatches of {spec.minibatch_size} rows make {count} minibatches, but each of the {len(shards)} "
            f"learner rank(s) holds only {rows} rows: raise algorithm.ppo_minibatch_size"
        )
    bounds = minibatch_bounds(rows, count)
    denominators = tuple(sum(s.rows(*b).loss_count(spec.agg_mode) for s in shards) for b in bounds)
    ptx_bounds: tuple = ()
    ptx_denominators: tuple = ()
    if getattr(shards[0], "ptx", None) is not None:
        ptx_bounds = tuple(minibatch_bounds(shards[0].ptx.size, count))
        ptx_denominators = tuple(
            float(sum(s.ptx.response_mask[start:stop].sum() for s in shards)) for start, stop in ptx_bounds
        )
    return UpdatePlan(spec.epochs, tuple(bounds), denominators, float(len(shards)), ptx_bounds, ptx_denominators)


def micro_weight(micro: LearnerBatch, spec: LossSpec, denominator: float) -> float:
    """Weight of a micro-batch's aggregated loss so that the weighted sum is the batch's."""
    if denominator <= 0:
        return 0.0
    return micro.loss_count(spec.agg_mode) / denominator


# ---------------------------------------------------------------------------
# loss terms of one micro-batch (aggregated over the micro-batch)
# ---------------------------------------------------------------------------

def _device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float32 if t.is_floating_point() else t.dtype)


def policy_terms(logits: torch.Tensor, micro: PolicyBatch, spec: LossSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ppo / sft loss of one micro-batch: (loss, detached stats)."""
    tokens = micro.tokens
    ids = tokens.input_ids.to(logits.device)
    mask = tokens.response_mask.to(logits.device).bool()
    mode = spec.agg_mode
    logprobs = per_token_logprobs(logits, ids)
    stats: dict[str, torch.Tensor] = {}
    if spec.kind == "sft":
        loss = rl_math.aggregate_loss(-logprobs, mask, mode)
        stats["nll"] = loss.detach()
    elif spec.kind == "ppo":
        old = _device(micro.old_logprobs, logits)
        weights = None
        if spec.tis_cap is not None:
            if micro.sampler_logprobs is None:
                raise ValueError("LossSpec.tis_cap needs the batch's sampler_logprobs")
            weights = rl_math.truncated_is_weights(old, _device(micro.sampler_logprobs, logits), spec.tis_cap)
            stats["tis_weight_mean"] = rl_math.masked_mean(weights, mask)
        settings = PolicyLossSettings(spec.clip_low, spec.clip_high, spec.dual_clip, mode)
        loss, ppo_stats = POLICY_LOSSES.get(spec.policy_loss)(
            logprobs, old, _device(micro.advantages, logits), mask, settings, weights
        )
        stats["pg_loss"] = loss.detach()
        stats.update(ppo_stats)
    else:
        raise ValueError(f"policy_terms handles ppo and sft, not {spec.kind!r}")
    if spec.entropy_coef:
        entropy = rl_math.aggregate_loss(per_token_entropy(logits), mask, mode)
        loss = loss - spec.entropy_coef * entropy
    else:
        with torch.no_grad():
            entropy = rl_math.aggregate_loss(per_token_entropy(logits.detach()), mask, mode)
    stats["entropy"] = entropy.detach()
    ref = micro.ref_logprobs
    if ref is not None:
        ref = _device(ref, logits)
        # masked positions: logprobs := ref, so they give KL 0 and no NaN gradients
        kl = rl_math.aggregate_loss(
            rl_math.kl_estimate(torch.where(mask, logprobs, ref), ref, spec.kl_estimator), mask, mode
        )
        if spec.kl_coef:
            loss = loss + spec.kl_coef * kl
        stats["kl"] = kl.detach()
    stats["loss"] = loss.detach()
    return loss, stats


def sequence_logps(logits: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Sum of the response tokens' log-probs per sequence, [B]."""
    mask = tokens.response_mask.to(logits.device).bool()
    return rl_math.masked_sum(per_token_logprobs(logits, tokens.input_ids.to(logits.device)), mask, dim=-1)


def dpo_terms(
    chosen_logits: torch.Tensor, rejected_logits: torch.Tensor, micro: PairBatch, spec: LossSpec
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO / IPO loss of one micro-batch of pairs: (loss, detached stats)."""
    chosen = sequence_logps(chosen_logits, micro.chosen)
    rejected = sequence_logps(rejected_logits, micro.rejected)
    loss, st = rl_math.dpo_loss(
        chosen, rejected, _device(micro.ref_chosen_logps, chosen), _device(micro.ref_rejected_logps, chosen),
        beta=spec.dpo_beta, loss_type=spec.dpo_loss_type,
    )
    stats = {
        "loss": loss.detach(), "dpo_loss": loss.detach(), "dpo_acc": st["accuracy"],
        "dpo_margin": st["margins"].mean(), "dpo_chosen_reward": st["chosen_rewards"].mean(),
        "dpo_rejected_reward": st["rejected_rewards"].mean(),
    }
    return loss, stats


def ptx_nll_sum(logits: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens of SFT rows (PPO-ptx term)."""
    mask = tokens.response_mask.to(logits.device).bool()
    return -rl_math.masked_sum(per_token_logprobs(logits, tokens.input_ids.to(logits.device)), mask)


def critic_terms(scores: torch.Tensor, micro: PolicyBatch, spec: LossSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value loss of one micro-batch (times vf_coef). Clipping needs ``old_values``; without
    them the loss is unclipped."""
    mask = micro.tokens.response_mask.to(scores.device).bool()
    values = per_token_values(scores)
    returns = _device(micro.returns, values)
    old = micro.old_values
    clip = spec.value_clip if old is not None else None
    old = _device(old, values) if old is not None else values.detach()
    loss, st = rl_math.value_loss(values, old, returns, mask, clip_range=clip, agg_mode=spec.agg_mode)
    stats = {
        "value_loss": loss.detach(), "value_clip_frac": st["clip_frac"],
        "values_mean": rl_math.masked_mean(values.detach(), mask),
    }
    return spec.vf_coef * loss, stats
