"""A test session killed before its cleanup (SIGKILL, a lost machine session) leaves its
containers, networks and volumes on the engine, and the containers' restart policies bring
them back whenever dockerd restarts: a backup container's schedule then runs beside every
later session and its benchmarks. The next session removes what such a session left, and
only that: never what a live session (a parallel run in another worktree) or another
machine made."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.docker import engine
from tests.docker.engine import DockerCli, DockerObjects

pytestmark = [pytest.mark.integration, pytest.mark.docker]


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _make_all(objects: DockerObjects, image: str, name: str) -> dict[str, str]:
    made = {
        "network": objects.create_network(f"{name}-net", internal=True),
        "volume": objects.create_volume(f"{name}-vol"),
    }
    made["container"] = objects.create_container(
        f"{name}-ctr", ["--restart", "unless-stopped", "--network", made["network"],
                        "-v", f"{made['volume']}:/data", image, "true"],
    )  # fmt: skip
    return made


def test_what_a_killed_session_left_is_removed_and_nothing_else(
    docker_cli: DockerCli, tools_image: str, session_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = DockerObjects(docker_cli, session_prefix + "hygiene-live")
    killed = DockerObjects(docker_cli, session_prefix + "hygiene-killed")
    elsewhere = DockerObjects(docker_cli, session_prefix + "hygiene-elsewhere")
    try:
        mine = _make_all(live, tools_image, f"{session_prefix}live")
        dead_pid = _gone_pid()
        with monkeypatch.context() as patch:
            patch.setattr(engine.os, "getpid", lambda: dead_pid)
            left = _make_all(killed, tools_image, f"{session_prefix}killed")
            patch.setattr(engine.socket, "gethostname", lambda: "another-machine")
            other = _make_all(elsewhere, tools_image, f"{session_prefix}elsewhere")

        found = engine.abandoned(docker_cli)
        for kind, name in left.items():
            assert name in found.get(kind, []), (kind, name, found)
        for kind, name in (*mine.items(), *other.items()):
            assert name not in found.get(kind, []), (kind, name)
        removed = engine.remove_abandoned(docker_cli)

        for kind, name in left.items():
            assert f"{kind} {name}" in removed
            assert not docker_cli.exists(kind, name), (kind, name)
        for kind, name in (*mine.items(), *other.items()):
            assert docker_cli.exists(kind, name), (kind, name)
        assert socket.gethostname() != "another-machine"
    finally:
        errors = [*live.remove_all(), *killed.remove_all(), *elsewhere.remove_all()]
        assert not errors, errors
