"""Ray for a run's driver process: where to find the cluster and ``ray.init`` with the engines'
environment (`flywheel train`, and the job `flywheel submit` starts, which runs `flywheel train`)."""

from __future__ import annotations

import logging
import os

from services.core.config import FlywheelConfig
from services.core.orphan_reaper import start_reaper, stop_descendants

QUIET_ENGINES = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def not_ray_auth_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for Ray's notice, on every local start, that it enabled token
    authentication by default (a notice, not a warning that matters)."""
    return not record.getMessage().startswith("Token authentication is enabled")


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
    quiet = cfg.metrics.service_logs == "file"
    if quiet:  # added once however many runs this process starts (the same function object)
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(not_ray_auth_notice)
    local = ray_address(cfg) is None
    reaper = start_reaper() if local else None  # before ray.init, which may be interrupted half way
    try:
        ray.init(
            address=ray_address(cfg),
            namespace=cfg.cluster.namespace,
            include_dashboard=False,
            log_to_driver=not quiet,  # quiet: the actors write OUT/logs/ (actor_group.send_service_logs_to)
            logging_level=logging.WARNING if quiet else logging.INFO,
            runtime_env={"env_vars": driver_env_vars()},
            _metrics_export_port=cfg.metrics.ray_metrics_port,  # used only when this starts local Ray
        )
    except BaseException:  # Ctrl-C during start-up: Ray's agents would outlive this process
        if reaper is not None:
            try:
                ray.shutdown()  # the core worker first (it may have connected), then Ray's processes
            finally:
                stop_descendants(spare=reaper.pid)  # what a half-made start left
        raise
