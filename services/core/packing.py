"""Sequence packing for dynamic batching (``learner.packing``, ``reference.packing``).

Padded micro-batches hold a fixed number of rows, each right-padded to the longest one: on a
long-tailed length distribution most of the forward pass is spent on padding. Packed
micro-batches are formed by a token budget instead (``pack_bins``) and run as one row of
``sum(lengths)`` tokens with no padding (``pack_row``); the position ids restart at 0 for
each sequence, which is what makes transformers build a block-diagonal causal mask (each
token sees only the earlier tokens of its own sequence) when the attention mask is None.
``PackedRow.unpack`` puts per-position values back into the padded [B, T] layout, so every
loss and aggregation is computed exactly as in the padded path.

Pure functions (lists and torch tensors; no model, no DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def pack_bins(lengths: Sequence[int], max_tokens: int, min_bins: int = 0) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``max_tokens`` tokens each,
    first-fit decreasing: longest first, each into the first bin it fits in, else a new bin.
    A sequence longer than ``max_tokens`` gets a bin of its own (it cannot be split).

    ``min_bins``: while there are fewer bins, the bin with the most sequences (the first of
    them on a tie) is cut into two halves; data-parallel ranks use it to run the same number
    of micro-batches. Every index is in exactly one bin; indices ascend within a bin and bins
    are ordered by their first index (deterministic for the same input)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if min_bins > len(lengths):
        raise ValueError(f"{len(lengths)} sequences cannot fill {min_bins} bins")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = int(lengths[i])
        if n < 0:
            raise ValueError(f"sequence {i} has a negative length {n}")
        for b, load in enumerate(loads):
            if load + n <= max_tokens:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    bins = [sorted(b) for b in bins]
    while len(bins) < min_bins:
        b = max(range(len(bins)), key=lambda k: (len(bins[k]), -k))
        half = len(bins[b]) // 2
        bins[b : b + 1] = [bins[b][:half], bins[b][half:]]
    return sorted(bins, key=lambda b: b[0])


def row_bins(size: int, rows_per_bin: int) -> list[list[int]]:
    """The padded path's micro-batches: consecutive runs of ``rows_per_bin`` row indices."""
    return [list(range(start, min(start + rows_per_bin, size))) for start in range(0, size, rows_per_bin)]


@dataclass(frozen=True)
class PackedRow:
    """The sequences of a right-padded [B, T] batch concatenated into one row of L tokens.

    input_ids, position_ids [1, L] (positions restart at 0 per sequence); rows, cols [L]:
    where each packed token sits in the padded batch of ``shape`` (B, T)."""

    input_ids: Tensor
    position_ids: Tensor
    rows: Tensor
    cols: Tensor
    shape: tuple[int, int]

    @property
    def tokens(self) -> int:
        return int(self.rows.numel())

    def unpack(self, values: Tensor, shifted: bool = True) -> Tensor:
        """Per-position values [1, L, ...] -> [B, T, ...], zero on padding. ``shifted``: the
        values follow the per-token alignment of ``services.core.batch_types`` (position t
        computed from the output at t-1), so each sequence's first position, which the packed
        row computed from the previous sequence's last token, is set to 0 as in the padded path.
        Differentiable in ``values``."""
        flat = values[0]
        if shifted:
            first = (self.cols == 0).view(-1, *([1] * (flat.dim() - 1)))
            flat = torch.where(first.to(flat.device), torch.zeros((), dtype=flat.dtype, device=flat.device), flat)
        out = flat.new_zeros(self.shape + tuple(flat.shape[1:]))
        return out.index_put((self.rows.to(flat.device), self.cols.to(flat.device)), flat)


def pack_row(input_ids: Tensor, attention_mask: Tensor) -> PackedRow:
    """Pack the right-padded rows of ``input_ids`` [B, T] (``attention_mask`` 1 on each row's
    tokens, a prefix of the row) into one row, in row order."""
    valid = attention_mask.bool()
    lengths = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device)[None, :] < lengths[:, None]
    if not torch.equal(valid, prefix):
        raise ValueError("packing needs right-padded rows: each row's attention mask must be 1s then 0s")
    rows, cols = valid.nonzero(as_tuple=True)  # row-major: the sequences one after another
    return PackedRow(input_ids[rows, cols][None, :], cols[None, :].clone(), rows, cols,
                     (int(input_ids.shape[0]), int(input_ids.shape[1])))
