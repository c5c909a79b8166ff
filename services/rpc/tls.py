"""TLS for the reward service's gRPC, with grpc's own credentials: the server's certificate
and key (and, for mutual TLS, the CA that signed the clients' certificates), the client's CA
bundle (and its own certificate and key). PEM files are read here, and a file that cannot be
read, or is not PEM, is a UserError naming its setting."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.core.errors import UserError


def read_pem(path: str, setting: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UserError(f"{setting}: cannot read {path} ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise UserError(f"{setting}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None, prefix: str) -> grpc.ServerCredentials:
    """TLS with ``cert`` and ``key``; with ``client_ca``, every client must present a
    certificate it signed (mutual TLS). ``prefix``: the settings' section, for errors."""
    pair = (read_pem(key, f"{prefix}.tls_key"), read_pem(cert, f"{prefix}.tls_cert"))
    roots = read_pem(client_ca, f"{prefix}.tls_client_ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(ca: str, cert: str | None, key: str | None, prefix: str) -> grpc.ChannelCredentials:
    """TLS that trusts the CA bundle ``ca``; with ``cert`` and ``key``, the client's own
    certificate for a server that asks for one (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, f"{prefix}.tls_ca"),
        private_key=read_pem(key, f"{prefix}.tls_key") if key else None,
        certificate_chain=read_pem(cert, f"{prefix}.tls_cert") if cert else None,
    )
