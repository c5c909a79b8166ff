"""What the learner trains on: typed batches with the row operations the learner group and
the micro-batch loop need (slice, index, trim padding columns, loss counts).

Shapes: B rows (sequences, or pairs for ``PairBatch``), T token positions; per-token
tensors follow ``services.core.batch_types`` (the value at position t belongs to token t,
position 0 and padding hold 0, ``tokens.response_mask`` marks the response tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from torch import Tensor

from services.core.batch_types import TokenBatch


def tokens_rows(tokens: TokenBatch, rows: slice | Tensor) -> TokenBatch:
    """Rows of a TokenBatch (a slice or an index tensor)."""
    return TokenBatch(tokens.input_ids[rows], tokens.attention_mask[rows], tokens.response_mask[rows])


def tokens_width(tokens: TokenBatch) -> int:
    """Columns up to the longest sequence (right padding), at least 1."""
    return max(int(tokens.attention_mask.sum(dim=1).max().item()), 1) if tokens.size else tokens.input_ids.shape[1]


def trim_tokens(tokens: TokenBatch) -> TokenBatch:
    """Drop padding columns past the longest sequence (causal models are unaffected)."""
    width = tokens_width(tokens)
    return TokenBatch(tokens.input_ids[:, :width], tokens.attention_mask[:, :width], tokens.response_mask[:, :width])


def agg_count(mask: Tensor, agg_mode: str) -> float:
    """What ``rl_math.aggregate_loss`` divides by: masked tokens (token-mean) or sequences
    with at least one masked token (seq-mean-*)."""
    m = mask.bool()
    if agg_mode == "token-mean":
        return float(m.sum().item())
    return float((m.sum(dim=-1) > 0).sum().item())


@dataclass
class PolicyBatch:
    """Rows for a policy-gradient update (ppo, grpo, rloo) or an SFT step (``tokens`` only).

    tokens: TokenBatch [B, T]; old_logprobs [B, T]: the learner's (or, streaming, the
    sampler's) log-probs the PPO ratio is taken against; advantages [B, T];
    ref_logprobs [B, T] | None: the reference's, for the KL term and metric;
    sampler_logprobs [B, T] | None: the rollout engine's, for truncated IS weights;
    returns, old_values [B, T] | None: the critic's targets and values before the step;
    ptx: TokenBatch | None: SFT rows of the PPO-ptx term (their own rows, not aligned with B).
    """

    tokens: TokenBatch
    old_logprobs: Tensor | None = None
    advantages: Tensor | None = None
    ref_logprobs: Tensor | None = None
    sampler_logprobs: Tensor | None = None
    returns: Tensor | None = None
    old_values: Tensor | None = None
    ptx: TokenBatch | None = None

    PER_TOKEN = ("old_logprobs", "advantages", "ref_logprobs", "sampler_logprobs", "returns", "old_values")

    @property
    def size(self) -> int:
        return self.tokens.size

    def _with_rows(self, rows: slice | Tensor) -> "PolicyBatch":
        per_token = {name: None if (t := getattr(self, name)) is None else t[rows] for name in self.PER_TOKEN}
        return PolicyBatch(tokens_rows(self.tokens, rows), ptx=self.ptx, **per_token)

    def rows(self, start: int, stop: int) -> "PolicyBatch":
        """Rows start:stop (``ptx`` stays whole)."""
        return self._with_rows(slice(start, stop))

    def take(self, index: Tensor) -> "PolicyBatch":
        """The rows in ``index`` (``ptx`` stays whole)."""
        return self._with_rows(index)

    def trim(self) -> "PolicyBatch":
        """Padding columns past the longest sequence dropped from every [B, T] tensor."""
        width = tokens_width(self.tokens)
        per_token = {name: None if (t := getattr(self, name)) is None else t[:, :width] for name in self.PER_TOKEN}
        return PolicyBatch(trim_tokens(self.tokens), ptx=self.ptx, **per_token)

    def loss_count(self, agg_mode: str) -> float:
        """``agg_count`` of the response tokens: what the batch's loss is normalised by."""
        return agg_count(self.tokens.response_mask, agg_mode)

    def without_ptx(self) -> "PolicyBatch":
        return dataclasses.replace(self, ptx=None)


@dataclass
class PairBatch:
    """Preference pairs for a DPO / IPO update: chosen and rejected TokenBatches [B, T]
    (their own widths) and the reference's summed response log-probs [B] of each.
    preference [B]: for soft pairs (online IPO), P(chosen preferred to rejected) from a
    preference model, and the loss is ``rl_variants.soft_ipo_loss``; None: hard pairs."""

    chosen: TokenBatch
    rejected: TokenBatch
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    preference: Tensor | None = None

    @property
    def size(self) -> int:
        return self.chosen.size

    def _with_rows(self, rows: slice | Tensor) -> "PairBatch":
        return PairBatch(tokens_rows(self.chosen, rows), tokens_rows(self.rejected, rows),
                         self.ref_chosen_logps[rows], self.ref_rejected_logps[rows],
                         None if self.preference is None else self.preference[rows])

    def rows(self, start: int, stop: int) -> "PairBatch":
        return self._with_rows(slice(start, stop))

    def take(self, index: Tensor) -> "PairBatch":
        return self._with_rows(index)

    def trim(self) -> "PairBatch":
        return PairBatch(trim_tokens(self.chosen), trim_tokens(self.rejected), self.ref_chosen_logps,
                         self.ref_rejected_logps, self.preference)

    def loss_count(self, agg_mode: str) -> float:
        """Pairs: the DPO loss is a mean over pairs."""
        return float(self.size)

    def without_ptx(self) -> "PairBatch":
        return self


LearnerBatch = Union[PolicyBatch, PairBatch]

