"""scripts/lib/wait-healthy.sh, which restore-stack.sh uses to bring a stack back: a
service counts as healthy once Docker says so, or, while Docker's first check is still
to come, once its own declared healthcheck passes when run in it now -- both forms
pulumi-docker and the CLI declare (``CMD``, ``CMD-SHELL``), as the container's user."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker.engine import DockerCli
from tests.stack.images import LocalImages
from tests.tooling import require_tool

pytestmark = pytest.mark.stack
LIB = Path(__file__).resolve().parents[2] / "scripts" / "lib" / "wait-healthy.sh"
# Docker's own first check comes this long after start: never during a test.
DOCKER_INTERVAL_NS = 600 * 10**9


class _EngineSocket(http.client.HTTPConnection):
    """The engine's API on its unix socket (the CLI cannot declare a CMD-form check)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def create_with_healthcheck(name: str, image: str, test: list[str], user: str) -> None:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert host.startswith("unix://"), f"DOCKER_HOST {host!r}: a unix socket expected"
    body = {
        "Image": image,
        "User": user,
        "Entrypoint": ["sleep"],
        "Cmd": ["300"],
        "NetworkDisabled": True,
        "Healthcheck": {"Test": test, "Interval": DOCKER_INTERVAL_NS},
    }
    engine = _EngineSocket(host.removeprefix("unix://"))
    try:
        engine.request(
            "POST",
            f"/containers/create?name={name}",
            json.dumps(body),
            {"Content-Type": "application/json"},
        )
        reply = engine.getresponse()
        assert reply.status == 201, reply.read()
    finally:
        engine.close()


@pytest.fixture
def names(docker_cli: DockerCli) -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            docker_cli.call("rm", "-f", name, timeout=60)


def started(docker: DockerCli, names: list[str], image: str, test: list[str], user: str) -> str:
    name = f"ragtest-{secrets.token_hex(3)}-health"
    names.append(name)
    create_with_healthcheck(name, image, test, user)
    docker.run("start", name)
    return name


def run_lib(function: str, container: str) -> subprocess.CompletedProcess[str]:
    bash = require_tool("bash")
    return subprocess.run(
        [bash, "-c", f'source "{LIB}"; {function} "$1"', "wait-healthy", container],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("test", "passes"),
    [
        (["CMD", "test", "-w", "/tmp"], True),
        (["CMD", "test", "-e", "/nonexistent"], False),
        (["CMD-SHELL", 'test "$(id -u)" = 65534 && test -n "$HOME"'], True),
        (["CMD-SHELL", "exit 1"], False),
    ],
)
def test_the_declared_check_run_now_decides_while_docker_has_not_checked_yet(
    docker_cli: DockerCli,
    local_images: LocalImages,
    names: list[str],
    test: list[str],
    passes: bool,
) -> None:
    name = started(docker_cli, names, local_images.shared(), test, "65534:65534")
    status = docker_cli.run("inspect", "--format", "{{.State.Health.Status}}", name).strip()
    assert status == "starting"
    probe = run_lib("passes_own_healthcheck", name)
    assert (probe.returncode == 0) is passes, probe.stderr
    if passes:
        began = time.monotonic()
        waited = run_lib("wait_healthy", name)
        assert (waited.returncode, waited.stdout.strip()) == (0, "healthy"), waited.stderr
        assert time.monotonic() - began < 30  # not Docker's first check, 10 min away


def test_a_container_without_a_healthcheck_is_not_taken_for_healthy(
    docker_cli: DockerCli, local_images: LocalImages, names: list[str]
) -> None:
    name = started(docker_cli, names, local_images.shared(), ["NONE"], "65534:65534")
    probe = run_lib("passes_own_healthcheck", name)
    assert probe.returncode != 0
