"""Run-time alarms from the research, kept out of the driver loop's body.

:class:`LikelihoodDisplacementMonitor` (online DPO, Razin et al. 2024): DPO can lower the
likelihood of the *chosen* responses while it widens the chosen-rejected margin. Each step
the driver measures the mean change of the chosen responses' summed log-likelihood under
the learner across the update; when that change stays negative for ``patience`` steps in a
row the monitor logs a warning and raises its alarm (``dpo/displacement_alarm`` in
metrics.jsonl, ``flywheel_dpo_likelihood_displacement_alarm`` in Prometheus).

:class:`LogprobGapMonitor` (every RL algorithm): the rollout engine's log-prob of each
sampled token against the learner's under the same weights. They should agree to float
noise in fp32 (bf16 kernels on GPUs differ more); a gap is a train-inference mismatch, such
as an engine that did not receive every weight in a sync. The monitor reports
``rollout/logprob_gap_max`` / ``_mean`` / ``_ratio_outside`` and warns once per streak of
steps whose largest gap exceeds the alarm threshold (``rollout.logprob_gap_alarm``).
"""

from __future__ import annotations

import logging

from services.core.config import FlywheelConfig
from services.core.rl_math import logprob_gap_stats

log = logging.getLogger("flywheel.diagnostics")


class LikelihoodDisplacementMonitor:
    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.streak = 0

    def update(self, step: int, chosen_logp_delta: float) -> dict[str, float]:
        """Record one step's mean change of log p(chosen); returns its metrics."""
        self.streak = self.streak + 1 if chosen_logp_delta < 0 else 0
        alarm = self.streak >= self.patience
        if self.streak == self.patience:
            log.warning(
                "likelihood displacement: the chosen responses' log-likelihood fell in each of the last %d "
                "steps (step %d: %+.4f); DPO is pushing probability mass away from both responses. "
                "Consider algorithm.ches_filter_top > 0, a smaller learning rate or a larger dpo_beta.",
                self.patience, step, chosen_logp_delta,
            )
        return {
            "dpo/chosen_logp_delta": float(chosen_logp_delta),
            "dpo/displacement_streak": float(self.streak),
            "dpo/displacement_alarm": 1.0 if alarm else 0.0,
        }


class LogprobGapMonitor:
    def __init__(self, alarm: float):
        if not alarm > 0:
            raise ValueError(f"alarm must be > 0, got {alarm}")
        self.alarm = alarm
        self.alarming = False

    def update(self, step: int, version: int, learner_logprobs, sampler_logprobs, mask) -> dict[str, float]:
        """One measurement on trajectories sampled by policy ``version``: the learner's and the
        sampler's log-probs [B, T] of their tokens under that version, ``mask`` [B, T] their
        response tokens (``rl_math.logprob_gap_stats``); returns its metrics."""
        gap = logprob_gap_stats(learner_logprobs, sampler_logprobs, mask)
        over = gap["max"] > self.alarm
        if over and not self.alarming:
            log.warning(
                "train-inference mismatch: in step %d the rollout engine's log-probs of tokens sampled by policy "
                "version %d differ from the learner's by up to %.3g (mean %.3g; %.1f%% of tokens with an importance "
                "ratio outside [0.5, 2]); above rollout.logprob_gap_alarm = %.3g. The engine does not hold the "
                "learner's weights, or computes differently (dtype, kernels); see algorithm.tis_cap.",
                step, version, gap["max"], gap["mean"], 100 * gap["ratio_outside"], self.alarm,
            )
        self.alarming = over
        return {
            "rollout/logprob_gap_max": gap["max"], "rollout/logprob_gap_mean": gap["mean"],
            "rollout/logprob_gap_ratio_outside": gap["ratio_outside"], "rollout/logprob_gap_alarm": float(over),
        }


# the step's phases as the driver times them: scoring (the reward ensemble) and reference run at the same time,
# so their shares overlap; so does the rollout of a streaming run (max_staleness >= 1) with the rest of the step
STEP_PHASES = {"rollout": "timing/rollout_s", "scoring": "timing/reward_s", "reference": "timing/reference_s",
               "training": "timing/train_s", "sync": "timing/sync_s", "eval": "timing/eval_s"}


def step_shares(record: dict, streaming: bool) -> dict[str, float]:
    """``perf/share/<phase>``: each timed phase of the step over ``timing/step_s``, and
    ``perf/share/driver``: the rest of the step, outside the rollout (a streaming run: only the
    wait for it, ``timing/rollout_wait_s``, which includes the syncs), the score phase (``timing/score_s``: reward,
    reference and learner log-probs together), training, sync and evaluation."""
    step = record.get("timing/step_s") or 0.0
    if step <= 0:
        return {}
    shares = {f"perf/share/{name}": record[key] / step for name, key in STEP_PHASES.items() if key in record}
    on_path = ["timing/score_s", "timing/train_s", "timing/eval_s"]  # a streaming run syncs on the rollout thread
    on_path += ["timing/rollout_wait_s"] if streaming else ["timing/rollout_s", "timing/sync_s"]
    shares["perf/share/driver"] = max(0.0, step - sum(record.get(key, 0.0) for key in on_path)) / step
    return shares


def episode_stats(trajectories) -> dict[str, float]:
    """Multi-turn episodes (``Trajectory.env_info``): policy turns, tool calls and tool errors
    per episode, the environment's errors and seconds (summed over episodes), and the length of
    the episodes' responses (policy and environment tokens) at the 50th and 90th percentile."""
    import numpy as np

    info = [t.env_info for t in trajectories]
    lengths = [len(t.response_ids) for t in trajectories]
    return {
        "rollout/turns_mean": float(np.mean([i.get("turns", 0.0) for i in info])),
        "rollout/tool_calls_mean": float(np.mean([i.get("tool_calls", 0.0) for i in info])),
        "rollout/tool_errors": float(sum(i.get("tool_errors", 0.0) for i in info)),
        "rollout/env_errors": float(sum(i.get("env_errors", 0.0) for i in info)),
        "rollout/env_s": float(sum(i.get("env_s", 0.0) for i in info)),
        "rollout/episode_tokens_p50": float(np.percentile(lengths, 50)),
        "rollout/episode_tokens_p90": float(np.percentile(lengths, 90)),
    }


def learner_old_due(cfg: FlywheelConfig, step: int) -> bool:
    """On-policy runs: whether this step runs the learner's forward for the batch's old
    log-probs (the PPO ratio's denominator, and the learner's side of the log-prob gap).
    Where it changes nothing else, only on the steps that measure the gap (``probe_due``),
    and the sampler's log-probs stand in on the others: one optimizer step on the whole
    batch (ppo_epochs 1, no ppo_minibatch_size) takes the ratio at the sampling weights, 1
    either way within float noise in fp32 (the gap is ~3e-6 there), and no tis_cap. The
    forward cost 1.1 s of an 8.5 s step on the bench-grpo workload (2 cores).

    Streaming runs: only with ``tis_cap`` (the decoupled objective: the ratio against the
    learner's weights now, times the truncated weight of those over the sampler's)."""
    a = cfg.algorithm
    if a.max_staleness:
        return a.tis_cap is not None
    single_update = a.ppo_epochs == 1 and a.ppo_minibatch_size is None
    if not single_update or a.tis_cap is not None or cfg.model.dtype != "fp32":
        return True
    return probe_due(cfg, step)


def probe_due(cfg: FlywheelConfig, step: int) -> bool:
    """Measure the log-prob gap on step 1 and every ``rollout.logprob_gap_every`` steps after
    it (the same steps in a resumed run): streaming runs, and on-policy runs whose learner
    forward would serve only the gap (``learner_old_due``)."""
    every = cfg.rollout.logprob_gap_every
    return every > 0 and (step - 1) % every == 0


__all__ = [
    "episode_stats", "learner_old_due", "probe_due", "LikelihoodDisplacementMonitor", "LogprobGapMonitor", "STEP_PHASES",
    "step_shares",
]
