"""A stand-in for "anywhere outside Docker": a network namespace on this machine, joined
to the host by a veth pair and routed like any external address (TEST-NET-2,
198.51.100.0/24, which is never a real host). A container whose network has egress
reaches it through the host's forwarding and NAT, exactly as it would reach the
internet; an internal network's container must not. Nothing leaves this machine.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.tooling import require_tool

LISTEN_PORT = 8080
READY_TIMEOUT_S = 10.0

LISTENER = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(16)
while True:
    conn, _ = server.accept()
    conn.close()
"""


@dataclass(frozen=True)
class OutsideHost:
    address: str
    port: int

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"


@contextmanager
def outside_host(session_id: str, python: str) -> Iterator[OutsideHost]:
    """``session_id``: 6 hex digits (names stay under the 15-character limit)."""
    ip = require_tool("ip")
    namespace = f"ragtest-{session_id}-outside"
    host_side, ns_side = f"rt{session_id}h", f"rt{session_id}n"
    base = 4 * (int(session_id, 16) % 64)  # one /30 of 198.51.100.0/24 per session
    host_address, address = f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"

    def run(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True, timeout=15)

    listener: subprocess.Popen[bytes] | None = None
    run("netns", "add", namespace)
    try:
        run("link", "add", host_side, "type", "veth", "peer", "name", ns_side)
        run("link", "set", ns_side, "netns", namespace)
        run("addr", "add", f"{host_address}/30", "dev", host_side)
        run("link", "set", host_side, "up")
        in_ns = ("netns", "exec", namespace, ip)
        run(*in_ns, "addr", "add", f"{address}/30", "dev", ns_side)
        run(*in_ns, "link", "set", ns_side, "up")
        run(*in_ns, "route", "add", "default", "via", host_address)
        listener = subprocess.Popen(
            [ip, "netns", "exec", namespace, python, "-c", LISTENER, address, str(LISTEN_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((address, LISTEN_PORT), timeout=0.5):
                    break
            except OSError:
                if listener.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no listener at {address}:{LISTEN_PORT}") from None
                time.sleep(0.1)
        yield OutsideHost(address, LISTEN_PORT)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        # Deleting the namespace deletes the veth pair with it.
        subprocess.run([ip, "netns", "del", namespace], capture_output=True, timeout=15)
        subprocess.run([ip, "link", "del", host_side], capture_output=True, timeout=15)
