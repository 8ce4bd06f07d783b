"""Stand-in API for the engine test: /health, /metrics, and /deps, which proves the
container reaches its stack's Redis over TLS (client certificate, ACL password from a
file) and its PostgreSQL (libpq environment + PGPASSFILE). Standard library + redis +
psycopg only."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psycopg
import redis

# The stack runs it on 0.0.0.0:8000; the local test of this app binds loopback instead.
BIND = os.environ.get("STANDIN_BIND", "0.0.0.0")  # noqa: S104
PORT = int(os.environ.get("STANDIN_PORT", "8000"))
_requests = 0
_lock = threading.Lock()


def check_redis() -> str:
    url = urlsplit(os.environ["REDIS_URL"])
    if url.scheme != "rediss":
        raise RuntimeError(f"REDIS_URL scheme is {url.scheme!r}; expected rediss (TLS)")
    with open(os.environ["REDIS_PASSWORD_FILE"], encoding="utf-8") as handle:
        password = handle.read().strip()
    client = redis.Redis(
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
            for name, check in (("redis", check_redis), ("postgres", check_postgres)):
                try:
                    result[name] = check()
                except Exception as exc:
                    result[name] = f"failed: {type(exc).__name__}: {exc}"
            healthy = all(v.startswith("ok") for v in result.values())
            self.reply(200 if healthy else 503, "application/json", result)
        else:
            self.reply(404, "application/json", {"error": f"no route {path}"})

    def reply(self, status: int, content_type: str, body: object) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    ThreadingHTTPServer((BIND, PORT), Handler).serve_forever()
