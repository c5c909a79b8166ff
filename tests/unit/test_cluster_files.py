"""cluster/: every cluster file passes Ray's validator and fits the example run; the fit
check's packing math on hand-computed cases; `flywheel validate --cluster` errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.core.cluster_check import (
    Bundle,
    ClusterShape,
    NodeType,
    _start_flags,
    check_cluster,
    check_single_bundles,
    largest_total,
    load_cluster,
    pack,
    ray_validated_config,
    run_bundles,
)
from services.core.config import Resources
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.core.placement import bundle
from tests.conftest import REPO, run_flywheel

CLUSTER = REPO / "cluster"
RUN_CONFIG = CLUSTER / "grpo-cluster.yaml"
LAUNCHER_FILES = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def flywheel(*args: str):
    return run_flywheel(*args, timeout=120)


def broken_copy(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, f"{old!r} not in {source}"
    target = tmp_path / source.name
    target.write_text(text.replace(old, new, 1))
    return target


def test_cluster_folder_has_the_expected_files():
    assert {p.name for p in LAUNCHER_FILES} == {"aws.yaml", "local.yaml"}
    assert {p.name for p in KUBERAY_FILES} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES + KUBERAY_FILES, ids=lambda p: p.name)
def test_every_cluster_file_fits_the_example_run(path):
    lines = check_cluster(path, load_config(str(RUN_CONFIG), []))
    assert "accepted by Ray's cluster config validator" in lines[0]
    assert lines[-2].startswith("fits (PACK") and lines[-1].startswith("can land on: ")


def test_example_run_asks_for_the_node_types_custom_resources():
    bundles = [b.resources for b in run_bundles(load_config(str(RUN_CONFIG), []))]
    assert sum(b.get("rollout", 0) for b in bundles) == 4
    assert sum(b.get("learner", 0) for b in bundles) == 4
    assert sum(b.get("GPU", 0) for b in bundles) == 8


# ---------------------------------------------------------------- the CLI


def test_cli_validate_cluster_prints_config_and_fit_as_comments():
    res = flywheel("validate", "--cluster", "cluster/aws.yaml", str(RUN_CONFIG))
    assert res.returncode == 0, res.stderr
    assert "# fits (PACK, first-fit decreasing): 1 x head, 1 x learner-gpu, 4 x rollout-gpu" in res.stdout
    # custom resources pin rollout and learner to their node types; CPU-only services may go anywhere with room
    assert ("# can land on: learner -> learner-gpu; reference -> head | rollout-gpu | learner-gpu; "
            "reward -> head | rollout-gpu | learner-gpu; rollout -> rollout-gpu") in res.stdout
    assert yaml.safe_load(res.stdout)["rollout"]["num_workers"] == 4  # stdout stays a loadable config


def test_cli_schema_error_names_file_and_field(tmp_path):
    bad = broken_copy(tmp_path, CLUSTER / "aws.yaml", "cluster_name: flywheel", "cluster_name: flywheel\nbogus_key: 1")
    res = flywheel("validate", "--cluster", str(bad), str(RUN_CONFIG))
    assert res.returncode == 2
    assert f"error: {bad}: Ray's cluster schema rejects" in res.stderr
    assert "'bogus_key' was unexpected" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_min_above_max_names_node_type(tmp_path):
    bad = broken_copy(tmp_path, CLUSTER / "aws.yaml", "min_workers: 1", "min_workers: 7")
    res = flywheel("validate", "--cluster", str(bad), str(RUN_CONFIG))
    assert res.returncode == 2
    assert "node type 'rollout-gpu' has min_workers 7 > max_workers 6" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_oversubscribed_run_names_what_does_not_fit():
    res = flywheel("validate", "--cluster", "cluster/aws.yaml", str(RUN_CONFIG), "rollout.num_workers=50")
    assert res.returncode == 2
    assert "the run asks for 50 rollout in total (rollout worker 50 x {CPU: 4, GPU: 1, rollout: 1})" in res.stderr
    assert "cluster/aws.yaml allows has 6 rollout" in res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- errors, called directly


def check(path: Path | str, *overrides: str) -> list[str]:
    return check_cluster(path, load_config(str(RUN_CONFIG), list(overrides)))


def test_wrong_type_names_the_field_path(tmp_path):
    bad = broken_copy(tmp_path, CLUSTER / "aws.yaml", "max_workers: 6", "max_workers: six")
    with pytest.raises(UserError, match=r"rejects available_node_types\.rollout-gpu\.max_workers: 'six' is not of type 'integer'"):
        check(bad)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("cluster_name: x\nprovider:\n  type: aws\n   region: us-west-2\n")
    with pytest.raises(UserError, match=rf"^{bad}:4: not valid YAML"):
        check(bad)


def test_missing_file_and_missing_provider(tmp_path):
    with pytest.raises(UserError, match="cluster file not found"):
        check(tmp_path / "nope.yaml")
    bad = tmp_path / "noprovider.yaml"
    bad.write_text("cluster_name: x\n")
    with pytest.raises(UserError, match="needs `provider:` with a `type`"):
        check(bad)


def test_global_max_workers_below_needed_nodes(tmp_path):
    bad = broken_copy(tmp_path, CLUSTER / "aws.yaml", "\nmax_workers: 10", "\nmax_workers: 3")
    with pytest.raises(UserError, match=r"asks for 4 rollout in total .* has 3 rollout .*at most 3 workers in all"):
        check(bad)


def test_rank_gpus_larger_than_any_node():
    with pytest.raises(UserError) as err:
        check(CLUSTER / "aws.yaml", "learner.resources.num_gpus=5")
    assert str(err.value) == (
        "learner rank bundle {CPU: 8, GPU: 5, learner: 1} fits no node type: largest GPU per node is 4 "
        f"({CLUSTER / 'aws.yaml'})"
    )


def test_bundle_that_no_single_node_type_has_all_of():
    with pytest.raises(UserError, match=r"rollout-gpu: GPU 1 \(needs 2\); learner-gpu: rollout 0 \(needs 1\)"):
        check(CLUSTER / "aws.yaml", "rollout.resources.num_gpus=2")


def test_strict_pack_needs_one_node_for_everything():
    with pytest.raises(UserError, match="STRICT_PACK puts all 12 bundles on one node"):
        check(CLUSTER / "aws.yaml", "cluster.placement_strategy=STRICT_PACK")


def test_on_prem_rejects_node_types_via_ray(tmp_path):
    bad = tmp_path / "local.yaml"
    bad.write_text((CLUSTER / "local.yaml").read_text() + "available_node_types: {w: {resources: {}, node_config: {}}}\n")
    with pytest.raises(UserError, match="available_node_types is not supported for on-premise clusters"):
        check(bad)


def test_on_prem_needs_stated_gpus(tmp_path):
    bad = broken_copy(tmp_path, CLUSTER / "local.yaml", " --num-gpus=4", "")
    with pytest.raises(UserError, match="worker_start_ray_commands do not pass --num-gpus"):
        check(bad)


def test_on_prem_warning_from_ray_becomes_a_note(tmp_path):
    wide = broken_copy(tmp_path, CLUSTER / "local.yaml", "max_workers: 3", "max_workers: 5")
    lines = check(wide)
    assert any(line.startswith("Ray: The value of `max_workers` supplied (5)") for line in lines)


def test_kuberay_min_above_max_names_group(tmp_path):
    bad = broken_copy(tmp_path, CLUSTER / "kuberay" / "raycluster.yaml", "maxReplicas: 6", "maxReplicas: 0")
    with pytest.raises(UserError, match="node type 'rollout-gpu' has min_workers 1 > max_workers 0"):
        check(bad)


def test_start_flags_parsing():
    flags = _start_flags([
        "ray stop",
        "ulimit -n 1; ray start --address=$RAY_HEAD_IP:6379 --num-cpus 32 --num-gpus=4 "
        "--resources='{\"rollout\": 4}'",
    ])
    assert flags == {"--num-cpus": "32", "--num-gpus": "4", "--resources": '{"rollout": 4}'}


# ---------------------------------------------------------------- KubeRay vs the launcher YAML


def node_types_of(path: Path) -> dict[str, dict]:
    return ray_validated_config(path, yaml.safe_load(path.read_text()))["available_node_types"]


def test_kuberay_worker_groups_match_aws_node_types():
    aws = node_types_of(CLUSTER / "aws.yaml")
    aws_workers = {name: spec for name, spec in aws.items() if name != "head"}
    for manifest in KUBERAY_FILES:
        groups = {name: spec for name, spec in node_types_of(manifest).items() if name != "headgroup"}
        assert set(groups) == set(aws_workers), manifest
        for name, group in groups.items():
            launcher = aws_workers[name]
            custom = {k: v for k, v in group["resources"].items() if k not in ("CPU", "memory")}
            assert custom == {k: v for k, v in launcher["resources"].items() if k not in ("CPU", "memory")}, name
            assert (group["min_workers"], group["max_workers"]) == (launcher["min_workers"], launcher["max_workers"])
        head = node_types_of(manifest)["headgroup"]["resources"]
        assert "GPU" not in head and aws["head"]["resources"].get("GPU", 0) == 0


def test_rayjob_runs_flywheel_on_the_raycluster_spec():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and cluster["kind"] == "RayCluster"
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["entrypoint"].startswith("flywheel train /etc/flywheel/grpo-cluster.yaml --out ")


# ---------------------------------------------------------------- packing math, by hand


def shape(*types: NodeType, max_workers: int | None = None) -> ClusterShape:
    return ClusterShape("test.yaml", list(types), max_workers)


HEAD4 = NodeType("head", {"CPU": 4}, is_head=True)
GPU2 = NodeType("gpu", {"CPU": 8, "GPU": 2, "g": 2}, min_workers=0, max_workers=3)


def test_ffd_fills_gpu_nodes_then_puts_cpu_bundles_on_the_head_first():
    bundles = [Bundle("r", {"CPU": 1, "GPU": 1, "g": 1})] * 5 + [Bundle("c", {"CPU": 3})] * 2
    packing = pack(bundles, shape(HEAD4, GPU2))
    # 5 GPU bundles: 2 + 2 + 1 on three gpu nodes; first CPU 3 on the head (4 free), the
    # second no longer fits there (1 free) and goes to the first gpu node (6 free)
    assert packing.counts() == {"head": 1, "gpu": 3}
    assert [len(a) for a in packing.assigned] == [1, 3, 2, 1]
    assert packing.free[0] == {"CPU": 1}
    assert packing.free[1] == {"CPU": 3, "GPU": 0, "g": 0}


def test_totals_beyond_the_largest_cluster_name_the_custom_resource_first():
    bundles = [Bundle("rollout worker", {"CPU": 1, "GPU": 1, "g": 1})] * 7  # 7 > 3 nodes x 2
    with pytest.raises(UserError, match=r"asks for 7 g in total .* has 6 g \(head \+ 3 x gpu\)"):
        pack(bundles, shape(HEAD4, GPU2))


def test_totals_fit_but_bundles_do_not_pack():
    # 3 x CPU 3 = 9 <= 2 + 2 x 4 = 10 CPUs, but no node holds two of them and the head none
    small = NodeType("small", {"CPU": 4}, max_workers=2)
    with pytest.raises(UserError, match=r"do not pack .* no room left for c bundle \{CPU: 3\} after filling 1 x head, 2 x small"):
        pack([Bundle("c", {"CPU": 3})] * 3, shape(NodeType("head", {"CPU": 2}, is_head=True), small))
    assert pack([Bundle("c", {"CPU": 3})] * 2, shape(NodeType("head", {"CPU": 2}, is_head=True), small)).counts() == {
        "head": 1, "small": 2}


def test_largest_total_respects_the_global_cap():
    gpu = NodeType("gpu", {"CPU": 4, "GPU": 1}, max_workers=5)
    cpu = NodeType("cpu", {"CPU": 16}, max_workers=5)
    capped = shape(HEAD4, gpu, cpu, max_workers=3)
    assert largest_total(capped, "GPU") == 3  # 3 gpu nodes
    assert largest_total(capped, "CPU") == 4 + 3 * 16  # head + 3 cpu nodes
    assert largest_total(shape(HEAD4, gpu, cpu), "CPU") == 4 + 5 * 4 + 5 * 16


def test_global_cap_limits_packing():
    gpu = NodeType("gpu", {"CPU": 4, "GPU": 1}, max_workers=5)
    cpu = NodeType("cpu", {"CPU": 16}, max_workers=5)
    bundles = [Bundle("r", {"GPU": 1, "CPU": 1})] * 2 + [Bundle("c", {"CPU": 10})] * 2
    assert pack(bundles, shape(HEAD4, gpu, cpu, max_workers=4)).counts() == {"head": 1, "gpu": 2, "cpu": 2}
    with pytest.raises(UserError, match="do not pack"):
        pack(bundles, shape(HEAD4, gpu, cpu, max_workers=3))


def test_new_nodes_are_of_the_smallest_type_that_holds_the_bundle():
    small = NodeType("small", {"CPU": 2}, max_workers=5)
    big = NodeType("big", {"CPU": 16, "GPU": 4}, max_workers=5)
    head = NodeType("head", {"CPU": 0.5}, is_head=True)
    assert pack([Bundle("c", {"CPU": 1})], shape(head, big, small)).counts() == {"head": 1, "small": 1}
    assert pack([Bundle("c", {"CPU": 3})], shape(head, big, small)).counts() == {"head": 1, "big": 1}


def test_strict_spread_puts_one_bundle_per_node():
    one = NodeType("one", {"CPU": 8}, max_workers=1)
    head = NodeType("head", {"CPU": 8}, is_head=True)
    assert pack([Bundle("c", {"CPU": 1})] * 2, shape(head, one), "STRICT_SPREAD").counts() == {"head": 1, "one": 1}
    with pytest.raises(UserError, match="do not pack"):
        pack([Bundle("c", {"CPU": 1})] * 3, shape(head, one), "STRICT_SPREAD")


def test_single_bundle_larger_than_every_node():
    with pytest.raises(UserError, match=r"^learner rank bundle \{GPU: 2\} fits no node type: largest GPU per node is 1 \(test.yaml\)$"):
        check_single_bundles([Bundle("learner rank", {"GPU": 2})], shape(HEAD4, NodeType("g", {"CPU": 4, "GPU": 1}, max_workers=2)))


def test_node_types_with_no_workers_allowed_do_not_count():
    idle = NodeType("gpu", {"CPU": 8, "GPU": 8}, max_workers=0)
    with pytest.raises(UserError, match="largest GPU per node is 0"):
        check_single_bundles([Bundle("r", {"GPU": 1})], shape(HEAD4, idle))


# ---------------------------------------------------------------- custom resources in the config


def test_custom_resources_reach_ray_options_and_bundles():
    res = Resources(num_cpus=2, num_gpus=1, custom={"rollout": 1})
    assert res.ray_options() == {"num_cpus": 2, "num_gpus": 1, "resources": {"rollout": 1}}
    assert bundle(res) == {"CPU": 2, "GPU": 1, "rollout": 1}
    assert "resources" not in Resources(num_cpus=1).ray_options()
    assert bundle(Resources()) == {"CPU": 0.001}  # Ray rejects all-zero bundles


def test_loaded_aws_shape():
    aws = load_cluster(CLUSTER / "aws.yaml")
    assert [(t.name, t.min_workers, t.max_count) for t in aws.node_types] == [
        ("head", 0, 1), ("rollout-gpu", 1, 6), ("learner-gpu", 0, 2)]
    assert aws.max_workers == 10


def test_kuberay_without_autoscaling_has_replicas_workers(tmp_path):
    fixed = broken_copy(tmp_path, CLUSTER / "kuberay" / "raycluster.yaml", "enableInTreeAutoscaling: true",
                        "enableInTreeAutoscaling: false")
    # replicas: 1 rollout-gpu pod and 0 learner-gpu pods: the learner ranks have nowhere to go
    assert [(t.name, t.max_count) for t in load_cluster(fixed).node_types] == [
        ("headgroup", 1), ("rollout-gpu", 1), ("learner-gpu", 0)]
    with pytest.raises(UserError, match="learner rank bundle .* fits no node type: .*largest learner per node is 0"):
        check(fixed)
