"""Pure tensor math for RLHF losses and advantages.

Only ``torch`` and the standard library are imported here: no Ray, no models.

Conventions
-----------
* Per-token quantities are ``[B, T]`` (batch, sequence).
* ``mask`` is a float or bool ``[B, T]`` tensor, 1 on response tokens.  Masked
  positions never influence any result (values there may even be NaN/inf,
  because masking uses ``torch.where`` rather than multiplication).
* Sequence-level quantities are ``[B]`` / ``[N]``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

Tensor = torch.Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
ENSEMBLE_MODES = ("mean", "wco", "uwo")
# model.dtype names: the torch dtype the policy, critic and reference load in
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------

def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask else 0 (NaN-safe, unlike ``x * mask``)."""
    return torch.where(_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum(x * mask) over ``dim`` (all elements when ``dim`` is None)."""
    xm = _zero_masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None, eps: float = 1e-8) -> Tensor:
    """sum(x * mask) / max(sum(mask), eps) over ``dim`` (all elements if None).

    An all-masked slice yields 0 (numerator is 0, denominator clamped to eps).
    """
    count = _bool_mask(mask).to(x.dtype if x.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(eps)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements of ``x`` (scalar, over all elements).

    var = sum(mask * (x - mean)^2) / (n - 1) if unbiased else / n, n = sum(mask).
    With ``unbiased`` and n == 1 the denominator is clamped to 1 (var = 0).
    """
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    n = _bool_mask(mask).sum().to(sq.dtype)
    denom = (n - 1.0) if unbiased else n
    return sq / denom.clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked elements (unbiased var).

    If ``shift_mean`` is False the mean is added back: x_w + mean.
    Masked positions of the output are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_masked(out, mask)


# ---------------------------------------------------------------------------
# loss aggregation / KL
# ---------------------------------------------------------------------------

def aggregate_loss(loss_mat: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    * token-mean:          sum(loss*mask) / sum(mask)
    * seq-mean-token-mean: mean over sequences with >=1 token of
                           sum_t(loss*mask) / sum_t(mask)
    * seq-mean-token-sum:  mean over sequences with >=1 token of sum_t(loss*mask)

    Sequences with no valid token are ignored (they do not count in the
    denominator).  With no valid token at all the result is 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown agg mode {mode!r}; allowed modes: {', '.join(AGG_MODES)}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    tok_sum = masked_sum(loss_mat, mask, dim=-1)  # [B]
    tok_cnt = _bool_mask(mask).to(tok_sum.dtype).sum(dim=-1)  # [B]
    seq_valid = tok_cnt > 0
    per_seq = tok_sum / tok_cnt.clamp_min(1.0) if mode == "seq-mean-token-mean" else tok_sum
    return masked_mean(per_seq, seq_valid)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimator of KL(pi || ref) for samples from pi (Schulman).

    With lr = logprobs - ref_logprobs:
    k1 = lr;  k2 = 0.5 * lr^2;  k3 = exp(-lr) - 1 + lr  (>= 0, unbiased).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; allowed: {', '.join(KL_KINDS)}")
    lr = logprobs - ref_logprobs
    if kind == "k1":
        return lr
    if kind == "k2":
        return 0.5 * lr * lr
    return torch.expm1(-lr) + lr


# ---------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------

def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation over masked token sequences.

    rewards, values, mask: [B, T].  Going backward over valid tokens only:
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
    where V_next / A_next are those of the next *valid* token (masked gaps are
    skipped) and are 0 after the last valid token (episode end).
    Returns (advantages, returns) [B, T]; returns = A + V; both 0 where mask==0.
    """
    m = _bool_mask(mask)
    B, T = rewards.shape
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r = _zero_masked(rewards.to(dtype), m)
    v = _zero_masked(values.to(dtype), m)
    next_v = torch.zeros(B, dtype=dtype, device=rewards.device)
    next_a = torch.zeros(B, dtype=dtype, device=rewards.device)
    advs = torch.zeros(B, T, dtype=dtype, device=rewards.device)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        a = torch.where(mt, a, torch.zeros_like(a))
        advs[:, t] = a
        next_v = torch.where(mt, v[:, t], next_v)
        next_a = torch.where(mt, a, next_a)
    returns = _zero_masked(advs + v, m)
    return advs, returns


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"N={rewards.numel()} is not divisible by group_size={group_size}")
    return rewards.view(-1, group_size)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Per-group unbiased (n-1) std of rewards [N] -> [N / group_size]; 0 if size 1."""
    g = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros(g.shape[0], dtype=rewards.dtype, device=rewards.device)
    return g.std(dim=1, unbiased=True)


def grpo_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO group-normalised advantages, rewards [N] -> [N].

    Consecutive blocks of ``group_size`` form a group.
    A_i = (r_i - mean_g) / (std_g + eps) if scale_by_std else r_i - mean_g,
    with std_g the unbiased (n-1) sample std.  A group of size 1 gives 0.
    """
    g = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(dim=1, unbiased=True, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j within each group.

    rewards [N] -> [N]; equivalently (r_i - mean_g) * G / (G - 1).
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    g = _groups(rewards, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


# ---------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------

def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg_mode: str = "token-mean",
    is_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped PPO surrogate.  logprobs/old_logprobs/mask [B, T], advantages [B, T] or [B].

    ratio = exp(logprobs - old); pg1 = -A*ratio;
    pg2 = -A*clamp(ratio, 1-clip_low, 1+clip_high)  (clip_high defaults to clip_low);
    loss_tok = max(pg1, pg2); with dual clip (c > 1) and A < 0:
    loss_tok = min(loss_tok, -A*c).  With ``is_weights`` [B, T] (for example
    ``truncated_is_weights``) each token's loss is multiplied by its (constant) weight.
    Aggregated with ``aggregate_loss``.

    Stats (detached float scalars, masked means):
      clip_frac  fraction of tokens with pg2 > pg1 (clipped branch selected);
      dual_clip_frac  fraction of tokens where the dual-clip bound was selected;
      approx_kl  mean of 0.5*(logprobs - old)^2 (the k2 estimator);
      ratio_mean mean of ratio.
    """
    if clip_high is None:
        clip_high = clip_low
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    m = _bool_mask(mask)
    advantages = _zero_masked(advantages.expand_as(logprobs), m)
    log_ratio = _zero_masked(logprobs - old_logprobs, m)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        pg3 = -advantages * dual_clip
        dual = (advantages < 0) & (pg3 < loss_tok)
        loss_tok = torch.where(dual, pg3, loss_tok)
    if is_weights is not None:
        loss_tok = loss_tok * _zero_masked(is_weights.detach(), m)
    loss = aggregate_loss(loss_tok, m, agg_mode)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.float(), m),
            "dual_clip_frac": masked_mean(dual.float(), m),
            "approx_kl": masked_mean(0.5 * log_ratio.float() ** 2, m),
            "ratio_mean": masked_mean(ratio.float(), m),
        }
    return loss, stats


def truncated_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(pi_old / pi_sampler, cap), per token [B, T].

    ``old_logprobs``: the learner's log-probs of the sampled tokens under the weights that
    sampled them; ``sampler_logprobs``: the rollout engine's. They differ where the engine
    computes differently (bf16 kernels on GPUs), which makes "on-policy" data slightly
    off-policy (Yao et al. 2025); the weight corrects for it, the cap bounds its variance.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap)


def logprob_gap_stats(
    learner_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, low: float = 0.5, high: float = 2.0
) -> Dict[str, float]:
    """How far the rollout engine's log-probs of the sampled tokens are from the learner's
    under the same weights ([B, T] each; only masked tokens count).

    max / mean: of |learner - sampler|; ratio_outside: share of tokens whose importance
    ratio exp(learner - sampler) lies outside [low, high]. With no token all are 0.
    """
    m = _bool_mask(mask)
    if not bool(m.any()):
        return {"max": 0.0, "mean": 0.0, "ratio_outside": 0.0}
    gap = (learner_logprobs.double() - sampler_logprobs.double())[m]
    outside = (gap < math.log(low)) | (gap > math.log(high))
    return {"max": float(gap.abs().max()), "mean": float(gap.abs().mean()), "ratio_outside": float(outside.double().mean())}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: Optional[float] = None,
    agg_mode: str = "token-mean",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Critic loss, all inputs [B, T].

    Without clipping: loss_tok = 0.5*(v - R)^2.  With clip_range c:
    v_clip = old + clamp(v - old, -c, c); loss_tok = 0.5*max((v-R)^2, (v_clip-R)^2).
    Stats: clip_frac = masked fraction with (v_clip-R)^2 > (v-R)^2 (0 if no clipping).
    """
    m = _bool_mask(mask)
    values, old_values, returns = (_zero_masked(t, m) for t in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip_range is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        loss_tok = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    else:
        loss_tok = 0.5 * unclipped
        clip_active = torch.zeros_like(m)
    loss = aggregate_loss(loss_tok, m, agg_mode)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(clip_active.float(), m)}
    return loss, stats


# ---------------------------------------------------------------------------
# logits helpers
# ---------------------------------------------------------------------------

def _upcast(logits: Tensor) -> Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: [..., T, V] -> [..., T].

    H = logsumexp(l) - sum_v softmax(l)_v * l_v  (terms with p == 0 dropped, so
    -inf logits are fine).  Half precision is computed in float32.
    """
    logits = _upcast(logits)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    safe = torch.where(p > 0, logits, torch.zeros((), dtype=p.dtype, device=p.device))
    return lse - (p * safe).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log softmax(logits)[..., token_ids]: logits [..., T, V], ids [..., T] -> [..., T]."""
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------
# preference losses
# ---------------------------------------------------------------------------

def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DPO / IPO loss on sequence-summed logps [B].

    h = (pc - rc) - (pr - rr)
    sigmoid: -logsigmoid(beta*h)*(1-ls) - logsigmoid(-beta*h)*ls
    ipo:     (h - 1/(2*beta))^2
    Returns (mean loss, stats) with detached chosen_rewards = beta*(pc-rc) [B],
    rejected_rewards = beta*(pr-rr) [B], margins [B], accuracy = mean(margins > 0).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    h = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = (
            -torch.nn.functional.logsigmoid(beta * h) * (1.0 - label_smoothing)
            - torch.nn.functional.logsigmoid(-beta * h) * label_smoothing
        )
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    with torch.no_grad():
        chosen_rewards = beta * chosen_lr.detach()
        rejected_rewards = beta * rejected_lr.detach()
        margins = chosen_rewards - rejected_rewards
        stats = {
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "margins": margins,
            "accuracy": (margins > 0).float().mean(),
        }
    return losses.mean(), stats


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Optional[Union[Tensor, float]] = None,
) -> Tuple[Tensor, Tensor]:
    """Reward-model pairwise loss, scores [N].

    loss = mean(-logsigmoid(c - r - margin)) (margin 0 if None);
    accuracy = mean(c > r) (detached float scalar).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    with torch.no_grad():
        acc = (chosen_scores > rejected_scores).float().mean()
    return loss, acc


def response_hidden_sum(hidden: Tensor, response_mask: Tensor) -> Tensor:
    """Sum over response tokens k of h(x, y_<k), hidden [B, T, D] -> [B, D].

    h(x, y_<k) is the hidden state that predicts response token k: the one at the position
    before the token's own (batch_types alignment), so the sum runs over positions t - 1
    for every t with ``response_mask[:, t]``.
    """
    predicts = torch.zeros(response_mask.shape, dtype=torch.bool, device=hidden.device)
    predicts[:, :-1] = _bool_mask(response_mask[:, 1:])
    return torch.where(predicts.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype)).sum(dim=1)


def ches_scores(chosen_hidden_sum: Tensor, rejected_hidden_sum: Tensor) -> Tensor:
    """CHES score per pair (Razin et al. 2024), [B, D] x [B, D] -> [B]:
    <sum_k h(x, y+_<k), sum_k h(x, y-_<k)> - ||sum_k h(x, y+_<k)||^2. High CHES (the two
    responses' hidden states alike) predicts that DPO lowers the chosen response's likelihood."""
    c, r = chosen_hidden_sum.double(), rejected_hidden_sum.double()
    return (c * r).sum(dim=-1) - (c * c).sum(dim=-1)


def ches_keep_mask(scores: Tensor, drop_fraction: float) -> Tensor:
    """Bool [B]: False on the ceil(drop_fraction * B) pairs with the highest CHES."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    n = scores.numel()
    n_drop = min(int(math.ceil(drop_fraction * n - 1e-9)), n - 1) if n else 0
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_drop > 0:
        keep[torch.topk(scores, n_drop).indices] = False
    return keep


def aggregate_ensemble(
    member_scores: Tensor, mode: str, uwo_lambda: float = 1.0
) -> Tuple[Tensor, Tensor]:
    """Combine a reward-model ensemble, member_scores [K, N] -> (scores [N], std [N]).

    std is the unbiased (K-1) sample std over members, 0 when K == 1.
    mean: mean_k;  wco (worst-case): min_k;  uwo: mean_k - uwo_lambda * std
    (Coste et al. penalise the variance; we use the std, as specified).
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; allowed: {', '.join(ENSEMBLE_MODES)}")
    if member_scores.dim() != 2:
        raise ValueError(f"member_scores must be [K, N], got {tuple(member_scores.shape)}")
    k = member_scores.shape[0]
    if k > 1:
        std = member_scores.std(dim=0, unbiased=True)
    else:
        std = torch.zeros_like(member_scores[0])
    mean = member_scores.mean(dim=0)
    if mode == "mean":
        scores = mean
    elif mode == "wco":
        scores = member_scores.min(dim=0).values
    else:
        scores = mean - uwo_lambda * std
    return scores, std


__all__ = [
    "response_hidden_sum", "ches_scores", "ches_keep_mask",
    "masked_sum", "masked_mean", "masked_var", "masked_whiten", "aggregate_loss",
    "kl_estimate", "gae_advantages", "group_reward_std", "grpo_advantages",
    "rloo_advantages", "ppo_policy_loss", "value_loss", "entropy_from_logits",
    "logprobs_from_logits", "dpo_loss", "bradley_terry_loss", "aggregate_ensemble",
]
