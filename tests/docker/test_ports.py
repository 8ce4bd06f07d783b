"""Published ports on a real engine: staging's Caddy is reachable on 127.0.0.1 only,
prod's on every interface (README: only prod's Caddy publishes 80/443 publicly).

The declared host ports (prod 80/443, staging 18080/18443) are replaced by free high
ports so the test never collides with a real deployment; the declared host IP and
container ports are kept. "Another interface" is the host's address on the test's own
frontend network, so nothing but this machine is contacted.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.docker.deployment import Deployment
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.docker]

CONNECT_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 15.0
# Caddy's stand-in serves both container ports (as root with only NET_BIND_SERVICE).
SERVE_80_AND_443 = [
    "python3",
    "-c",
    "import http.server, threading\n"
    "def serve(port):\n"
    "    http.server.HTTPServer(('0.0.0.0', port), http.server.SimpleHTTPRequestHandler)"
    ".serve_forever()\n"
    "threading.Thread(target=serve, args=(443,), daemon=True).start()\n"
    "serve(80)\n",
]
# README: what each stack's Caddy publishes, by container port -> host IP.
EXPECTED_HOST_IP = {"staging": "127.0.0.1", "prod": "0.0.0.0"}  # noqa: S104
# README: container port -> declared host port (staging: offset 10000 onto 8080/8443).
EXPECTED_HOST_PORTS = {"staging": {80: 18080, 443: 18443}, "prod": {80: 80, 443: 443}}


def outcome(address: str, port: int) -> str:
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def answers_http(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S) as conn:
            conn.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            return conn.recv(5) == b"HTTP/"
    except OSError:
        return False


def wait_serving(address: str, port: int) -> None:
    """Until the stand-in itself answers: Docker's userland proxy accepts a connection on
    the published port before the container listens, so "connected" alone proves
    nothing (and a DNAT'ed connection from another interface is refused meanwhile)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not answers_http(address, port):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answers HTTP on {address}:{port}")
        time.sleep(0.2)


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_caddy_publishes_on_the_declared_interfaces(deployment: Deployment, stack: str) -> None:
    name = f"rag-{stack}-caddy"
    declared = deployment.declared(stack, name)["ports"]
    assert {int(p["internal"]): int(p["external"]) for p in declared} == EXPECTED_HOST_PORTS[stack]
    test_ports = {int(p["external"]): free_port() for p in declared}
    plan = deployment.plan(stack, name, process=SERVE_80_AND_443, host_ports=test_ports)
    container = deployment.start(stack, plan)

    bindings = deployment.docker.inspect("container", container)["NetworkSettings"]["Ports"]
    host_ip = EXPECTED_HOST_IP[stack]
    elsewhere = deployment.gateway_of(deployment.rename(f"rag-{stack}-frontend"))
    for port in declared:
        internal, host_port = int(port["internal"]), test_ports[int(port["external"])]
        assert bindings[f"{internal}/tcp"] == [{"HostIp": host_ip, "HostPort": str(host_port)}]
        published = deployment.docker.run("port", container, f"{internal}/tcp").splitlines()
        assert f"{host_ip}:{host_port}" in published, published

        wait_serving("127.0.0.1", host_port)
        seen_elsewhere = outcome(elsewhere, host_port)
        if host_ip == "127.0.0.1":
            assert seen_elsewhere != "connected", (elsewhere, host_port)
        else:
            assert seen_elsewhere == "connected", (elsewhere, host_port)
    # Nothing else of the container is published.
    assert sorted(bindings) == ["443/tcp", "80/tcp"]
