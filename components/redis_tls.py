"""Per-stack Redis TLS material from pulumi-tls: a private CA, the server certificate
and one client certificate per client (mutual TLS; Redis's default
``tls-auth-clients yes`` is kept). Each stack has its own CA, so a staging client
cannot complete a handshake with prod.

Rotation: leaf certificates live 90 days and become due 30 days before expiry, the CA
lives 5 years and becomes due 1 year before; a routine ``pulumi up`` inside those windows
replaces them (and, through the config hash, restarts Redis and its clients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_tls as tls

from components.config import StackConfig

# ECDSA P-256: pulumi-tls would default to P-224 if only ECDSA were named.
KEY_ALGORITHM = "ECDSA"
KEY_CURVE = "P256"
LEAF_VALIDITY_HOURS = 90 * 24
LEAF_EARLY_RENEWAL_HOURS = 30 * 24
CA_VALIDITY_HOURS = 5 * 365 * 24
CA_EARLY_RENEWAL_HOURS = 365 * 24
# blackbox-exporter: the TLS probe only completes a handshake (no Redis user), so the
# server certificate's expiry is measured; mutual TLS needs it to show its own cert.
REDIS_CLIENTS = ("api", "redis-exporter", "backup", "blackbox-exporter")


@dataclass(frozen=True)
class RedisTlsArgs:
    config: StackConfig
    clients: Sequence[str] = REDIS_CLIENTS


@dataclass(frozen=True)
class KeyPair:
    cert_pem: pulumi.Output[str]
    key_pem: pulumi.Output[str]  # always a secret Output


class RedisTls(pulumi.ComponentResource):
    ca_cert_pem: pulumi.Output[str]
    server: KeyPair
    clients: dict[str, KeyPair]
    server_dns_names: list[str]

    def __init__(
        self, name: str, args: RedisTlsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:RedisTls", name, None, opts)
        cfg = args.config
        prefix = cfg.resource_name("redis-tls")
        child = pulumi.ResourceOptions(parent=self)

        ca_key = self._key(f"{prefix}-ca-key")
        ca_cert = tls.SelfSignedCert(
            f"{prefix}-ca-cert",
            private_key_pem=ca_key.private_key_pem,
            is_ca_certificate=True,
            subject=tls.SelfSignedCertSubjectArgs(
                common_name=f"personal-rag {cfg.stack} Redis CA",
                organization="personal-rag",
                organizational_unit=cfg.stack,
            ),
            validity_period_hours=CA_VALIDITY_HOURS,
            early_renewal_hours=CA_EARLY_RENEWAL_HOURS,
            allowed_uses=["cert_signing", "crl_signing", "digital_signature"],
            opts=child,
        )
        self.ca_cert_pem = ca_cert.cert_pem
        ca_key_pem: pulumi.Output[str] = pulumi.Output.secret(ca_key.private_key_pem)

        # Every name a client may dial: container name, the network alias, loopback
        # (the healthcheck runs inside the Redis container).
        self.server_dns_names = [cfg.resource_name("redis"), "redis", "localhost"]
        self.server = self._leaf(
            f"{prefix}-server",
            common_name=cfg.resource_name("redis"),
            dns_names=self.server_dns_names,
            ip_addresses=["127.0.0.1"],
            # client_auth too: the healthcheck's redis-cli presents the server's pair.
            uses=["digital_signature", "key_encipherment", "server_auth", "client_auth"],
            ca_key_pem=ca_key_pem,
            ca_cert_pem=ca_cert.cert_pem,
        )
        self.clients = {
            client: self._leaf(
                f"{prefix}-client-{client}",
                common_name=cfg.resource_name(client),
                dns_names=[],
                ip_addresses=[],
                uses=["digital_signature", "key_encipherment", "client_auth"],
                ca_key_pem=ca_key_pem,
                ca_cert_pem=ca_cert.cert_pem,
            )
            for client in args.clients
        }
        self.register_outputs({"caCertPem": self.ca_cert_pem})

    def _key(self, name: str) -> tls.PrivateKey:
        return tls.PrivateKey(
            name,
            algorithm=KEY_ALGORITHM,
            ecdsa_curve=KEY_CURVE,
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _leaf(
        self,
        name: str,
        common_name: str,
        dns_names: list[str],
        ip_addresses: list[str],
        uses: list[str],
        ca_key_pem: pulumi.Output[str],
        ca_cert_pem: pulumi.Output[str],
    ) -> KeyPair:
        child = pulumi.ResourceOptions(parent=self)
        key = self._key(f"{name}-key")
        request = tls.CertRequest(
            f"{name}-csr",
            private_key_pem=key.private_key_pem,
            subject=tls.CertRequestSubjectArgs(
                common_name=common_name, organization="personal-rag"
            ),
            dns_names=dns_names or None,
            ip_addresses=ip_addresses or None,
            opts=child,
        )
        cert = tls.LocallySignedCert(
            f"{name}-cert",
            cert_request_pem=request.cert_request_pem,
            ca_private_key_pem=ca_key_pem,
            ca_cert_pem=ca_cert_pem,
            validity_period_hours=LEAF_VALIDITY_HOURS,
            early_renewal_hours=LEAF_EARLY_RENEWAL_HOURS,
            allowed_uses=uses,
            opts=child,
        )
        return KeyPair(cert_pem=cert.cert_pem, key_pem=pulumi.Output.secret(key.private_key_pem))
