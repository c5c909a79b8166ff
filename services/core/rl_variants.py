"""Pure tensor math of the variants beyond PPO / GRPO / RLOO / DPO (``rl_math`` holds those):
GSPO's sequence-level ratio and clipping, REINFORCE++'s advantages, the sizes of DAPO's
dynamic-sampling refills, online IPO's loss against a preference model, and Nash-MD's
advantages against a mixture opponent.

Only ``torch`` and ``rl_math`` are imported; conventions are ``rl_math``'s (per-token
quantities [B, T], ``mask`` 1 on response tokens, sequence quantities [B]).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from services.core.rl_math import Tensor, _bool_mask, _groups, _zero_masked, aggregate_loss, masked_mean, masked_whiten


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised log importance ratio per sequence, [B, T] -> [B]:
    (1/|y_i|) * sum_t (logprobs - old_logprobs) over response tokens (0 for an empty one)."""
    m = _bool_mask(mask)
    summed = _zero_masked(logprobs - old_logprobs, m).sum(dim=-1)
    return summed / m.sum(dim=-1).clamp_min(1).to(summed.dtype)


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 3e-4,
    clip_high: Optional[float] = 4e-4,
    agg_mode: str = "seq-mean-token-mean",
    is_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): the clipped surrogate on the sequence-level ratio.

    s_i = exp(sequence_log_ratio) = (pi(y_i|x) / pi_old(y_i|x)) ** (1/|y_i|);
    loss_i = max(-A_i * s_i, -A_i * clamp(s_i, 1 - clip_low, 1 + clip_high)), A_i the
    sequence's advantage (``advantages`` [B], or [B, T] holding it on every response token:
    its token mean is used). loss_i is put on each response token (times ``is_weights``
    [B, T] if given) and aggregated with ``aggregate_loss``: under seq-mean-token-mean (the
    paper's 1/G sum over sequences) that is the mean of loss_i over sequences with a token.

    Stats: clip_frac (share of sequences whose clipped branch was taken), ratio_mean (mean
    s_i), approx_kl (mean over sequences of 0.5 * log(s_i)^2), dual_clip_frac 0.
    """
    if clip_high is None:
        clip_high = clip_low
    m = _bool_mask(mask)
    has_token = m.any(dim=-1)
    seq_adv = advantages if advantages.dim() == 1 else masked_mean(advantages, m, dim=-1)
    log_ratio = sequence_log_ratio(logprobs, old_logprobs, m)
    ratio = torch.exp(log_ratio)
    pg1 = -seq_adv * ratio
    pg2 = -seq_adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_seq = torch.maximum(pg1, pg2)
    loss_tok = _zero_masked(per_seq[:, None].expand_as(logprobs), m)
    if is_weights is not None:
        loss_tok = loss_tok * _zero_masked(is_weights.detach(), m)
    loss = aggregate_loss(loss_tok, m, agg_mode)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((pg2 > pg1).float(), has_token),
            "dual_clip_frac": torch.zeros((), dtype=torch.float32),
            "approx_kl": masked_mean(0.5 * log_ratio.float() ** 2, has_token),
            "ratio_mean": masked_mean(ratio.float(), has_token),
        }
    return loss, stats


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each row's response tokens (masked gaps are
    skipped, as ``rl_math.gae_advantages`` does); 0 off the mask. [B, T] -> [B, T]."""
    m = _bool_mask(mask)
    r = _zero_masked(token_rewards, m)
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t], r[:, t] + gamma * running, running)
        out[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    return out


def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0, group_size: int | None = None,
    sequence_rewards: Tensor | None = None,
) -> Tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu et al. 2025): returns-to-go of the per-token rewards (the outcome on
    the last response token minus the per-token KL penalty), whitened over every response
    token of the whole batch: A = (G - mean) / std (unbiased std, ``rl_math.masked_whiten``).

    With ``group_size`` (REINFORCE++-baseline) the group's mean outcome is first subtracted
    from each row's outcome: ``sequence_rewards`` [B] are those outcomes, and the last
    response token's reward is lowered by the mean of its group's. Returns (advantages,
    returns) [B, T], the returns before whitening."""
    m = _bool_mask(mask)
    rewards = token_rewards.clone()
    if group_size is not None:
        if sequence_rewards is None:
            raise ValueError("the group baseline needs sequence_rewards")
        baseline = _groups(sequence_rewards.to(rewards.dtype), group_size).mean(dim=1).repeat_interleave(group_size)
        lengths = m.sum(dim=-1)
        rows = (lengths > 0).nonzero().flatten()
        last = m.long().cumsum(dim=-1).argmax(dim=-1)
        rewards[rows, last[rows]] -= baseline[rows]
    returns = returns_to_go(rewards, m, gamma)
    return _zero_masked(masked_whiten(returns, m), m), returns


def refill_prompts(missing_groups: int, kept_groups: int, drawn_groups: int, cap: int) -> int:
    """Prompts to draw next in DAPO's dynamic sampling: enough that, at the keep rate seen so
    far (kept / drawn groups with varied rewards), ``missing_groups`` more are expected:
    ceil(missing * drawn / kept), at least ``missing``, at most ``cap`` (the batch's prompts);
    ``cap`` when nothing was kept yet."""
    if missing_groups <= 0:
        return 0
    if kept_groups <= 0:
        return cap
    return max(missing_groups, min(cap, math.ceil(missing_groups * drawn_groups / kept_groups)))


def soft_ipo_loss(
    policy_a_logps: Tensor, policy_b_logps: Tensor, ref_a_logps: Tensor, ref_b_logps: Tensor, preference: Tensor,
    beta: float,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Online IPO against a preference model (Azar et al. 2024; Calandriello et al. 2024), on
    sequence-summed log-probs [B] of two samples a, b of each prompt:

    h = (log pi(a) - log ref(a)) - (log pi(b) - log ref(b)),  loss = mean (h - (p - 1/2) / beta)^2

    with p = P(a preferred to b) [B]. It is IPO's expected loss over the label (a wins with
    probability p: (h - 1/(2 beta))^2, else (h + 1/(2 beta))^2) less a constant in h, so the
    optimum is h = (p - 1/2) / beta. Stats: margin (mean h), target (mean (p - 1/2) / beta),
    agreement (share of pairs where h and p - 1/2 have the same sign, ties excluded)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (policy_a_logps - ref_a_logps) - (policy_b_logps - ref_b_logps)
    target = (preference.to(h.dtype) - 0.5) / beta
    loss = ((h - target) ** 2).mean()
    with torch.no_grad():
        decided = target != 0
        agree = (torch.sign(h) == torch.sign(target)) & decided
        stats = {
            "margin": h.detach().mean(), "target": target.mean(),
            "agreement": agree.float().sum() / decided.float().sum().clamp_min(1.0),
        }
    return loss, stats


def mixture_weights(ref_seq_logps: Tensor, policy_seq_logps: Tensor, beta: float) -> Tensor:
    """Self-normalised importance weights that turn samples of pi into samples of the
    geometric mixture pi^(1-beta) * ref^beta (Nash-MD's opponent, Munos et al. 2024): for
    each sample i of a group, w_ij over the group's other samples j is proportional to
    (ref(y_j) / pi(y_j))^beta. Inputs [G, n] sequence log-probs; returns [G, n, n] with
    w_ii = 0 and each row summing to 1 (n >= 2)."""
    if ref_seq_logps.shape != policy_seq_logps.shape or ref_seq_logps.dim() != 2:
        raise ValueError(f"expected two [G, n] tensors, got {tuple(ref_seq_logps.shape)} and "
                         f"{tuple(policy_seq_logps.shape)}")
    n = ref_seq_logps.shape[1]
    if n < 2:
        raise ValueError("the mixture opponent needs another sample of the prompt (n >= 2)")
    log_w = beta * (ref_seq_logps - policy_seq_logps)  # [G, n]: the weight of opponent j
    logits = log_w[:, None, :].expand(-1, n, -1).clone()
    logits.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # not oneself
    return torch.softmax(logits, dim=-1)


def nash_md_advantages(preference: Tensor, ref_seq_logps: Tensor, policy_seq_logps: Tensor,
                       beta: float) -> Tuple[Tensor, Tensor]:
    """Nash-MD's policy-gradient signal (Munos et al. 2024): A_i = P(y_i beats the mixture
    opponent) - 1/2, the opponent's law estimated by ``mixture_weights`` over the group's
    other samples: P_i = sum_j w_ij * preference[g, i, j]. ``preference`` [G, n, n]:
    P(y_i preferred to y_j). Returns (A [G, n], the weights [G, n, n])."""
    weights = mixture_weights(ref_seq_logps, policy_seq_logps, beta)
    won = (weights * preference.to(weights.dtype)).sum(dim=-1)
    return won - 0.5, weights
