"""Preference pairs for Bradley-Terry reward models: the user's data or the toy world's.

A pair is a dict ``{"prompt", "chosen", "rejected"}``. Toy pairs also carry the hidden gold
reward of both responses (``gold_chosen``, ``gold_rejected``), so an evaluation can score
a reward model against the noiseless gold ordering as well as against the noisy labels.

Toy labels follow the Bradley-Terry model on the gold reward:
``P(a preferred to b) = sigmoid(beta * (gold(a) - gold(b)))``. Close calls are therefore
often labelled the wrong way round, as human labels are.
"""

from __future__ import annotations

import math
import random
from typing import Any

from services.core import toy_world
from services.core.config import FlywheelConfig
from services.core.data import load_rows
from services.core.toy_eval import generate, load_sampling_policy

HELDOUT_SEED_OFFSET = 1_000_003  # held-out toy prompts and labels are drawn apart from training


def bt_preference_probability(gold_a: float, gold_b: float, beta: float) -> float:
    """P(a preferred to b) under Bradley-Terry with inverse temperature ``beta``."""
    z = beta * (gold_a - gold_b)
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    return math.exp(z) / (1.0 + math.exp(z))  # no overflow for very negative z


def label_pairs(
    prompts: list[str], first: list[str], second: list[str], beta: float, seed: int
) -> list[dict[str, Any]]:
    """Label sampled response pairs with gold + Bradley-Terry noise. Pairs whose responses
    are identical or equally good under gold are dropped: neither order would be wrong."""
    gold_first = toy_world.gold_reward(prompts, first)
    gold_second = toy_world.gold_reward(prompts, second)
    rng = random.Random(seed)
    pairs = []
    for prompt, a, b, gold_a, gold_b in zip(prompts, first, second, gold_first, gold_second):
        if a.strip() == b.strip() or gold_a == gold_b:
            continue
        a_wins = rng.random() < bt_preference_probability(gold_a, gold_b, beta)
        chosen, rejected = (a, b) if a_wins else (b, a)
        gold_chosen, gold_rejected = (gold_a, gold_b) if a_wins else (gold_b, gold_a)
        pairs.append({
            "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "gold_chosen": gold_chosen, "gold_rejected": gold_rejected,
        })
    return pairs


def toy_preference_pairs(policy_dir: str, n_pairs: int, cfg: FlywheelConfig, seed: int) -> list[dict[str, Any]]:
    """``n_pairs`` labelled pairs of responses sampled (T = 1) from the SFT policy at
    ``policy_dir`` on the toy world's list prompts."""
    model, tokenizer = load_sampling_policy(str(policy_dir))
    task = toy_world.TASKS["preference"]
    pairs: list[dict[str, Any]] = []
    for attempt in range(8):  # ties and duplicates are dropped; sample more until there are enough
        wanted = max(2 * (n_pairs - len(pairs)), 16)
        prompts = [row.prompt for row in task.prompts(wanted, seed + 7919 * attempt)]
        first = generate(model, tokenizer, prompts, cfg.data.max_response_tokens, seed=seed + 2 * attempt, batch_size=256)
        second = generate(model, tokenizer, prompts, cfg.data.max_response_tokens, seed=seed + 2 * attempt + 1, batch_size=256)
        pairs += label_pairs(prompts, first, second, cfg.data.toy_label_beta, seed + attempt)
        if len(pairs) >= n_pairs:
            return pairs[:n_pairs]
    raise RuntimeError(
        f"the policy at {policy_dir} gave only {len(pairs)} usable pairs for {n_pairs} wanted: "
        "its samples are nearly all identical or tied under gold"
    )


def pair_problem(prompt_key: str, chosen_key: str, rejected_key: str):
    """A ``load_rows`` check: chosen and rejected must differ."""

    def check(row: dict[str, Any]) -> str | None:
        if row[chosen_key].strip() == row[rejected_key].strip():
            return (
                f"'{chosen_key}' and '{rejected_key}' are identical, so the pair says nothing; "
                "remove the row"
            )
        return None

    return check


def user_preference_pairs(cfg: FlywheelConfig) -> list[dict[str, Any]]:
    data = cfg.data
    keys = [data.prompt_key, data.chosen_key, data.rejected_key]
    rows = load_rows(
        data.source, keys, split=data.split,
        key_fields={data.prompt_key: "data.prompt_key", data.chosen_key: "data.chosen_key",
                    data.rejected_key: "data.rejected_key"},
        check=pair_problem(*keys),
    )
    return [{**row, "prompt": row[keys[0]], "chosen": row[keys[1]], "rejected": row[keys[2]]} for row in rows]


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float, seed: int):
    """(train, held-out): a seeded shuffle, then the last ``eval_fraction`` held out."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(pairs) * eval_fraction)
    if eval_fraction > 0 and len(pairs) > 1:
        n_eval = min(max(n_eval, 1), len(pairs) - 1)
    cut = len(pairs) - n_eval
    return [pairs[i] for i in order[:cut]], [pairs[i] for i in order[cut:]]


def bootstrap_sample(n: int, seed: int) -> list[int]:
    """n indices drawn with replacement (a bootstrap resample, Coste et al. 2024)."""
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(n)]


def label_noise_rate(pairs: list[dict[str, Any]]) -> float | None:
    """Share of pairs whose label contradicts gold; None when the pairs carry no gold."""
    with_gold = [p for p in pairs if "gold_chosen" in p and "gold_rejected" in p]
    if not with_gold:
        return None
    return sum(p["gold_chosen"] < p["gold_rejected"] for p in with_gold) / len(with_gold)


def preference_pairs(cfg: FlywheelConfig, policy_dir: str | None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs for ``flywheel train-rm``: generated on the toy world
    (``data.toy_pairs`` + ``data.toy_heldout_pairs``), else read from ``data.source`` and split
    by ``data.eval_fraction``."""
    if cfg.data.source == "toy":
        train = toy_preference_pairs(policy_dir, cfg.data.toy_pairs, cfg, cfg.seed)
        heldout = toy_preference_pairs(policy_dir, cfg.data.toy_heldout_pairs, cfg, cfg.seed + HELDOUT_SEED_OFFSET)
        return train, heldout
    return split_pairs(user_preference_pairs(cfg), cfg.data.eval_fraction, cfg.seed)


__all__ = [
    "bt_preference_probability", "label_pairs", "toy_preference_pairs", "user_preference_pairs", "split_pairs",
    "bootstrap_sample", "label_noise_rate", "preference_pairs", "pair_problem",
]
