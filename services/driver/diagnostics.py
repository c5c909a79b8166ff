"""Run-time alarms from the research, kept out of the driver loop's body.

:class:`LikelihoodDisplacementMonitor` (online DPO, Razin et al. 2024): DPO can lower the
likelihood of the *chosen* responses while it widens the chosen-rejected margin. Each step
the driver measures the mean change of the chosen responses' summed log-likelihood under
the learner across the update; when that change stays negative for ``patience`` steps in a
row the monitor logs a warning and raises its alarm (``dpo/displacement_alarm`` in
metrics.jsonl, ``flywheel_dpo_likelihood_displacement_alarm`` in Prometheus).
"""

from __future__ import annotations

import logging

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


__all__ = ["LikelihoodDisplacementMonitor"]
