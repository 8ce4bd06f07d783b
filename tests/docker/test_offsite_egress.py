"""Egress only where the off-host target needs it, on a real Docker engine with the
networks the program declares: with ``offsiteTarget`` set, the backup job (and only it)
reaches an address outside Docker; PostgreSQL, on the backend only, still does not; without
a target, the backup job has no way out either. Both stacks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker.deployment import REACHED, Deployment
from tests.docker.engine import DockerCli, DockerObjects
from tests.docker.outside import outside_host
from tests.docker.test_isolation import IDLE, wait_connected
from tests.docker.translate import Renamer
from tests.program.test_backups_offsite import OFFSITE_SECRETS, SFTP
from tests.pulumi_harness import SECRET_KEYS, run_program, stack_config
from tests.tooling import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.docker]
STACKS = ("staging", "prod")
REPO = Path(__file__).resolve().parents[2]


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


def test_the_egress_firewall_script_narrows_the_job_to_its_target(
    offsite_deployment: Deployment, session_id: str
) -> None:
    """scripts/offsite-egress-firewall.sh on the egress bridge: the target's address and
    port stay reachable, any other destination is dropped; --remove restores it."""
    job = _start(offsite_deployment, "staging", "backup")
    interface = offsite_deployment.bridge_interface(
        offsite_deployment.rename("rag-staging-offsite-egress")
    )
    script = str(REPO / "scripts" / "offsite-egress-firewall.sh")
    with outside_host(session_id, sys.executable) as outside:
        elsewhere = f"{outside.address}:{outside.port + 1}"  # nothing listens: refused
        wait_connected(offsite_deployment, job, outside.target)
        assert offsite_deployment.connect_probe(job, [elsewhere])[elsewhere]["outcome"] in REACHED
        narrow = [script, interface, outside.address, str(outside.port)]
        subprocess.run(["bash", *narrow], check=True, timeout=30)
        try:
            seen = offsite_deployment.connect_probe(job, [outside.target, elsewhere])
        finally:
            subprocess.run(["bash", script, "--remove", *narrow[1:]], check=True, timeout=30)
        after = offsite_deployment.connect_probe(job, [elsewhere])
    assert seen[outside.target]["outcome"] == "connected", seen
    assert seen[elsewhere]["outcome"] not in REACHED, seen
    assert after[elsewhere]["outcome"] in REACHED, after


@pytest.mark.integration
def test_egress_firewall_script_passes_shellcheck_and_refuses_bad_input() -> None:
    script = str(REPO / "scripts" / "offsite-egress-firewall.sh")
    subprocess.run([require_tool("shellcheck"), script], check=True)
    bad = subprocess.run(
        ["bash", script, "rag-prod-eg", "backup.example.net", "23"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "'backup.example.net' is not an IPv4 address" in bad.stderr
