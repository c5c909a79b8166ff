"""Client of the gRPC reward server (``protos/flywheel/reward/v1``, ``flywheel serve-reward``).

:class:`RewardClient` sends prompt/completion batches and returns every member's scores plus
the server's aggregate (:class:`RemoteScores`, an :class:`EnsembleScores`). Each attempt has a
deadline of ``timeout_s``; only UNAVAILABLE (server down or restarting) is retried, at most
``retries`` more times, with exponential backoff and jitter. Every failure is a
:class:`RemoteRewardError` that names the address and says what to change.

A port that answers, but not with gRPC (a web server, a Prometheus exporter, another protocol),
is not retried: grpc reports it as UNAVAILABLE ("Failed parsing HTTP/2"), and one HTTP/1.1
request to the port (:func:`http_status_line`) tells whether it is an HTTP server; the error is
then a :class:`NotGrpcServerError`. A port that refuses connections is retried as before (a
server still starting).
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.reward.aggregate import EnsembleScores
from services.rpc.generated.flywheel.reward.v1 import reward_pb2, reward_pb2_grpc
from services.rpc.struct_columns import columns_to_structs

MIB = 1 << 20
SERVER_LIMIT_SETTING = "reward.server.max_message_mb"
CLIENT_LIMIT_SETTING = "max_message_mb of the remote scorer (reward.scorers.N.max_message_mb)"


class RemoteRewardError(RuntimeError):
    """A call to the reward server failed; ``code`` is the last gRPC status (None if never sent)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class NotGrpcServerError(RemoteRewardError):
    """The address answered, but not with gRPC; ``answer`` says what it answered (e.g.
    ``answered HTTP ("HTTP/1.0 200 OK" to GET /), not gRPC``), ``hint`` what else to check
    ("" or "; ..."). Retrying would not help."""

    def __init__(self, address: str, answer: str, hint: str = ""):
        super().__init__(f"{address} {answer}; is it the address of a reward server (`flywheel serve-reward`)?{hint}",
                         grpc.StatusCode.UNAVAILABLE)
        self.address, self.answer, self.hint = address, answer, hint


# grpc's words (in an UNAVAILABLE status's details) for a peer that sent bytes that are not HTTP/2,
# and, for a TLS client, for a peer that did not answer the handshake with TLS
NOT_HTTP2_WORDS = ("failed parsing http/2", "http1.x server")
NOT_TLS_WORDS = ("wrong_version_number",)
PLAINTEXT_HINT = ("; the client speaks plaintext: if the server uses TLS (reward.server.tls_cert), set tls_ca of the "
                  "remote scorer")


def http_status_line(address: str, timeout_s: float = 2.0) -> str | None:
    """The status line (``HTTP/1.1 404 Not Found``) an HTTP/1.x server at ``address``
    (``host:port``) answers to ``GET /``; None when the port does not answer HTTP, cannot be
    reached, or the address is not of that form."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    request = f"GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode("ascii", "replace")
    reply = b""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(request)
            while b"\n" not in reply and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except (OSError, ValueError):
        pass  # what came before the reset or the timeout, if anything, is judged below
    if not reply.startswith(b"HTTP/"):
        return None
    return reply.splitlines()[0].decode("latin-1").strip()[:100]


@dataclass
class RemoteScores(EnsembleScores):
    """The server's answer: ``scores`` is its aggregate; plus the mode and API version."""

    aggregate_mode: str = ""
    api_version: str = ""


def backoff_delay(retry: int, base_s: float = 0.1, cap_s: float = 2.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): ``min(cap, base * 2**retry)``,
    with "equal jitter" (uniformly in the upper half of that), so clients that failed together
    do not retry in lockstep."""
    ceiling = min(cap_s, base_s * 2**retry)
    return ceiling / 2 + (rng or random).uniform(0.0, ceiling / 2)


def format_mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:.2f} MiB ({n_bytes} bytes)"


class RewardClient:
    """Blocking client for one reward server at ``address`` (``host:port``).

    ``token``: bearer token sent as ``authorization: Bearer <token>`` (None sends none);
    ``token_env``: the environment variable it came from, only for error messages.
    ``tls``: grpc channel credentials (``services.rpc.tls.channel_credentials``); None: plaintext.
    ``last_attempts``: how many attempts the latest call made (1 + retries used).
    """

    def __init__(
        self, address: str, timeout_s: float = 30.0, retries: int = 4, token: str | None = None,
        max_message_mb: float = 16.0, *, token_env: str | None = None, backoff_base_s: float = 0.1,
        backoff_cap_s: float = 2.0, sleep: Callable[[float], None] = time.sleep,
        tls: grpc.ChannelCredentials | None = None,
    ):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address, self.timeout_s, self.retries = address, float(timeout_s), int(retries)
        self.token, self.token_env = token or None, token_env
        self.max_message_bytes = int(max_message_mb * MIB)
        self.backoff_base_s, self.backoff_cap_s, self._sleep = backoff_base_s, backoff_cap_s, sleep
        self._rng = random.Random()
        self.last_attempts = 0
        self.tls = tls is not None
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes)]
        self.channel = (grpc.secure_channel(address, tls, options=options) if tls is not None
                        else grpc.insecure_channel(address, options=options))
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    # --- calls -------------------------------------------------------------------------------

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        completion_token_ids: Sequence[Sequence[int]] | None = None, request_id: str | None = None,
    ) -> RemoteScores:
        """Score N samples on the server: every member's scores, their std and the aggregate."""
        request = self.build_request(prompts, completions, columns, prompt_token_ids, completion_token_ids, request_id)
        size = request.ByteSize()
        if size > self.max_message_bytes:
            raise RemoteRewardError(
                f"reward request to {self.address} is {format_mib(size)} for {len(request.samples)} samples, over "
                f"the client's limit of {format_mib(self.max_message_bytes)}: raise {CLIENT_LIMIT_SETTING} "
                f"(and {SERVER_LIMIT_SETTING} on the server) or score smaller batches"
            )
        response = self._call("Score", self.stub.Score, request, size)
        names = [m.name for m in response.members]
        result = RemoteScores(
            scores=list(response.aggregate), member_scores=[list(m.scores) for m in response.members],
            member_std=list(response.member_std), member_names=names,
            aggregate_mode=response.aggregate_mode, api_version=response.api_version,
        )
        n = len(request.samples)
        if len(result.scores) != n or any(len(m) != n for m in result.member_scores) or len(result.member_std) != n:
            raise RemoteRewardError(
                f"reward server at {self.address} answered {len(result.scores)} aggregate scores and member lists "
                f"of lengths {[len(m) for m in result.member_scores]} for {n} samples"
            )
        return result

    def health(self) -> reward_pb2.HealthResponse:
        """The server's status, member names, aggregate mode and API version."""
        return self._call("Health", self.stub.Health, reward_pb2.HealthRequest(), 0)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def build_request(
        prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        completion_token_ids: Sequence[Sequence[int]] | None = None, request_id: str | None = None,
    ) -> reward_pb2.ScoreRequest:
        """The ScoreRequest for a batch; ValueError on mismatched lengths or unsendable columns."""
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"{n} prompts but {len(completions)} completions")
        for label, ids in (("prompt_token_ids", prompt_token_ids), ("completion_token_ids", completion_token_ids)):
            if ids is not None and len(ids) != n:
                raise ValueError(f"{label} has {len(ids)} rows for {n} samples")
        metadata = columns_to_structs(columns, n)
        samples = [
            reward_pb2.Sample(
                prompt=prompts[i], completion=completions[i], metadata=metadata[i],
                prompt_token_ids=list(prompt_token_ids[i]) if prompt_token_ids is not None else [],
                completion_token_ids=list(completion_token_ids[i]) if completion_token_ids is not None else [],
            )
            for i in range(n)
        ]
        return reward_pb2.ScoreRequest(samples=samples, request_id=request_id or uuid.uuid4().hex)

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _call(self, method: str, rpc: Callable, request: Any, request_bytes: int) -> Any:
        self.last_attempts = 0
        last: grpc.RpcError | None = None
        probed = False
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(backoff_delay(attempt - 1, self.backoff_base_s, self.backoff_cap_s, self._rng))
            self.last_attempts = attempt + 1
            try:
                return rpc(request, timeout=self.timeout_s, metadata=self._metadata())
            except grpc.RpcError as exc:
                last = exc
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._error(method, exc, request_bytes) from None
                if not probed:
                    probed = self._check_speaks_grpc(exc)
        raise RemoteRewardError(
            f"reward server at {self.address} is unavailable: {method} failed after {self.last_attempts} attempts "
            f"({self.retries} retries); last status {last.code().name}: {last.details()}{self._tls_hint(last)}",
            last.code(),
        ) from None

    def _check_speaks_grpc(self, exc: grpc.RpcError) -> bool:
        """Raise :class:`NotGrpcServerError` when the UNAVAILABLE ``exc`` came from a port that
        answered, but not with gRPC; True when the port was probed (once per call is enough)."""
        details = (exc.details() or "").lower()
        not_http2 = not self.tls and any(word in details for word in NOT_HTTP2_WORDS)
        not_tls = self.tls and any(word in details for word in NOT_TLS_WORDS)
        if not (not_http2 or not_tls):
            return False
        status = http_status_line(self.address, min(self.timeout_s, 2.0))
        if status is not None:
            raise NotGrpcServerError(self.address, f'answered HTTP ("{status}" to GET /), not gRPC') from None
        if not_http2:  # a gRPC server's first bytes are HTTP/2, whatever happens to it: retrying will not help
            raise NotGrpcServerError(
                self.address, f"answered with something that is not gRPC (HTTP/2): {exc.details()}", PLAINTEXT_HINT,
            ) from None
        return True

    def _tls_hint(self, exc: grpc.RpcError) -> str:
        """What to check when the connection failed where TLS is the likely cause."""
        details = (exc.details() or "").lower()
        closed = any(word in details for word in ("socket closed", "connection reset", "eof"))
        if not self.tls and closed:
            return PLAINTEXT_HINT
        if self.tls and closed:
            return ("; the server closed the connection during the TLS handshake: does the server want a client "
                    "certificate (tls_cert, tls_key), signed by its reward.server.tls_client_ca?")
        if self.tls and any(word in details for word in ("ssl", "tls", "handshake", "certificate")):
            return ("; the TLS handshake failed: does tls_ca hold the CA that signed the server's certificate, is the "
                    "address a name that certificate covers, and does the server want a client certificate "
                    "(tls_cert, tls_key)?")
        return ""

    def _error(self, method: str, exc: grpc.RpcError, request_bytes: int) -> RemoteRewardError:
        code, details = exc.code(), exc.details()
        where = f"reward server at {self.address}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = (
                f"{where} did not answer {method} within the deadline of {self.timeout_s:g} s (timeout_s); "
                "raise timeout_s or score smaller batches"
            )
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            source = (
                f"the client reads its token from the environment variable {self.token_env}"
                if self.token_env else "the client sends no token: set token_env to the variable holding it"
            )
            message = f"{where} rejected the bearer token ({details}); {source}"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            message = (
                f"{where}: message too large (RESOURCE_EXHAUSTED: {details}); the request is {format_mib(request_bytes)}; "
                f"the server's limit is {SERVER_LIMIT_SETTING}, the client's is {CLIENT_LIMIT_SETTING} "
                f"({format_mib(self.max_message_bytes)}): raise them or score smaller batches"
            )
        else:
            message = f"{where}: {method} failed: {code.name}: {details}"
        return RemoteRewardError(message, code)


__all__ = ["RewardClient", "RemoteRewardError", "NotGrpcServerError", "RemoteScores", "backoff_delay",
           "http_status_line"]
