"""Stand-in API (the demo app and the engine tests' api): /health, /metrics, and /deps,
which proves the container reaches its stack's Redis over TLS (client certificate, ACL
password from a file) and its PostgreSQL (libpq environment + PGPASSFILE), with pgcrypto
when DATA_ENCRYPTION_KEY_FILE is set. ``PUT /markers/NAME`` writes a marker into each store
(a pgcrypto-encrypted row, a Redis key, a file in the Chroma directory) and
``GET /markers/NAME`` says which store has it: what a restore must bring back;
``DELETE /markers/NAME`` loses it from every store.
Standard library + redis + psycopg only."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redis

# The stack runs it on 0.0.0.0:8000; the local test of this app binds loopback instead.
BIND = os.environ.get("STANDIN_BIND", "0.0.0.0")  # noqa: S104
PORT = int(os.environ.get("STANDIN_PORT", "8000"))
_requests = 0
_lock = threading.Lock()


MARKER_NAME = re.compile(r"[a-z0-9-]{1,64}")


def redis_client() -> redis.Redis:
    url = urlsplit(os.environ["REDIS_URL"])
    if url.scheme != "rediss":
        raise RuntimeError(f"REDIS_URL scheme is {url.scheme!r}; expected rediss (TLS)")
    with open(os.environ["REDIS_PASSWORD_FILE"], encoding="utf-8") as handle:
        password = handle.read().strip()
    return redis.Redis(
        host=url.hostname or "",
        port=url.port or 6379,
        username=url.username,
        password=password,
        ssl=True,
        ssl_cert_reqs="required",
        ssl_ca_certs=os.environ["REDIS_TLS_CA_FILE"],
        ssl_certfile=os.environ["REDIS_TLS_CERT_FILE"],
        ssl_keyfile=os.environ["REDIS_TLS_KEY_FILE"],
        socket_timeout=5,
        socket_connect_timeout=5,
    )


def check_redis() -> str:
    client = redis_client()
    try:
        client.set("standin:probe", "ok", ex=60)
        value = client.get("standin:probe")
    finally:
        client.close()
    if value != b"ok":
        raise RuntimeError(f"Redis read back {value!r}")
    return "ok (tls)"


def check_postgres() -> str:
    # Empty conninfo: libpq takes PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSFILE from env.
    with psycopg.connect("", connect_timeout=5) as conn:
        row = conn.execute("select current_database()").fetchone()
    return f"ok ({row[0] if row else '?'})"


def data_key() -> str:
    with open(os.environ["DATA_ENCRYPTION_KEY_FILE"], encoding="utf-8") as handle:
        return handle.read().strip()


def check_pgcrypto() -> str:
    with psycopg.connect("", connect_timeout=5) as conn:
        row = conn.execute(
            "select pgp_sym_decrypt(pgp_sym_encrypt('probe', %(k)s), %(k)s)", {"k": data_key()}
        ).fetchone()
    if not row or row[0] != "probe":
        raise RuntimeError(f"pgcrypto round trip returned {row!r}")
    return "ok"


def chroma_marker(name: str) -> Path:
    return Path(os.environ["CHROMA_PERSIST_DIR"]) / "markers" / name


def write_marker(name: str) -> dict[str, str]:
    with psycopg.connect("", connect_timeout=5) as conn:
        conn.execute(
            "create table if not exists markers (name text primary key, sealed bytea not null)"
        )
        conn.execute(
            "insert into markers values (%(n)s, pgp_sym_encrypt(%(n)s, %(k)s))"
            " on conflict (name) do update set sealed = excluded.sealed",
            {"n": name, "k": data_key()},
        )
    client = redis_client()
    try:
        client.set(f"marker:{name}", name)
    finally:
        client.close()
    path = chroma_marker(name)
    path.parent.mkdir(exist_ok=True)
    path.write_text(name)
    return read_marker(name)


def delete_marker(name: str) -> dict[str, str]:
    """Data loss, as a bug or a user would cause it: the marker gone from every store."""
    with psycopg.connect("", connect_timeout=5) as conn:
        conn.execute(
            "create table if not exists markers (name text primary key, sealed bytea not null)"
        )
        conn.execute("delete from markers where name = %(n)s", {"n": name})
    client = redis_client()
    try:
        client.delete(f"marker:{name}")
    finally:
        client.close()
    chroma_marker(name).unlink(missing_ok=True)
    return read_marker(name)


def read_marker(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        with psycopg.connect("", connect_timeout=5, autocommit=True) as conn:
            row = conn.execute("select sealed from markers where name = %(n)s", {"n": name})
            sealed = row.fetchone()
            if sealed is None:
                found["postgres"] = "absent"
            else:
                try:
                    opened = conn.execute(
                        "select pgp_sym_decrypt(%(s)s, %(k)s)", {"s": sealed[0], "k": data_key()}
                    ).fetchone()
                    found["postgres"] = "present" if opened and opened[0] == name else "altered"
                except psycopg.errors.ExternalRoutineInvocationException:
                    # pgcrypto: "Wrong key or corrupt data" (e.g. another stack's rows).
                    found["postgres"] = "sealed with another key"
    except psycopg.errors.UndefinedTable:
        found["postgres"] = "absent"
    client = redis_client()
    try:
        found["redis"] = "present" if client.get(f"marker:{name}") == name.encode() else "absent"
    finally:
        client.close()
    path = chroma_marker(name)
    found["chroma"] = "present" if path.is_file() and path.read_text() == name else "absent"
    return found


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        global _requests
        with _lock:
            _requests += 1
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.reply(200, "application/json", {"status": "ok"})
        elif path == "/metrics":
            body = (
                "# HELP rag_standin_requests_total Requests served.\n"
                "# TYPE rag_standin_requests_total counter\n"
                f"rag_standin_requests_total {_requests}\n"
            )
            self.reply(200, "text/plain; version=0.0.4", body)
        elif path == "/deps":
            result: dict[str, str] = {}
            checks = [("redis", check_redis), ("postgres", check_postgres)]
            if os.environ.get("DATA_ENCRYPTION_KEY_FILE"):
                checks.append(("pgcrypto", check_pgcrypto))
            for name, check in checks:
                try:
                    result[name] = check()
                except Exception as exc:
                    result[name] = f"failed: {type(exc).__name__}: {exc}"
            healthy = all(v.startswith("ok") for v in result.values())
            self.reply(200 if healthy else 503, "application/json", result)
        elif path.startswith("/markers/") and MARKER_NAME.fullmatch(path[9:]):
            self.reply_with(read_marker, path[9:])
        else:
            self.reply(404, "application/json", {"error": f"no route {path}"})

    def do_DELETE(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/markers/") and MARKER_NAME.fullmatch(path[9:]):
            self.reply_with(delete_marker, path[9:])
        else:
            self.reply(404, "application/json", {"error": f"no route {path}"})

    def do_PUT(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/markers/") and MARKER_NAME.fullmatch(path[9:]):
            self.reply_with(write_marker, path[9:])
        else:
            self.reply(404, "application/json", {"error": f"no route {path}"})

    def reply_with(self, action: Callable[[str], dict[str, str]], name: str) -> None:
        """200 with what ``action`` found, or 500 naming the store's error (not a dropped
        connection, which the proxy can only call a 502)."""
        try:
            found = action(name)
        except Exception as exc:
            self.reply(500, "application/json", {"error": f"{type(exc).__name__}: {exc}"})
            return
        self.reply(200, "application/json", found)

    def reply(self, status: int, content_type: str, body: object) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _stop(signum: int, frame: object) -> None:
    # As a container's PID 1, SIGTERM has no default action: without a handler `docker stop`
    # waits out its grace period and kills the api (exit 137).
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    ThreadingHTTPServer((BIND, PORT), Handler).serve_forever()
