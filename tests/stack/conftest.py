"""Fixtures for the whole-stack tests: the program's declarations applied to a real
Docker engine (tests/stack/apply.py) with local images (tests/stack/images.py).

- ``local_images``: built once per machine, reused while their content hash matches.
- ``fresh_applier``: per test, its own namespace (``ragtest-<id>-``); everything it made
  is removed afterwards, pass or fail.
- ``stack``: both stacks brought up once per module and shared by its scenario tests
  (bringing them up takes ~40 s on 2 cores); removed at the module's end.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.docker.conftest import docker_cli  # noqa: F401 - the shared engine fixture
from tests.docker.engine import DockerCli, DockerObjects
from tests.docker.translate import Renamer
from tests.pulumi_harness import ProgramRun, run_program, stack_config
from tests.servers import RedisTLSFiles, make_tls_files
from tests.stack.apply import (
    Applied,
    StackApplier,
    progress,
    release_host_binds,
    run_parallel,
)
from tests.stack.images import LocalImages

STACKS = ("staging", "prod")
# Settings a user of this host would choose; everything else is the committed stack file.
# Prod's Caddy uses its internal CA here: ACME needs the internet. Staging mails a
# change of its alerts within 15 s (alertGroupInterval; prod keeps the 5 min default).
STACK_OVERRIDES: dict[str, dict[str, str | None]] = {
    "staging": {"alertGroupWait": "10s", "alertGroupInterval": "15s"},
    "prod": {"caddyTls": "internal"},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stack: the program's whole stacks on a real Docker engine (local images)"
    )


def stack_run(
    stack: str, provider_state: dict[str, dict[str, Any]] | None = None, **overrides: str | None
) -> ProgramRun:
    config = stack_config(stack, **{**STACK_OVERRIDES[stack], **overrides})
    return run_program(stack, config, provider_state=provider_state)


def smtp_host(stack: str) -> tuple[str, int]:
    """The SMTP server a stack's Alertmanager mails through (its ``smtpHost``)."""
    host, port = stack_config(stack)["smtpHost"].rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="session")
def smtp_sink_tls(tmp_path_factory: pytest.TempPathFactory) -> RedisTLSFiles:
    """A CA the local Alertmanager image trusts (as the official one trusts a public CA)
    and a server certificate for the staging stack's SMTP host, for the SMTP sink."""
    return make_tls_files(tmp_path_factory.mktemp("smtp-sink-tls"), smtp_host("staging")[0])


@pytest.fixture(scope="session")
def local_images(
    docker_cli: DockerCli,  # noqa: F811
    smtp_sink_tls: RedisTLSFiles,
) -> LocalImages:
    images = LocalImages(docker_cli, trusted_ca=smtp_sink_tls.ca_cert.read_bytes())
    images.app()
    return images


def _applier(docker: DockerCli, images: LocalImages) -> tuple[StackApplier, DockerObjects]:
    prefix = f"ragtest-{secrets.token_hex(3)}-"
    objects = DockerObjects(docker, prefix.rstrip("-"))
    return StackApplier(docker, objects, Renamer(prefix), images, images.app()), objects


@pytest.fixture
def fresh_applier(
    docker_cli: DockerCli,  # noqa: F811
    local_images: LocalImages,
) -> Iterator[StackApplier]:
    applier, objects = _applier(docker_cli, local_images)
    try:
        yield applier
    finally:
        errors = [*objects.remove_all(), *applier.release_host_commands()]
        release_host_binds()
        assert not errors, f"cleanup failed: {errors}"


@dataclass
class Stacks:
    applier: StackApplier
    runs: dict[str, ProgramRun]
    applied: dict[str, Applied]
    # Per stack, the provider state a later `pulumi up` starts from (generated values).
    states: dict[str, dict[str, dict[str, Any]]]

    def name(self, stack: str, service: str) -> str:
        """Engine name of the declared container rag-<stack>-<service>."""
        return self.applied[stack].containers[f"rag-{stack}-{service}"]


def image_id(docker: DockerCli, image: str) -> str:
    return docker.run("image", "inspect", "--format", "{{.Id}}", image)


@pytest.fixture(scope="module")
def stacks(
    docker_cli: DockerCli,  # noqa: F811
    local_images: LocalImages,
) -> Iterator[Stacks]:
    applier, objects = _applier(docker_cli, local_images)
    try:
        # The api is the demo app deployed by its digest, as `up.sh STACK --demo` does.
        demo = image_id(docker_cli, local_images.app())
        states: dict[str, dict[str, dict[str, Any]]] = {stack: {} for stack in STACKS}
        started = time.monotonic()
        runs = {s: stack_run(s, states[s], localImageId=demo) for s in STACKS}
        progress(f"both programs run under mocks in {time.monotonic() - started:.1f} s")
        applied = run_parallel([functools.partial(applier.apply, runs[s]) for s in STACKS])
        progress(f"both stacks up in {time.monotonic() - started:.1f} s")
        yield Stacks(applier, runs, dict(zip(STACKS, applied, strict=True)), states)
    finally:
        errors = [*objects.remove_all(), *applier.release_host_commands()]
        release_host_binds()
        assert not errors, f"cleanup failed: {errors}"
