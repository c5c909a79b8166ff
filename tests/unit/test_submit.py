"""`flywheel submit` and joining a Ray job's cluster: the pure parts (no Ray started)."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime

import pytest

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.driver import submit
from services.core.ray_session import QUIET_ENGINES, RAY_JOB_ENV, driver_env_vars, ray_address


def job_env(env_vars: dict | None = None) -> dict:
    """The variables Ray's job supervisor gives an entrypoint (as seen in ray 2.60)."""
    config = {"runtime_env": {"env_vars": env_vars or {}}, "metadata": {"job_submission_id": "x"}}
    return {"RAY_ADDRESS": "192.0.2.2:6379", RAY_JOB_ENV: json.dumps(config)}


def cfg_with(**cluster) -> FlywheelConfig:
    return FlywheelConfig.model_validate({"cluster": cluster})


def test_ray_job_env_var_is_the_one_ray_sets():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert RAY_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR


def test_ray_address_local_job_and_explicit():
    assert ray_address(cfg_with(), {}) is None  # starts local Ray
    assert ray_address(cfg_with(), job_env()) == "auto"  # joins the job's cluster
    assert ray_address(cfg_with(address="10.0.0.5:6379"), job_env()) == "10.0.0.5:6379"
    assert ray_address(cfg_with(address="ray://head:10001"), {}) == "ray://head:10001"


def test_driver_env_vars_leave_out_what_the_job_already_sets():
    assert driver_env_vars({}) == QUIET_ENGINES
    assert driver_env_vars({"VLLM_LOGGING_LEVEL": "DEBUG"})["VLLM_LOGGING_LEVEL"] == "DEBUG"
    inside = driver_env_vars(job_env({"VLLM_LOGGING_LEVEL": "ERROR", "HF_TOKEN": "t"}))
    assert "VLLM_LOGGING_LEVEL" not in inside and inside["TOKENIZERS_PARALLELISM"] == "false"
    assert driver_env_vars({RAY_JOB_ENV: "not json"}) == QUIET_ENGINES


def test_submission_id_is_readable():
    cfg = FlywheelConfig.model_validate({"algorithm": {"name": "online_dpo"}})
    assert submit.make_submission_id(cfg, datetime(2025, 3, 4, 5, 6, 7), "ab12") == "flywheel-online-dpo-20250304-050607-ab12"
    sid = submit.make_submission_id(FlywheelConfig())
    assert re.fullmatch(r"flywheel-[a-z-]+-\d{8}-\d{6}-[0-9a-f]{4}", sid) and submit.SUBMISSION_ID.fullmatch(sid)


def test_runtime_env_json_inline_or_file(tmp_path):
    assert submit.parse_runtime_env(None) == {}
    assert submit.parse_runtime_env('{"env_vars": {"A": "1"}}') == {"env_vars": {"A": "1"}}
    path = tmp_path / "env.yaml"
    path.write_text("pip: [rich]\nenv_vars: {B: '2'}\n")
    assert submit.parse_runtime_env(str(path)) == {"pip": ["rich"], "env_vars": {"B": "2"}}
    with pytest.raises(UserError, match="not valid JSON"):
        submit.parse_runtime_env("{nope")
    with pytest.raises(UserError, match="JSON object"):
        submit.parse_runtime_env("[1, 2]")


def test_runtime_env_merges_user_settings(tmp_path):
    working, env = submit.build_runtime_env(
        str(tmp_path), {"env_vars": {"VLLM_LOGGING_LEVEL": "INFO", "HF_TOKEN": "t"}, "excludes": ["data/"], "pip": ["x"]}
    )
    assert working == tmp_path.resolve() and env["working_dir"] == str(tmp_path.resolve())
    assert env["env_vars"] == {
        **QUIET_ENGINES, "VLLM_LOGGING_LEVEL": "INFO", "HF_TOKEN": "t", "RAY_JOB_STOP_WAIT_TIME_S": "600",
    }
    _, own_grace = submit.build_runtime_env(str(tmp_path), {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    assert own_grace["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"  # the user's grace period wins
    assert env["excludes"][-1] == "data/" and {".venv", ".git", "runs", "*.pt"} <= set(env["excludes"])
    assert env["pip"] == ["x"]
    with pytest.raises(UserError, match="local directory"):
        submit.build_runtime_env(None, {"working_dir": "s3://bucket/code.zip"})
    with pytest.raises(UserError, match="no such directory"):
        submit.build_runtime_env(str(tmp_path / "missing"), {})
    with pytest.raises(UserError, match="strings"):
        submit.build_runtime_env(str(tmp_path), {"env_vars": {"N": 1}})


def test_out_must_be_absolute_and_home_expands_in_the_job_shell():
    assert submit.resolve_out(None, "sid") == "~/flywheel-runs/sid"
    assert submit.resolve_out("/data/run", "sid") == "/data/run"
    with pytest.raises(UserError, match="absolute"):
        submit.resolve_out("runs/x", "sid")
    entry = submit.job_entrypoint("flywheel-job-sid.yaml", "~/runs/my run")
    assert entry.startswith("python -m services.cli train flywheel-job-sid.yaml --out ")
    assert not entry.endswith("--resume")
    assert submit.job_entrypoint("c.yaml", "/runs/a", resume=True) == "python -m services.cli train c.yaml --out /runs/a --resume"
    echoed = subprocess.run(["bash", "-c", f"echo {submit.shell_path('~/runs/my run')}"], capture_output=True,
                            text=True, env={"HOME": "/home/ray"}).stdout.strip()
    assert echoed == "/home/ray/runs/my run"


def test_dashboard_address():
    assert submit.dashboard_address("127.0.0.1:8265", {}) == "http://127.0.0.1:8265"
    assert submit.dashboard_address("https://ray.example.com/", {}) == "https://ray.example.com"
    assert submit.dashboard_address(None, {"RAY_API_SERVER_ADDRESS": "http://h:1", "RAY_ADDRESS": "http://g:2"}) == "http://h:1"
    assert submit.dashboard_address(None, {"RAY_ADDRESS": "http://g:2"}) == "http://g:2"
    for bad in ("ray://head:10001", "auto"):
        with pytest.raises(UserError, match="dashboard"):
            submit.dashboard_address(bad, {})
    with pytest.raises(UserError, match="--address"):
        submit.dashboard_address(None, {})


def test_auth_headers(tmp_path):
    assert submit.auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    token = tmp_path / "token"
    token.write_text("def\n")
    assert submit.auth_headers({"RAY_AUTH_TOKEN_PATH": str(token)}) == {"Authorization": "Bearer def"}
    assert submit.auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}) == {}
    assert submit.auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "abc"}) == {}


def test_short_error_keeps_the_last_line_of_a_server_traceback():
    exc = RuntimeError("Request failed with status code 500: Traceback (most recent call last):\n"
                       '  File "job_head.py", line 419\nValueError: Job with submission_id x already exists.\n.')
    assert submit.short_error(exc) == "ValueError: Job with submission_id x already exists."
    assert submit.short_error(ConnectionError("Failed to connect.\nmore")) == "Failed to connect."
    assert submit.short_error(RuntimeError()) == "RuntimeError"


def test_the_ray_auth_notice_filter_drops_only_that_notice():
    import logging

    from services.core.ray_session import not_ray_auth_notice

    def record(message):
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, message, None, None)

    assert not not_ray_auth_notice(record("Token authentication is enabled for this Ray cluster. Set ..."))
    assert not_ray_auth_notice(record("Token authentication is disabled: anyone with network access ..."))
