"""Reward ensembles: K member scorers aggregated by mean, worst case (wco) or
uncertainty-weighted (uwo: mean - lambda * std), per ``reward.aggregate``.

- :class:`RewardEnsemble`: the plain class (members in this process, no Ray);
- :class:`ScorerActor`: the thin Ray actor around one member, with Prometheus metrics;
- :class:`RewardService`: one actor per member per replica (``reward.replicas`` copies of
  the ensemble, requests round-robin over them); members score in parallel.

The aggregation itself (EnsembleScores, aggregate_scores) is services/reward/aggregate.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.core.actor_group import ActorGroup, ServiceActor
from services.core.config import PreferenceConfig, RewardConfig, ScorerConfig
from services.core.service_metrics import ServiceMetrics
from services.core.errors import UserError
from services.reward.aggregate import EnsembleScores, aggregate_scores
from services.reward.preference import PreferenceModel
from services.reward.scorers import (
    Columns, Scorer, ScorerError, ScorerOutputError, build_scorer, resolve_scorer_config, scorer_env, scorer_error,
    scorer_name,
)


class RewardEnsemble:
    """The ensemble in this process: build every member, score, aggregate."""

    def __init__(self, cfg: RewardConfig, scorers: Sequence[Scorer] | None = None):
        self.cfg = cfg
        self.scorers = list(scorers) if scorers is not None else [
            build_scorer(s, i) for i, s in enumerate(cfg.scorers)
        ]

    @property
    def member_names(self) -> list[str]:
        return [s.name for s in self.scorers]

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Columns | None = None
    ) -> EnsembleScores:
        return ensemble_scores([s.score_steps(prompts, completions, columns) for s in self.scorers],
                               self.member_names, self.cfg)


class ScorerActor(ServiceActor):
    """One ensemble member (Ray actor body; also usable directly), named after the member.
    Metrics label: replica ``<replica>/<member name>``, so every actor's series are distinct."""

    def __init__(self, cfg: ScorerConfig, index: int, replica: int = 0):
        self.scorer = build_scorer(cfg, index)
        self.name = self.scorer.name
        self.field = f"reward.scorers.{index}"
        self.metrics = ServiceMetrics(service="reward", replica=f"{replica}/{self.scorer.name}")
        self.preference: PreferenceModel | None = None

    def compare(self, cfg: PreferenceConfig, prompts: Sequence[str], completions_a: Sequence[str],
                completions_b: Sequence[str], columns: Columns | None = None) -> list[float]:
        """P(a preferred to b) for each pair from ``reward.preference``'s python function,
        loaded in this actor on the first call (online IPO, Nash-MD; see ``RewardService.compare``)."""
        with self.metrics.track("compare"):
            if self.preference is None:
                self.preference = PreferenceModel(cfg)
            return self.preference.compare(prompts, completions_a, completions_b, dict(columns or {}))

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              columns: Columns | None = None) -> tuple[list[float], list[list[float]] | None]:
        """The member's scores, and its per-step scores if it is a process reward (else None);
        a bad output is a ScorerOutputError, anything the scorer's code raises becomes a
        ScorerError naming the member (never a silent 0 or None); a ScorerError the scorer
        raised itself already names it."""
        with self.metrics.track("score"):
            try:
                return self.scorer.score_steps(prompts, completions, columns)
            except (ScorerOutputError, ScorerError, UserError):
                raise
            except Exception as exc:
                raise scorer_error(self.scorer, self.field, exc) from exc


def ensemble_scores(results: Sequence[tuple[list[float], list[list[float]] | None]], names: Sequence[str],
                    cfg: RewardConfig) -> EnsembleScores:
    """The members' (scores, step scores or None) aggregated per ``reward.aggregate``; the
    process-reward members' step scores kept in ``member_steps``."""
    scores = aggregate_scores([r[0] for r in results], names, cfg.aggregate, cfg.uwo_lambda,
                              [s.weight for s in cfg.scorers])
    scores.member_steps = {name: r[1] for name, r in zip(names, results) if r[1] is not None}
    return scores


class PendingScores:
    """Scores in flight on one replica; ``result()`` waits (``reward.timeout_s`` per member),
    sends a batch again to a member that died or was stuck (once Ray restarted it), aggregates."""

    def __init__(self, service: "RewardService", replica: int, refs: list, args: list):
        self.service, self.replica, self.refs, self.args = service, replica, refs, args

    def result(self, timeout: float | None = None) -> EnsembleScores:
        service = self.service
        timeout_s = timeout or service.cfg.timeout_s
        k = len(service.member_names)
        results = service.call_supervised(
            range(self.replica * k, (self.replica + 1) * k), lambda index: service.actors[index].score.remote(*self.args),
            "score", timeout_s, "reward.timeout_s", refs=self.refs,
        )
        return ensemble_scores(results, service.member_names, service.cfg)


class RewardService(ActorGroup):
    """``reward.replicas`` copies of the ensemble as Ray actors, one actor per member.

    Configs are checked here first (bad paths raise UserError in the caller, not in an
    actor), then the actors start and the constructor waits until all have loaded.
    Ray restarts a dead member (``reward.max_restarts``) and its batch is scored again; a
    scorer's own error (it raised, returned NaN or the wrong length) is not retried.
    Needs ``ray.init`` to have run.
    """

    def __init__(self, cfg: RewardConfig, placement: list[dict] | None = None, wait: bool = True):
        super().__init__(max_restarts=cfg.max_restarts, restarts_setting="reward.max_restarts")
        self.cfg = cfg
        resolved = [resolve_scorer_config(s, i) for i, s in enumerate(cfg.scorers)]
        self.member_names = [scorer_name(s, i) for i, s in enumerate(resolved)]
        k = len(resolved)
        self._next = 0
        # actor r * k + i: member i of replica r; a scorer's env (a remote scorer's bearer
        # token) goes in its runtime_env: actors don't see our env
        envs = [scorer_env(s, i) for i, s in enumerate(resolved)]
        self.spawn(
            ScorerActor, [f"reward-{r}/{name}" for r in range(cfg.replicas) for name in self.member_names],
            [(s, i, r) for r in range(cfg.replicas) for i, s in enumerate(resolved)],
            resources=cfg.resources.ray_options(), placement=placement,
            options=[{"runtime_env": {"env_vars": env}} if env else {} for _ in range(cfg.replicas) for env in envs],
            wait=wait,
        )
        self.replicas = [self.actors[r * k : (r + 1) * k] for r in range(cfg.replicas)]

    def submit(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Columns | None = None
    ) -> PendingScores:
        """Send one request to the next replica's members (in parallel); don't wait."""
        import ray

        if not self.replicas:
            raise RuntimeError("RewardService was shut down")
        replica = self._next % len(self.replicas)
        self._next += 1
        args = [ray.put(list(prompts)), ray.put(list(completions)), ray.put(dict(columns or {}))]
        refs = [actor.score.remote(*args) for actor in self.replicas[replica]]
        return PendingScores(self, replica, refs, args)

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Columns | None = None,
        timeout: float | None = None,
    ) -> EnsembleScores:
        return self.submit(prompts, completions, columns).result(timeout)

    def compare(self, cfg: PreferenceConfig, prompts: Sequence[str], completions_a: Sequence[str],
                completions_b: Sequence[str], columns: Columns | None = None) -> list[float]:
        """A python preference model's P(a preferred to b) per pair, computed in the first
        member actor of the next replica, supervised like scoring (a dead or stuck actor is
        restarted and asked again; ``reward.timeout_s``)."""
        import ray

        replica = self._next % len(self.replicas)
        self._next += 1
        index = replica * len(self.member_names)
        args = [cfg, ray.put(list(prompts)), ray.put(list(completions_a)), ray.put(list(completions_b)),
                ray.put(dict(columns or {}))]
        return self.call_supervised([index], lambda i: self.actors[i].compare.remote(*args), "compare",
                                    self.cfg.timeout_s, "reward.timeout_s")[0]

    def shutdown(self) -> None:
        super().shutdown()
        self.replicas = []


__all__ = ["RewardEnsemble", "ScorerActor", "RewardService", "PendingScores"]
