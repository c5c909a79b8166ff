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

from dataclasses import dataclass
from typing import Any

import torch

from services.core import rl_math
from services.core.batch_types import TokenBatch
from services.core.config import AlgorithmConfig, FlywheelConfig, LearnerConfig
from services.core.learner_batches import LearnerBatch, PairBatch, PolicyBatch
from services.core.estimators import POLICY_LOSSES
from services.core.rl_variants import soft_ipo_loss

KINDS = ("ppo", "dpo", "sft")


@dataclass(frozen=True)
class LossSpec:
    """The loss of one train step: the loss family, the registered policy loss, and the
    validated config sections its terms read (``from_config``), under the config's names and
    with the config's defaults and checks (``services.core.config``).

    kind: "ppo" (clipped surrogate; PPO, GRPO, RLOO), "dpo" (DPO / IPO on pairs) or "sft"
    (negative log-likelihood of the response tokens); policy_loss (ppo kind): the registered
    policy loss (``services.core.estimators.POLICY_LOSSES``).

    algorithm: ``algorithm.*`` as this loss applies it. ``kl_coef`` > 0 adds
    ``kl_coef * KL(pi || ref)`` as a loss term (needs ``ref_logprobs``); it is 0 with
    ``kl_in_reward`` (the KL is in the reward) and for dpo (beta weighs the KL there). The
    ppo-only settings (ptx_coef, tis_cap, ppo_epochs, ppo_minibatch_size) are at their neutral
    values for the other kinds. tis_cap multiplies each token's policy loss by the truncated
    importance weight min(exp(old_logprobs - sampler_logprobs), tis_cap) (needs
    ``sampler_logprobs``); ppo_epochs / ppo_minibatch_size: see ``plan_update``.
    learner: ``learner.*``, of which the loss reads entropy_coef (subtracts
    ``entropy_coef * entropy``) and vf_coef (the critic's weight).
    """

    kind: str
    algorithm: AlgorithmConfig
    learner: LearnerConfig
    policy_loss: str = "ppo_clip"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LossSpec.kind={self.kind!r}; allowed: {', '.join(KINDS)}")

    @classmethod
    def from_config(cls, cfg: FlywheelConfig, kind: str, policy_loss: str = "ppo_clip") -> "LossSpec":
        """From a FlywheelConfig, the algorithm's loss family ``kind`` and its policy loss
        (``Algorithm.loss_kind`` / ``policy_loss``): copies of its algorithm and learner
        sections, with the settings ``kind`` does not apply set to their neutral values."""
        applied: dict[str, Any] = {}
        if cfg.algorithm.kl_in_reward or kind == "dpo":
            applied["kl_coef"] = 0.0
        if kind != "ppo":
            applied.update(ptx_coef=0.0, tis_cap=None, ppo_epochs=1, ppo_minibatch_size=None)
        return cls(kind, cfg.algorithm.model_copy(update=applied, deep=True), cfg.learner.model_copy(deep=True),
                   policy_loss)


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
    rows, alg = shards[0].size, spec.algorithm
    count = minibatch_count(rows * len(shards), alg.ppo_minibatch_size)
    if count > rows:
        raise ValueError(
            f"minibatches of {alg.ppo_minibatch_size} rows make {count} minibatches, but each of the {len(shards)} "
            f"learner rank(s) holds only {rows} rows: raise algorithm.ppo_minibatch_size"
        )
    bounds = minibatch_bounds(rows, count)
    denominators = tuple(sum(s.rows(*b).loss_count(alg.loss_agg_mode) for s in shards) for b in bounds)
    ptx_bounds: tuple = ()
    ptx_denominators: tuple = ()
    if getattr(shards[0], "ptx", None) is not None:
        ptx_bounds = tuple(minibatch_bounds(shards[0].ptx.size, count))
        ptx_denominators = tuple(
            float(sum(s.ptx.response_mask[start:stop].sum() for s in shards)) for start, stop in ptx_bounds
        )
    return UpdatePlan(alg.ppo_epochs, tuple(bounds), denominators, float(len(shards)), ptx_bounds, ptx_denominators)


def micro_weight(micro: LearnerBatch, spec: LossSpec, denominator: float) -> float:
    """Weight of a micro-batch's aggregated loss so that the weighted sum is the batch's."""
    if denominator <= 0:
        return 0.0
    return micro.loss_count(spec.algorithm.loss_agg_mode) / denominator


# ---------------------------------------------------------------------------
# loss terms of one micro-batch (aggregated over the micro-batch)
# ---------------------------------------------------------------------------

def _device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float32 if t.is_floating_point() else t.dtype)


def token_outputs(logits: torch.Tensor, input_ids: torch.Tensor, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropy at each position of ``logits``' layout (padded
    [B, T] or one packed row); the entropy carries a gradient only with ``entropy_coef``."""
    logprobs = per_token_logprobs(logits, input_ids)
    if spec.learner.entropy_coef:
        return logprobs, per_token_entropy(logits)
    with torch.no_grad():
        return logprobs, per_token_entropy(logits.detach())


def policy_terms(logits: torch.Tensor, micro: PolicyBatch, spec: LossSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ppo / sft loss of one micro-batch: (loss, detached stats)."""
    return policy_token_terms(*token_outputs(logits, micro.tokens.input_ids.to(logits.device), spec), micro, spec)


def policy_token_terms(logprobs: torch.Tensor, entropy: torch.Tensor, micro: PolicyBatch, spec: LossSpec
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_terms`` from the micro-batch's per-token log-probs and entropy [b, T] (from
    padded or packed logits alike: ``token_outputs``)."""
    mask = micro.tokens.response_mask.to(logprobs.device).bool()
    alg = spec.algorithm
    mode = alg.loss_agg_mode
    stats: dict[str, torch.Tensor] = {}
    if spec.kind == "sft":
        loss = rl_math.aggregate_loss(-logprobs, mask, mode)
        stats["nll"] = loss.detach()
    elif spec.kind == "ppo":
        old = _device(micro.old_logprobs, logprobs)
        weights = None
        if alg.tis_cap is not None:
            if micro.sampler_logprobs is None:
                raise ValueError("algorithm.tis_cap needs the batch's sampler_logprobs")
            weights = rl_math.truncated_is_weights(old, _device(micro.sampler_logprobs, logprobs), alg.tis_cap)
            stats["tis_weight_mean"] = rl_math.masked_mean(weights, mask)
        loss, ppo_stats = POLICY_LOSSES.get(spec.policy_loss)(
            logprobs, old, _device(micro.advantages, logprobs), mask, alg, weights
        )
        stats["pg_loss"] = loss.detach()
        stats.update(ppo_stats)
    else:
        raise ValueError(f"policy_terms handles ppo and sft, not {spec.kind!r}")
    entropy = rl_math.aggregate_loss(entropy, mask, mode)
    if spec.learner.entropy_coef:
        loss = loss - spec.learner.entropy_coef * entropy
    stats["entropy"] = entropy.detach()
    ref = micro.ref_logprobs
    if ref is not None:
        ref = _device(ref, logprobs)
        # masked positions: logprobs := ref, so they give KL 0 and no NaN gradients
        kl = rl_math.aggregate_loss(
            rl_math.kl_estimate(torch.where(mask, logprobs, ref), ref, alg.kl_estimator), mask, mode
        )
        if alg.kl_coef:
            loss = loss + alg.kl_coef * kl
        stats["kl"] = kl.detach()
    stats["loss"] = loss.detach()
    return loss, stats


def response_logps(logprobs: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Per-token log-probs [B, T] -> the sum over each sequence's response tokens, [B]."""
    return rl_math.masked_sum(logprobs, tokens.response_mask.to(logprobs.device).bool(), dim=-1)


def sequence_logps(logits: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Sum of the response tokens' log-probs per sequence, [B]."""
    return response_logps(per_token_logprobs(logits, tokens.input_ids.to(logits.device)), tokens)


def dpo_terms(
    chosen_logits: torch.Tensor, rejected_logits: torch.Tensor, micro: PairBatch, spec: LossSpec
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO / IPO loss of one micro-batch of pairs: (loss, detached stats)."""
    return pair_terms(sequence_logps(chosen_logits, micro.chosen), sequence_logps(rejected_logits, micro.rejected),
                      micro, spec)


def pair_terms(chosen: torch.Tensor, rejected: torch.Tensor, micro: PairBatch, spec: LossSpec
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``dpo_terms`` from the pairs' summed response log-probs [B] (``response_logps``)."""
    if micro.preference is not None:  # soft pairs: online IPO against a preference model
        loss, st = soft_ipo_loss(chosen, rejected, _device(micro.ref_chosen_logps, chosen),
                                 _device(micro.ref_rejected_logps, chosen), _device(micro.preference, chosen),
                                 spec.algorithm.dpo_beta)
        return loss, {"loss": loss.detach(), "ipo_loss": loss.detach(), "ipo_margin": st["margin"],
                      "ipo_target": st["target"], "ipo_agreement": st["agreement"]}
    loss, st = rl_math.dpo_loss(
        chosen, rejected, _device(micro.ref_chosen_logps, chosen), _device(micro.ref_rejected_logps, chosen),
        beta=spec.algorithm.dpo_beta, loss_type=spec.algorithm.dpo_loss,
    )
    stats = {
        "loss": loss.detach(), "dpo_loss": loss.detach(), "dpo_acc": st["accuracy"],
        "dpo_margin": st["margins"].mean(), "dpo_chosen_reward": st["chosen_rewards"].mean(),
        "dpo_rejected_reward": st["rejected_rewards"].mean(),
    }
    return loss, stats


def critic_terms(scores: torch.Tensor, micro: PolicyBatch, spec: LossSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value loss of one micro-batch (times vf_coef). Clipping needs ``old_values``; without
    them the loss is unclipped."""
    return value_terms(per_token_values(scores), micro, spec)


def value_terms(values: torch.Tensor, micro: PolicyBatch, spec: LossSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``critic_terms`` from the micro-batch's per-token values [b, T] (``per_token_values``)."""
    mask = micro.tokens.response_mask.to(values.device).bool()
    returns = _device(micro.returns, values)
    old = micro.old_values
    clip = spec.algorithm.value_clip if old is not None else None
    old = _device(old, values) if old is not None else values.detach()
    loss, st = rl_math.value_loss(values, old, returns, mask, clip_range=clip, agg_mode=spec.algorithm.loss_agg_mode)
    stats = {
        "value_loss": loss.detach(), "value_clip_frac": st["clip_frac"],
        "values_mean": rl_math.masked_mean(values.detach(), mask),
    }
    return spec.learner.vf_coef * loss, stats
