"""Both stacks from the program's own declarations on a real engine, and what a user
and an operator do with them afterwards (README, "Tests": the scenarios).

The module brings staging and prod up once (fixture ``stacks``) and runs the scenarios
in order against them; each scenario leaves both stacks healthy for the next.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.config import parse_stack_config
from components.monitoring_config import parse_duration
from components.monitoring_render import settings_from_config
from tests.pulumi_harness import SECRET_KEYS, TEST_SECRETS, run_program, stack_config
from tests.servers import RedisTLSFiles
from tests.stack.conftest import Stacks, image_id, smtp_host
from tests.stack.probes import caddy_request
from tests.tooling import require_tool

pytestmark = pytest.mark.stack
SCHEDULED_BACKUP_TIMEOUT_S = 180
# The schedule is set to the next whole minute at least this far ahead: time for the
# backup job's replacement to be up before it.
SCHEDULE_LEAD_S = 20
# From the slot to the backup's time in Prometheus: backup + verify + prune, a scrape.
SCHEDULED_RUN_TIMEOUT_S = 120


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


def backup_metric(port: int) -> float | None:
    """The newest rag_backup_last_success_timestamp_seconds Prometheus has (any
    component), after checking it comes from node_exporter's textfile collector."""
    found = prometheus_query(port, "rag_backup_last_success_timestamp_seconds")
    if not found:
        return None
    assert {sample["metric"]["job"] for sample in found} == {"node-exporter"}, found
    return max(float(sample["value"][1]) for sample in found)


def test_the_scheduler_catches_up_at_start_and_its_metric_reaches_prometheus(
    stacks: Stacks,
) -> None:
    """The scheduler, started with no backup yet, catches up on the missed run at once,
    and Prometheus has the backup's time through node_exporter's textfile collector, over
    the declared networks. (A run at its scheduled minute: the RedisDown scenario, which
    waits for prod's while staging's alert fires.)"""
    port = published_port(stacks, "staging", "prometheus", 9090)
    deadline = time.monotonic() + SCHEDULED_BACKUP_TIMEOUT_S
    while backup_metric(port) is None:
        assert time.monotonic() < deadline, "no rag_backup_last_success_timestamp_seconds"
        time.sleep(2)


@dataclass(frozen=True)
class ScheduledBackup:
    stack: str
    slot: dt.datetime
    newest_before: float  # the newest backup time Prometheus had before the schedule


def schedule_a_backup_a_minute_ahead(stacks: Stacks, stack: str) -> ScheduledBackup:
    """`backupTime` set to the next whole minute at least SCHEDULE_LEAD_S ahead and
    re-applied as `pulumi up` does: only the backup job (and the migration job, which
    every deploy runs) is replaced, and the new job is up before its slot, so the run at
    the slot is the scheduled one, not a start-up catch-up."""
    newest_before = backup_metric(published_port(stacks, stack, "prometheus", 9090))
    assert newest_before is not None, f"{stack} has no backup yet (the start-up catch-up)"
    now = dt.datetime.now(dt.UTC)
    slot = (now + dt.timedelta(seconds=SCHEDULE_LEAD_S + 60)).replace(second=0, microsecond=0)
    replaced = redeploy(stacks, stack, backupTime=slot.strftime("%H:%M"))
    assert set(replaced) == {f"rag-{stack}-backup", f"rag-{stack}-postgres-migrate"}
    backup = stacks.name(stack, "backup")
    started = stacks.applier.docker.inspect("container", backup)["State"]["StartedAt"]
    assert dt.datetime.fromisoformat(started[:19]).replace(tzinfo=dt.UTC) < slot, started
    return ScheduledBackup(stack, slot, newest_before)


def check_the_scheduled_backup(stacks: Stacks, scheduled: ScheduledBackup) -> None:
    """The backup was taken in its minute, `verify` accepts it, and Prometheus has its
    time (node_exporter's textfile collector, scraped over the declared networks)."""
    stack, slot = scheduled.stack, scheduled.slot
    port = published_port(stacks, stack, "prometheus", 9090)
    deadline = time.monotonic() + max(0.0, slot.timestamp() - time.time())
    deadline += SCHEDULED_RUN_TIMEOUT_S
    while (newest := backup_metric(port) or 0.0) < slot.timestamp():
        assert time.monotonic() < deadline, f"no backup at {slot:%H:%M} (newest {newest})"
        time.sleep(2)
    backup = stacks.name(stack, "backup")
    backup_id = stacks.applier.docker.run(
        "exec", backup, "python3", "-m", "rag_backup", "resolve", "latest", timeout=60
    ).strip()
    taken = dt.datetime.strptime(backup_id, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert slot <= taken < slot + dt.timedelta(minutes=1), (backup_id, slot)
    assert scheduled.newest_before < taken.timestamp() <= newest, (scheduled, backup_id, newest)
    done = stacks.applier.docker.call(
        "exec", backup, "python3", "-m", "rag_backup", "verify", backup_id, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]


REPO = Path(__file__).resolve().parents[2]
RESTORE_SCRIPT = REPO / "scripts" / "restore-stack.sh"
RESTORE_TIMEOUT_S = 900


def marker(stacks: Stacks, stack: str, method: str, name: str) -> dict[str, str]:
    domain = stacks.runs[stack].config["domain"]
    status, body = caddy_request(
        stacks.applier, stacks.applied[stack], domain, method, f"/markers/{name}"
    )
    if status != 200:  # what Caddy and the api said, to tell a proxy error from the app's
        logs = {
            service: (
                done := stacks.applier.docker.call(
                    "logs", "--tail", "15", stacks.name(stack, service)
                )
            ).stdout.decode(errors="replace")
            + done.stderr.decode(errors="replace")
            for service in ("caddy", "api")
        }
        raise AssertionError((stack, method, name, status, body, all_healthy(stacks, stack), logs))
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


def wait_all_healthy(stacks: Stacks, stack: str, timeout: float = 300) -> None:
    """Until Docker itself reports every service healthy: restore-stack.sh returns once
    each passes its own healthcheck, up to HEALTH_INTERVAL before Docker's next check."""
    deadline = time.monotonic() + timeout
    while set((states := all_healthy(stacks, stack)).values()) != {"healthy"}:
        assert time.monotonic() < deadline, states
        time.sleep(1)


def test_restore_stack_brings_back_the_backed_up_data_after_data_loss(stacks: Stacks) -> None:
    assert marker(stacks, "staging", "PUT", "kept-by-backup") == PRESENT
    take_backup(stacks, "staging")
    assert marker(stacks, "staging", "PUT", "after-backup") == PRESENT
    assert marker(stacks, "staging", "DELETE", "kept-by-backup") == ABSENT  # the loss

    done = restore_stack(stacks, "staging", "--yes")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert marker(stacks, "staging", "GET", "kept-by-backup") == PRESENT
    assert marker(stacks, "staging", "GET", "after-backup") == ABSENT
    wait_all_healthy(stacks, "staging")


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
    wait_all_healthy(stacks, "staging")
    # Prod untouched: still healthy, its data still there.
    assert all_healthy(stacks, "prod") == prod_state
    assert marker(stacks, "prod", "GET", "from-prod") == PRESENT


def archive_wal_now(stacks: Stacks, stack: str) -> None:
    """One `rag-backup wal-archive` cycle in the backup container, as an operator runs it
    rather than waiting for the scheduler's next minute (retried while the scheduler's own
    cycle holds the archive's lock)."""
    deadline = time.monotonic() + 120
    while True:
        done = stacks.applier.docker.call(
            "exec", stacks.name(stack, "backup"), "python3", "-m", "rag_backup", "wal-archive",
            timeout=300,
        )  # fmt: skip
        err = done.stderr.decode(errors="replace")
        if done.returncode == 0:
            return
        assert "another wal-archive run holds" in err and time.monotonic() < deadline, err[-3000:]
        time.sleep(2)


def started_at(stacks: Stacks, stack: str) -> dict[str, str]:
    return {
        name: stacks.applier.docker.inspect("container", name)["State"]["StartedAt"]
        for name in stacks.applied[stack].containers.values()
    }


def test_restore_staging_to_a_time_between_two_markers_brings_postgres_back_to_it(
    stacks: Stacks,
) -> None:
    """The bad migration at 17:00: PostgreSQL back to a time just before it, from the base
    backup before that time plus the WAL archive. Redis and Chroma keep their data."""
    # A restored cluster has no replication slot until the scheduler's first cycle after
    # the restore (a base backup copies none): one cycle now, so the backup's WAL is kept.
    archive_wal_now(stacks, "staging")
    assert marker(stacks, "staging", "PUT", "pitr-a") == PRESENT
    take_backup(stacks, "staging")
    assert marker(stacks, "staging", "PUT", "pitr-b") == PRESENT
    time.sleep(1.5)
    target = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    time.sleep(1.5)
    assert marker(stacks, "staging", "PUT", "pitr-c") == PRESENT
    archive_wal_now(stacks, "staging")
    assert marker(stacks, "prod", "PUT", "pitr-prod") == PRESENT
    prod_state = all_healthy(stacks, "prod")

    # A time the archive does not reach: exit 2 with the archived range, nothing stopped.
    before = started_at(stacks, "staging")
    refused = restore_stack(stacks, "staging", "--target-time", "2001-02-03T04:05:06Z", "--yes")
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert "--target-time 2001-02-03T04:05:06+00:00 is outside what is archived" in refused.stderr
    assert "expected a time in 20" in refused.stderr and "(base backup 20" in refused.stderr
    assert "nothing was stopped" in refused.stderr
    assert started_at(stacks, "staging") == before

    done = restore_stack(stacks, "staging", "--target-time", target, "--yes")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert marker(stacks, "staging", "GET", "pitr-a") == PRESENT
    assert marker(stacks, "staging", "GET", "pitr-b") == PRESENT
    # Only PostgreSQL went back in time: Redis and Chroma still hold the later marker.
    assert marker(stacks, "staging", "GET", "pitr-c") == {**PRESENT, "postgres": "absent"}
    wait_all_healthy(stacks, "staging")
    assert all_healthy(stacks, "prod") == prod_state
    assert marker(stacks, "prod", "GET", "pitr-prod") == PRESENT


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
    consumers = {"redis", "api", "redis-exporter", "blackbox-exporter", "backup"}
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


SMTP_SINK_SCRIPT = Path(__file__).resolve().parent / "smtp_sink.py"
# Margin over what the alert's own timings add up to (alert_mail_budget_s).
MAIL_MARGIN_S = 90


def alert_mail_budget_s(stacks: Stacks, stack: str, alert: str) -> tuple[float, float]:
    """(firing, resolved) seconds the stack's own timings allow: the alert's `for`, a
    scrape and an evaluation, then Alertmanager's group_wait; the resolved mail comes at
    the group's next group_interval tick after the firing one (plus a scrape and an
    evaluation to see the service back)."""
    cfg = parse_stack_config(stack, stacks.runs[stack].config, SECRET_KEYS)
    settings = settings_from_config(cfg)
    seen = parse_duration(settings.scrape_interval) + parse_duration(settings.evaluation_interval)
    firing = parse_duration(settings.alert_for(alert)) + seen + parse_duration(settings.group_wait)
    resolved = parse_duration(settings.group_interval) + seen
    return firing + MAIL_MARGIN_S, resolved + MAIL_MARGIN_S


@dataclass
class SmtpSinkContainer:
    """The SMTP sink (tests/stack/smtp_sink.py) in a container of the shared local image,
    on a stack's monitoring network under the name its ``smtpHost`` gives."""

    name: str
    mailbox: Path

    def mails(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.mailbox.glob("[0-9]*.json"))]

    def failed_logins(self) -> str:
        log = self.mailbox / "failed-logins"
        return log.read_text() if log.exists() else ""


def start_smtp_sink(
    stacks: Stacks, stack: str, tls: RedisTLSFiles, password: str, workdir: Path
) -> SmtpSinkContainer:
    host, port = smtp_host(stack)
    network = stacks.applier.rename(f"rag-{stack}-monitoring")
    alertmanager = stacks.applier.docker.inspect("container", stacks.name(stack, "alertmanager"))
    assert network in alertmanager["NetworkSettings"]["Networks"], network
    mailbox, secret = workdir / "mailbox", workdir / "secret"
    mailbox.mkdir()
    secret.mkdir(mode=0o700)
    (secret / "smtp_password").write_text(password)
    name = f"{stacks.applier.rename.prefix}{stack}-smtp-sink"
    stacks.applier.objects.create_container(
        name,
        [
            "--network", network, "--network-alias", host, "--cap-drop", "ALL",
            "-v", f"{SMTP_SINK_SCRIPT}:/sink/smtp_sink.py:ro",
            "-v", f"{tls.server_cert}:/sink/tls/server.crt:ro",
            "-v", f"{tls.server_key}:/sink/tls/server.key:ro",
            "-v", f"{secret}:/sink/secret:ro",
            "-v", f"{mailbox}:/mailbox",
            stacks.applier.images.shared(),
            "python3", "/sink/smtp_sink.py", "/mailbox", "/sink/tls/server.crt",
            "/sink/tls/server.key", stacks.runs[stack].config["smtpUsername"],
            "/sink/secret/smtp_password", str(port),
        ],
    )  # fmt: skip
    stacks.applier.docker.run("start", name)
    deadline = time.monotonic() + 60
    while "listening" not in (logs := stacks.applier.docker.call("logs", name)).stdout.decode():
        assert time.monotonic() < deadline, logs.stderr.decode(errors="replace")[-2000:]
        time.sleep(1)
    return SmtpSinkContainer(name, mailbox)


def wait_for_mail(
    sink: SmtpSinkContainer, subject_has: tuple[str, ...], after: float, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for mail in sink.mails():
            if mail["received_at"] > after and all(s in mail["subject"] for s in subject_has):
                return mail
        assert time.monotonic() < deadline, (
            f"no mail {subject_has} within {timeout:.0f}s; received: "
            f"{[m['subject'] for m in sink.mails()]}; refused logins: {sink.failed_logins()!r}"
        )
        time.sleep(1)


def test_a_redis_outage_mails_redis_down_and_resolved_while_the_other_stack_backs_up_on_time(
    stacks: Stacks, smtp_sink_tls: RedisTLSFiles, tmp_path: Path
) -> None:
    """Staging's Redis stopped: Alertmanager (trusting the sink's CA as the official image
    trusts a public one) mails RedisDown over STARTTLS with the declared login to an SMTP
    sink container named like the stack's ``smtpHost``; Redis back: the resolved mail.
    Meanwhile prod, given a `backupTime` a minute ahead, takes its scheduled backup in that
    minute (a user's schedule; an outage in one stack is nothing to the other).

    On the stack's own timings (RedisDown `for: 1m`; staging's alertGroupWait 10s and
    alertGroupInterval 15s, STACK_OVERRIDES): ~1.5 min to the firing mail, under a
    minute more to the resolved one; prod's slot is 20-80 s ahead, inside that wait.
    Runs last in this module and leaves Redis healthy.
    """
    run = stacks.runs["staging"]
    firing_budget, resolved_budget = alert_mail_budget_s(stacks, "staging", "RedisDown")
    sink = start_smtp_sink(stacks, "staging", smtp_sink_tls, TEST_SECRETS["smtpPassword"], tmp_path)
    redis = stacks.name("staging", "redis")
    stopped_at = time.time()
    stacks.applier.docker.run("stop", redis, timeout=120)
    try:
        scheduled = schedule_a_backup_a_minute_ahead(stacks, "prod")
        firing = wait_for_mail(
            sink, ("[staging]", "FIRING", "RedisDown"), stopped_at, firing_budget
        )
    finally:
        restarted_at = time.time()
        stacks.applier.docker.run("start", redis, timeout=120)
    expected_envelope = {
        "from": run.config["smtpFrom"],
        "recipients": [run.config["alertEmail"]],
        "login": run.config["smtpUsername"],
        "tls": True,
    }
    assert {k: firing[k] for k in expected_envelope} == expected_envelope, firing
    assert "RedisDown" in firing["body"], firing["body"][:2000]

    resolved = wait_for_mail(
        sink, ("[staging]", "RESOLVED", "RedisDown"), restarted_at, resolved_budget
    )
    assert {k: resolved[k] for k in expected_envelope} == expected_envelope, resolved
    assert not sink.failed_logins()
    check_the_scheduled_backup(stacks, scheduled)
    wait_all_healthy(stacks, "staging")
