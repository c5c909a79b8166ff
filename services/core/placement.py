"""One Ray placement group for a run: a bundle per actor, so rollout, learner, reference and
reward each get the resources their config sections ask for, or the run fails up front
with a message saying what does not fit (instead of actors pending forever)."""

from __future__ import annotations

from services.core.config import FlywheelConfig, Resources
from services.core.errors import UserError

# Ray rejects bundles whose resources are all zero; actors asking for 0 CPUs (the laptop
# default) reserve this token amount instead.
MIN_BUNDLE_CPU = 0.001


def bundle(resources: Resources) -> dict[str, float]:
    out = {"CPU": max(resources.num_cpus, MIN_BUNDLE_CPU)}
    if resources.num_gpus:
        out["GPU"] = resources.num_gpus
    out.update(resources.custom)
    return out


def service_plan(cfg: FlywheelConfig) -> list[tuple[str, int, Resources]]:
    """(service, actor count, resources per actor), in the order the driver builds them."""
    return [
        ("learner", cfg.learner.num_ranks, cfg.learner.resources),
        # LoRA: the learner answers for the reference (its base model), no actor of its own
        ("reference", 0 if cfg.learner.lora is not None else cfg.reference.replicas, cfg.reference.resources),
        ("reward", cfg.reward.replicas * len(cfg.reward.scorers), cfg.reward.resources),
        ("rollout", cfg.rollout.num_workers, cfg.rollout.resources),
    ]


def reserve(cfg: FlywheelConfig, timeout_s: float = 120.0):
    """Create and wait for the run's placement group; returns (group, options per service)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles, owners = [], []
    for service, count, resources in service_plan(cfg):
        bundles += [bundle(resources)] * count
        owners += [service] * count
    group = placement_group(bundles, strategy=cfg.cluster.placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        wanted = "; ".join(f"{s}: {n} x {bundle(r)}" for s, n, r in service_plan(cfg))
        raise UserError(
            f"the cluster cannot place this run within {timeout_s:.0f}s (strategy "
            f"{cfg.cluster.placement_strategy}); it asks for {wanted}; available: {ray.available_resources()}"
        )
    options: dict[str, list[dict]] = {service: [] for service in set(owners)}
    for index, service in enumerate(owners):
        options[service].append(
            {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}
        )
    return group, options
