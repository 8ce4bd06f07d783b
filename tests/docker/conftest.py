"""Fixtures for the tests that run the program's declarations on a real Docker engine.

- ``docker_cli``: a reachable engine. When ``docker info`` fails and we are root, dockerd
  is started in the background (log in a temp file) and stopped at the end -- only when
  this session started it. No engine: skip locally, fail in CI (``tools_required()``).
- ``tools_image``: the test image, built once per machine (see images.py).
- ``programs``: both stacks' declarations from the real __main__.py under mocks.
- ``deployment``: per test, the session's namespace (``ragtest-<id>-``) and a record of
  every Docker object the test makes; all of them are removed afterwards, pass or fail.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker.deployment import Deployment
from tests.docker.engine import DockerCli, DockerObjects, remove_abandoned
from tests.docker.images import ensure_tools_image
from tests.docker.translate import Renamer
from tests.pulumi_harness import ProgramRun, run_program
from tests.servers import log_tail, stop_process
from tests.tooling import require_tool, tools_required

DOCKERD_START_TIMEOUT_S = 60.0
STACKS = ("staging", "prod")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "docker: runs the program's containers on a real Docker engine"
    )


def _unavailable(message: str) -> None:
    if tools_required():
        pytest.fail(message)
    pytest.skip(message)


def _engine_answers(cli: DockerCli) -> bool:
    try:
        return cli.call("info", timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _tidied(cli: DockerCli) -> DockerCli:
    removed = remove_abandoned(cli)
    if removed:
        print(f"[tests/docker] removed what killed test sessions left: {', '.join(removed)}")
    return cli


@pytest.fixture(scope="session")
def docker_cli() -> Iterator[DockerCli]:
    cli = DockerCli(require_tool("docker"))
    if _engine_answers(cli):
        yield _tidied(cli)
        return
    if os.geteuid() != 0:
        _unavailable("no Docker engine answers and only root may start dockerd")
    dockerd = require_tool("dockerd")
    log = Path(tempfile.mkstemp(prefix="rag-test-dockerd-", suffix=".log")[1])
    print(f"[tests/docker] starting dockerd, log in {log}")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + DOCKERD_START_TIMEOUT_S
        while not _engine_answers(cli):
            if proc.poll() is not None or time.monotonic() > deadline:
                _unavailable(f"dockerd did not come up (see {log}):\n{log_tail(log)}")
            time.sleep(0.5)
        yield _tidied(cli)
    finally:
        stop_process(proc, 15)


@pytest.fixture(scope="session")
def tools_image(docker_cli: DockerCli) -> str:
    return ensure_tools_image(docker_cli)


@pytest.fixture(scope="session")
def programs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


@pytest.fixture(scope="session")
def session_id() -> str:
    """6 hex digits naming everything this session makes (``ragtest-<id>-...``)."""
    return secrets.token_hex(3)


@pytest.fixture(scope="session")
def session_prefix(session_id: str) -> str:
    return f"ragtest-{session_id}-"


@pytest.fixture
def deployment(
    docker_cli: DockerCli,
    tools_image: str,
    programs: dict[str, ProgramRun],
    session_prefix: str,
) -> Iterator[Deployment]:
    objects = DockerObjects(docker_cli, session_prefix.rstrip("-"))
    try:
        yield Deployment(docker_cli, objects, Renamer(session_prefix), tools_image, programs)
    finally:
        errors = objects.remove_all()
        assert not errors, f"cleanup failed: {errors}"
