"""A local *autoscaling* multi-node Ray cluster on this one machine, shaped like a cluster-launcher YAML.

`autoscaling_cluster("cluster/aws.yaml")` starts a real head (tests/ray_head.py's `ray_head`: own
--temp-dir, free ports, token auth, dashboard on loopback) whose autoscaler runs Ray's fake multi-node
provider (FakeMultiNodeProvider, env RAY_FAKE_CLUSTER=1). That provider "launches" a
worker node by starting one more raylet (with its agents) on this machine, from the autoscaler's
process, with the node type's resources, so actors that ask for `rollout` or `learner` make the
autoscaler add nodes of the YAML's types, as on the real cluster, and a test can SIGKILL a node's raylet.

The YAML's node types are scaled down to fit here (`scaled_node_types`): no GPUs, a CPU or two per
node, no `memory`, a small object store; custom resources and min/max_workers are kept (overridable).

The head is the provider's fixed "ray.head.default" type with node id ffff...00000 (the YAML's head
type is renamed to it); worker node ids count up (ffff...00001, ...) and are never reused. A worker
node's type is in its raylet's environment (RAY_NODE_TYPE_NAME; it does not become a node label,
as the provider computes labels in the autoscaler's process), its raylet pid is found by its command
line (--node_id=...). Every process of the cluster, fake nodes included, names the head's temp dir on
its command line, has the head's token in its environment or descends from one that does (Ray
retitles workers and agents), so the exit kills all of them by pid (never `ray stop`) and checks.

Ray's own `ray.cluster_utils.AutoscalingCluster` is not used: it needs a template missing from the
wheel and runs `ray stop --force`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import yaml

from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE, FakeMultiNodeProvider)

from tests.ray_head import Head, StateApi, free_port, head_processes, ray_head

AUTOSCALER_HEAD_TYPE = FAKE_HEAD_NODE_TYPE  # "ray.head.default", FakeMultiNodeProvider's tag for its head
MB = 1024 * 1024
NOT_CUSTOM = {"CPU", "GPU", "memory", "object_store_memory"}


def scaled_node_types(cluster_yaml: str, *, head_cpus: int = 2, worker_cpus: int = 1,
                      object_store_mb: int = 300, overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """The YAML's available_node_types (keyed by its own names) made to fit this machine: CPU set to
    ``head_cpus``/``worker_cpus``, GPU and memory dropped, custom resources, labels and
    min/max_workers kept, object_store_memory ``object_store_mb``; ``overrides[type]`` is applied
    last (its ``resources`` merge into the type's)."""
    with open(cluster_yaml) as f:
        config = yaml.safe_load(f)
    if "available_node_types" not in config:
        raise ValueError(f"{cluster_yaml} has no available_node_types (an on-prem `type: local` config?)")
    head_type = config["head_node_type"]
    overrides = dict(overrides or {})
    scaled = {}
    for name, node_type in config["available_node_types"].items():
        resources = {k: v for k, v in (node_type.get("resources") or {}).items() if k not in NOT_CUSTOM}
        resources["CPU"] = head_cpus if name == head_type else worker_cpus
        resources["object_store_memory"] = object_store_mb * MB
        kept = {k: node_type[k] for k in ("min_workers", "max_workers", "labels") if k in node_type}
        scaled[name] = {"resources": resources, "node_config": {}, **kept}
        for key, value in overrides.pop(name, {}).items():
            if key == "resources":
                scaled[name]["resources"].update(value)
            else:
                scaled[name][key] = value
    if overrides:
        raise ValueError(f"overrides for node types not in {cluster_yaml}: {sorted(overrides)}")
    return scaled


def fake_autoscaler_config(cluster_yaml: str, node_types: dict[str, dict], gcs_address: str, *,
                           idle_timeout_minutes: float | None = None) -> dict:
    """The autoscaler config for ``node_types`` (from `scaled_node_types`) on the fake provider; the
    YAML's head type is renamed to "ray.head.default" and gets no workers of its own type."""
    with open(cluster_yaml) as f:
        config = yaml.safe_load(f)
    head_type = config["head_node_type"]
    types = {name: dict(node_type) for name, node_type in node_types.items() if name != head_type}
    types[AUTOSCALER_HEAD_TYPE] = {**node_types[head_type], "min_workers": 0, "max_workers": 0}
    return {
        "cluster_name": config.get("cluster_name", "fake"),
        "max_workers": config.get("max_workers", sum(t.get("max_workers", 0) for t in types.values())),
        "upscaling_speed": config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes if idle_timeout_minutes is not None
        else config.get("idle_timeout_minutes", 5),
        "provider": {
            # = `type: fake_multinode`, whose defaults file (example.yaml), which autoscaler v2 reads, is
            # missing from the wheel; an external provider's defaults are built in
            "type": "external", "module": f"{FakeMultiNodeProvider.__module__}.{FakeMultiNodeProvider.__name__}",
            "gcs_address": gcs_address, "use_node_id_as_ip": True,
            "disable_node_updaters": True, "disable_launch_config_check": True, "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,  # else the provider starts one node per request, whatever the count
        },
        "available_node_types": types,
        "head_node_type": AUTOSCALER_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@dataclass
class ClusterNode:
    node_id: str
    node_type: str  # the cluster YAML's name for it ("head", "rollout-gpu", ...)
    resources: dict[str, float]
    raylet_pid: int | None  # None once its raylet is gone


@dataclass
class AutoscalingHead(Head):
    node_types: dict[str, dict] = field(default_factory=dict)  # scaled, by the YAML's names
    head_type: str = "head"  # the YAML's head_node_type

    def yaml_type_name(self, node: dict, raylet_pid: int | None) -> str:
        """The YAML's type of a state-API node (dict): the head, else RAY_NODE_TYPE_NAME in its
        raylet's environment, else the one type whose custom resources it has."""
        if node.get("is_head_node"):
            return self.head_type
        with contextlib.suppress(psutil.Error):
            autoscaler_type = raylet_pid and psutil.Process(raylet_pid).environ().get("RAY_NODE_TYPE_NAME")
            if autoscaler_type in self.node_types:
                return autoscaler_type
        customs = {k for k in node.get("resources_total", {}) if k not in NOT_CUSTOM and not k.startswith("node:")}
        matches = [name for name, t in self.node_types.items() if set(t["resources"]) - NOT_CUSTOM == customs]
        return matches[0] if len(matches) == 1 else "unknown"

    def nodes(self, node_type: str | None = None) -> list[ClusterNode]:
        """The live nodes (of ``node_type``, the YAML's name, if given), head included."""
        found, pids = [], self.raylet_pids()
        for node in StateApi(self).nodes(("state", "=", "ALIVE")):
            node = node if isinstance(node, dict) else vars(node)
            pid = pids.get(node["node_id"])
            found.append(ClusterNode(node["node_id"], self.yaml_type_name(node, pid),
                                     dict(node.get("resources_total", {})), pid))
        return [n for n in found if node_type in (None, n.node_type)]

    def raylet_pids(self) -> dict[str, int]:
        """This cluster's live raylets, node id -> pid (from their command lines: --node_id=...)."""
        pids = {}
        for proc in head_processes(self.temp_dir):
            with contextlib.suppress(psutil.Error, IndexError):
                cmdline = proc.cmdline()
                if os.path.basename(cmdline[0]) == "raylet":
                    node_ids = [a.split("=", 1)[1] for a in cmdline if a.startswith("--node_id=")]
                    pids.update(dict.fromkeys(node_ids, proc.pid))
        return pids

    def raylet_pid(self, node_id: str) -> int | None:
        """The pid of ``node_id``'s raylet, None if it is not running."""
        return self.raylet_pids().get(node_id)

    def kill_raylet(self, node_id: str, *, with_its_processes: bool = False) -> int:
        """SIGKILL the raylet of ``node_id``; its pid. Its workers (actors) and agents live on, and
        actors answer calls, until Ray marks the node dead (health checks: ~15 s by default), unless
        ``with_its_processes`` kills them too, as a machine crash would."""
        pid = self.raylet_pid(node_id)
        if pid is None:
            raise LookupError(f"no raylet process for node {node_id}")
        children = psutil.Process(pid).children(recursive=True) if with_its_processes else []
        os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        return pid

    def wait_for_nodes(self, counts: dict[str, int], timeout: float = 120) -> list[ClusterNode]:
        """Wait until at least ``counts[type]`` nodes of each type (the YAML's names) are alive."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            have = {t: sum(n.node_type == t for n in nodes) for t in counts}
            if all(have[t] >= c for t, c in counts.items()):
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"wanted nodes {counts}, have {have} after {timeout}s")
            time.sleep(0.5)


@contextlib.contextmanager
def autoscaling_cluster(cluster_yaml: str, *, overrides: dict[str, dict] | None = None, head_cpus: int = 2,
                        worker_cpus: int = 1, object_store_mb: int = 300, idle_timeout_minutes: float | None = None,
                        autoscaler_v2: bool = True, extra_env: dict[str, str] | None = None):
    """A fresh autoscaling cluster shaped like ``cluster_yaml`` (see the module docstring); yields an
    `AutoscalingHead`. ``extra_env`` reaches the head's processes, the autoscaler and the fake nodes
    (e.g. RAY_health_check_period_ms). Autoscaler v2 (the default of `ray up` in this Ray) terminates
    a node Ray marked dead and launches a replacement if demand asks for it; v1 never terminates it
    (it keeps counting as an "uninitialized" node of its type) and may launch no replacement."""
    with open(cluster_yaml) as f:
        head_type = yaml.safe_load(f)["head_node_type"]
    node_types = scaled_node_types(cluster_yaml, head_cpus=head_cpus, worker_cpus=worker_cpus,
                                   object_store_mb=object_store_mb, overrides=overrides)
    gcs_port = free_port()
    config = fake_autoscaler_config(cluster_yaml, node_types, f"127.0.0.1:{gcs_port}",
                                    idle_timeout_minutes=idle_timeout_minutes)
    fd, config_path = tempfile.mkstemp(prefix="fwautoscale", suffix=".yaml", dir="/tmp")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f)
    head_resources = node_types[head_type]["resources"]
    custom = {k: v for k, v in head_resources.items() if k not in NOT_CUSTOM}
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    if autoscaler_v2:  # v2 needs the head's cloud instance id; `ray start` gives it the matching node id
        env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID)
    env.update(extra_env or {})
    args = [f"--autoscaling-config={config_path}", f"--object-store-memory={head_resources['object_store_memory']}",
            f"--resources={json.dumps(custom)}"]
    try:
        with ray_head(env, num_cpus=head_resources["CPU"], extra_args=args, gcs_port=gcs_port) as head:
            cluster = AutoscalingHead(head.address, head.token, head.temp_dir, head.gcs_port,
                                      node_types=node_types, head_type=head_type)
            cluster.wait_for_nodes({head_type: 1}, timeout=60)  # the dashboard can answer before the head registers
            yield cluster
    finally:
        os.unlink(config_path)
    # ray_head has killed every process of the cluster, the fake nodes' included: check it
    survivors = head_processes(cluster.temp_dir, cluster.token)
    if survivors:
        raise RuntimeError(f"processes of the cluster in {cluster.temp_dir} survived: {[p.pid for p in survivors]}")
