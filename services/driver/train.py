"""`flywheel train`: start (or join) Ray, make sure there is a policy, run the driver."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from services.core.actor_group import send_service_logs_to
from services.core.config import FlywheelConfig
from services.core.ray_session import init_ray
from services.driver import preflight
from services.driver.bootstrap import policy_dir
from services.driver.checkpoint import resolve_resume
from services.driver.driver import Driver
from services.driver.prompt_data import rl_prompts


def run_train(
    cfg: FlywheelConfig, out_dir: str | Path, progress: bool = True, resume: bool = False, stop_after: int | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """``resume``: continue from the latest checkpoint under OUT/checkpoints (or from
    ``checkpoint.resume_from``); ``stop_after``: stop, with a checkpoint, after that many steps.
    ``overwrite``: a fresh run may replace a run that has checkpoints in OUT (`flywheel train
    --overwrite`; the demo and the study re-run their own stages): the old checkpoints are
    deleted once every check has passed, so that none of them passes for this run's. Without
    it, `flywheel train` refuses. Every check of
    :mod:`services.driver.preflight` runs before Ray starts and before OUT is written."""
    out = Path(out_dir)
    checkpoint = resolve_resume(cfg.checkpoint.resume_from, resume, out)
    preflight.check_rl_settings(cfg)
    preflight.check_scorers(cfg)
    preflight.check_ports(cfg)
    preflight.check_ptx_data(cfg)
    if cfg.model.path is None:
        preflight.check_toy_context_length(cfg)  # before the toy policy's SFT
    if not overwrite:
        preflight.check_fresh_out(out, checkpoint)
    if cfg.model.path is None:  # the toy policy's SFT writes into OUT
        out.mkdir(parents=True, exist_ok=True)
    policy = policy_dir(cfg, out)
    preflight.check_context_length(cfg, preflight.read_model_config(policy), str(policy / "config.json"))
    preflight.check_resume(checkpoint, policy, cfg.algorithm.name)
    prompts, held_out = rl_prompts(cfg, policy)  # every bad row is refused before OUT is written
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and checkpoint is None:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    driver = Driver(cfg, out, policy, prompts=prompts, eval_prompts=held_out)
    if cfg.metrics.service_logs == "file":
        send_service_logs_to((out / "logs").resolve())  # the actors' working directory may differ
        if progress:
            print(f"service logs: {out / 'logs'}/ (--verbose shows them here)", file=sys.stderr)
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
        send_service_logs_to(None)
