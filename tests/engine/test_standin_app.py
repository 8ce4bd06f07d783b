"""The engine test's stand-in app, run here against a real TLS-only redis-server and a
real PostgreSQL, so a failure in the engine job means the stack, not the stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, make_tls_files, start_postgres, start_redis

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parent / "app" / "app.py"


def get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:  # noqa: S310 (loopback http)
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def run_app(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(APP)],
        env={**os.environ, **env, "STANDIN_BIND": "127.0.0.1", "STANDIN_PORT": str(port)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                get(base + "/health")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Env for the app as the stack gives it: rediss URL + TLS files + password file,
    libpq variables + PGPASSFILE."""
    tls = make_tls_files(tmp_path / "tls")
    redis_server = start_redis(tmp_path / "redis", tls=tls)
    try:
        postgres = start_postgres(tmp_path)
        try:
            password_file = tmp_path / "redis_password"
            password_file.write_text(redis_server.password or "")
            yield {
                "REDIS_URL": f"rediss://default@{redis_server.host}:{redis_server.port}/0",
                "REDIS_PASSWORD_FILE": str(password_file),
                "REDIS_TLS_CA_FILE": str(tls.ca_cert),
                "REDIS_TLS_CERT_FILE": str(tls.client_cert),
                "REDIS_TLS_KEY_FILE": str(tls.client_key),
                **postgres.env(),
            }
        finally:
            postgres.stop()
    finally:
        redis_server.stop()


def test_deps_reports_redis_over_tls_and_postgres(stores: dict[str, str]) -> None:
    for base in run_app(stores):
        assert get(base + "/health") == (200, {"status": "ok"})
        assert get(base + "/deps") == (200, {"redis": "ok (tls)", "postgres": "ok (postgres)"})
        with urllib.request.urlopen(base + "/metrics", timeout=10) as reply:  # noqa: S310
            assert b"rag_standin_requests_total " in reply.read()


def test_deps_fails_with_the_reason_when_a_store_is_unreachable(
    stores: dict[str, str], tmp_path: Path
) -> None:
    wrong_password = tmp_path / "wrong"
    wrong_password.write_text("not-the-password")
    broken = {**stores, "REDIS_PASSWORD_FILE": str(wrong_password), "PGPORT": str(free_port())}
    for base in run_app(broken):
        status, deps = get(base + "/deps")
        assert status == 503
        assert deps["redis"].startswith("failed: AuthenticationError")
        assert deps["postgres"].startswith("failed: OperationalError")


def test_deps_refuses_a_plaintext_redis_url(stores: dict[str, str]) -> None:
    plaintext = {**stores, "REDIS_URL": stores["REDIS_URL"].replace("rediss://", "redis://")}
    for base in run_app(plaintext):
        status, deps = get(base + "/deps")
        assert status == 503
        assert "expected rediss (TLS)" in deps["redis"]
