"""`flywheel train-rm`: an ensemble of Bradley-Terry reward models, trained with DeepSpeed.

Each member is a Hugging Face ``AutoModelForSequenceClassification`` with one label,
initialised from the policy at ``model.path`` (a fresh scalar head on the SFT backbone)
and trained on ``-log sigmoid(r(chosen) - r(rejected))``. With ``ensemble.size`` K, member k
uses seed ``seed + k`` for its head, its batch order and, with ``ensemble.bootstrap``, its own
resample (with replacement) of the training pairs (Coste et al. 2024).

Writes into DIR:
- ``pairs/train.jsonl``, ``pairs/heldout.jsonl``: the pairs (toy pairs carry gold rewards);
- ``members/rm-<k>/``: HF directories that ``reward.scorers: [{kind: hf, path: ...}]`` loads;
- ``ensemble.yaml``: a full config using the ensemble (and the held-out pairs), ready for
  ``flywheel eval-rm``, ``flywheel serve-reward`` or a ``reward:`` section of ``flywheel train``;
- ``metrics.jsonl``, ``summary.json`` and ``eval.json`` (see services/reward/evaluation.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from services.core.config import FlywheelConfig, RewardConfig, ScorerConfig
from services.core.config_loading import dump_config
from services.core.data import write_jsonl
from services.core.metrics import MetricsWriter
from services.core.rl_math import bradley_terry_loss
from services.core.special_tokens import load_padding_tokenizer
from services.driver.bootstrap import policy_dir as resolve_policy
from services.learner.deepspeed_setup import full_state_dict, init_engine, unpacked_stage
from services.learner.lora import reject_lora
from services.reward.evaluation import run_evaluation
from services.reward.preference_data import bootstrap_sample, label_noise_rate, preference_pairs
from services.reward.scorers import encode_reward_inputs


def reward_max_length(cfg: FlywheelConfig) -> int:
    """Tokens per scored sequence, in training and in the written scorer configs."""
    return cfg.data.max_prompt_tokens + cfg.data.max_response_tokens


def load_reward_model(policy_dir: str, seed: int):
    """A one-label sequence classifier on the policy's backbone (head seeded by ``seed``)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tokenizer = load_padding_tokenizer(policy_dir, "model.path")
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model, tokenizer


def pair_scores(model, tokenizer, pairs: list[dict], max_length: int):
    """(chosen scores [B], rejected scores [B]) from one forward pass over both halves."""
    prompts = [p["prompt"] for p in pairs]
    enc = encode_reward_inputs(
        tokenizer, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], max_length
    )
    device = next(model.parameters()).device
    scores = model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device)).logits[:, 0]
    return scores[: len(pairs)].float(), scores[len(pairs):].float()


def train_member(
    cfg: FlywheelConfig, policy_dir: str, pairs: list[dict], index: int, member_dir: Path, metrics: MetricsWriter
) -> dict:
    """Train member ``index`` and save it to ``member_dir``; returns its training summary."""
    import math

    from tqdm import tqdm

    seed = cfg.seed + index
    started = time.time()
    model, tokenizer = load_reward_model(policy_dir, seed)
    sample = bootstrap_sample(len(pairs), seed) if cfg.ensemble.bootstrap else list(range(len(pairs)))
    micro, accum = cfg.learner.micro_batch_size, cfg.learner.grad_accum_steps
    micro_per_epoch = math.ceil(len(sample) / micro)
    total_steps = max(1, micro_per_epoch * cfg.learner.epochs // accum)
    reject_lora(cfg.learner, "train-rm")
    engine = init_engine(model, cfg.learner, cfg.model.dtype, total_steps)
    max_length, rng = reward_max_length(cfg), random.Random(seed)
    losses, accs = [], []
    with tqdm(total=micro_per_epoch * cfg.learner.epochs, desc=f"rm-{index}", unit="batch", mininterval=2.0) as bar:
        for epoch in range(cfg.learner.epochs):
            order = list(sample)
            rng.shuffle(order)
            for start in range(0, len(order), micro):
                batch = [pairs[i] for i in order[start : start + micro]]
                chosen, rejected = pair_scores(engine, tokenizer, batch, max_length)
                loss, acc = bradley_terry_loss(chosen, rejected)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                accs.append(acc.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.2f}", refresh=False)
                metrics.write({
                    "member": index, "epoch": epoch, "step": engine.global_steps,
                    "train/loss": loss.item(), "train/accuracy": acc.item(), "train/lr": engine.get_lr()[0],
                })
    state = full_state_dict(engine)
    engine.module.save_pretrained(member_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(member_dir)
    tail = max(1, micro_per_epoch // 2)  # the last half epoch
    return {
        "name": f"rm-{index}", "seed": seed, "path": str(member_dir),
        "distinct_pairs": len(set(sample)), "train_pairs": len(sample),
        "final_loss": sum(losses[-tail:]) / tail, "final_train_accuracy": sum(accs[-tail:]) / tail,
        "train_s": round(time.time() - started, 1),
    }


def ensemble_reward_config(cfg: FlywheelConfig, members: list[dict]) -> RewardConfig:
    """``reward:`` section scoring with the trained members, aggregated by ``ensemble.aggregate``."""
    scorers = [
        ScorerConfig(kind="hf", path=m["path"], name=m["name"], max_length=reward_max_length(cfg)) for m in members
    ]
    return cfg.reward.model_copy(update={"scorers": scorers, "aggregate": cfg.ensemble.aggregate})


def run_train_rm(cfg: FlywheelConfig, out_dir: str | Path) -> dict:
    """Make or load the pairs, train K members, evaluate them; returns summary.json's content."""
    unpacked_stage(cfg.learner, "train-rm")
    out = Path(out_dir)  # made once the policy's files and the pairs are checked
    started = time.time()
    if cfg.data.source != "toy":  # the user's pairs are checked before anything slow
        train, heldout = preference_pairs(cfg, None)
    policy = str(resolve_policy(cfg, out).resolve())
    if cfg.model.path is not None:  # the toy policy, made in OUT, can pad
        load_padding_tokenizer(policy, "model.path")
    if cfg.data.source == "toy":  # toy pairs are sampled from the policy
        train, heldout = preference_pairs(cfg, policy)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "pairs" / "train.jsonl", train)
    write_jsonl(out / "pairs" / "heldout.jsonl", heldout)
    noise = label_noise_rate(train)
    print(
        f"{len(train)} training pairs, {len(heldout)} held out"
        + (f"; labels contradicting gold: {noise:.1%}" if noise is not None else "")
    )
    members = []
    with MetricsWriter(out / "metrics.jsonl") as metrics:
        for k in range(cfg.ensemble.size):
            member_dir = (out / "members" / f"rm-{k}").resolve()
            members.append(train_member(cfg, policy, train, k, member_dir, metrics))

    eval_cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"path": policy}),
        "data": cfg.data.model_copy(update={"source": str((out / "pairs" / "heldout.jsonl").resolve())}),
        "reward": ensemble_reward_config(cfg, members),
    })
    (out / "ensemble.yaml").write_text(
        "# written by `flywheel train-rm`: the trained ensemble, its held-out pairs and the policy\n"
        + dump_config(eval_cfg)
    )
    summary = {
        "train_pairs": len(train), "heldout_pairs": len(heldout),
        "label_noise_rate": noise, "heldout_label_noise_rate": label_noise_rate(heldout),
        "policy": policy, "members": members, "train_s": round(time.time() - started, 1),
    }
    summary["eval"] = run_evaluation(eval_cfg, heldout, out)
    summary["total_s"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["run_train_rm", "train_member", "load_reward_model", "pair_scores", "ensemble_reward_config"]
