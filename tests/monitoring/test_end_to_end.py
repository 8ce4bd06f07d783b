"""End to end on loopback: Redis stops -> a RedisDown email reaches the inbox; it starts
again -> the resolved email arrives. Real redis-server, redis_exporter, Prometheus and
Alertmanager running the rendered files, and an SMTP sink that requires AUTH.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from components.monitoring_config import MonitoringSettings
from tests.monitoring.helpers import settings
from tests.monitoring.live import (
    SMTP_USERNAME,
    LiveMonitoring,
    ReceivedMail,
    pipeline_targets,
    start_live_monitoring,
    wait_until,
)

pytestmark = pytest.mark.integration

STACK = "staging"
MAIL_TIMEOUT_S = 40.0


def fast_settings(ports: dict[str, int], password_file: str) -> MonitoringSettings:
    """Production files with short intervals; RedisDown's `for` shortened explicitly."""
    return settings(
        stack=STACK,
        alert_email="oncall@example.com",
        smtp_smarthost=f"127.0.0.1:{ports['smtp']}",
        smtp_username=SMTP_USERNAME,
        smtp_require_tls=False,
        smtp_password_file=password_file,
        scrape_interval="1s",
        scrape_timeout="1s",
        evaluation_interval="1s",
        group_wait="1s",
        group_interval="1s",
        targets=pipeline_targets(ports),
        alert_for_overrides={"RedisDown": "3s"},
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveMonitoring]:
    pipeline = start_live_monitoring(tmp_path / "live", fast_settings)
    try:
        yield pipeline
    finally:
        pipeline.close()


def _redis_down(status: str, after: float) -> Callable[[ReceivedMail], bool]:
    def matches(mail: ReceivedMail) -> bool:
        return "RedisDown" in mail.subject and status in mail.subject and mail.received_at > after

    return matches


def test_redis_down_email_then_resolved_email(live: LiveMonitoring) -> None:
    # Healthy first: the exporter reaches Redis over TLS with its client certificate.
    wait_until(
        lambda: any(r["value"][1] == "1" for r in live.query('redis_up{job="redis-exporter"}')),
        30,
        "Prometheus to scrape redis_up 1 through the TLS exporter",
    )
    # Until Prometheus's first scrape (service discovery hands targets over after ~5s),
    # redis_up is absent and the shortened RedisDown may fire and resolve once. Wait for it
    # to be quiet, then only look at mail that arrives after Redis is stopped.
    live.wait_quiet("RedisDown", quiet_for=3.0, timeout=30)

    stopped = time.monotonic()
    live.stop_redis()
    firing = live.wait_for_mail(_redis_down("FIRING", stopped), MAIL_TIMEOUT_S, "RedisDown firing")
    assert f"[{STACK}]" in firing.subject
    assert firing.recipients == ("oncall@example.com",)
    # The sink only accepts mail after AUTH with the password from the file.
    assert (firing.login, firing.password) == (SMTP_USERNAME, live.smtp_password)
    assert live.sink.failed_logins == []

    started = time.monotonic()
    live.start_redis()
    resolved = live.wait_for_mail(
        _redis_down("RESOLVED", started), MAIL_TIMEOUT_S, "RedisDown resolved"
    )
    assert f"[{STACK}]" in resolved.subject


def test_watchdog_is_not_mailed_without_heartbeat(live: LiveMonitoring) -> None:
    """Watchdog fires from the first evaluation but goes to the null receiver."""
    wait_until(
        lambda: any(
            r["metric"].get("alertstate") == "firing"
            for r in live.query('ALERTS{alertname="Watchdog"}')
        ),
        30,
        "Watchdog to fire in Prometheus",
    )
    # Give Alertmanager group_wait plus a margin to (wrongly) send it.
    time.sleep(3)
    assert [m.subject for m in live.sink.snapshot() if "Watchdog" in m.subject] == []
