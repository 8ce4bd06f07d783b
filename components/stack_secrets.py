"""Per-stack generated secrets (pulumi-random): one set per stack, never shared.

Every value is re-wrapped with ``Output.secret`` although the random provider already
marks ``result`` secret: anything derived from these stays secret even where a
provider (or the test mocks) would drop the marking.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_random as random

from components.config import StackConfig

# Redis ACL users, one per client, so a leaked credential names its source.
REDIS_USERS = ("app", "exporter", "backup")


@dataclass(frozen=True)
class StackSecretsArgs:
    config: StackConfig


class StackSecrets(pulumi.ComponentResource):
    postgres_password: pulumi.Output[str]  # the bootstrap superuser's (migration only)
    postgres_app_password: pulumi.Output[str]
    postgres_backup_password: pulumi.Output[str]
    postgres_monitor_password: pulumi.Output[str]
    redis_passwords: dict[str, pulumi.Output[str]]
    data_encryption_key: pulumi.Output[str]
    backup_passphrase: pulumi.Output[str]

    def __init__(
        self, name: str, args: StackSecretsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:StackSecrets", name, None, opts)
        stack = args.config.stack

        def password(purpose: str, length: int, irreplaceable: bool = False) -> pulumi.Output[str]:
            # Alphanumeric only: the values land in URLs, pgpass and ACL files unescaped.
            generated = random.RandomPassword(
                f"rag-{stack}-{purpose}",
                length=length,
                special=False,
                # A lost key cannot be re-made: protected (CONTRIBUTING.md, renames).
                opts=pulumi.ResourceOptions(parent=self, protect=irreplaceable),
            )
            return pulumi.Output.secret(generated.result)

        self.postgres_password = password("postgres-password", 32)
        self.postgres_app_password = password("postgres-app-password", 32)
        self.postgres_backup_password = password("postgres-backup-password", 32)
        self.postgres_monitor_password = password("postgres-monitor-password", 32)
        self.redis_passwords = {
            user: password(f"redis-{user}-password", 32) for user in REDIS_USERS
        }
        # Passwords are replaceable (the migration and the ACL file set new ones); these two
        # are not: pgcrypto rows and every backup are encrypted with them.
        self.data_encryption_key = password("data-encryption-key", 48, irreplaceable=True)
        self.backup_passphrase = password("backup-passphrase", 64, irreplaceable=True)

        self.register_outputs(
            {
                "postgresPassword": self.postgres_password,
                "dataEncryptionKey": self.data_encryption_key,
                "backupPassphrase": self.backup_passphrase,
            }
        )
