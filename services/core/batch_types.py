"""Data that flows between services: trajectories from rollout, token batches for the
learner and the reference server.

Per-token convention: every per-token tensor is aligned with ``input_ids`` positions.
The value at position t belongs to token ``input_ids[:, t]`` (for log-probs: log p of that
token given the tokens before it, computed from the logits at t-1). Position 0 has no
value. ``response_mask`` is 1 exactly on the response tokens' positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One sampled response, with everything needed to train on it later."""

    prompt_id: str
    prompt: str
    prompt_ids: list[int]
    response: str
    response_ids: list[int]
    logprobs: list[float]  # the sampler's log-prob of each response token
    finish_reason: str  # "stop" (EOS) or "length"
    policy_version: int  # version of the weights that produced it
    sample_index: int = 0  # which of the n samples of this prompt
    columns: dict[str, Any] = field(default_factory=dict)  # extra dataset columns for rewards
    # multi-turn episodes (rollout.environment): response_ids holds every turn after the prompt,
    # loss_mask is 1 on the policy's tokens and 0 on the environment's, logprobs has the policy's
    # tokens only, turns are (role, start, end) in response_ids, response is the last policy turn
    loss_mask: list[int] | None = None
    turns: list[tuple[str, int, int]] | None = None
    env_reward: float = 0.0  # the environment's per-turn rewards, summed
    env_info: dict[str, float] = field(default_factory=dict)  # turns, tool_calls, tool_errors, env_s, env_errors
    # a partial rollout continued under newer weights (rollout.partial_tokens): (first response token,
    # policy version) per span, in order; None: policy_version sampled every token
    version_spans: list[tuple[int, int]] | None = None


def trajectory_columns(trajectories: list[Trajectory]) -> dict[str, list[Any]]:
    """The prompts' extra columns as reward scorers take them: ``{name: [value per trajectory]}``
    (the names of the first trajectory's columns)."""
    if not trajectories:
        return {}
    return {key: [t.columns.get(key) for t in trajectories] for key in trajectories[0].columns}


@dataclass
class TokenBatch:
    """Right-padded prompt+response sequences. Tensors are [B, T] (torch.long / float)."""

    input_ids: Any
    attention_mask: Any
    response_mask: Any

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def pack_sequences(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                   loss_masks: list[list[int] | None] | None = None) -> TokenBatch:
    """Concatenate each prompt with its response and right-pad to the longest. ``loss_masks``
    (multi-turn episodes): per response token 1 (the policy's) or 0 (an environment's, context
    only); ``response_mask`` is then 0 on environment tokens too, so every per-token value
    (log-probs, advantages, KL) is defined on the policy's tokens only. None: all 1."""
    import torch

    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    masks = loss_masks or [None] * len(response_ids)
    for i, (r, m) in enumerate(zip(response_ids, masks)):
        if m is not None and len(m) != len(r):
            raise ValueError(f"sequence {i}: a loss mask of {len(m)} for {len(r)} response tokens")
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, : len(p) + len(r)] = 1
        mask = masks[i]
        response_mask[i, len(p) : len(p) + len(r)] = 1.0 if mask is None else torch.tensor(mask, dtype=torch.float32)
    return TokenBatch(input_ids, attention, response_mask)


def response_values(per_token, batch: TokenBatch) -> list[list[float]]:
    """Per-token tensor [B, T] -> the response tokens' values, one list per sequence."""
    mask = batch.response_mask.bool()
    return [per_token[i][mask[i]].tolist() for i in range(batch.size)]


def pad_response_values(values: list[list[float]], batch: TokenBatch):
    """Inverse of ``response_values``: lists of per-response-token values -> [B, T] float."""
    import torch

    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    for i, row in enumerate(values):
        positions = batch.response_mask[i].nonzero().flatten()
        if len(row) != len(positions):
            raise ValueError(f"sequence {i}: {len(row)} values for {len(positions)} response tokens")
        out[i, positions] = torch.tensor(row, dtype=torch.float32)
    return out
