"""The Python code generated from protos/ is committed; `python -m services.rpc.codegen --check`
must find it up to date, and must notice when a proto changes without regenerating."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from services.rpc import codegen
from tests.conftest import REPO

pytest.importorskip("grpc_tools")

REWARD_PB2 = "services/rpc/generated/flywheel/reward/v1/reward_pb2.py"


def test_committed_code_has_no_drift():
    proc = subprocess.run(
        [sys.executable, "-m", "services.rpc.codegen", "--check"], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout
    assert codegen.find_drift() == []


def test_generated_imports_are_package_absolute():
    grpc_module = (REPO / "services/rpc/generated/flywheel/reward/v1/reward_pb2_grpc.py").read_text()
    assert "from services.rpc.generated.flywheel.reward.v1 import reward_pb2" in grpc_module
    assert not (REPO / "services/rpc/generated/flywheel/trajectory/v1/trajectory_pb2_grpc.py").exists()
    from services.rpc.generated.flywheel.reward.v1 import reward_pb2, reward_pb2_grpc
    from services.rpc.generated.flywheel.trajectory.v1 import trajectory_pb2

    assert reward_pb2.DESCRIPTOR.package == "flywheel.reward.v1"
    assert trajectory_pb2.DESCRIPTOR.package == "flywheel.trajectory.v1"
    assert [m.name for m in reward_pb2.DESCRIPTOR.services_by_name["RewardService"].methods] == ["Score", "Health"]
    assert hasattr(reward_pb2_grpc, "RewardServiceStub")


def test_edited_proto_is_detected_as_drift(tmp_path, capsys):
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos)
    reward = protos / "flywheel/reward/v1/reward.proto"
    text = reward.read_text()
    anchor = "  string request_id = 2;\n"
    assert anchor in text
    reward.write_text(text.replace(anchor, anchor + "  // A new field.\n  int32 priority = 3;\n"))
    (protos / "flywheel/extra.proto").write_text('syntax = "proto3";\npackage flywheel.extra;\nmessage Extra {}\n')

    drift = codegen.find_drift(protos)
    assert f"differs: {REWARD_PB2}" in drift
    assert "missing: services/rpc/generated/flywheel/extra_pb2.py" in drift
    assert not any("trajectory" in line for line in drift)  # untouched protos stay equal
    assert codegen.main(["--check", "--protos", str(protos)]) == 1
    out = capsys.readouterr().out
    assert "out of date" in out and REWARD_PB2 in out and "make protos" in out


def test_regenerate_writes_and_removes_stale_files(tmp_path):
    stale = tmp_path / "services/rpc/generated/flywheel/old/v1/old_pb2.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("# from a deleted proto\n")
    assert "stale (no proto generates it): services/rpc/generated/flywheel/old/v1/old_pb2.py" in codegen.find_drift(
        repo=tmp_path
    )
    written = codegen.regenerate(repo=tmp_path)
    assert not stale.exists()
    assert REWARD_PB2 in {p.as_posix() for p in written}
    assert (tmp_path / REWARD_PB2).read_bytes() == (REPO / REWARD_PB2).read_bytes()
    assert codegen.find_drift(repo=tmp_path) == []
