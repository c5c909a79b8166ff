"""Evaluation during RL: before the first step (``eval.before_training``: metrics.jsonl's
step 0 line), every ``algorithm.eval_every`` steps and after the last one, the
engines (synced to the learner's latest weights) sample ``eval.n_samples`` responses for
each held-out prompt, the run's reward ensemble scores them with the prompts' columns, and
the step's metrics.jsonl line gets:

- ``eval/reward_mean`` (the ensemble's aggregate) and ``eval/member/<name>`` per member;
- for each verifiable member (math_verify, exact_match, regex: a score >= 1 is a correct
  answer, the format term stays below 1) ``eval/pass@1/<name>`` and ``eval/pass@<n>/<name>``,
  the unbiased estimator of Chen et al. 2021 averaged over prompts; with exactly one such
  member also ``eval/pass@1`` and ``eval/pass@<n>``;
- on the toy world ``eval/gold_mean``, the hidden gold reward of the samples.

Each held-out prompt's samples have a seed fixed by (run seed, prompt id), the same at every
evaluation and in a resumed run, so two evaluations differ by the policy only.
"""

from __future__ import annotations

from statistics import fmean

from services.core import toy_world
from services.core.batch_types import trajectory_columns
from services.core.config import FlywheelConfig
from services.driver.prompt_source import sample_seed
from services.reward.scorers import scorer_class, scorer_name
from services.reward.stats import mean_pass_at_k
from services.rollout.worker import PromptItem, SamplingSpec


def eval_seed(run_seed: int, prompt_id: str) -> int:
    return sample_seed("eval", run_seed, prompt_id)


def verifiable_members(cfg: FlywheelConfig) -> list[str]:
    """Members that check an answer column (a regex format reward without one is not)."""
    return [scorer_name(s, i) for i, s in enumerate(cfg.reward.scorers)
            if scorer_class(s, i).verifiable and scorer_class(s, i).columns_needed(s)]


class HeldOutEval:
    def __init__(self, cfg: FlywheelConfig, items: list[dict]):
        if cfg.eval.max_prompts is not None:
            items = items[: cfg.eval.max_prompts]
        self.items = [
            PromptItem(id=it["id"], prompt=it["prompt"], columns=dict(it.get("columns") or {}),
                       seed=eval_seed(cfg.seed, it["id"]), prompt_ids=it.get("prompt_ids"))
            for it in items
        ]
        self.every, self.total = cfg.algorithm.eval_every, cfg.algorithm.total_steps
        self.n = cfg.eval.n_samples
        self.sampling = SamplingSpec.from_config(cfg, n=self.n, temperature=cfg.eval.temperature)
        self.verifiable = verifiable_members(cfg)
        self.toy = cfg.data.source == "toy"

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.total)

    def run(self, rollout, reward) -> dict[str, float]:
        """Sample, score, summarise (``rollout``/``reward``: the driver's service protocols)."""
        trajectories, _ = rollout.generate_with_stats(self.items, self.sampling)
        prompts = [t.prompt for t in trajectories]
        completions = [t.response for t in trajectories]
        scores = reward.submit(prompts, completions, trajectory_columns(trajectories)).result()
        record = {"eval/reward_mean": fmean(scores.scores), "eval/prompts": float(len(self.items))}
        members = dict(zip(scores.member_names, scores.member_scores))
        for name, values in members.items():
            record[f"eval/member/{name}"] = fmean(values)
        for name in self.verifiable:
            groups: dict[str, list[bool]] = {}
            for t, value in zip(trajectories, members[name]):
                groups.setdefault(t.prompt_id, []).append(value >= 1.0)
            for k in dict.fromkeys((1, self.n)):
                record[f"eval/pass@{k}/{name}"] = mean_pass_at_k(list(groups.values()), k)
                if len(self.verifiable) == 1:
                    record[f"eval/pass@{k}"] = record[f"eval/pass@{k}/{name}"]
        if self.toy:
            record["eval/gold_mean"] = fmean(toy_world.gold_reward(prompts, completions))
        record["eval/response_length_mean"] = fmean(len(t.response_ids) for t in trajectories)
        return record
