"""Before a restore, rag-backup refuses while the live Redis still answers. A stopped
container's name that the host's resolver never answers must not hold that check for
30-40 s: a name without an address has no server behind it."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from rag_backup import redis_ops
from rag_backup.redis_ops import RESOLVE_TIMEOUT_S, RedisSettings, remote_answers
from tests.servers import start_redis

pytestmark = pytest.mark.integration


def settings_for(url: str) -> RedisSettings:
    return RedisSettings.from_url(
        url, password_file=None, ca_file=None, cert_file=None, key_file=None
    )


def test_a_running_server_answers_and_a_stopped_one_does_not(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "data")
    # By name, as the stack's job reaches it (localhost: resolved, then PING).
    settings = settings_for(server.url.replace("127.0.0.1", "localhost"))
    try:
        assert remote_answers(settings)
    finally:
        server.stop()
    assert not remote_answers(settings)


def test_a_name_whose_lookup_hangs_is_not_running_within_the_resolve_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def hanging_resolver(*args: Any, **kwargs: Any) -> Any:
        time.sleep(60)  # a resolver that never answers (the name of a stopped container)
        return socket.getaddrinfo("localhost", 6379)

    def no_redis_cli(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("redis-cli run for a name without an address")

    monkeypatch.setattr(redis_ops.socket, "getaddrinfo", hanging_resolver)
    monkeypatch.setattr(redis_ops.subprocess, "run", no_redis_cli)
    started = time.monotonic()
    assert not remote_answers(settings_for("redis://rag-staging-redis:6379/0"))
    assert time.monotonic() - started < RESOLVE_TIMEOUT_S + 2
