"""Plumbing shared by every service that runs as a set of Ray actors."""

from __future__ import annotations

from typing import Any

from services.core.service_metrics import merge_expositions


def placed(options: dict, placement: list[dict] | None, index: int) -> dict:
    """Actor options plus the placement-group bundle reserved for actor ``index``, if any."""
    return {**options, **(placement[index] if placement else {})}


class ActorGroup:
    """A set of Ray actors that each expose ``metrics_text()``; ``actors`` lists them all."""

    actors: list

    def metrics_texts(self) -> list[str]:
        """Each actor's Prometheus text (labels ``service`` / ``replica`` keep them apart)."""
        import ray

        return ray.get([actor.metrics_text.remote() for actor in self.actors])

    def metrics_text(self) -> str:
        return merge_expositions(self.metrics_texts())

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
