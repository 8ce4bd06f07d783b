"""Staging and prod cannot reach each other, and the backend network has no way out,
on a real Docker engine with the networks and attachments the program declares.

Stand-ins: a real redis-server for each stack's ``redis`` (the declared container, its
process replaced: plain TCP, so a connect is the whole question) and an idle process for
each ``api``, attached exactly as declared (default bridge swapped for the declared
networks and aliases, as pulumi-docker does).

Known gap, kept as a strict xfail: on this engine (Docker 20.10) ``internal`` stops
forwarded traffic only; a backend container still reaches services listening on the
Docker host itself (any host address, e.g. a network's gateway).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.docker.deployment import REACHED, Deployment
from tests.docker.outside import outside_host

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REDIS_PORT = 6379
REDIS_STANDIN = ["redis-server", "--port", "6379", "--protected-mode", "no", "--save", ""]
IDLE = ["sleep", "infinity"]
READY_TIMEOUT_S = 15.0


def wait_connected(deployment: Deployment, container: str, target: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        outcome = deployment.connect_probe(container, [target])[target]["outcome"]
        if outcome == "connected":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{container} never connected to {target}: {outcome}")
        time.sleep(0.3)


def start_stack_pair(deployment: Deployment, stack: str) -> tuple[str, str]:
    """The stack's redis stand-in and its api stand-in, both running."""
    redis = deployment.start(
        stack, deployment.plan(stack, f"rag-{stack}-redis", process=REDIS_STANDIN)
    )
    api = deployment.start(stack, deployment.plan(stack, f"rag-{stack}-api", process=IDLE))
    return redis, api


def test_stacks_reach_only_their_own_redis(deployment: Deployment) -> None:
    rename = deployment.rename
    pairs = {stack: start_stack_pair(deployment, stack) for stack in ("staging", "prod")}
    for stack, other in (("staging", "prod"), ("prod", "staging")):
        own_redis, api = pairs[stack]
        other_redis, _ = pairs[other]
        own_backend = rename(f"rag-{stack}-backend")
        other_backend = rename(f"rag-{other}-backend")
        own_ip = deployment.ip_on(own_redis, own_backend)
        other_ip = deployment.ip_on(other_redis, other_backend)
        wait_connected(deployment, api, f"{own_redis}:{REDIS_PORT}")

        by_name, by_alias, by_ip = (f"{h}:{REDIS_PORT}" for h in (own_redis, "redis", own_ip))
        other_by_name, other_by_ip = f"{other_redis}:{REDIS_PORT}", f"{other_ip}:{REDIS_PORT}"
        # Every address the other redis has (only its backend one, unless it stayed on
        # Docker's default bridge too).
        other_by_any_ip = [
            f"{ip}:{REDIS_PORT}" for ip in deployment.addresses(other_redis).values()
        ]
        targets = [by_name, by_alias, by_ip, other_by_name, other_by_ip, *other_by_any_ip]
        seen = deployment.connect_probe(api, targets)

        # Its own redis: by container name, by the declared alias (which resolves to
        # this stack's redis, not the other stack's same alias) and by IP.
        assert seen[by_name] == {"outcome": "connected", "address": own_ip}, (stack, seen)
        assert seen[by_alias] == {"outcome": "connected", "address": own_ip}, (stack, seen)
        assert seen[by_ip]["outcome"] == "connected", (stack, seen)
        # The other stack's: its name does not resolve, its address cannot be reached.
        assert seen[other_by_name]["outcome"] == "no-dns", (stack, seen)
        for target in (other_by_ip, *other_by_any_ip):
            assert seen[target]["outcome"] not in REACHED, (stack, target, seen)
        # And the other stack's api does reach it: the refusal above is isolation,
        # not a dead server.
        wait_connected(deployment, pairs[other][1], other_by_ip)


@contextmanager
def host_listener(address: str) -> Iterator[int]:
    """A TCP listener on the host at ``address`` (a test network's gateway); its port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((address, 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def start_backend_and_frontend(deployment: Deployment, stack: str) -> tuple[str, str, str]:
    """PostgreSQL (declared on the backend only), Caddy (frontend only) and the api
    (both), each with a listener: Caddy on 80, the api on 8000."""
    postgres = deployment.start(
        stack, deployment.plan(stack, f"rag-{stack}-postgres", process=IDLE)
    )
    caddy = deployment.start(stack, deployment.plan(stack, f"rag-{stack}-caddy", process=http(80)))
    api = deployment.start(stack, deployment.plan(stack, f"rag-{stack}-api", process=http(8000)))
    networks = deployment.docker.inspect("container", postgres)["NetworkSettings"]["Networks"]
    assert set(networks) == {deployment.rename(f"rag-{stack}-backend")}
    return postgres, caddy, api


def http(port: int) -> list[str]:
    # Inside the container, on its test networks only.
    return ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(port)]  # noqa: S104


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_backend_has_no_egress(deployment: Deployment, session_id: str, stack: str) -> None:
    """From the backend-only container, neither an address outside Docker nor a
    frontend-only container is reachable; the api, also on the frontend, reaches both
    (so the outside stand-in and Caddy do answer), and PostgreSQL reaches the api."""
    postgres, caddy, api = start_backend_and_frontend(deployment, stack)
    caddy_by_ip = f"{deployment.ip_on(caddy, deployment.rename(f'rag-{stack}-frontend'))}:80"
    with outside_host(session_id, sys.executable) as outside:
        wait_connected(deployment, api, outside.target)
        wait_connected(deployment, api, caddy_by_ip)
        wait_connected(deployment, postgres, f"{api}:8000")

        seen = deployment.connect_probe(postgres, [outside.target, caddy_by_ip, f"{caddy}:80"])
    assert seen[outside.target]["outcome"] not in REACHED, seen
    assert seen[caddy_by_ip]["outcome"] not in REACHED, seen
    assert seen[f"{caddy}:80"]["outcome"] == "no-dns", seen


def test_host_firewall_script_closes_the_host_to_the_backend(deployment: Deployment) -> None:
    """Docker's internal networks block forwarding but not the host itself (measured on
    Docker 20.10: backend containers reached a listener on the host). The documented fix,
    scripts/host-firewall.sh on the backend bridge's interface (the program names it), must
    close that path and leave traffic inside the stack alone."""
    postgres, _, api = start_backend_and_frontend(deployment, "staging")
    backend = deployment.rename("rag-staging-backend")
    interface = deployment.bridge_interface(backend)
    gateway = deployment.gateway_of(backend)
    script = str(REPO / "scripts" / "host-firewall.sh")
    with host_listener(gateway) as port:
        target = f"{gateway}:{port}"
        subprocess.run(["bash", script, interface], check=True, timeout=30)
        try:
            seen = deployment.connect_probe(postgres, [target, f"{api}:8000"])
        finally:
            subprocess.run(["bash", script, "--remove", interface], check=True, timeout=30)
    assert seen[target]["outcome"] not in REACHED, seen
    assert seen[f"{api}:8000"]["outcome"] in REACHED, seen
