"""Checks `flywheel train` makes before Ray starts and before anything is written to OUT.

Each raises :class:`UserError` naming the setting (or file) at fault, so a mistake costs
seconds, not the minute it takes to start vLLM, DeepSpeed and the reward actors:

- ``check_fresh_out``: a fresh run (no ``--resume``) into an OUT that already holds complete
  checkpoints would overwrite that run's metrics.jsonl, config.yaml and checkpoints;
- ``check_rl_settings``: an RL algorithm, and n >= 2 samples per prompt for grpo/online_dpo;
- ``check_scorers``: every reward member's cheap checks (a python function imports);
- ``check_ports``: the Prometheus exporter's port (and Ray's metrics port) must be free;
- ``check_context_length``: prompt + response budget within the model's context;
- ``check_resume``: the checkpoint was trained from this model (config.json) and algorithm;
- ``check_ptx_data``: the PPO-ptx rows load.

The RL prompts themselves are checked as they load (``prompt_data.rl_prompts``): bad
rows, and prompts over ``data.max_prompt_tokens``, which RL never truncates (the reward
would score a prompt the policy never saw).

``actor_user_error`` turns a user's mistake raised inside a Ray actor (a reward function
that raises or returns NaN / the wrong number of scores) into a UserError without Ray's
remote traceback.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

from services.core.config import FlywheelConfig, PreferenceConfig
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.core.ray_session import ray_address
from services.core.registry import ALGORITHMS
from services.driver.checkpoint import CheckpointStore, model_fingerprint, read_state
from services.learner.sft_data import sft_rows
from services.reward.preference import check_preference
from services.reward.scorers import resolve_scorer_config
from services.reward.scorers import ScorerError, ScorerOutputError

# the keys vLLM derives a model's context length from (smallest wins; model_max_length overrides)
CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
    "max_sequence_length", "max_seq_length", "seq_len",
)


def check_out_dir(out: Path) -> None:
    """``--out`` must be a directory, or a path that can be made one: no file in its place or
    above it, and its nearest existing folder writable. Writes nothing."""
    for path in (out, *out.absolute().parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "" if path == out else f", so --out {out} cannot be made"
            raise UserError(f"--out: {path} is a file, not a directory{where}; choose another --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--out: cannot write in {path} (permission denied); choose another --out")
        return


def check_fresh_out(out: Path, checkpoint: Path | None) -> None:
    """Refuse to start a fresh run over a run that has complete checkpoints."""
    if checkpoint is not None:
        return
    latest = CheckpointStore(out / "checkpoints").latest()
    if latest is not None:
        raise UserError(
            f"--out: {out} already holds a run with checkpoints (latest: {latest}); a fresh run would overwrite "
            "its metrics.jsonl, config.yaml and checkpoints. Pass --resume to continue it, or choose another --out"
        )


def check_rl_settings(cfg: FlywheelConfig) -> None:
    name = cfg.algorithm.name
    if name not in ALGORITHMS:
        raise UserError(f"algorithm.name: '{name}' is not an RL algorithm ({', '.join(ALGORITHMS.names())})")
    algorithm = ALGORITHMS.get(name)
    if algorithm.group_relative and cfg.rollout.n_samples < 2:
        raise UserError(
            f"rollout.n_samples: {name} needs at least 2 samples per prompt, got {cfg.rollout.n_samples} "
            f"({algorithm.group_reason})"
        )
    if algorithm.needs_preference:
        check_preference(cfg.reward.preference)
    elif cfg.reward.preference != PreferenceConfig():  # the default, as a resolved config.yaml holds it, is fine
        raise UserError(f"reward.preference: {name} does not compare pairs (online_ipo and nash_md do); remove it")
    minibatch, ranks = cfg.algorithm.ppo_minibatch_size, cfg.learner.num_ranks
    rows = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    count = -(-rows // minibatch) if minibatch is not None else 1
    if count > 1 and ranks > 1 and rows % (count * ranks):
        raise UserError(
            f"algorithm.ppo_minibatch_size: {minibatch} sequences cut a step's {rows} (rollout.prompts_per_step x "
            f"rollout.n_samples) into {count} minibatches, which cannot each be split evenly over "
            f"learner.num_ranks={ranks}; choose a minibatch size that divides {rows} and is a multiple of {ranks}"
        )


def check_scorers(cfg: FlywheelConfig) -> None:
    """Every reward member's cheap checks (a python function imports, a model path exists; no
    server contacted), here rather than ~17 s later when its actor starts."""
    for index, scorer in enumerate(cfg.reward.scorers):
        resolve_scorer_config(scorer, index)


def optimizer_steps_per_step(cfg: FlywheelConfig) -> int:
    """Optimizer steps one RL step makes (what sizes the learning-rate schedule): ppo_epochs x
    minibatches of a full batch (a step that drops rows makes fewer)."""
    alg = cfg.algorithm
    if not alg.policy_gradient() or alg.ppo_minibatch_size is None:
        return alg.ppo_epochs
    rows = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    return alg.ppo_epochs * max(1, -(-rows // alg.ppo_minibatch_size))


def _check_port(host: str, port: int | None, setting: str, host_setting: str | None = None) -> None:
    """Bind ``host:port`` the way the exporter will (IPv4, SO_REUSEADDR) and let go at once."""
    if not port:  # None: disabled; 0: the OS picks a free one
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise UserError(
                    f"{setting}: cannot serve on {host}:{port}: {reason}; stop what holds port {port} "
                    f"or choose another {setting} (0 picks a free one)"
                ) from None
            raise UserError(f"{host_setting or setting}: cannot serve on {host}:{port}: {reason}") from None


def check_ports(cfg: FlywheelConfig) -> None:
    m = cfg.metrics
    if m.prometheus_port and m.prometheus_port == m.ray_metrics_port:
        raise UserError(
            f"metrics.prometheus_port and metrics.ray_metrics_port are both {m.prometheus_port}; they need two ports"
        )
    _check_port(m.prometheus_host, m.prometheus_port, "metrics.prometheus_port", "metrics.prometheus_host")
    ray = sys.modules.get("ray")
    starts_local_ray = ray_address(cfg) is None and not (ray is not None and ray.is_initialized())
    if starts_local_ray:
        _check_port("0.0.0.0", m.ray_metrics_port, "metrics.ray_metrics_port")  # Ray binds every interface


def model_context(config: dict) -> tuple[int, str] | None:
    """(context length, the config key it comes from) as vLLM derives it; None when the config
    names none or scales RoPE (vLLM then stretches the context itself)."""
    config = config.get("text_config") or config
    for key in ("rope_scaling", "rope_parameters"):
        scaling = config.get(key)
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            return None
    if isinstance(config.get("model_max_length"), int):
        return config["model_max_length"], "model_max_length"
    found = [(config[k], k) for k in CONTEXT_KEYS if isinstance(config.get(k), int) and config[k] > 0]
    return min(found) if found else None


def check_context_length(cfg: FlywheelConfig, config: dict, where: str) -> None:
    """vLLM's context is data.max_prompt_tokens + rollout.max_tokens; it must fit the model."""
    context = model_context(config)
    prompt, response = cfg.data.max_prompt_tokens, cfg.rollout.max_tokens
    if context is not None and prompt + response > context[0]:
        raise UserError(
            f"data.max_prompt_tokens + rollout.max_tokens = {prompt} + {response} = {prompt + response} tokens, more "
            f"than the model's context of {context[0]} ({context[1]} in {where}): lower rollout.max_tokens or "
            "data.max_prompt_tokens"
        )


def check_toy_context_length(cfg: FlywheelConfig) -> None:
    """Before bootstrapping the toy policy (preset sft-toy), against the model it will build."""
    toy = load_config("sft-toy").model.toy
    check_context_length(cfg, {"max_position_embeddings": toy.max_position_embeddings}, "the toy model (sft-toy)")


def read_model_config(policy: Path) -> dict:
    try:
        config = json.loads((policy / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"model.path: {policy / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"model.path: {policy / 'config.json'} is not a JSON object")
    return config


def check_resume(checkpoint: Path | None, policy: Path, algorithm: str) -> dict | None:
    """The checkpoint must come from this model (its config.json) and this algorithm; checked
    from files alone, before any actor exists or any learner state is loaded. Returns the
    checkpoint's driver state (None without a checkpoint)."""
    if checkpoint is None:
        return
    state = read_state(checkpoint)
    if "model_fingerprint" not in state or "algorithm" not in state:
        raise UserError(f"checkpoint: '{checkpoint}' lacks the model fingerprint or the algorithm; it is damaged")
    if state["model_fingerprint"] != model_fingerprint(policy):
        raise UserError(
            f"checkpoint: '{checkpoint}' was saved from a different model than model.path "
            f"'{policy}' (config.json differs); resume with the model it was trained from"
        )
    if state["algorithm"] != algorithm:
        raise UserError(f"checkpoint: '{checkpoint}' is a {state['algorithm']} run, the config says {algorithm}")
    return state


def check_ptx_data(cfg: FlywheelConfig) -> None:
    """The PPO-ptx rows load (the learner reads them again when the actors are up)."""
    if not cfg.algorithm.ptx_coef or cfg.data.ptx_source == "toy":
        return
    try:
        sft_rows(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": cfg.data.ptx_source})}))
    except UserError as exc:
        message = str(exc).removeprefix("data.source: ")
        raise UserError(f"data.ptx_source: {message}") from None


def last_logged_step(metrics: Path) -> int:
    """The step of metrics.jsonl's last record (0 when there is none)."""
    if not metrics.is_file():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (ValueError, AttributeError):
        return 0


def actor_user_error(exc: BaseException, metrics: Path | None) -> UserError | None:
    """A UserError for a user's mistake that surfaced in a Ray actor: a reward scorer's bad
    output or exception, or a UserError the actor raised. ``metrics``: the run's metrics.jsonl
    once steps run (the message then names the step that failed). None: not a user error."""
    from ray.exceptions import RayTaskError

    if not isinstance(exc, RayTaskError):
        return None
    cause = exc.cause  # the actor's own exception; str(exc) would carry Ray's remote traceback
    if not isinstance(cause, (ScorerError, ScorerOutputError, UserError)):
        return None
    if metrics is None:
        return UserError(str(cause))
    step = last_logged_step(metrics) + 1
    hint = ""
    if isinstance(cause, (ScorerError, ScorerOutputError)):
        hint = (
            "\n  the run stopped before the learner used these scores; fix the scorer and run again "
            "(with --resume to continue from the last checkpoint, if OUT/checkpoints holds one)"
        )
    return UserError(f"step {step}: {cause}{hint}")


__all__ = [
    "check_fresh_out", "check_rl_settings", "check_ports", "model_context", "check_context_length",
    "check_toy_context_length", "read_model_config", "check_resume", "check_ptx_data",
    "last_logged_step", "actor_user_error",
]
