"""Both stacks from the program's own declarations on a real engine, and what a user
and an operator do with them afterwards (README, "Tests": the scenarios).

The module brings staging and prod up once (fixture ``stacks``) and runs the scenarios
in order against them; each scenario leaves both stacks healthy for the next.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.stack.conftest import Stacks
from tests.stack.probes import caddy_request
from tests.tooling import require_tool

pytestmark = pytest.mark.stack


def test_both_stacks_answer_through_caddy_with_redis_tls_postgres_and_pgcrypto(
    stacks: Stacks,
) -> None:
    for stack, run in stacks.runs.items():
        domain = run.config["domain"]
        status, deps = caddy_request(stacks.applier, stacks.applied[stack], domain, "GET", "/deps")
        assert (status, deps) == (
            200,
            {"redis": "ok (tls)", "postgres": "ok (rag_feedback)", "pgcrypto": "ok"},
        ), stack
        status, health = caddy_request(
            stacks.applier, stacks.applied[stack], domain, "GET", "/health"
        )
        assert (status, health) == (200, {"status": "ok"}), stack


REPO = Path(__file__).resolve().parents[2]
RESTORE_SCRIPT = REPO / "scripts" / "restore-stack.sh"
RESTORE_TIMEOUT_S = 900


def marker(stacks: Stacks, stack: str, method: str, name: str) -> dict[str, str]:
    domain = stacks.runs[stack].config["domain"]
    status, body = caddy_request(
        stacks.applier, stacks.applied[stack], domain, method, f"/markers/{name}"
    )
    assert status == 200, (stack, method, name, body)
    return dict(body)


PRESENT = {"postgres": "present", "redis": "present", "chroma": "present"}
ABSENT = {"postgres": "absent", "redis": "absent", "chroma": "absent"}


def take_backup(stacks: Stacks, stack: str) -> None:
    """What an operator runs for a backup now: the job's own command in its container."""
    done = stacks.applier.docker.call(
        "exec", stacks.name(stack, "backup"), "python3", "-m", "rag_backup", "backup", "--verify",
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]


def restore_stack(stacks: Stacks, *args: str) -> subprocess.CompletedProcess[str]:
    bash = require_tool("bash")
    prefix = stacks.applier.rename.prefix
    return subprocess.run(
        [bash, str(RESTORE_SCRIPT), *args],
        env={**os.environ, "RAG_NAME_PREFIX": prefix},
        capture_output=True,
        text=True,
        timeout=RESTORE_TIMEOUT_S,
        check=False,
    )


def all_healthy(stacks: Stacks, stack: str) -> dict[str, str]:
    """Declared name -> health (or status) of every long-running container."""
    states = {}
    for declared, name in stacks.applied[stack].containers.items():
        if not stacks.applied[stack].inputs[declared].get("wait"):
            continue
        state = stacks.applier.docker.inspect("container", name)["State"]
        states[declared] = (state.get("Health") or {}).get("Status") or state["Status"]
    return states


def test_restore_stack_brings_back_the_backed_up_data_after_data_loss(stacks: Stacks) -> None:
    assert marker(stacks, "staging", "PUT", "kept-by-backup") == PRESENT
    take_backup(stacks, "staging")
    assert marker(stacks, "staging", "PUT", "after-backup") == PRESENT
    assert marker(stacks, "staging", "DELETE", "kept-by-backup") == ABSENT  # the loss

    done = restore_stack(stacks, "staging", "--yes")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert marker(stacks, "staging", "GET", "kept-by-backup") == PRESENT
    assert marker(stacks, "staging", "GET", "after-backup") == ABSENT
    assert set(all_healthy(stacks, "staging").values()) == {"healthy"}


def test_restore_staging_from_prod_brings_prods_data_and_only_its_passphrase(
    stacks: Stacks,
) -> None:
    assert marker(stacks, "prod", "PUT", "from-prod") == PRESENT
    take_backup(stacks, "prod")
    assert marker(stacks, "staging", "PUT", "staging-only") == PRESENT
    prod_state = all_healthy(stacks, "prod")

    done = restore_stack(stacks, "staging", "--from", "prod", "--yes")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert marker(stacks, "staging", "GET", "from-prod") == PRESENT
    assert marker(stacks, "staging", "GET", "staging-only") == ABSENT
    assert set(all_healthy(stacks, "staging").values()) == {"healthy"}
    # Prod untouched: still healthy, its data still there.
    assert all_healthy(stacks, "prod") == prod_state
    assert marker(stacks, "prod", "GET", "from-prod") == PRESENT
