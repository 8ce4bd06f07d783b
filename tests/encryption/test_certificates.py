"""Properties of each stack's Redis TLS material, read from the real certificates and keys
(the mocked pulumi-tls issues them from exactly the program's inputs) and compared to what
the spec requires: ECDSA P-256 keys, server names every client dials, 90-day leaves, the CA
flag only on the CA, one CA per stack.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.encryption.conftest import STACKS
from tests.encryption.helpers import other_stack, tls_client_pair, uploaded_files
from tests.pulumi_harness import ProgramRun

LEAF_LIFETIME = dt.timedelta(days=90)
# pulumi-tls starts validity "now"; the mocks backdate a few minutes for clock skew.
LIFETIME_SLACK = dt.timedelta(hours=1)
REDIS_CLIENTS = ("api", "redis-exporter", "backup", "blackbox-exporter")


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _ca(run: ProgramRun) -> x509.Certificate:
    return _cert(uploaded_files(run, "redis")["tls/ca.crt"])


def _server(run: ProgramRun) -> x509.Certificate:
    return _cert(uploaded_files(run, "redis")["tls/server.crt"])


def _leaves(run: ProgramRun) -> dict[str, x509.Certificate]:
    leaves = {"server": _server(run)}
    for client in REDIS_CLIENTS:
        leaves[client] = _cert(tls_client_pair(run, client)[0])
    return leaves


def _all_private_key_pems(run: ProgramRun) -> dict[str, str]:
    """Every key the stack generated, and the keys as the containers receive them."""
    keys = {
        r.name: str(r.state["privateKeyPem"])
        for r in run.of_type("tls:index/privateKey:PrivateKey")
    }
    keys["deployed redis tls/server.key"] = uploaded_files(run, "redis")["tls/server.key"]
    keys["deployed api tls/client.key"] = uploaded_files(run, "api")["tls/client.key"]
    return keys


@pytest.mark.parametrize("stack", STACKS)
def test_every_key_is_ecdsa_p256(stack: str, runs: dict[str, ProgramRun]) -> None:
    keys = _all_private_key_pems(runs[stack])
    # CA + server + one per client, plus the two deployed copies.
    assert len(keys) == 2 + len(REDIS_CLIENTS) + 2
    for name, pem in keys.items():
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), name
        assert key.curve.name == "secp256r1", f"{name}: {key.curve.name}"
    for name, cert in {"ca": _ca(runs[stack]), **_leaves(runs[stack])}.items():
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey), name
        assert public.curve.name == "secp256r1", f"{name}: {public.curve.name}"


@pytest.mark.parametrize("stack", STACKS)
def test_server_certificate_names_every_address_clients_dial(
    stack: str, runs: dict[str, ProgramRun]
) -> None:
    sans = _server(runs[stack]).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    dns_names = set(sans.value.get_values_for_type(x509.DNSName))
    # The container name, the network alias, and localhost for the in-container healthcheck.
    assert {f"rag-{stack}-redis", "redis", "localhost"} <= dns_names
    assert f"rag-{other_stack(stack)}-redis" not in dns_names


@pytest.mark.parametrize("stack", STACKS)
def test_leaf_certificates_live_90_days(stack: str, runs: dict[str, ProgramRun]) -> None:
    for name, cert in _leaves(runs[stack]).items():
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert LEAF_LIFETIME <= lifetime <= LEAF_LIFETIME + LIFETIME_SLACK, f"{name}: {lifetime}"


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_ca_is_a_ca(stack: str, runs: dict[str, ProgramRun]) -> None:
    ca = _ca(runs[stack])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    for name, cert in _leaves(runs[stack]).items():
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is False, name
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is False


@pytest.mark.parametrize("stack", STACKS)
def test_leaves_are_issued_by_their_own_stacks_ca_for_their_role(
    stack: str, runs: dict[str, ProgramRun]
) -> None:
    ca, other_ca = _ca(runs[stack]), _ca(runs[other_stack(stack)])
    for name, cert in _leaves(runs[stack]).items():
        cert.verify_directly_issued_by(ca)
        with pytest.raises((ValueError, InvalidSignature)):
            cert.verify_directly_issued_by(other_ca)
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        needed = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if name == "server"
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        assert needed in usages, name


def test_each_stack_has_its_own_ca(runs: dict[str, ProgramRun]) -> None:
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    public_keys = {stack: _ca(runs[stack]).public_key().public_bytes(pem, raw) for stack in STACKS}
    assert public_keys["staging"] != public_keys["prod"]


@pytest.mark.parametrize("stack", STACKS)
def test_server_and_clients_share_the_exported_ca(stack: str, runs: dict[str, ProgramRun]) -> None:
    run = runs[stack]
    exported, _secret = run.exports["redisCaCertPem"]
    assert uploaded_files(run, "redis")["tls/ca.crt"] == exported
    assert uploaded_files(run, "api")["tls/ca.crt"] == exported
