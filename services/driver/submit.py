"""`flywheel submit`: run `flywheel train` as a Ray job through a cluster's job API (the Ray
dashboard, http://HEAD:8265), with a local working directory uploaded beside it.

The config is validated here before anything is contacted, then travels fully resolved: it
is written into the working directory as ``flywheel-job-<id>.yaml`` only for the upload (and
removed right after), so a preset, a config file outside the working directory and dotted
overrides all reach the job exactly as validated. The job runs
``python -m services.cli train flywheel-job-<id>.yaml --out OUT`` in the uploaded copy, which
works whether the cluster's python has Flywheel installed or only its dependencies.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from services.core.config import FlywheelConfig
from services.core.config_loading import dump_config, load_config
from services.core.errors import UserError
from services.core.ray_session import QUIET_ENGINES

# never worth uploading; Ray also honours .gitignore and .rayignore in the working dir
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "runs", "__pycache__", "*.pt", ".pytest_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0
SUBMISSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def make_submission_id(cfg: FlywheelConfig, now: datetime | None = None, token: str | None = None) -> str:
    """``flywheel-<algorithm>-<YYYYmmdd-HHMMSS>-<4 hex>``: readable in `ray job list`."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"flywheel-{cfg.algorithm.name.replace('_', '-')}-{stamp}-{token or secrets.token_hex(2)}"


def parse_runtime_env(text: str | None) -> dict:
    """``--runtime-env-json``: inline JSON, or a JSON/YAML file holding one object."""
    if not text:
        return {}
    path = Path(text).expanduser()
    if path.is_file():
        try:
            value = yaml.safe_load(path.read_text())  # JSON is YAML
        except yaml.YAMLError as exc:
            raise UserError(f"--runtime-env-json: {path} is neither JSON nor YAML ({exc})") from None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--runtime-env-json: not a file and not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError('--runtime-env-json: must be a JSON object, e.g. \'{"env_vars": {"HF_TOKEN": "..."}}\'')
    return value


# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s;
# the job supervisor reads it from the job's env_vars). The run needs the rest of its step plus
# a checkpoint save, so it gets 10 minutes unless the user's env_vars say otherwise.
STOP_GRACE = {"RAY_JOB_STOP_WAIT_TIME_S": "600"}


def build_runtime_env(working_dir: str | None, user: dict) -> tuple[Path, dict]:
    """The job's runtime env: the user's, plus the working dir, default excludes and
    Flywheel's quiet-engine variables (the user's env_vars win). Returns (working dir, env)."""
    env = dict(user)
    given = working_dir or env.get("working_dir") or "."
    if not isinstance(given, str) or "://" in given:
        raise UserError(
            f"working_dir '{given}': flywheel submit needs a local directory (it adds the resolved "
            "config to the upload); pass --working-dir DIR"
        )
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--working-dir: no such directory: {given}")
    env_vars = {**QUIET_ENGINES, **STOP_GRACE, **(env.get("env_vars") or {})}
    bad = [k for k, v in env_vars.items() if not isinstance(v, str)]
    if bad:
        raise UserError(f"--runtime-env-json: env_vars values must be strings (quote them): {', '.join(bad)}")
    excludes = env.get("excludes") or []
    if not isinstance(excludes, list):
        raise UserError("--runtime-env-json: excludes must be a list of patterns")
    env.update(working_dir=str(path), excludes=[*DEFAULT_EXCLUDES, *excludes], env_vars=env_vars)
    return path, env


def resolve_out(out: str | None, submission_id: str) -> str:
    """Where the job writes, on the cluster: absolute or ``~/...`` (a relative path would land
    in the job's temporary copy of the working dir, which Ray deletes)."""
    if out is None:
        return f"~/flywheel-runs/{submission_id}"
    if not (os.path.isabs(out) or out == "~" or out.startswith("~/")):
        raise UserError(
            f"--out '{out}': give an absolute path (or ~/...) on the cluster; the job runs in a "
            "temporary copy of the working directory"
        )
    return out


def shell_path(path: str) -> str:
    """Quote a path for the entrypoint's shell, letting a leading ``~`` mean the job's $HOME."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if len(path) > 1 else "")
    return shlex.quote(path)


def job_entrypoint(config_name: str, out: str, resume: bool = False) -> str:
    command = f"python -m services.cli train {shlex.quote(config_name)} --out {shell_path(out)}"
    return command + " --resume" if resume else command


def dashboard_address(address: str | None, environ=os.environ) -> str:
    """``--address``, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (as `ray job` does)."""
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: give the cluster's Ray dashboard address, e.g. http://HEAD:8265")
    address = address.strip().rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise UserError(
            f"--address {address}: jobs go through the Ray dashboard (http://HEAD:8265), not a Ray Client "
            "or GCS address"
        )
    return address if "://" in address else f"http://{address}"


def auth_headers(environ=os.environ) -> dict[str, str]:
    """A bearer token for clusters with Ray token auth (on by default in Ray 2.60 when
    ~/.ray/auth_token exists): $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token, as Ray itself looks for it. Harmless when the cluster has no auth."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def short_error(exc: BaseException) -> str:
    """One line from a job API error: the last line of a server traceback (Ray answers some
    refusals with status 500 and the whole traceback), else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip(" .")]
    if not lines:
        return type(exc).__name__
    if not any("Traceback" in line for line in lines):
        return lines[0]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    return (raised or lines)[-1]


def connect(address: str):
    """A JobSubmissionClient for ``address``; UserError (naming it) when it cannot be reached."""
    url = urlsplit(address)
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError as exc:
        raise UserError(f"--address {address}: {exc}") from None
    if not host:
        raise UserError(f"--address {address}: no host in it; expected http://HEAD:8265")
    try:  # fail in seconds on an unreachable host rather than the OS's connect timeout
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray dashboard at {address} ({exc.strerror or exc}): is the cluster up and "
            "is this its dashboard address (http://HEAD:8265, `ray start --head --dashboard-host 0.0.0.0`)?"
        ) from None

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as exc:
        raise UserError(
            f"the Ray dashboard at {address} wants a valid auth token ({short_error(exc)}); set "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head)"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot use the Ray job API at {address}: {short_error(exc)}") from None


def run_submit(
    config: str,
    overrides: list[str] | None = None,
    *,
    address: str | None = None,
    follow: bool = False,
    out: str | None = None,
    submission_id: str | None = None,
    working_dir: str | None = None,
    runtime_env_json: str | None = None,
    resume: bool = False,
) -> int:
    cfg = load_config(config, overrides)  # config mistakes fail here, before any network
    working, runtime_env = build_runtime_env(working_dir, parse_runtime_env(runtime_env_json))
    sid = submission_id or make_submission_id(cfg)
    if not SUBMISSION_ID.fullmatch(sid):
        raise UserError(f"--submission-id '{sid}': use letters, digits, '.', '_' and '-' only")
    out = resolve_out(out, sid)
    address = dashboard_address(address)
    client = connect(address)

    staged = working / f"flywheel-job-{sid}.yaml"
    entrypoint = job_entrypoint(staged.name, out, resume)
    command = " ".join(["flywheel train", config, *(overrides or [])])
    if staged.exists():
        raise UserError(f"{staged} exists already: pick another --submission-id")
    try:
        staged.write_text(f"# resolved by `flywheel submit` ({sid}) from: {command}\n{dump_config(cfg)}")
    except OSError as exc:
        raise UserError(f"cannot write the resolved config into {working} ({exc.strerror}): pass a writable --working-dir") from None
    try:  # submit_job zips and uploads the working dir before it returns
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=sid,
            runtime_env=runtime_env,
            metadata={"flywheel_command": command[:200], "flywheel_out": out},
        )
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"the Ray job API at {address} did not take the job: {short_error(exc)}") from None
    finally:
        staged.unlink(missing_ok=True)

    print(f"submitted Ray job {sid} to {address}")
    print(f"  runs       {entrypoint}")
    print(f"             ({command}, resolved; in an upload of {working})")
    print(f"  outputs    {out} (on the node running the entrypoint: the head node)")
    print(f"  dashboard  {address}/#/jobs/{sid}")
    print(f"  follow     ray job logs --follow {sid} --address {address}")
    print(f"  status     ray job status {sid} --address {address}")
    print(f"  stop       ray job stop {sid} --address {address}")
    if auth_headers() and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        print("             (a cluster with Ray token auth needs RAY_AUTH_MODE=token for these `ray job` commands)")
    sys.stdout.flush()
    if not follow:
        return 0
    return follow_job(client, sid, address, out)


def follow_job(client, sid: str, address: str, out: str, poll_s: float = 2.0) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, 1 otherwise."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except Exception as exc:  # the log stream broke: keep waiting on the status
            print(f"(lost the log stream: {exc}; waiting for the job to end)", file=sys.stderr, flush=True)
        status, failures = None, 0
        while status not in TERMINAL:
            try:
                reply = client.get_job_status(sid)
                status = str(getattr(reply, "value", reply))
                failures = 0
            except Exception as exc:
                failures += 1
                if failures >= 30:
                    raise UserError(
                        f"lost the Ray job API at {address} while following {sid} ({exc}); the job may still be "
                        f"running: ray job status {sid} --address {address}"
                    ) from None
            if status not in TERMINAL:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sid} keeps running (ray job stop {sid} --address {address})",
              file=sys.stderr)
        raise
    if status == "SUCCEEDED":
        print(f"job {sid} SUCCEEDED; outputs in {out} on the cluster")
        return 0
    message = (client.get_job_info(sid).message or "").strip().splitlines()
    print(f"job {sid} {status}: {message[0] if message else 'no message'}", file=sys.stderr)
    return 1
