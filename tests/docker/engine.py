"""The Docker CLI, bounded in time, and the objects a test session made on the engine.

Every call has a timeout. Objects are created through ``DockerObjects`` only, which
remembers each one (and labels it with the session's id) and removes exactly those at
the end -- never anything else on the engine, except what an earlier session that was
killed before its cleanup left (``remove_abandoned``).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

DEFAULT_TIMEOUT_S = 60.0
SESSION_LABEL = "rag-test.session"
# The test process that made an object, and its machine: an object whose process is gone
# was left by a session killed before its cleanup.
OWNER_PID_LABEL = "rag-test.pid"
OWNER_HOST_LABEL = "rag-test.host"
KINDS = ("container", "network", "volume")  # the order they are removed in


class DockerError(RuntimeError):
    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"docker {' '.join(args[:3])} ... exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


REMOVE_WORKERS = 8  # parallel `docker rm` calls in a cleanup


@dataclass(frozen=True)
class DockerCli:
    binary: str

    def call(
        self,
        *args: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        stdin: IO[bytes] | None = None,
        input_bytes: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``docker ARGS``; the result whatever the exit code (bounded by timeout)."""
        return subprocess.run(
            [self.binary, *args],
            stdin=stdin,
            input=input_bytes,
            capture_output=True,
            timeout=max(timeout, 1.0),
            check=False,
        )

    def run(
        self,
        *args: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        stdin: IO[bytes] | None = None,
        input_bytes: bytes | None = None,
    ) -> str:
        """Run ``docker ARGS``; its stdout, or DockerError with stderr."""
        done = self.call(*args, timeout=timeout, stdin=stdin, input_bytes=input_bytes)
        if done.returncode != 0:
            raise DockerError(args, done.returncode, done.stderr.decode(errors="replace"))
        return done.stdout.decode(errors="replace").strip()

    def exists(self, kind: str, name: str) -> bool:
        return self.call(kind, "inspect", name, timeout=30).returncode == 0

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        found = json.loads(self.run(kind, "inspect", name))
        assert isinstance(found, list) and len(found) == 1, found
        result: dict[str, Any] = found[0]
        return result


@dataclass
class DockerObjects:
    """What this session created, removed in reverse kind order by ``remove_all``."""

    docker: DockerCli
    session: str
    containers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{SESSION_LABEL}={self.session}"

    @property
    def labels(self) -> list[str]:
        """``--label`` arguments for every object made here."""
        owner = (f"{OWNER_PID_LABEL}={os.getpid()}", f"{OWNER_HOST_LABEL}={socket.gethostname()}")
        return [arg for label in (self.label, *owner) for arg in ("--label", label)]

    def create_network(
        self,
        name: str,
        internal: bool,
        driver: str = "bridge",
        options: Mapping[str, str] | None = None,
    ) -> str:
        args = ["network", "create", "--driver", driver, *self.labels]
        if internal:
            args.append("--internal")
        for key, value in (options or {}).items():
            args += ["--opt", f"{key}={value}"]
        self.networks.append(name)
        self.docker.run(*args, name)
        return name

    def create_volume(self, name: str) -> str:
        self.volumes.append(name)
        self.docker.run("volume", "create", *self.labels, name)
        return name

    def create_container(self, name: str, create_args: Sequence[str]) -> str:
        """``docker create --name NAME ARGS`` (ARGS end with the image and command)."""
        self.containers.append(name)
        self.docker.run("create", "--name", name, *self.labels, *create_args)
        return name

    def _remove(
        self, kind: str, force: Sequence[str], name: str
    ) -> subprocess.CompletedProcess[bytes]:
        return self.docker.call(kind, "rm", *force, name, timeout=60)

    def remove_all(self) -> list[str]:
        """Remove every object made here; the errors (other than 'already gone')."""
        errors: list[str] = []
        for kind, names, force in (
            ("container", self.containers, ["-f", "-v"]),
            ("network", self.networks, []),
            ("volume", self.volumes, ["-f"]),
        ):
            # Each kind in parallel (nothing of one kind needs another of it gone first):
            # a stack's ~60 containers one by one took ~10 s.
            targets = list(reversed(names))
            with ThreadPoolExecutor(max_workers=REMOVE_WORKERS) as pool:
                removals = list(pool.map(functools.partial(self._remove, kind, force), targets))
            for name, done in zip(targets, removals, strict=True):
                stderr = done.stderr.decode(errors="replace")
                if done.returncode != 0 and "No such" not in stderr and "not found" not in stderr:
                    errors.append(f"{kind} {name}: {stderr.strip()}")
            names.clear()
        return errors


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def abandoned(docker: DockerCli) -> dict[str, list[str]]:
    """By kind, the objects made on this machine by test processes that are gone. A killed
    session's containers keep their restart policies: a restarted engine runs them again,
    beside later sessions (a backup container's schedule included)."""
    host = socket.gethostname()
    found: dict[str, list[str]] = {}
    for kind in KINDS:
        name_field = "Names" if kind == "container" else "Name"
        fields = (name_field, f'Label "{OWNER_PID_LABEL}"', f'Label "{OWNER_HOST_LABEL}"')
        listing = docker.run(
            kind, "ls", *(["-a"] if kind == "container" else []),
            "--filter", f"label={OWNER_PID_LABEL}",
            "--format", "\t".join("{{." + field + "}}" for field in fields),
        )  # fmt: skip
        for line in listing.splitlines():
            name, pid, owner_host = line.split("\t")
            if owner_host == host and pid.isdigit() and not _process_alive(int(pid)):
                found.setdefault(kind, []).append(name)
    return found


def remove_abandoned(docker: DockerCli) -> list[str]:
    """Remove what ``abandoned`` finds; returns what was removed."""
    removed = []
    for kind, names in abandoned(docker).items():
        force = ["-f", "-v"] if kind == "container" else (["-f"] if kind == "volume" else [])
        for name in names:
            docker.call(kind, "rm", *force, name, timeout=60)
            removed.append(f"{kind} {name}")
    return removed
