"""TLS for the gRPC reward service on real loopback sockets, with certificates made here (a CA,
a server certificate for localhost / 127.0.0.1, a client certificate, and a second CA that
signed neither): scores over TLS equal the in-process ensemble, a plaintext client and a
client trusting the wrong CA fail with errors that say what to check, mutual TLS refuses a
client without a certificate, and a bearer token still counts over TLS."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from services.core.config import RewardConfig, RewardServerConfig, ScorerConfig
from services.core.errors import UserError
from services.reward.ensemble import RewardEnsemble
from services.reward.grpc_client import RemoteRewardError, RewardClient
from services.reward.grpc_server import serve_reward
from services.reward.scorers import build_scorer, resolve_scorer_config
from services.rpc.tls import channel_credentials

PROMPTS = ["12+7=", "3-1=", "5+5=", "9-4="]
COMPLETIONS = ["19", "3", "10", "5"]
TOKEN_ENV, TOKEN = "FLYWHEEL_TEST_TLS_TOKEN", "tls-secret-token"


def _name(common_name: str):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, issuer_key, issuer_name, key, *, ca: bool, hosts: tuple[str, ...] = ()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, key, cert) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: ca, server (cert, key), client (cert, key), other_ca (signed neither)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = tmp_path_factory.mktemp("pki")
    files = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("flywheel test CA", ca_key, None, ca_key, ca=True)
    files["ca"], _ = _write(directory, "ca", ca_key, ca)
    for name, hosts in (("server", ("localhost", "127.0.0.1")), ("client", ())):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}_cert"], files[f"{name}_key"] = _write(
            directory, name, key, _certificate(f"flywheel test {name}", ca_key, ca.subject, key, ca=False, hosts=hosts))
    other_key = ec.generate_private_key(ec.SECP256R1())
    files["other_ca"], _ = _write(directory, "other-ca", other_key,
                                  _certificate("another CA", other_key, None, other_key, ca=True))
    return files


def tls_server(pki, *, client_ca: bool = False, token_env: str | None = None, host: str = "127.0.0.1"):
    server = RewardServerConfig(host=host, port=0, token_env=token_env, tls_cert=pki["server_cert"],
                                tls_key=pki["server_key"], tls_client_ca=pki["ca"] if client_ca else None)
    cfg = RewardConfig(scorers=[ScorerConfig(name="gold"), ScorerConfig(kind="toy_noisy_gold", noise_std=0.5, name="noisy")],
                       aggregate="mean", server=server)
    return cfg, serve_reward(cfg)


def remote(address: str, **fields) -> ScorerConfig:
    return ScorerConfig(kind="remote", address=address, retries=0, timeout_s=10, **fields)


def test_tls_scores_equal_in_process_and_a_plaintext_or_wrong_ca_client_fails_clearly(pki):
    cfg, (server, port) = tls_server(pki)
    address = f"localhost:{port}"
    try:
        direct = RewardEnsemble(cfg).score(PROMPTS, COMPLETIONS)
        scorer = build_scorer(remote(address, tls_ca=pki["ca"]), 0)
        assert scorer.score(PROMPTS, COMPLETIONS) == direct.scores
        member = build_scorer(remote(f"127.0.0.1:{port}", tls_ca=pki["ca"], member="noisy"), 1)  # the IP is in the SAN
        assert member.score(PROMPTS, COMPLETIONS) == direct.member_scores[1]

        with pytest.raises(RemoteRewardError) as plaintext:
            RewardClient(address, timeout_s=10, retries=0).score(PROMPTS, COMPLETIONS)
        assert plaintext.value.code == grpc.StatusCode.UNAVAILABLE
        assert "the client speaks plaintext: if the server uses TLS" in str(plaintext.value), str(plaintext.value)

        wrong_ca = RewardClient(address, timeout_s=10, retries=0, tls=channel_credentials(pki["other_ca"], None, None, "x"))
        with pytest.raises(RemoteRewardError) as untrusted:
            wrong_ca.score(PROMPTS, COMPLETIONS)
        assert untrusted.value.code == grpc.StatusCode.UNAVAILABLE
        assert "the TLS handshake failed: does tls_ca hold the CA" in str(untrusted.value), str(untrusted.value)
    finally:
        server.stop(0)


def test_mutual_tls_needs_a_client_certificate_and_counts_as_authentication(pki):
    # with client certificates required, a non-loopback bind needs no bearer token
    cfg, (server, port) = tls_server(pki, client_ca=True, host="0.0.0.0")
    address = f"localhost:{port}"
    try:
        with pytest.raises(RemoteRewardError) as anonymous:
            build_scorer(remote(address, tls_ca=pki["ca"]), 0).score(PROMPTS, COMPLETIONS)
        assert anonymous.value.code == grpc.StatusCode.UNAVAILABLE
        assert "does the server want a client certificate (tls_cert, tls_key)" in str(anonymous.value)
        with_certificate = build_scorer(remote(address, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                                               tls_key=pki["client_key"]), 0)
        assert with_certificate.score(PROMPTS, COMPLETIONS) == RewardEnsemble(cfg).score(PROMPTS, COMPLETIONS).scores
    finally:
        server.stop(0)


def test_a_bearer_token_over_tls(pki, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _, (server, port) = tls_server(pki, token_env=TOKEN_ENV)
    address = f"localhost:{port}"
    try:
        gold = remote(address, tls_ca=pki["ca"], token_env=TOKEN_ENV, member="gold")
        assert build_scorer(gold, 0).score(["12+7="], ["19"]) == [1.0]
        tls = channel_credentials(pki["ca"], None, None, "x")
        with pytest.raises(RemoteRewardError) as wrong:
            RewardClient(address, 10, 0, token="not-it", token_env=TOKEN_ENV, tls=tls).score(["12+7="], ["19"])
        assert wrong.value.code == grpc.StatusCode.UNAUTHENTICATED and "wrong bearer token" in str(wrong.value)
    finally:
        server.stop(0)


def test_tls_settings_are_checked_before_anything_connects(pki, tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        RewardServerConfig(tls_cert=pki["server_cert"])
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert"):
        RewardServerConfig(tls_client_ca=pki["ca"])
    with pytest.raises(ValueError, match="tls_cert needs tls_ca"):
        remote("localhost:1", tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.tls_ca: .*ca\.txt is not a PEM file"):
        resolve_scorer_config(remote("localhost:1", tls_ca=str(not_pem)), 0)
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.tls_ca: cannot read .*missing\.pem"):
        resolve_scorer_config(remote("localhost:1", tls_ca=str(tmp_path / "missing.pem")), 0)
    bad_server = RewardConfig(server=RewardServerConfig(port=0, token_env=None, tls_cert=str(not_pem),
                                                        tls_key=pki["server_key"]))
    with pytest.raises(UserError, match=r"reward\.server\.tls_cert: .* is not a PEM file"):
        serve_reward(bad_server)
