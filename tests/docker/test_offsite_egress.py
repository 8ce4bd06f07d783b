"""Egress only where the off-host target needs it, on a real Docker engine with the
networks the program declares: with ``offsiteTarget`` set, the backup job (and only it)
reaches an address outside Docker; PostgreSQL, on the backend only, still does not; without
a target, the backup job has no way out either. Both stacks."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.docker.deployment import REACHED, Deployment
from tests.docker.engine import DockerCli, DockerObjects
from tests.docker.outside import outside_host
from tests.docker.test_isolation import IDLE, wait_connected
from tests.docker.translate import Renamer
from tests.program.test_backups_offsite import OFFSITE_SECRETS, SFTP
from tests.pulumi_harness import SECRET_KEYS, run_program, stack_config

pytestmark = [pytest.mark.integration, pytest.mark.docker]
STACKS = ("staging", "prod")


@pytest.fixture
def offsite_deployment(
    docker_cli: DockerCli, tools_image: str, session_prefix: str
) -> Iterator[Deployment]:
    """As ``deployment``, from both stacks declared with an SFTP off-host target."""
    programs = {
        stack: run_program(
            stack, stack_config(stack, **SFTP), secret_keys=SECRET_KEYS | OFFSITE_SECRETS
        )
        for stack in STACKS
    }
    objects = DockerObjects(docker_cli, session_prefix.rstrip("-"))
    try:
        yield Deployment(docker_cli, objects, Renamer(session_prefix), tools_image, programs)
    finally:
        errors = objects.remove_all()
        assert not errors, f"cleanup failed: {errors}"


def _start(deployment: Deployment, stack: str, service: str) -> str:
    return deployment.start(stack, deployment.plan(stack, f"rag-{stack}-{service}", process=IDLE))


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_backup_job_with_a_target_gets_out(
    offsite_deployment: Deployment, session_id: str, stack: str
) -> None:
    job = _start(offsite_deployment, stack, "backup")
    postgres = _start(offsite_deployment, stack, "postgres")
    egress = offsite_deployment.rename(f"rag-{stack}-offsite-egress")
    networks = offsite_deployment.docker.inspect("container", job)["NetworkSettings"]["Networks"]
    assert set(networks) == {offsite_deployment.rename(f"rag-{stack}-backend"), egress}
    with outside_host(session_id, sys.executable) as outside:
        wait_connected(offsite_deployment, job, outside.target)
        seen = offsite_deployment.connect_probe(postgres, [outside.target])
    assert seen[outside.target]["outcome"] not in REACHED, seen


@pytest.mark.parametrize("stack", STACKS)
def test_without_a_target_the_backup_job_has_no_way_out(
    deployment: Deployment, session_id: str, stack: str
) -> None:
    job = _start(deployment, stack, "backup")
    api = deployment.start(stack, deployment.plan(stack, f"rag-{stack}-api", process=IDLE))
    with outside_host(session_id, sys.executable) as outside:
        wait_connected(deployment, api, outside.target)  # the stand-in answers
        seen = deployment.connect_probe(job, [outside.target])
    assert seen[outside.target]["outcome"] not in REACHED, seen
