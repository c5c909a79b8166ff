"""``flywheel validate --cluster FILE``: does this run fit on this Ray cluster?

FILE is a Ray cluster-launcher YAML (``ray up``) or a KubeRay ``RayCluster`` / ``RayJob``
manifest. It first goes through Ray's own code: ``prepare_config`` (provider defaults,
on-prem preparation, per-node-type min/max workers) and ``validate_config`` (Ray's JSON
schema and its cross-field rules) for launcher YAMLs, and KubeRay's translation of the
custom resource into an autoscaling config (which also calls ``validate_config``) for
manifests. None of these contact a cloud or a Kubernetes API. Then Flywheel's own checks:
min_workers <= max_workers per node type (Ray does not check it), and whether the run's
placement group (``services.core.placement``: one bundle per actor) fits the largest
cluster the file allows. Every failure is a ``UserError`` naming the file and the culprit.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import shlex
from collections import Counter
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.core.placement import bundle, service_plan

EPSILON = 1e-9
# what one actor of each service is called in messages ("learner rank bundle {...}")
ACTOR_NOUN = {"learner": "rank", "reference": "replica", "reward": "scorer", "rollout": "worker"}
KUBERAY_KINDS = ("RayCluster", "RayJob")


@dataclass(frozen=True)
class NodeType:
    """One kind of node: its Ray resources and how many of it the cluster may have."""

    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 0
    is_head: bool = False

    @property
    def max_count(self) -> int:
        """Nodes of this type in the largest cluster (the head node is always exactly one)."""
        return 1 if self.is_head else self.max_workers


@dataclass(frozen=True)
class ClusterShape:
    source: str
    node_types: list[NodeType]
    max_workers: int | None = None  # global cap on worker nodes of all types together
    notes: tuple[str, ...] = ()  # warnings Ray printed while preparing the config


@dataclass(frozen=True)
class Bundle:
    label: str  # e.g. "learner rank"
    resources: dict[str, float]


@dataclass
class Packing:
    """Where first-fit-decreasing put the bundles: nodes opened, in order, and their load."""

    nodes: list[NodeType] = field(default_factory=list)
    free: list[dict[str, float]] = field(default_factory=list)
    assigned: list[list[Bundle]] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(node.name for node in self.nodes)


# ---------------------------------------------------------------- formatting


def format_amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def format_resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {format_amount(v)}" for k, v in resources.items()) + "}"


# ---------------------------------------------------------------- reading the cluster file


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"cluster file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a cluster file must be a YAML mapping, got {type(data).__name__}")
    return data


@contextmanager
def _quiet_ray(captured: list[str]):
    """Ray's config helpers log INFO lines ("setting max workers ...") meant for `ray up` and
    print warnings straight to stdout/stderr; keep stdout clean and collect what they print."""
    names = ["ray.autoscaler._private.util", "ray.autoscaler._private.kuberay.autoscaling_config"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer), redirect_stderr(buffer):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        text = re.sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue())
        text = re.sub(r"(?m)^\d{4}-\d\d-\d\d [\d:,]+\s+\w+ \S+ -- ", "", text)  # logging prefix
        captured += [line.strip() for line in text.splitlines() if line.strip()]


def _ray_error(path: Path, exc: Exception) -> UserError:
    """One line saying what Ray's validator rejected, with the field path for schema errors."""
    import jsonschema

    if isinstance(exc, jsonschema.ValidationError):
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        return UserError(f"{path}: Ray's cluster schema rejects {where}: {exc.message}")
    if isinstance(exc, KeyError):
        return UserError(f"{path}: Ray's cluster config validator failed: missing field {exc}")
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return UserError(f"{path}: Ray's cluster config validator failed: {message}")


def ray_validated_config(path: Path, raw: dict, notes: list[str] | None = None) -> dict:
    """The autoscaling config Ray derives from the file, after Ray's validator accepted it;
    what Ray printed on the way (warnings) is appended to ``notes``."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    notes = [] if notes is None else notes
    with _quiet_ray(notes):
        if raw.get("kind") in KUBERAY_KINDS:
            from ray.autoscaler._private.kuberay.autoscaling_config import (
                _derive_autoscaling_config_from_ray_cr,
            )

            spec = raw.get("spec") if isinstance(raw.get("spec"), dict) else {}
            cluster_spec = spec.get("rayClusterSpec") if raw["kind"] == "RayJob" else spec
            if not isinstance(cluster_spec, dict):
                field_name = "spec.rayClusterSpec" if raw["kind"] == "RayJob" else "spec"
                raise UserError(f"{path}: {raw['kind']} has no {field_name} mapping")
            metadata = {"name": "flywheel", "namespace": "default", **(raw.get("metadata") or {})}
            try:
                derived = _derive_autoscaling_config_from_ray_cr({"metadata": metadata, "spec": cluster_spec})
            except Exception as exc:  # noqa: BLE001 - any failure in Ray's translator is the file's
                raise _ray_error(path, exc) from None
            check_min_max(path, derived)
            if not cluster_spec.get("enableInTreeAutoscaling"):
                _fixed_size(path, derived, cluster_spec)
                notes.append("enableInTreeAutoscaling is off: each worker group has exactly `replicas` pods")
            return derived
        provider = raw.get("provider")
        if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
            raise UserError(f"{path}: a Ray cluster YAML needs `provider:` with a `type` (aws, gcp, local, ...)")
        try:
            prepared = prepare_config(copy.deepcopy(raw))
        except Exception as exc:  # noqa: BLE001 - includes click's abort for on-prem configs
            raise _ray_error(path, exc) from None
        check_min_max(path, prepared)  # before Ray's global-sum rule, which names no node type
        try:
            validate_config(prepared)
        except Exception as exc:  # noqa: BLE001
            raise _ray_error(path, exc) from None
        return prepared


def _fixed_size(path: Path, derived: dict, cluster_spec: dict) -> None:
    """Without KubeRay's autoscaler a group has `replicas` pods (default minReplicas), not up
    to `maxReplicas`."""
    for group in cluster_spec.get("workerGroupSpecs") or []:
        replicas = group.get("replicas", group.get("minReplicas", 0))
        if not isinstance(replicas, int) or replicas < 0:
            raise UserError(f"{path}: worker group '{group['groupName']}': replicas must be a count, got {replicas!r}")
        count = replicas * group.get("numOfHosts", 1)
        node_type = derived["available_node_types"][group["groupName"]]
        node_type["min_workers"] = node_type["max_workers"] = count
    derived["max_workers"] = sum(t["max_workers"] for t in derived["available_node_types"].values())


def check_min_max(path: Path | str, config: dict) -> None:
    """min_workers <= max_workers for every node type (Ray's validator does not check it)."""
    for name, node in (config.get("available_node_types") or {}).items():
        if not isinstance(node, dict):
            continue
        low, high = node.get("min_workers", 0), node.get("max_workers")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            raise UserError(
                f"{path}: node type '{name}' has min_workers {low} > max_workers {high}"
            )


def _start_flags(commands: list[str]) -> dict[str, str]:
    """--num-cpus / --num-gpus / --memory / --resources given to `ray start` in these commands."""
    flags: dict[str, str] = {}
    for command in commands or []:
        try:
            words = shlex.split(command)
        except ValueError:
            continue
        for i, word in enumerate(words):
            for flag in ("--num-cpus", "--num-gpus", "--memory", "--resources"):
                if word.startswith(flag + "="):
                    flags[flag] = word.split("=", 1)[1]
                elif word == flag and i + 1 < len(words):
                    flags[flag] = words[i + 1]
    return flags


def _on_prem_resources(path: Path, commands: list[str], which: str) -> dict[str, float]:
    """An on-prem machine advertises what `ray start` is told (or detects, which we cannot see)."""
    flags = _start_flags(commands)
    missing = [f for f in ("--num-cpus", "--num-gpus") if f not in flags]
    if missing:
        raise UserError(
            f"{path}: {which} do not pass {' and '.join(missing)} to `ray start`; on-prem nodes advertise "
            "what Ray detects on each machine, so state them for the fit check"
        )
    try:
        resources = {"CPU": float(flags["--num-cpus"]), "GPU": float(flags["--num-gpus"])}
        if "--memory" in flags:
            resources["memory"] = float(flags["--memory"])
        custom = json.loads(flags.get("--resources", "{}"))
        if not isinstance(custom, dict):
            raise ValueError("--resources is not a JSON object")
        resources.update({str(k): float(v) for k, v in custom.items()})
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: {which}: cannot read `ray start` resources ({exc})") from None
    return resources


def cluster_shape(path: Path | str, config: dict, notes: tuple[str, ...] = ()) -> ClusterShape:
    """Node types, resources and limits from a config that Ray's validator accepted."""
    path = Path(path)
    provider = config.get("provider", {}).get("type")
    head_type = config["head_node_type"]
    if provider == "local":
        # one node type for the head and every worker IP; resources come from the start commands
        node = config["available_node_types"][head_type]
        head = NodeType("head", _on_prem_resources(path, config.get("head_start_ray_commands"),
                                                   "head_start_ray_commands"), is_head=True)
        workers = NodeType(
            "worker", _on_prem_resources(path, config.get("worker_start_ray_commands"), "worker_start_ray_commands"),
            min_workers=node.get("min_workers", 0), max_workers=node.get("max_workers", 0),
        )
        return ClusterShape(str(path), [head, workers], config.get("max_workers"), notes)
    types = []
    for name, node in config["available_node_types"].items():
        resources = {k: float(v) for k, v in (node.get("resources") or {}).items()}
        if not resources:
            raise UserError(
                f"{path}: node type '{name}' declares no resources; Ray would look them up from the "
                "cloud, which this check does not contact; write e.g. resources: {CPU: 8, GPU: 1}"
            )
        is_head = name == head_type
        types.append(NodeType(name, resources, node.get("min_workers", 0), node.get("max_workers", 0), is_head))
    types.sort(key=lambda t: not t.is_head)  # head first
    return ClusterShape(str(path), types, config.get("max_workers"), notes)


def load_cluster(path: Path | str) -> ClusterShape:
    path = Path(path)
    notes: list[str] = []
    config = ray_validated_config(path, _read_yaml(path), notes)
    return cluster_shape(path, config, tuple(notes))


# ---------------------------------------------------------------- the run's requests


def run_bundles(cfg: FlywheelConfig) -> list[Bundle]:
    """One bundle per actor, exactly as the driver reserves them (services.core.placement)."""
    return [
        Bundle(f"{service} {ACTOR_NOUN.get(service, 'actor')}", bundle(resources))
        for service, count, resources in service_plan(cfg)
        for _ in range(count)
    ]


# ---------------------------------------------------------------- the math


def fits(request: dict[str, float], free: dict[str, float]) -> bool:
    return all(amount <= free.get(key, 0.0) + EPSILON for key, amount in request.items())


def shortfalls(request: dict[str, float], node: dict[str, float]) -> list[str]:
    return [
        f"{key} {format_amount(node.get(key, 0.0))} (needs {format_amount(amount)})"
        for key, amount in request.items()
        if amount > node.get(key, 0.0) + EPSILON
    ]


def largest_total(shape: ClusterShape, key: str) -> float:
    """The most of one resource the cluster can have: the head plus the worker types richest
    in it, up to each type's max_workers and the global max_workers."""
    total, room = 0.0, shape.max_workers
    for node_type in sorted(shape.node_types, key=lambda t: (not t.is_head, -t.resources.get(key, 0.0))):
        count = node_type.max_count
        if not node_type.is_head and room is not None:
            count = min(count, room)
            room -= count
        total += count * node_type.resources.get(key, 0.0)
    return total


def check_single_bundles(bundles: list[Bundle], shape: ClusterShape) -> None:
    """Every bundle must fit on one node of some type the cluster may have."""
    usable = [t for t in shape.node_types if t.max_count > 0]
    for item in bundles:
        if any(fits(item.resources, t.resources) for t in usable):
            continue
        too_big = [
            f"largest {key} per node is {format_amount(max((t.resources.get(key, 0.0) for t in usable), default=0))}"
            for key, amount in item.resources.items()
            if all(amount > t.resources.get(key, 0.0) + EPSILON for t in usable)
        ]
        reason = "; ".join(too_big) or "; ".join(
            f"{t.name}: {', '.join(shortfalls(item.resources, t.resources))}" for t in usable
        )
        raise UserError(
            f"{item.label} bundle {format_resources(item.resources)} fits no node type: {reason} ({shape.source})"
        )


def check_totals(bundles: list[Bundle], shape: ClusterShape) -> None:
    """The run's total request of each resource must not exceed the largest cluster's."""
    totals: dict[str, float] = {}
    for item in bundles:
        for key, amount in item.resources.items():
            totals[key] = totals.get(key, 0.0) + amount
    for key, wanted in sorted(totals.items(), key=lambda kv: _RESOURCE_ORDER.get(kv[0], 0)):
        have = largest_total(shape, key)
        if wanted > have + EPSILON:
            askers = Counter((b.label, tuple(b.resources.items())) for b in bundles if b.resources.get(key))
            detail = "; ".join(f"{label} {n} x {format_resources(dict(res))}" for (label, res), n in askers.items())
            raise UserError(
                f"the run asks for {format_amount(wanted)} {key} in total ({detail}), but the largest cluster "
                f"that {shape.source} allows has {format_amount(have)} {key} ({describe_largest(shape)})"
            )


# custom resources (the most specific: "rollout", "learner") are reported first, then GPU, CPU, memory
_RESOURCE_ORDER = {"GPU": 1, "CPU": 2, "memory": 3}


def describe_largest(shape: ClusterShape) -> str:
    parts = [t.name if t.is_head else f"{t.max_count} x {t.name}" for t in shape.node_types if t.max_count > 0]
    cap = f", at most {shape.max_workers} workers in all" if shape.max_workers is not None else ""
    return " + ".join(parts) + cap


def _bundle_size(item: Bundle) -> tuple:
    """Sort key for first-fit decreasing: GPUs first, then custom resources, CPUs, memory."""
    res = item.resources
    custom = sum(v for k, v in res.items() if k not in ("CPU", "GPU", "memory"))
    return (res.get("GPU", 0.0), custom, res.get("CPU", 0.0), res.get("memory", 0.0))


def pack(bundles: list[Bundle], shape: ClusterShape, strategy: str = "PACK") -> Packing:
    """Place every bundle on the largest cluster the file allows, or raise a UserError.

    A conservative check: first-fit decreasing (largest bundles first, each onto the first
    open node with room, else onto a new node of the smallest type that holds it, within
    max_workers per type and overall). It may reject a run that a cleverer packing (or Ray)
    could place; it never accepts one that Ray cannot. STRICT_SPREAD puts one bundle per
    node; STRICT_PACK needs all bundles on one node.
    """
    check_single_bundles(bundles, shape)
    if strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for item in bundles:
            for key, amount in item.resources.items():
                total[key] = total.get(key, 0.0) + amount
        home = next((t for t in shape.node_types if t.max_count > 0 and fits(total, t.resources)), None)
        if home is None:
            raise UserError(
                f"placement_strategy STRICT_PACK puts all {len(bundles)} bundles on one node, "
                f"{format_resources(total)} in all, and no node type of {shape.source} is that large"
            )
        return Packing([home], [{k: home.resources.get(k, 0.0) - total.get(k, 0.0) for k in home.resources}],
                       [list(bundles)])
    check_totals(bundles, shape)
    one_per_node = strategy == "STRICT_SPREAD"
    packing = Packing()
    head = next((t for t in shape.node_types if t.is_head), None)
    if head is not None:  # the head is always there
        packing.nodes.append(head)
        packing.free.append(dict(head.resources))
        packing.assigned.append([])
    for item in sorted(bundles, key=_bundle_size, reverse=True):
        slot = next(
            (i for i, free in enumerate(packing.free)
             if fits(item.resources, free) and not (one_per_node and packing.assigned[i])),
            None,
        )
        if slot is None:
            slot = _open_node(packing, item, shape)
        for key, amount in item.resources.items():
            packing.free[slot][key] = packing.free[slot].get(key, 0.0) - amount
        packing.assigned[slot].append(item)
    return packing


def _open_node(packing: Packing, item: Bundle, shape: ClusterShape) -> int:
    counts = packing.counts()
    workers = sum(n for name, n in counts.items() if not _type(shape, name).is_head)
    capped = shape.max_workers is not None and workers >= shape.max_workers
    choices = [
        t for t in shape.node_types
        if not t.is_head and not capped and counts[t.name] < t.max_workers and fits(item.resources, t.resources)
    ]
    if not choices:
        opened = ", ".join(f"{n} x {name}" for name, n in counts.items()) or "none"
        raise UserError(
            f"the run's bundles do not pack onto the largest cluster {shape.source} allows "
            f"({describe_largest(shape)}): no room left for {item.label} bundle {format_resources(item.resources)} "
            f"after filling {opened} (first-fit decreasing, a conservative check)"
        )
    smallest = min(choices, key=lambda t: (t.resources.get("GPU", 0.0), sum(t.resources.values())))
    packing.nodes.append(smallest)
    packing.free.append(dict(smallest.resources))
    packing.assigned.append([])
    return len(packing.nodes) - 1


def _type(shape: ClusterShape, name: str) -> NodeType:
    return next(t for t in shape.node_types if t.name == name)


# ---------------------------------------------------------------- entry point


def service_node_types(cfg: FlywheelConfig, shape: ClusterShape) -> dict[str, list[str]]:
    """Per service, the node types one of its actors can land on: those the cluster may have
    whose resources hold its bundle (custom resources narrow it; a CPU-only service may land on
    any node with room, wherever Ray's placement group puts it)."""
    usable = [t for t in shape.node_types if t.max_count > 0]
    return {service: [t.name for t in usable if fits(bundle(resources), t.resources)]
            for service, count, resources in service_plan(cfg) if count}


def check_cluster(path: Path | str, cfg: FlywheelConfig) -> list[str]:
    """Validate the cluster file and fit the run on it; returns a few summary lines."""
    shape = load_cluster(path)
    bundles = run_bundles(cfg)
    packing = pack(bundles, shape, cfg.cluster.placement_strategy)
    asked = Counter((b.label, tuple(b.resources.items())) for b in bundles)
    warm = [f"{t.min_workers} x {t.name}" for t in shape.node_types if t.min_workers and not t.is_head]
    return [
        f"cluster {shape.source}: accepted by Ray's cluster config validator",
        *(f"Ray: {note}" for note in shape.notes),
        f"largest cluster: {describe_largest(shape)}" + (f"; kept warm: {', '.join(warm)}" if warm else ""),
        "run asks for: " + "; ".join(f"{n} x {label} {format_resources(dict(r))}" for (label, r), n in asked.items()),
        f"fits ({cfg.cluster.placement_strategy}, first-fit decreasing): "
        + ", ".join(f"{n} x {name}" for name, n in packing.counts().items()),
        "can land on: " + "; ".join(f"{service} -> {' | '.join(types)}"
                                    for service, types in service_node_types(cfg, shape).items()),
    ]
