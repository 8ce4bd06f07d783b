"""Requests a user makes against a deployed stack: HTTPS through its Caddy, verified
against Caddy's own CA, to the published loopback port."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.stack.apply import Applied, StackApplier

CADDY_ROOT_CA = "/data/caddy/pki/authorities/local/root.crt"
HTTPS_PORT_IN_CONTAINER = 443


class _PinnedHostConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port, with SNI and certificate check for ``server_name``."""

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, timeout=20, context=context)
        self.server_name = server_name
        self.tls_context = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock = self.tls_context.wrap_socket(raw, server_hostname=self.server_name)


def caddy_https_port(applier: StackApplier, applied: Applied) -> int:
    caddy = applied.inputs[f"rag-{applied.stack}-caddy"]
    for port in caddy["ports"]:
        if int(port["internal"]) == HTTPS_PORT_IN_CONTAINER:
            return applied.host_ports[int(port["external"])]
    raise KeyError("Caddy publishes no HTTPS port")


def caddy_request(
    applier: StackApplier,
    applied: Applied,
    domain: str,
    method: str,
    path: str,
    timeout: float = 60,
) -> tuple[int, Any]:
    """``method path`` through the stack's Caddy over verified HTTPS; (status, JSON)."""
    caddy = applied.containers[f"rag-{applied.stack}-caddy"]
    port = caddy_https_port(applier, applied)
    deadline = time.monotonic() + timeout
    while True:
        # Caddy issues its internal certificate shortly after start.
        done = applier.docker.call("exec", caddy, "cat", CADDY_ROOT_CA, timeout=30)
        try:
            if done.returncode != 0:
                raise OSError(done.stderr.decode(errors="replace"))
            with tempfile.TemporaryDirectory() as tmp:
                ca = Path(tmp) / "root.crt"
                ca.write_bytes(done.stdout)
                context = ssl.create_default_context(cafile=str(ca))
            conn = _PinnedHostConnection(port, domain, context)
            try:
                conn.request(method, path, headers={"Host": domain})
                reply = conn.getresponse()
                body = reply.read()
            finally:
                conn.close()
            return reply.status, json.loads(body) if body else None
        except (OSError, ssl.SSLError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
