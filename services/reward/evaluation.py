"""Evaluating reward models beyond accuracy (`flywheel eval-rm`, and the end of `train-rm`).

For every member and for the ensemble (aggregated mean, wco and uwo):

- **held-out pairwise accuracy** against the labels, and, for toy pairs that carry the hidden
  gold reward, against the noiseless gold ordering;
- **reward variance under a policy** (Razin et al. 2025): per prompt x, the unbiased sample
  variance over n responses y ~ pi of r(x, y); reported as mean, quantiles, the fraction of
  prompts below ``reward.variance.threshold``, and the within-prompt share of all reward
  variance (scale-free: Bradley-Terry rewards have no fixed scale);
- **disagreement between members**: the share of held-out pairs that the members do not all
  order the same way, the mean Pearson correlation between members' scores, and the mean
  std across members of their centred scores.

The statistics are pure functions of lists of floats (services/reward/stats.py), unit-tested
against hand computations.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.core import toy_world
from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.core.model_files import check_model_files
from services.core.toy_eval import generate, load_sampling_policy
from services.driver.preflight import check_scorers
from services.reward.aggregate import aggregate_scores
from services.reward.ensemble import RewardEnsemble
from services.reward.preference_data import HELDOUT_SEED_OFFSET, toy_preference_pairs, user_preference_pairs
from services.reward.stats import (
    centered_member_std, gold_order_accuracy, mean_pairwise_correlation, order_disagreement, pairwise_accuracy,
    variance_summary,
)

EVAL_SAMPLING_SEED = 4242


def policy_samples(policy_dir: str, prompts: list[str], n: int, max_tokens: int, seed: int) -> list[str]:
    """n responses per prompt (consecutive), sampled at T = 1 with transformers."""
    model, tokenizer = load_sampling_policy(str(policy_dir))
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if getattr(tokenizer, "chat_template", None) else p
        for p in prompts
    ]
    return generate(model, tokenizer, [t for t in texts for _ in range(n)], max_tokens, seed=seed)


def _scorer_rows(ensemble_scores, aggregates: dict[str, list[float]]):
    """(name, scores) for every member, then every aggregate."""
    return list(zip(ensemble_scores.member_names, ensemble_scores.member_scores)) + [
        (f"ensemble/{mode}", scores) for mode, scores in aggregates.items()
    ]


def _all_aggregates(ensemble_scores, uwo_lambda: float) -> dict[str, list[float]]:
    return {
        mode: aggregate_scores(ensemble_scores.member_scores, ensemble_scores.member_names, mode, uwo_lambda).scores
        for mode in ("mean", "wco", "uwo")
    }


def evaluate_pairs(ensemble, pairs: list[dict], uwo_lambda: float) -> dict:
    """Accuracy of every member and aggregate on ``pairs``, and member disagreement."""
    prompts = [p["prompt"] for p in pairs]
    chosen = ensemble.score(prompts, [p["chosen"] for p in pairs])
    rejected = ensemble.score(prompts, [p["rejected"] for p in pairs])
    agg_c, agg_r = _all_aggregates(chosen, uwo_lambda), _all_aggregates(rejected, uwo_lambda)
    has_gold = all(isinstance(p.get("gold_chosen"), (int, float)) and isinstance(p.get("gold_rejected"), (int, float))
                   for p in pairs)
    accuracy: dict[str, dict] = {}
    for (name, c), (_, r) in zip(_scorer_rows(chosen, agg_c), _scorer_rows(rejected, agg_r)):
        entry = {"label_accuracy": pairwise_accuracy(c, r)}
        if has_gold:
            entry["gold_accuracy"] = gold_order_accuracy(
                c, r, [p["gold_chosen"] for p in pairs], [p["gold_rejected"] for p in pairs]
            )
        accuracy[name] = entry
    both = [mc + mr for mc, mr in zip(chosen.member_scores, rejected.member_scores)]
    return {
        "pairs": len(pairs),
        "accuracy": accuracy,
        "disagreement": {
            "order_disagreement": order_disagreement(chosen.member_scores, rejected.member_scores),
            "mean_pairwise_correlation": mean_pairwise_correlation(both),
            "centered_member_std": centered_member_std(both),
        },
    }


def evaluate_variance(ensemble, cfg: FlywheelConfig, prompts: list[str], with_gold: bool) -> dict:
    """Reward variance of every member and aggregate under the policy at ``model.path``."""
    n = cfg.reward.variance.samples
    completions = policy_samples(cfg.model.path, prompts, n, cfg.data.max_response_tokens, EVAL_SAMPLING_SEED)
    repeated = [p for p in prompts for _ in range(n)]
    scored = ensemble.score(repeated, completions)
    rows = _scorer_rows(scored, _all_aggregates(scored, cfg.reward.uwo_lambda))
    if with_gold:
        rows.append(("gold", toy_world.gold_reward(repeated, completions)))
    threshold = cfg.reward.variance.threshold
    return {
        "policy": cfg.model.path, "prompts": len(prompts), "samples_per_prompt": n, "threshold": threshold,
        "by_scorer": {name: variance_summary(scores, n, threshold) for name, scores in rows},
    }


def print_report(report: dict, aggregate: str) -> None:
    from rich.console import Console
    from rich.table import Table

    accuracy, variance = report["pairs"]["accuracy"], report.get("variance", {}).get("by_scorer", {})
    gold = any("gold_accuracy" in a for a in accuracy.values())
    table = Table(title=f"reward models on {report['pairs']['pairs']} held-out pairs (* the configured aggregate)")
    columns = ["scorer", "acc"] + (["acc gold"] if gold else [])
    columns += ["var mean", "var p10", "var p50", "var p90", "var<thr", "within"]
    for column in columns:
        table.add_column(column, justify="left" if column == "scorer" else "right")
    for name in list(accuracy) + [n for n in variance if n not in accuracy]:
        acc, var = accuracy.get(name, {}), variance.get(name)
        label = f"{name}*" if name == f"ensemble/{aggregate}" else name
        cells = [label, _fmt(acc.get("label_accuracy"))] + ([_fmt(acc.get("gold_accuracy"))] if gold else [])
        if var:
            cells += [_fmt(var[k]) for k in ("mean", "p10", "p50", "p90", "fraction_below_threshold", "within_prompt_share")]
        else:
            cells += [""] * 6
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # logs and pipes: don't squeeze the table into 80 columns
        console = Console(width=120)
    console.print(table)
    console.print(
        "acc: held-out pairwise accuracy against the labels"
        + ("; acc gold: against the noiseless gold order" if gold else "")
        + f". var: per-prompt reward variance under the policy (Razin et al.), its mean and quantiles; "
        f"var<thr: share of prompts below {report.get('variance', {}).get('threshold', '-')}; "
        "within: mean per-prompt variance / total variance."
    )
    d = report["pairs"]["disagreement"]
    console.print(
        f"member disagreement: {_fmt(d['order_disagreement'])} of pairs not ordered alike; mean correlation "
        f"{_fmt(d['mean_pairwise_correlation'])}; centred member std {_fmt(d['centered_member_std'])}"
    )


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}"


def run_evaluation(cfg: FlywheelConfig, pairs: list[dict], out_dir: str | Path) -> dict:
    """Evaluate ``cfg.reward`` on ``pairs`` (and under the policy ``model.path`` when set);
    prints the table and writes DIR/eval.json."""
    ensemble = RewardEnsemble(cfg.reward)
    report: dict = {"members": ensemble.member_names, "aggregate": cfg.reward.aggregate}
    report["pairs"] = evaluate_pairs(ensemble, pairs, cfg.reward.uwo_lambda)
    if cfg.model.path:
        prompts = list(dict.fromkeys(p["prompt"] for p in pairs))[: cfg.reward.variance.prompts]
        with_gold = all("gold_chosen" in p for p in pairs)
        report["variance"] = evaluate_variance(ensemble, cfg, prompts, with_gold)
    else:
        report["variance_skipped"] = "model.path is null: no policy to measure reward variance under"
    print_report(report, cfg.reward.aggregate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def run_eval_rm(cfg: FlywheelConfig, out_dir: str | Path) -> dict:
    """`flywheel eval-rm`: the pairs come from ``data.source`` (all rows), or, on the toy
    world, are sampled afresh from the policy at ``model.path``. The policy's and the reward
    models' weight files are checked first (cheap), before the pairs are sampled or read."""
    check_model_files(cfg.model.path, "model.path")
    check_scorers(cfg)
    if cfg.data.source == "toy":
        if not cfg.model.path:
            raise UserError("model.path: toy pairs are sampled from a policy; point model.path at one")
        pairs = toy_preference_pairs(cfg.model.path, cfg.data.toy_heldout_pairs, cfg, cfg.seed + HELDOUT_SEED_OFFSET)
    else:
        pairs = user_preference_pairs(cfg)
    return run_evaluation(cfg, pairs, out_dir)


__all__ = ["evaluate_pairs", "evaluate_variance", "run_evaluation", "run_eval_rm"]
