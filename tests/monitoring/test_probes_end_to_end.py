"""End to end on loopback with the real blackbox_exporter: a Redis server whose certificate
expires in 5 days raises CertificateExpiringSoon (the site's 60-day certificate does not);
the site answering 500 raises SiteDown and its resolved mail follows when it answers 200
again; a failed scheduler job, written by the scheduler's own code into node_exporter's
textfile directory, reaches the daily ticket digest as BackupJobFailed.

Real redis-server (mutual TLS), prometheus-blackbox-exporter presenting the probe's own
client certificate, node_exporter, Prometheus and Alertmanager running the rendered files,
and an SMTP sink that requires AUTH. Only the intervals and `for` are shortened, explicitly.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from components.monitoring_config import MonitoringSettings
from rag_backup.schedule import Schedule, write_scheduler_metrics
from tests.monitoring.helpers import settings
from tests.monitoring.live import SMTP_USERNAME, ReceivedMail, wait_until
from tests.monitoring.probe_live import (
    DOMAIN,
    ProbePipeline,
    pipeline_probe_targets,
    pipeline_targets,
    start_probe_pipeline,
)

pytestmark = pytest.mark.integration

STACK = "staging"
REDIS_CERT_DAYS = 5
MAIL_TIMEOUT_S = 45.0


def fast_settings(ports: dict[str, int], password_file: str, tls_dir: Path) -> MonitoringSettings:
    """The rendered production files with 1 s intervals and short `for`s."""
    return settings(
        stack=STACK,
        domain=DOMAIN,
        # Staging's mode: Caddy's own CA, not in the probe's trust store (the test CA either).
        caddy_tls="internal",
        smtp_smarthost=f"127.0.0.1:{ports['smtp']}",
        smtp_username=SMTP_USERNAME,
        smtp_require_tls=False,
        smtp_password_file=password_file,
        probe_tls_dir=str(tls_dir),
        scrape_interval="1s",
        scrape_timeout="1s",
        evaluation_interval="1s",
        group_wait="1s",
        group_interval="1s",
        digest_group_wait="1s",
        digest_interval="2s",
        targets=pipeline_targets(ports),
        probe_targets=pipeline_probe_targets(ports),
        alert_for_overrides={
            "SiteDown": "3s",
            "CertificateExpiringSoon": "2s",
            "BackupJobFailed": "2s",
        },
    )


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[ProbePipeline]:
    started = start_probe_pipeline(tmp_path / "probes", REDIS_CERT_DAYS, fast_settings)
    try:
        yield started
    finally:
        started.close()


def _mail(alert: str, status: str, after: float) -> Callable[[ReceivedMail], bool]:
    def matches(mail: ReceivedMail) -> bool:
        return alert in mail.subject and status in mail.subject and mail.received_at > after

    return matches


def _probe_ok(pipeline: ProbePipeline, job: str) -> bool:
    return any(r["value"][1] == "1" for r in pipeline.live.query(f'probe_success{{job="{job}"}}'))


def test_redis_certificate_expiring_in_days_pages(pipeline: ProbePipeline) -> None:
    live = pipeline.live
    # The TLS probe completes the mutual-TLS handshake with the probe's own certificate.
    wait_until(lambda: _probe_ok(pipeline, "probe-redis"), 30, "the Redis TLS probe to pass")
    days_left = live.query('(probe_ssl_earliest_cert_expiry{job="probe-redis"} - time()) / 86400')
    assert days_left and REDIS_CERT_DAYS - 1 < float(days_left[0]["value"][1]) <= REDIS_CERT_DAYS

    firing = live.wait_for_mail(
        _mail("CertificateExpiringSoon", "FIRING", 0), MAIL_TIMEOUT_S, "CertificateExpiringSoon"
    )
    assert firing.subject.startswith(f"[{STACK}] ")
    assert f"127.0.0.1:{pipeline.ports['redis']}" in firing.body, "names the Redis endpoint"
    # The site's certificate (60 days; Caddy-internal threshold 2 h) does not page.
    assert _probe_ok(pipeline, "probe-site")
    site_alerts = live.query('ALERTS{alertname="CertificateExpiringSoon",job="probe-site"}')
    assert site_alerts == []
    assert f"https://{DOMAIN}/health" not in firing.body, "the site is not in the group"


def test_site_answering_500_pages_then_resolves(pipeline: ProbePipeline) -> None:
    live = pipeline.live
    wait_until(lambda: _probe_ok(pipeline, "probe-site"), 30, "the site probe to pass")
    live.wait_quiet("SiteDown", quiet_for=3.0, timeout=30)

    broken = time.monotonic()
    pipeline.site.status = 500
    firing = live.wait_for_mail(_mail("SiteDown", "FIRING", broken), MAIL_TIMEOUT_S, "SiteDown")
    assert firing.subject.startswith(f"[{STACK}] ")
    assert f"https://{DOMAIN}/health" in firing.body, "the instance is the public URL"
    assert (firing.login, firing.password) == (SMTP_USERNAME, live.smtp_password)

    fixed = time.monotonic()
    pipeline.site.status = 200
    resolved = live.wait_for_mail(
        _mail("SiteDown", "RESOLVED", fixed), MAIL_TIMEOUT_S, "SiteDown resolved"
    )
    assert resolved.subject.startswith(f"[{STACK}] ")


def test_failed_backup_job_reaches_the_ticket_digest(pipeline: ProbePipeline) -> None:
    live = pipeline.live
    schedule = Schedule.parse("03:00", "sun", "04:30")
    now = dt.datetime.now(dt.UTC)
    write_scheduler_metrics(pipeline.textfile_dir, now, schedule, {"backup": True})
    wait_until(
        lambda: bool(live.query("rag_backup_scheduler_job_success == 1")),
        30,
        "the scheduler's metric to be scraped",
    )
    failed = time.monotonic()
    write_scheduler_metrics(pipeline.textfile_dir, now, schedule, {"backup": False})
    digest = live.wait_for_mail(
        _mail("BackupJobFailed", "FIRING", failed), MAIL_TIMEOUT_S, "BackupJobFailed digest"
    )
    assert digest.subject.startswith(f"[{STACK}] ticket digest"), digest.subject
    assert "The scheduled backup job failed" in digest.body
