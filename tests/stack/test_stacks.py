"""Both stacks from the program's own declarations on a real engine, and what a user
and an operator do with them afterwards (README, "Tests": the scenarios).

The module brings staging and prod up once (fixture ``stacks``) and runs the scenarios
in order against them; each scenario leaves both stacks healthy for the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.pulumi_harness import TEST_SECRETS, run_program, stack_config
from tests.stack.conftest import Stacks, image_id
from tests.stack.probes import caddy_request
from tests.tooling import require_tool

pytestmark = pytest.mark.stack
SCHEDULED_BACKUP_TIMEOUT_S = 180


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


def published_port(stacks: Stacks, stack: str, service: str, internal: int) -> int:
    applied = stacks.applied[stack]
    for port in applied.inputs[f"rag-{stack}-{service}"]["ports"]:
        if int(port["internal"]) == internal:
            return applied.host_ports[int(port["external"])]
    raise KeyError(f"{service} publishes no port {internal}")


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_the_scheduler_backup_is_verified_and_its_metric_reaches_prometheus(
    stacks: Stacks,
) -> None:
    """The scheduler, started with no backup yet, catches up on the missed run at once
    (a backup due since the last scheduled time); Prometheus sees its metric through
    node_exporter's textfile collector, over the declared networks."""
    port = published_port(stacks, "staging", "prometheus", 9090)
    deadline = time.monotonic() + SCHEDULED_BACKUP_TIMEOUT_S
    while not (found := prometheus_query(port, "rag_backup_last_success_timestamp_seconds")):
        assert time.monotonic() < deadline, "no rag_backup_last_success_timestamp_seconds"
        time.sleep(5)
    assert {sample["metric"]["job"] for sample in found} == {"node-exporter"}
    backup = stacks.name("staging", "backup")
    listing = stacks.applier.docker.run(
        "exec", backup, "python3", "-m", "rag_backup", "resolve", "latest", timeout=60
    )
    done = stacks.applier.docker.call(
        "exec", backup, "python3", "-m", "rag_backup", "verify", listing.strip(), timeout=300
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    # Made by the scheduler (the only writer so far) before any test took a backup.
    newest = max(float(sample["value"][1]) for sample in found)
    assert newest > time.time() - SCHEDULED_BACKUP_TIMEOUT_S - 600


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


def take_backup(stacks: Stacks, stack: str) -> str:
    """What an operator runs for a backup now: the job's own command in its container;
    the new backup's id."""
    done = stacks.applier.docker.call(
        "exec", stacks.name(stack, "backup"), "python3", "-m", "rag_backup", "backup", "--verify",
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode().split()[-1]


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

    # Prod's rows, Redis keys and Chroma files; the rows' pgcrypto columns stay sealed
    # with prod's data key, which staging does not get (only the backup passphrase).
    assert marker(stacks, "staging", "GET", "from-prod") == {
        **PRESENT,
        "postgres": "sealed with another key",
    }
    assert marker(stacks, "staging", "GET", "staging-only") == ABSENT
    assert set(all_healthy(stacks, "staging").values()) == {"healthy"}
    # Prod untouched: still healthy, its data still there.
    assert all_healthy(stacks, "prod") == prod_state
    assert marker(stacks, "prod", "GET", "from-prod") == PRESENT


def wait_all_healthy(stacks: Stacks, stack: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while set((states := all_healthy(stacks, stack)).values()) != {"healthy"}:
        assert time.monotonic() < deadline, states
        time.sleep(3)


def test_a_restore_that_fails_midway_leaves_every_store_as_it_was_and_services_running(
    stacks: Stacks,
) -> None:
    backup_id = take_backup(stacks, "staging")
    assert marker(stacks, "staging", "PUT", "newer-than-backup") == PRESENT
    # An earlier restore's kept cluster under the name this restore needs: rag-backup
    # refuses after the script has stopped the services (midway for the stack).
    postgres = stacks.name("staging", "postgres")
    env = stacks.applier.docker.inspect("container", postgres)["Config"]["Env"]
    pgdata = next(e.split("=", 1)[1] for e in env if e.startswith("PGDATA="))
    blocker = f"{pgdata}.pre-restore-{backup_id}"
    stacks.applier.docker.run("exec", "--user", "postgres", postgres, "mkdir", blocker)
    try:
        done = restore_stack(stacks, "staging", "--yes")
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
        assert f"restore of {backup_id} failed" in done.stderr
        for service in ("postgres", "redis", "api", "backup"):
            assert f"{stacks.name('staging', service)}: running" in done.stderr, done.stderr
        wait_all_healthy(stacks, "staging")
        assert marker(stacks, "staging", "GET", "newer-than-backup") == PRESENT
    finally:
        stacks.applier.docker.call("exec", "--user", "postgres", postgres, "rmdir", blocker)


def container_ids(stacks: Stacks) -> dict[str, str]:
    """Engine name -> container id, for every container of both stacks."""
    return {
        name: stacks.applier.docker.inspect("container", name)["Id"]
        for applied in stacks.applied.values()
        for name in applied.containers.values()
    }


def release_of(stacks: Stacks, base: str, release: str) -> str:
    """A new release of the app: the same app, another image (another digest)."""
    tag = f"{base}-release-{release}"
    if not stacks.applier.docker.exists("image", tag):
        dockerfile = f"FROM {base}\nLABEL personal-rag.test-release={release}\n"
        stacks.applier.docker.run(
            "build", "-q", "--label", "rag-test.local-image=1", "-t", tag, "-",
            input_bytes=dockerfile.encode(), timeout=300,
        )  # fmt: skip
    return image_id(stacks.applier.docker, tag)


def redeploy(stacks: Stacks, stack: str, **changes: Any) -> list[str]:
    """`pulumi up` of ``stack`` again, from its provider state, with changed config (and
    ``replace``: logical resources made anew, as a renewal or `--replace` does); the
    replaced containers."""
    replace = set(changes.pop("replace", ()))
    state = stacks.states[stack]
    for key in [k for k in state if json.loads(k)[1] in replace]:
        del state[key]
    old = stacks.runs[stack]
    config = {k: v for k, v in old.config.items() if k not in TEST_SECRETS}
    new = run_program(stack, stack_config(stack, **{**config, **changes}), provider_state=state)
    replaced = stacks.applier.update(old, new, stacks.applied[stack])
    stacks.runs[stack] = new
    return replaced


def test_an_upgrade_replaces_the_api_and_restarts_only_a_changed_configs_consumer(
    stacks: Stacks,
) -> None:
    assert marker(stacks, "staging", "PUT", "survives-upgrade") == PRESENT
    before = container_ids(stacks)
    new_image = release_of(stacks, stacks.applier.app_image, "2")
    assert new_image != stacks.runs["staging"].config["localImageId"]

    replaced = redeploy(stacks, "staging", localImageId=new_image, smtpFrom="alerts-v2@example.com")

    n = "rag-staging-"
    assert set(replaced) == {
        f"{n}api-config-init", f"{n}api",  # the new digest (its config copy runs in it)
        f"{n}alertmanager-config-init", f"{n}alertmanager",  # the one changed config file
        f"{n}postgres-migrate",  # declared to run on every deploy
    }  # fmt: skip
    after = container_ids(stacks)
    for name, container_id in before.items():
        declared = next(
            d for a in stacks.applied.values() for d, e in a.containers.items() if e == name
        )
        assert (container_id != after[name]) == (declared in replaced), declared
    api = stacks.applier.docker.inspect("container", stacks.name("staging", "api"))
    assert api["Image"] == new_image
    wait_all_healthy(stacks, "staging")
    assert marker(stacks, "staging", "GET", "survives-upgrade") == PRESENT
    domain = stacks.runs["staging"].config["domain"]
    status, deps = caddy_request(stacks.applier, stacks.applied["staging"], domain, "GET", "/deps")
    assert status == 200, deps


def test_renewed_redis_certificates_restart_redis_and_its_clients_which_reconnect(
    stacks: Stacks,
) -> None:
    run = stacks.runs["staging"]
    ca_certs = [r.name for r in run.of_type("tls:index/selfSignedCert:SelfSignedCert")]
    assert ca_certs, "the program declares no CA certificate"
    before = {
        s: stacks.applier.docker.run(
            "exec", stacks.name("staging", s), "cat", "/etc/rag/tls/ca.crt"
        )
        for s in ("redis", "api")
    }

    replaced = redeploy(stacks, "staging", replace=set(ca_certs))

    n = "rag-staging-"
    consumers = {"redis", "api", "redis-exporter", "backup"}
    assert set(replaced) == {
        *(f"{n}{s}" for s in consumers),
        *(f"{n}{s}-config-init" for s in consumers),
        f"{n}postgres-migrate",
    }
    after = {
        s: stacks.applier.docker.run(
            "exec", stacks.name("staging", s), "cat", "/etc/rag/tls/ca.crt"
        )
        for s in ("redis", "api")
    }
    assert after["redis"] == after["api"] and after["redis"] != before["redis"]
    wait_all_healthy(stacks, "staging")
    domain = run.config["domain"]
    status, deps = caddy_request(stacks.applier, stacks.applied["staging"], domain, "GET", "/deps")
    assert (status, deps["redis"]) == (200, "ok (tls)"), deps
    assert marker(stacks, "staging", "GET", "survives-upgrade") == PRESENT
    take_backup(stacks, "staging")  # the backup job reaches Redis with its new certificate
