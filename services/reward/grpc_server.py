"""The gRPC reward server (``protos/flywheel/reward/v1``): a :class:`RewardEnsemble` of any
scorer kinds, in this process, behind ``RewardService.Score`` / ``Health``.

- Columns travel as one ``google.protobuf.Struct`` per sample (``Sample.metadata``) and reach
  the scorers as ``{column: [value per sample]}``; a key missing in a sample is None there.
- Authentication: when the environment variable named by ``reward.server.token_env`` is set
  and non-empty, every call must carry ``authorization: Bearer <token>``; anything else is
  UNAUTHENTICATED. Serving on a non-loopback host without a token is refused unless
  ``reward.server.allow_unauthenticated`` is true, or clients must present certificates
  (mutual TLS, ``tls_client_ca``).
- TLS: with ``reward.server.tls_cert`` and ``tls_key`` the server speaks TLS only (grpc's own
  credentials, ``services.rpc.tls``); with ``tls_client_ca`` too, only clients whose
  certificate that CA signed get in. Without them the channel is plaintext.
- Requests are accepted concurrently (``max_workers``) but scored one at a time: scorers
  such as HF tokenizers are not thread-safe, and torch already uses every core.
- Errors: bad input or a scorer's bad output is INVALID_ARGUMENT with the message; anything
  else is INTERNAL with the exception's type and message (and a traceback in the log).

Messages are protobuf only; nothing is pickled.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import threading
from concurrent import futures
from typing import Any

import grpc

from services.core.config import RewardConfig
from services.core.errors import UserError
from services.reward.ensemble import RewardEnsemble
from services.rpc.generated.flywheel.reward.v1 import reward_pb2, reward_pb2_grpc
from services.rpc.struct_columns import structs_to_columns
from services.rpc.tls import server_credentials

API_VERSION = "v1"
MIB = 1 << 20
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}

log = logging.getLogger("flywheel.reward.server")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs (127.0.0.0/8, ::1); False for 0.0.0.0, names, etc."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_server_token(cfg: RewardConfig) -> str | None:
    """The bearer token from ``reward.server.token_env`` (None when unset, empty or disabled)."""
    name = cfg.server.token_env
    return (os.environ.get(name) or None) if name else None


def check_host(host: str) -> None:
    """A host the server can bind: an IP address, or a name that resolves; UserError otherwise
    (before any check that would talk about tokens)."""
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return
    except ValueError:
        pass
    if bare.replace(".", "").isdigit():  # 999.1.1.1: meant as an IPv4 address
        raise UserError(f"reward.server.host: '{host}' is not a valid IP address")
    try:
        socket.getaddrinfo(bare, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"reward.server.host: cannot resolve '{host}' ({exc})") from None


def check_bind_allowed(cfg: RewardConfig) -> str | None:
    """The server's bearer token (None: no authentication); UserError when that would expose
    an unauthenticated server beyond loopback without ``allow_unauthenticated``."""
    server_cfg = cfg.server
    check_host(server_cfg.host)
    token = read_server_token(cfg)
    client_certificates = bool(server_cfg.tls_client_ca)  # mutual TLS authenticates every client
    if not token and not is_loopback(server_cfg.host) and not (server_cfg.allow_unauthenticated or client_certificates):
        how = (
            f"set the environment variable {server_cfg.token_env} to a secret token"
            if server_cfg.token_env else "set reward.server.token_env to a variable holding a secret token"
        )
        raise UserError(
            f"reward.server.host: refusing to serve on non-loopback host '{server_cfg.host}' without a bearer "
            f"token: {how}, require client certificates (reward.server.tls_client_ca), or set "
            "reward.server.allow_unauthenticated=true"
        )
    return token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call without ``authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, token: str, token_env: str | None):
        self._expected = token.encode()
        self._token_env = token_env

    def intercept_service(self, continuation, handler_call_details):
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if not values:
            return self._deny("missing bearer token: send metadata 'authorization: Bearer <token>'")
        scheme, _, presented = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return self._deny("malformed authorization metadata: expected 'Bearer <token>'")
        if not hmac.compare_digest(presented.strip().encode(), self._expected):
            where = f": it must equal the server's ${self._token_env}" if self._token_env else ""
            return self._deny(f"wrong bearer token{where}")
        return continuation(handler_call_details)

    @staticmethod
    def _deny(message: str) -> grpc.RpcMethodHandler:
        def abort(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(abort)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """``Score`` and ``Health`` over one in-process :class:`RewardEnsemble`."""

    def __init__(self, ensemble: RewardEnsemble):
        self.ensemble = ensemble
        self.aggregate_mode = ensemble.cfg.aggregate
        self._lock = threading.Lock()

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        code, message = None, ""
        try:
            prompts = [s.prompt for s in request.samples]
            completions = [s.completion for s in request.samples]
            columns = structs_to_columns([s.metadata for s in request.samples])
            with self._lock:
                result = self.ensemble.score(prompts, completions, columns)
        except ValueError as exc:  # includes ScorerOutputError: bad input or a scorer's bad output
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception as exc:
            log.exception("request %s: scoring failed", request.request_id or "-")
            code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        if code is not None:
            context.abort(code, message)  # raises; outside the try so it is not caught above
        return reward_pb2.ScoreResponse(
            members=[
                reward_pb2.MemberScores(name=name, scores=scores)
                for name, scores in zip(result.member_names, result.member_scores)
            ],
            aggregate=result.scores, aggregate_mode=self.aggregate_mode, member_std=result.member_std,
            api_version=API_VERSION,
        )

    def Health(self, request: reward_pb2.HealthRequest, context: grpc.ServicerContext) -> reward_pb2.HealthResponse:
        return reward_pb2.HealthResponse(
            status=reward_pb2.HealthResponse.SERVING, member_names=self.ensemble.member_names,
            aggregate_mode=self.aggregate_mode, api_version=API_VERSION,
        )


def serve_reward(cfg: RewardConfig, ensemble: RewardEnsemble | None = None) -> tuple[grpc.Server, int]:
    """Start serving ``ensemble`` (default: built from ``cfg.scorers``) on
    ``cfg.server.host:port`` and return ``(server, bound port)``; port 0 picks a free one.
    Stop it with ``server.stop(grace_s)``."""
    server_cfg = cfg.server
    token = check_bind_allowed(cfg)
    ensemble = ensemble if ensemble is not None else RewardEnsemble(cfg)
    limit = int(server_cfg.max_message_mb * MIB)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=server_cfg.max_workers, thread_name_prefix="reward-rpc"),
        interceptors=[BearerTokenInterceptor(token, server_cfg.token_env)] if token else [],
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(ensemble), server)
    address = format_address(server_cfg.host, server_cfg.port)
    tls = server_cfg.tls_cert is not None
    credentials = (server_credentials(server_cfg.tls_cert, server_cfg.tls_key, server_cfg.tls_client_ca, "reward.server")
                   if tls else None)
    try:
        port = server.add_secure_port(address, credentials) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise UserError(f"reward.server: cannot bind {address} ({exc}); is the port in use?") from None
    if port == 0:
        raise UserError(f"reward.server: cannot bind {address}; is the port in use?")
    server.start()
    auth = ", ".join(filter(None, [
        "bearer token required" if token else "no bearer token",
        ("mutual TLS" if server_cfg.tls_client_ca else "TLS") if tls else "plaintext",
    ]))
    log.info(
        "reward server: ensemble %s (%s) on %s, %s", ",".join(ensemble.member_names), cfg.aggregate,
        format_address(server_cfg.host, port), auth,
    )
    return server, port


__all__ = [
    "serve_reward", "RewardServicer", "BearerTokenInterceptor", "check_bind_allowed", "is_loopback",
    "format_address", "read_server_token", "API_VERSION",
]
