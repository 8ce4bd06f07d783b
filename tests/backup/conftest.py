"""Fixtures: real PostgreSQL, TLS redis-server with appendonly, a Chroma-like directory, and
the environment the CLI reads (libpq variables, REDIS_URL, key file, BACKUP_DIR...)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.backup.helpers import DATABASE, seed_chroma, seed_postgres, seed_redis
from tests.servers import (
    PostgresServer,
    RedisServer,
    RedisTLSFiles,
    make_tls_files,
    start_postgres,
    start_redis,
)
from tests.tooling import require_tool

KEY = "correct horse battery staple 0451"
# As the deployed server: AOF on. No diskless-sync delay, so backups do not wait 5 s.
REDIS_ARGS = ["--appendonly", "yes", "--repl-diskless-sync-delay", "0"]


@dataclass
class Stack:
    root: Path
    pg: PostgresServer
    redis: RedisServer
    redis_data: Path
    tls: RedisTLSFiles
    chroma_dir: Path
    backup_dir: Path
    metrics_dir: Path
    key_file: Path
    env: dict[str, str]
    redis_servers: list[RedisServer]

    def start_redis(self) -> RedisServer:
        """(Re)start the live redis-server on its data dir, as the deployed one runs."""
        self.redis = start_redis(
            self.redis_data,
            tls=self.tls,
            password=self.redis.password,
            extra_args=REDIS_ARGS,
        )
        self.redis_servers.append(self.redis)
        return self.redis

    def restore_args(self) -> list[str]:
        return ["--redis-data-dir", str(self.redis_data)]


def _require_tools() -> None:
    for tool in (
        "pg_dump",
        "pg_restore",
        "psql",
        "initdb",
        "postgres",
        "redis-server",
        "redis-cli",
        "redis-check-rdb",
        "gpg",
        "zstd",
    ):
        require_tool(tool)


def make_stack(root: Path) -> Generator[Stack, None, None]:
    _require_tools()
    tls = make_tls_files(root / "tls")
    pg = start_postgres(root)
    redis_servers: list[RedisServer] = []
    try:
        redis_data = root / "redis-data"
        redis = start_redis(redis_data, tls=tls, extra_args=REDIS_ARGS)
        redis_servers.append(redis)
        seed_postgres(pg)
        seed_redis(redis)
        chroma_dir = root / "chroma"
        seed_chroma(chroma_dir)
        key_file = root / "backup.key"
        key_file.write_text(KEY + "\n")
        key_file.chmod(0o600)
        redis_password_file = root / "redis.password"
        redis_password_file.write_text(str(redis.password))
        backup_dir = root / "backups"
        metrics_dir = root / "textfile"
        metrics_dir.mkdir()
        env = {
            **pg.env(DATABASE),
            "REDIS_URL": redis.url_without_password,
            "REDIS_PASSWORD_FILE": str(redis_password_file),
            "REDIS_TLS_CA_FILE": str(tls.ca_cert),
            "REDIS_TLS_CERT_FILE": str(tls.client_cert),
            "REDIS_TLS_KEY_FILE": str(tls.client_key),
            "CHROMA_DIR": str(chroma_dir),
            "BACKUP_DIR": str(backup_dir),
            "RAG_BACKUP_KEY_FILE": str(key_file),
            "RAG_BACKUP_METRICS_DIR": str(metrics_dir),
        }
        stack = Stack(
            root,
            pg,
            redis,
            redis_data,
            tls,
            chroma_dir,
            backup_dir,
            metrics_dir,
            key_file,
            env,
            redis_servers,
        )
        yield stack
    finally:
        for server in redis_servers:
            server.stop()
        pg.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from make_stack(tmp_path)
