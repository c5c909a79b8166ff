"""Figures of a step's record that are plain functions of what the step trained on."""

from __future__ import annotations

from statistics import mean

from services.core import toy_world
from services.core.batch_types import Trajectory


def batch_figures(kept: list[Trajectory], trajectories: list[Trajectory], staleness: list[int], toy: bool,
                  rollout_s: float, train_s: float) -> dict[str, float]:
    """``kept``: the trajectories trained on, of ``trajectories`` (the batch as sampled);
    ``staleness``: each kept one's policy-version lag; ``toy``: the toy world's gold reward
    applies. A rollout time of 0 (a batch restored from a checkpoint) gives 0 tokens/s."""
    record = {
        "rollout/response_length_mean": mean(len(t.response_ids) for t in kept),
        "rollout/staleness_max": max(staleness), "rollout/staleness_mean": mean(staleness),
        "rollout/stop_fraction": mean(t.finish_reason == "stop" for t in kept),
        "rollout/truncated_fraction": mean(t.finish_reason == "length" for t in kept),  # hit max_tokens
    }
    if toy:
        record["gold/mean"] = mean(toy_world.gold_reward([t.prompt for t in kept], [t.response for t in kept]))
    generated = sum(len(t.response_ids) for t in trajectories)
    record["perf/generated_tokens_per_s"] = generated / rollout_s if rollout_s > 0 else 0.0
    trained = sum(len(t.prompt_ids) + len(t.response_ids) for t in kept)
    record["perf/train_tokens_per_s"] = trained / train_s if train_s > 0 else 0.0
    return record


def restart_figures(restarts: dict[str, int], logged: dict[str, int]) -> dict[str, int]:
    """Actor restarts per service since the counts ``logged`` with the last step, and in all."""
    record = {f"workers/restarts/{service}": count - logged.get(service, 0) for service, count in restarts.items()}
    record["workers/restarts"] = sum(restarts.values()) - sum(logged.values())
    return record


__all__ = ["batch_figures", "restart_figures"]
