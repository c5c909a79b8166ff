"""What a stage starts from when the config does not name it: the policy (``model.path``, or on
the toy world a tiny Llama bootstrapped by `flywheel sft sft-toy`) and, for the demo and the
overoptimization study, a reward ensemble trained by `flywheel train-rm rm-toy`. Both stages
run in their own process (:func:`run_stage`), and a re-run reuses what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.core.model_files import check_model_files

RM_PRESET = "rm-toy"


def bootstrap_toy_policy(cfg: FlywheelConfig, out: Path) -> Path:
    """No ``model.path`` on the toy world: SFT the tiny Llama first (its own process)."""
    target = out / "sft"
    if (target / "model" / "model.safetensors").is_file() and (target / "summary.json").is_file():
        print(f"using the SFT policy already in {target / 'model'}")
        return target / "model"
    print(f"model.path is null: bootstrapping the toy policy with `flywheel sft sft-toy` into {target}")
    run_stage("sft", "sft-toy", "--out", str(target), f"seed={cfg.seed}")
    return target / "model"


def run_stage(*args: str) -> None:
    """``flywheel ARGS`` in its own process, so that its DeepSpeed state (and torch.distributed
    rendezvous variables, which Ray's workers would inherit) stay out of this one."""
    command = [sys.executable, "-m", "services.cli", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if subprocess.run(command, env=env).returncode != 0:
        raise RuntimeError(f"`flywheel {' '.join(args)}` failed")


def policy_dir(cfg: FlywheelConfig, out: Path) -> Path:
    if cfg.model.path is not None:
        path = Path(cfg.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"model.path: no HF model directory (config.json) at '{cfg.model.path}'")
        check_model_files(path, "model.path")
        return path
    if cfg.data.source != "toy":
        raise UserError("model.path: point it at a policy directory (the output of `flywheel sft`)")
    return bootstrap_toy_policy(cfg, out)


def train_reward_ensemble(policy: Path, out: Path) -> tuple[dict, dict]:
    """`flywheel train-rm rm-toy` into DIR/rm (its own process); (summary, reward section)."""
    target = out / "rm"
    if not (target / "summary.json").is_file():
        run_stage("train-rm", RM_PRESET, "--out", str(target), f"model.path={policy}")
    else:
        print(f"using the reward ensemble already in {target}")
    reward = yaml.safe_load((target / "ensemble.yaml").read_text())["reward"]
    return json.loads((target / "summary.json").read_text()), reward
