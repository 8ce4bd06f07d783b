"""The rendered files pass the real linters, route as the plan says, and carry no secret.

promtool/amtool are the judges of syntax and semantics; the assertions here check the
requirements of the issue (names from the common naming brief, routing, inhibition), not
the text the renderer happens to produce.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.monitoring_config import (
    ALERTS,
    WAL_ALERTS,
    MonitoringConfigError,
    SloObjectives,
    render_alert_rules,
    render_alertmanager_config,
    render_all,
    render_blackbox_config,
    render_prometheus_config,
)
from components.monitoring_render import main as render_main
from tests.monitoring.helpers import render_to, run_tool, settings
from tests.monitoring.live import Process, free_port, wait_until
from tests.tooling import require_tool

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT = "https://hc-ping.example.com/0b7e3c1e-staging"

VARIANTS = {
    "staging": settings(),
    "prod-with-heartbeat": settings(stack="prod", heartbeat_url=HEARTBEAT),
    "plain-smtp": settings(smtp_require_tls=False, smtp_smarthost="127.0.0.1:2525"),
    "internal-tls-strict-slo": settings(
        caddy_tls="internal",
        slo=SloObjectives(availability_percent=99.9, latency_threshold_seconds=0.25),
    ),
}


def _lint(directory: Path) -> None:
    promtool = require_tool("promtool")
    amtool = require_tool("amtool")
    blackbox = require_tool("prometheus-blackbox-exporter")
    checks = [
        [promtool, "check", "config", "prometheus.yml"],  # also loads the rule file
        [promtool, "check", "rules", "alerts.yml"],
        [amtool, "check-config", "alertmanager.yml"],
        [blackbox, "--config.check", "--config.file=blackbox.yml"],
    ]
    for args in checks:
        result = run_tool(*args, cwd=directory)
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}{result.stderr}"


@pytest.mark.integration
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_files_pass_promtool_and_amtool(variant: str, tmp_path: Path) -> None:
    render_to(tmp_path, VARIANTS[variant])
    _lint(tmp_path)


@pytest.mark.integration
def test_blackbox_check_catches_a_broken_module(tmp_path: Path) -> None:
    """The blackbox lint can fail: a misspelt key is refused (strict parsing)."""
    render_to(tmp_path, settings())
    config = yaml.safe_load((tmp_path / "blackbox.yml").read_text())
    tcp = config["modules"]["tls_redis"]["tcp"]
    tcp["tls_confg"] = tcp.pop("tls_config")
    (tmp_path / "blackbox.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError, match=r"config\.check"):
        _lint(tmp_path)


@pytest.mark.integration
def test_linters_catch_a_broken_file(tmp_path: Path) -> None:
    """The lint above can fail: a rule with a PromQL error is rejected by promtool."""
    render_to(tmp_path, settings())
    rules = yaml.safe_load((tmp_path / "alerts.yml").read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(x[5m])"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    with pytest.raises(AssertionError, match="check config"):
        _lint(tmp_path)


STACK_FILE = """\
config:
  personal-rag:domain: staging.api.example.com
  personal-rag:alertEmail: oncall@example.com
  personal-rag:smtpHost: smtp.example.com:587
  personal-rag:smtpFrom: alerts@example.com
  personal-rag:smtpUsername: alerts@example.com
  personal-rag:smtpPassword:
    secure: AAABAEncryptedSmtpPasswordCiphertextZZZ
  personal-rag:heartbeatUrl: https://hc-ping.example.com/abc
  personal-rag:llmErrorsMetric: myapp_llm_failures_total
  personal-rag:image: ghcr.io/example/rag_personal
  personal-rag:imageTag: 3f9c2ab
  personal-rag:portOffset: "10000"
"""


@pytest.mark.integration
def test_render_command_writes_lintable_files_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack_file = tmp_path / "Pulumi.staging.yaml"
    stack_file.write_text(STACK_FILE)
    out = tmp_path / "out"
    code = render_main(["--stack", "staging", "--out", str(out), "--config-file", str(stack_file)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "alertmanager.yml",
        "alerts.yml",
        "blackbox.yml",
        "prometheus.yml",
    ]
    _lint(out)
    everything = "".join(p.read_text() for p in out.iterdir()) + capsys.readouterr().out
    assert "EncryptedSmtpPasswordCiphertext" not in everything
    alertmanager = yaml.safe_load((out / "alertmanager.yml").read_text())
    assert "smtp_auth_password" not in alertmanager["global"]
    assert alertmanager["global"]["smtp_auth_password_file"].startswith("/")
    # Config from the stack file reached the files.
    assert "myapp_llm_failures_total" in (out / "alerts.yml").read_text()
    assert "https://hc-ping.example.com/abc" in (out / "alertmanager.yml").read_text()
    assert alertmanager["global"]["smtp_smarthost"] == "smtp.example.com:587"


@pytest.mark.integration
@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_render_command_on_the_repository_stack_files(stack: str, tmp_path: Path) -> None:
    if not (REPO / f"Pulumi.{stack}.yaml").is_file():
        pytest.skip(f"Pulumi.{stack}.yaml is not in the repository")
    assert render_main(["--stack", stack, "--out", str(tmp_path)]) == 0
    _lint(tmp_path)


def test_render_command_names_the_missing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack_file = tmp_path / "Pulumi.staging.yaml"
    stack_file.write_text(STACK_FILE.replace("  personal-rag:smtpFrom: alerts@example.com\n", ""))
    out = tmp_path / "out"
    code = render_main(["--stack", "staging", "--out", str(out), "--config-file", str(stack_file)])
    assert code == 2
    assert "personal-rag:smtpFrom is not set" in capsys.readouterr().err
    assert not out.exists(), "nothing is written when the config is bad"


def test_render_command_reports_a_missing_stack_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = render_main(["--stack", "nosuch", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "Pulumi.nosuch.yaml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"alert_email": "not-an-email"}, "alert_email", "not-an-email"),
        ({"smtp_smarthost": "smtp.example.com"}, "smtp_smarthost", "smtp.example.com"),
        ({"scrape_interval": "15 seconds"}, "scrape_interval", "15 seconds"),
        ({"scrape_timeout": "30s"}, "scrape_timeout", "30s"),
        ({"heartbeat_url": "ftp://x"}, "heartbeat_url", "ftp://x"),
        ({"stack": "Staging!"}, "stack", "Staging!"),
        ({"targets": {"mysql": "db:3306"}}, "targets['mysql']", "db:3306"),
        ({"alert_for_overrides": {"RedisDwn": "1s"}}, "alert_for_overrides['RedisDwn']", "1s"),
        ({"smtp_password_file": "smtp_password"}, "smtp_password_file", "smtp_password"),
    ],
)
def test_bad_settings_name_the_field_and_value(
    overrides: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(MonitoringConfigError) as raised:
        settings(**overrides)
    message = str(raised.value)
    assert f"{field} = {value!r} is invalid; expected" in message


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(MonitoringConfigError) as raised:
        settings(alert_email="x", smtp_from="y", group_wait="soon")
    assert len(raised.value.problems) == 3


# --- prometheus.yml -------------------------------------------------------------------------
def test_prometheus_scrapes_every_service_by_its_docker_name() -> None:
    config = render_prometheus_config(settings())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        if job["metrics_path"] == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    # Names and ports from the common naming brief.
    assert targets == {
        "api": "rag-staging-api:8000",
        "prometheus": "rag-staging-prometheus:9090",
        "alertmanager": "rag-staging-alertmanager:9093",
        "node-exporter": "rag-staging-node-exporter:9100",
        "redis-exporter": "rag-staging-redis-exporter:9121",
        "postgres-exporter": "rag-staging-postgres-exporter:9187",
        "blackbox-exporter": "rag-staging-blackbox-exporter:9115",
        "caddy": "rag-staging-caddy:2020",
    }
    api = next(j for j in config["scrape_configs"] if j["job_name"] == "api")
    assert api["metrics_path"] == "/metrics"
    assert config["global"]["external_labels"] == {"stack": "staging"}
    alertmanagers = config["alerting"]["alertmanagers"]
    assert alertmanagers == [{"static_configs": [{"targets": ["rag-staging-alertmanager:9093"]}]}]


def test_prometheus_config_of_prod_never_points_at_staging() -> None:
    text = render_all(settings(stack="prod", domain="api.example.com"))["prometheus.yml"]
    assert "staging" not in text
    assert "rag-prod-redis-exporter:9121" in text


# --- alert rules ----------------------------------------------------------------------------
def _runbook_anchors() -> set[str]:
    text = (REPO / "docs" / "runbooks.md").read_text()
    return {m.group(1).strip().lower() for m in re.finditer(r"^## +(.+)$", text, re.MULTILINE)}


def test_every_rule_has_severity_annotations_and_a_runbook_that_exists() -> None:
    anchors = _runbook_anchors()
    rules = [r for g in render_alert_rules(settings())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == {a.name for a in (*ALERTS, *WAL_ALERTS)}
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket", "none"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["description"].strip(), rule["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbooks.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no '## {anchor}' heading in runbooks.md"


def test_spec_alerts_are_all_present() -> None:
    required = {
        "APIDown", "HighErrorRate", "HighLatency", "RedisDown", "PostgresDown",
        "CacheHitRateLow", "LLMErrorsHigh", "DiskSpaceLow", "Watchdog", "TargetDown",
        "BackupTooOld", "RestoreDrillFailed", "AlertmanagerNotificationsFailing",
    }  # fmt: skip
    assert required <= {a.name for a in ALERTS}


def test_runbook_base_url_makes_absolute_links() -> None:
    base = "https://github.com/example/personal-rag/blob/main/docs/runbooks.md"
    rules = render_alert_rules(settings(runbook_base_url=base))
    urls = [r["annotations"]["runbook_url"] for g in rules["groups"] for r in g["rules"]]
    assert all(u.startswith(base + "#") for u in urls)


# --- alertmanager.yml -----------------------------------------------------------------------
def _route(directory: Path, *labels: str) -> str:
    amtool = require_tool("amtool")
    result = run_tool(
        amtool, "config", "routes", "test", "--config.file=alertmanager.yml", *labels, cwd=directory
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.mark.integration
def test_routing_watchdog_to_nobody_without_heartbeat(tmp_path: Path) -> None:
    render_to(tmp_path, settings())
    receiver = _route(tmp_path, "alertname=Watchdog", "severity=none", "stack=staging")
    config = render_alertmanager_config(settings())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers[receiver]) == {"name"}, "Watchdog's receiver must have no integration"
    assert _route(tmp_path, "alertname=RedisDown", "severity=page") == "email"
    assert _route(tmp_path, "alertname=DiskSpaceLow", "severity=ticket") == "ticket-digest"


@pytest.mark.integration
def test_routing_watchdog_to_heartbeat_only(tmp_path: Path) -> None:
    with_heartbeat = settings(heartbeat_url=HEARTBEAT)
    render_to(tmp_path, with_heartbeat)
    receiver = _route(tmp_path, "alertname=Watchdog", "severity=none")
    receivers = {r["name"]: r for r in render_alertmanager_config(with_heartbeat)["receivers"]}
    assert [w["url"] for w in receivers[receiver]["webhook_configs"]] == [HEARTBEAT]
    assert "email_configs" not in receivers[receiver]


def test_route_timings_follow_the_plan() -> None:
    route = render_alertmanager_config(settings())["route"]
    assert route["group_by"] == ["alertname", "severity"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == (
        "30s",
        "5m",
        "4h",
    )
    page = [r for r in route["routes"] if r.get("matchers") == ['severity="page"']]
    assert [r["repeat_interval"] for r in page] == ["1h"]


def test_every_email_is_sent_resolved_and_names_the_stack() -> None:
    config = render_alertmanager_config(settings(stack="prod"))
    emails = [e for r in config["receivers"] for e in r.get("email_configs", [])]
    assert emails
    for email_config in emails:
        assert email_config["send_resolved"] is True
        assert "prod" in email_config["headers"]["Subject"]


def test_smtp_settings_and_password_file_only() -> None:
    config = render_alertmanager_config(settings(smtp_require_tls=False))
    smtp = config["global"]
    assert smtp["smtp_smarthost"] == "smtp.example.com:587"
    assert smtp["smtp_from"] == "alerts@example.com"
    assert smtp["smtp_auth_username"] == "alerts@example.com"
    assert smtp["smtp_auth_password_file"] == "/etc/alertmanager/secrets/smtp_password"
    assert smtp["smtp_require_tls"] is False
    assert "password:" not in json.dumps(config).replace("password_file", "")


# --- inhibition, on a real Alertmanager --------------------------------------------------------
@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    binary = require_tool("prometheus-alertmanager")
    port = free_port()
    monitoring = settings(smtp_smarthost="127.0.0.1:9", smtp_require_tls=False)
    render_to(tmp_path, monitoring)
    process = Process(
        "alertmanager",
        [
            binary,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        tmp_path / "alertmanager.log",
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            process.check_running()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:  # noqa: S310
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(ready, 30, "Alertmanager to be ready")
        yield url
    finally:
        process.stop()


def _post_alerts(url: str, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{url}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        assert response.status == 200


def _alert_states(url: str) -> dict[tuple[str, str], list[str]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as response:  # noqa: S310
        alerts = json.loads(response.read())
    return {
        (a["labels"]["alertname"], a["labels"]["severity"]): a["status"]["inhibitedBy"]
        for a in alerts
    }


def _alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, "severity": severity, "stack": "staging", **labels}}


def _inhibited_after_posting(url: str, alerts: list[dict[str, Any]]) -> dict[str, bool]:
    """alert key -> inhibited, once Alertmanager has evaluated every posted alert.

    Each alert is keyed by its alertname plus its other distinguishing labels."""

    def key(labels: dict[str, str]) -> str:
        extra = sorted((k, v) for k, v in labels.items() if k not in ("alertname", "stack"))
        return labels["alertname"] + "".join(f" {k}={v}" for k, v in extra)

    _post_alerts(url, alerts)
    wanted = {key(a["labels"]) for a in alerts}
    deadline = time.monotonic() + 10
    states: dict[str, bool] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as response:  # noqa: S310
            states = {
                key(a["labels"]): bool(a["status"]["inhibitedBy"])
                for a in json.loads(response.read())
            }
        # Inhibition is computed on read; give the sources a moment to be registered.
        if wanted <= set(states) and any(states.values()):
            break
        time.sleep(0.1)
    assert wanted <= set(states), (wanted, states)
    return states


@pytest.mark.integration
def test_page_inhibits_the_ticket_of_the_same_alertname_only(alertmanager: str) -> None:
    states = _inhibited_after_posting(
        alertmanager,
        [
            _alert("DiskSpaceLow", "page"),
            _alert("DiskSpaceLow", "ticket"),
            _alert("HighLatency", "ticket"),
        ],
    )
    assert states["DiskSpaceLow severity=ticket"], "the ticket twin of a page is inhibited"
    assert not states["DiskSpaceLow severity=page"]
    assert not states["HighLatency severity=ticket"], "other alert names are not inhibited"


@pytest.mark.integration
def test_site_down_inhibits_the_alerts_it_explains_only(alertmanager: str) -> None:
    states = _inhibited_after_posting(
        alertmanager,
        [
            _alert("SiteDown", "page", job="probe-site"),
            _alert("APIDown", "page"),
            _alert("HighErrorRate", "page"),
            _alert("SiteSlow", "ticket", job="probe-site"),
            _alert("APIErrorBudgetFastBurn", "page", slo="availability", burn="fast"),
            _alert("APILatencyBudgetSlowBurn", "ticket", slo="latency", burn="slow"),
            _alert("TargetDown", "ticket", job="api"),
            # Causes, not symptoms: still mailed.
            _alert("RedisDown", "page"),
            _alert("TargetDown", "ticket", job="redis-exporter"),
            _alert("CertificateExpiringSoon", "page", job="probe-redis"),
        ],
    )
    assert not states["SiteDown job=probe-site severity=page"]
    explained = [
        "APIDown severity=page",
        "HighErrorRate severity=page",
        "SiteSlow job=probe-site severity=ticket",
        "APIErrorBudgetFastBurn burn=fast severity=page slo=availability",
        "APILatencyBudgetSlowBurn burn=slow severity=ticket slo=latency",
        "TargetDown job=api severity=ticket",
    ]
    assert {k: states[k] for k in explained} == dict.fromkeys(explained, True)
    causes = [
        "RedisDown severity=page",
        "TargetDown job=redis-exporter severity=ticket",
        "CertificateExpiringSoon job=probe-redis severity=page",
    ]
    assert {k: states[k] for k in causes} == dict.fromkeys(causes, False)


@pytest.mark.integration
def test_fast_burn_inhibits_the_slow_burn_of_the_same_slo(alertmanager: str) -> None:
    states = _inhibited_after_posting(
        alertmanager,
        [
            _alert("APIErrorBudgetFastBurn", "page", slo="availability", burn="fast"),
            _alert("APIErrorBudgetSlowBurn", "ticket", slo="availability", burn="slow"),
            _alert("APILatencyBudgetSlowBurn", "ticket", slo="latency", burn="slow"),
        ],
    )
    assert states["APIErrorBudgetSlowBurn burn=slow severity=ticket slo=availability"]
    assert not states["APILatencyBudgetSlowBurn burn=slow severity=ticket slo=latency"]
    assert not states["APIErrorBudgetFastBurn burn=fast severity=page slo=availability"]


@pytest.mark.integration
def test_every_new_alert_routes_by_its_severity(tmp_path: Path) -> None:
    """amtool routes each alert, with the labels its rule gives it, to page or digest."""
    render_to(tmp_path, settings())
    expected = {"page": "email", "ticket": "ticket-digest"}
    for alert in ALERTS:
        if alert.severity == "none":
            continue
        labels = {"alertname": alert.name, "severity": alert.severity, **alert.labels}
        receiver = _route(tmp_path, *(f"{k}={v}" for k, v in labels.items()), "stack=staging")
        assert receiver == expected[alert.severity], alert.name
    # A label set without a known severity still reaches a human at once.
    assert _route(tmp_path, "alertname=Unknown") == "email"


def test_tickets_are_one_digest_per_stack_a_day() -> None:
    route = render_alertmanager_config(settings())["route"]
    (digest,) = [r for r in route["routes"] if r.get("matchers") == ['severity="ticket"']]
    assert digest["group_by"] == ["stack"], "every open ticket in one mail"
    assert (digest["group_interval"], digest["repeat_interval"]) == ("24h", "24h")


def test_every_subject_names_the_stack() -> None:
    config = render_alertmanager_config(settings(stack="prod", domain="api.example.com"))
    subjects = [
        e["headers"]["Subject"] for r in config["receivers"] for e in r.get("email_configs", [])
    ]
    assert len(subjects) == 2
    assert all(subject.startswith("[prod] ") for subject in subjects)


# --- blackbox.yml ------------------------------------------------------------------------------
def test_site_probe_dials_caddy_with_the_public_name_and_checks_tls() -> None:
    acme = render_blackbox_config(settings(stack="prod", domain="api.example.com"))
    http = acme["modules"]["https_site"]["http"]
    assert http["headers"] == {"Host": "api.example.com"}
    assert http["tls_config"] == {"server_name": "api.example.com"}, "acme: chain verified"
    assert http["fail_if_not_ssl"] is True
    internal = render_blackbox_config(settings(caddy_tls="internal"))
    assert internal["modules"]["https_site"]["http"]["tls_config"]["insecure_skip_verify"]
    redis = acme["modules"]["tls_redis"]["tcp"]
    assert redis["tls"] is True
    assert redis["tls_config"]["server_name"] == "rag-prod-redis"
    assert {"ca_file", "cert_file", "key_file"} <= set(redis["tls_config"])


def test_probe_instances_name_what_users_reach() -> None:
    config = render_prometheus_config(settings())
    probes = {j["job_name"]: j for j in config["scrape_configs"] if j["metrics_path"] == "/probe"}
    assert set(probes) == {"probe-site", "probe-api", "probe-redis"}
    site = probes["probe-site"]
    relabels = {r["target_label"]: r.get("replacement") for r in site["relabel_configs"]}
    assert relabels["instance"] == "https://staging.api.example.com/health"
    assert relabels["__address__"] == "rag-staging-blackbox-exporter:9115"


@pytest.mark.parametrize(
    ("slo", "field", "value"),
    [
        (SloObjectives(availability_percent=90.0), "slo.availability_percent", 90.0),
        (SloObjectives(latency_percent=100.0), "slo.latency_percent", 100.0),
        (SloObjectives(latency_threshold_seconds=0.3), "slo.latency_threshold_seconds", 0.3),
    ],
)
def test_bad_slo_names_the_field_value_and_what_is_expected(
    slo: SloObjectives, field: str, value: float
) -> None:
    with pytest.raises(MonitoringConfigError) as raised:
        settings(slo=slo)
    assert f"{field} = {value!r} is invalid; expected" in str(raised.value)
