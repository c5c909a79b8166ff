"""The ``flywheel`` command, run as a subprocess the way users run it."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from services.cli import build_parser
from tests.conftest import REPO, run_flywheel

def flywheel(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_flywheel(*args, timeout=120, cwd=cwd)


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return sorted(actions[0].choices)


def test_help_lists_subcommands():
    res = flywheel("--help")
    assert res.returncode == 0, res.stderr
    for name in subcommands():
        assert name in res.stdout
    assert {"validate", "presets", "sft"} <= set(subcommands())


@pytest.mark.parametrize("name", subcommands())
def test_subcommand_help(name):
    res = flywheel(name, "--help")
    assert res.returncode == 0, res.stderr
    assert f"flywheel {name}" in res.stdout


def test_no_command_is_usage_error():
    res = flywheel()
    assert res.returncode == 2
    assert "usage:" in res.stderr
    assert "Traceback" not in res.stderr


def test_validate_preset_prints_yaml():
    res = flywheel("validate", "sft-toy")
    assert res.returncode == 0, res.stderr
    assert "zero_stage: 0" in res.stdout
    import yaml

    tree = yaml.safe_load(res.stdout)
    assert tree["learner"]["zero_stage"] == 0 and tree["algorithm"]["name"] == "sft"


def test_validate_with_overrides():
    res = flywheel("validate", "sft-toy", "learner.zero_stage=2", "model.toy.num_layers=3")
    assert res.returncode == 0, res.stderr
    assert "zero_stage: 2" in res.stdout and "num_layers: 3" in res.stdout


def test_validate_broken_file(tmp_path):
    (tmp_path / "BROKEN.yaml").write_text("seed: 0\nlearner:\n  zero_stage: 0\n  lr: fast\n  lr_rate: 1\n")
    res = flywheel("validate", "BROKEN.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.startswith("error: ")
    assert "BROKEN.yaml:4: learner.lr:" in res.stderr
    assert "BROKEN.yaml:5: learner.lr_rate: unknown key" in res.stderr
    assert "Traceback" not in res.stderr


def test_validate_invalid_yaml(tmp_path):
    (tmp_path / "BROKEN.yaml").write_text("learner:\n  lr: [1,\n")
    res = flywheel("validate", str(tmp_path / "BROKEN.yaml"))
    assert res.returncode == 2
    assert "BROKEN.yaml:3: invalid YAML" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["validate", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["validate", "missing.yaml"], "config file not found: missing.yaml"),
        (["validate", "sft-toy", "learner.lr"], "must look like section.key=value"),
        (["sft", "no-such-preset", "--out", "unused"], "unknown preset"),
        # the study's GRPO overrides are checked before its SFT and reward models start
        (["study", "overopt", "--out", "unused", "algorithm.bogus=1"], "algorithm.bogus: unknown key"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, expected):
    res = flywheel(*args)
    assert res.returncode == 2
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


def test_presets_lists_sft_toy():
    res = flywheel("presets")
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("sft-toy ") for line in res.stdout.splitlines())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.path=/no/such/policy"], "model.path: no HF model directory"),
        (["algorithm.name=sft", "model.path=."], "algorithm.name: 'sft' is not an RL algorithm"),
        (["rollout.n_samples=1", "model.path=."], "rollout.n_samples: grpo needs at least 2 samples"),
    ],
)
def test_train_bad_input_exits_2_before_starting_anything(overrides, expected, tmp_path):
    if "model.path=." in overrides:  # a directory that looks like a HF model
        (tmp_path / "config.json").write_text("{}")
        overrides = [o if o != "model.path=." else f"model.path={tmp_path}" for o in overrides]
    proc = flywheel("train", "grpo-toy", "--out", str(tmp_path / "out"), *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
