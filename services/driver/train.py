"""`flywheel train`: start (or join) Ray, make sure there is a policy, run the driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.core.config import FlywheelConfig
from services.core.errors import UserError

QUIET_ENGINES = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}


# set by Ray's job supervisor for a job's entrypoint (with RAY_ADDRESS = the cluster's GCS)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_address(cfg: FlywheelConfig, environ=os.environ) -> str | None:
    """cluster.address when set; "auto" inside a Ray job (join the job's cluster); else None
    (start local Ray)."""
    if cfg.cluster.address:
        return cfg.cluster.address
    return "auto" if environ.get(RAY_JOB_ENV) else None


def driver_env_vars(environ=os.environ) -> dict[str, str]:
    """QUIET_ENGINES for the actors, minus those the job's runtime env already sets: Ray
    refuses a ray.init runtime_env whose env_vars repeat a key of the job's."""
    import json

    try:
        job_env = json.loads(environ.get(RAY_JOB_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        job_env = {}
    taken = set(job_env.get("env_vars") or {})
    return {k: environ.get(k, v) for k, v in QUIET_ENGINES.items() if k not in taken}


def init_ray(cfg: FlywheelConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: os.environ.get(k, v) for k, v in QUIET_ENGINES.items()})
    ray.init(
        address=ray_address(cfg),
        namespace=cfg.cluster.namespace,
        include_dashboard=False,
        runtime_env={"env_vars": driver_env_vars()},
        _metrics_export_port=cfg.metrics.ray_metrics_port,  # used only when this starts local Ray
    )


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
        return path
    if cfg.data.source != "toy":
        raise UserError("model.path: point it at a policy directory (the output of `flywheel sft`)")
    return bootstrap_toy_policy(cfg, out)


def run_train(
    cfg: FlywheelConfig, out_dir: str | Path, progress: bool = True, resume: bool = False, stop_after: int | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """``resume``: continue from the latest checkpoint under OUT/checkpoints (or from
    ``checkpoint.resume_from``); ``stop_after``: stop, with a checkpoint, after that many steps.
    ``overwrite``: a fresh run may replace a run that has checkpoints in OUT (the demo and the
    study re-run their own stages); `flywheel train` refuses that. Every check of
    :mod:`services.driver.preflight` runs before Ray starts and before OUT is written."""
    from services.driver import preflight
    from services.driver.checkpoint import resolve_resume
    from services.driver.driver import Driver

    out = Path(out_dir)
    checkpoint = resolve_resume(cfg.checkpoint.resume_from, resume, out)
    preflight.check_rl_settings(cfg)
    preflight.check_ports(cfg)
    preflight.check_ptx_data(cfg)
    if cfg.model.path is None:
        preflight.check_toy_context_length(cfg)  # before the toy policy's SFT
    if not overwrite:
        preflight.check_fresh_out(out, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    policy = policy_dir(cfg, out)
    preflight.check_context_length(cfg, preflight.read_model_config(policy), str(policy / "config.json"))
    preflight.check_resume(checkpoint, policy, cfg.algorithm.name)
    driver = Driver(cfg, out, policy)
    preflight.check_prompt_lengths(driver.prompts.items, policy, cfg)
    init_ray(cfg)
    running = False
    try:
        driver.build()
        running = True
        return driver.run(progress=progress, resume=checkpoint, stop_after=stop_after)
    except Exception as exc:
        error = preflight.actor_user_error(exc, out / "metrics.jsonl" if running else None)
        if error is None:
            raise
        raise error from None
    finally:
        driver.shutdown()
