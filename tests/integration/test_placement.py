"""The run's placement group on real local Ray: one bundle per actor from the config
sections, and a request the cluster cannot meet fails fast with a message saying why."""

from __future__ import annotations

import pytest

from services.core.config import FlywheelConfig, Resources
from services.core.errors import UserError
from services.core.placement import MIN_BUNDLE_CPU, bundle, reserve, service_plan

pytestmark = pytest.mark.slow


def test_one_bundle_per_actor_from_each_section():
    cfg = FlywheelConfig()
    cfg.rollout.num_workers, cfg.reference.replicas, cfg.learner.num_ranks = 2, 3, 2
    cfg.reward.replicas = 2
    cfg.rollout.resources = Resources(num_cpus=1, num_gpus=0.5, custom={"rollout_node": 1})
    plan = {service: (count, bundle(resources)) for service, count, resources in service_plan(cfg)}
    assert plan["rollout"] == (2, {"CPU": 1, "GPU": 0.5, "rollout_node": 1})
    assert plan["reference"] == (3, {"CPU": MIN_BUNDLE_CPU})
    assert plan["learner"][0] == 2 and plan["reward"][0] == 2 * len(cfg.reward.scorers)


def test_actors_land_in_their_bundles(ray_session):
    import ray

    cfg = FlywheelConfig()
    cfg.reference.replicas = 2
    group, options = reserve(cfg, timeout_s=30)
    try:
        assert {s: len(o) for s, o in options.items()} == {"learner": 1, "reference": 2, "reward": 1, "rollout": 1}
        indices = [o["scheduling_strategy"].placement_group_bundle_index for opts in options.values() for o in opts]
        assert sorted(indices) == list(range(5))

        @ray.remote(num_cpus=0)
        def where():
            return ray.get_runtime_context().get_placement_group_id()

        placed = ray.get(where.options(**options["reference"][1]).remote())
        assert placed == group.id.hex()
    finally:
        ray.util.remove_placement_group(group)


def test_unsatisfiable_request_is_a_clear_error(ray_session):
    cfg = FlywheelConfig()
    cfg.rollout.resources = Resources(num_gpus=1)  # no GPU on this machine
    with pytest.raises(UserError, match="cannot place this run") as err:
        reserve(cfg, timeout_s=3)
    assert "rollout: 1 x {'CPU': 0.001, 'GPU': 1" in str(err.value)
