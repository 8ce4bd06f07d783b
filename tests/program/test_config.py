"""Stack config validation: every bad input fails before any resource, naming key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import ConfigError, StackConfig, parse_stack_config
from tests.pulumi_harness import (
    SECRET_KEYS,
    failure_before_registration,
    stack_config,
)

SECRET_VALUE = "smtp-password-for-tests"


def parse(stack: str, secret_keys: set[str] = SECRET_KEYS, **overrides: str | None) -> StackConfig:
    return parse_stack_config(stack, stack_config(stack, **overrides), secret_keys)


def parse_overrides(stack: str, overrides: dict[str, str | None]) -> StackConfig:
    return parse_stack_config(stack, stack_config(stack, **overrides), SECRET_KEYS)


def test_both_committed_stack_files_parse() -> None:
    import yaml

    repo = Path(__file__).resolve().parents[2]
    for stack in ("staging", "prod"):
        data = yaml.safe_load((repo / f"Pulumi.{stack}.yaml").read_text())
        raw = {k.split(":", 1)[1]: str(v) for k, v in data["config"].items()}
        assert "smtpPassword" not in raw, "secrets never live in plaintext stack files"
        cfg = parse_stack_config(stack, {**raw, "smtpPassword": "x"}, {"smtpPassword"})
        assert cfg.stack == stack


def test_staging_gets_the_plans_settings_and_loopback_ports() -> None:
    repo = Path(__file__).resolve().parents[2]
    import yaml

    data = yaml.safe_load((repo / "Pulumi.staging.yaml").read_text())
    raw = {k.split(":", 1)[1]: str(v) for k, v in data["config"].items()}
    cfg = parse_stack_config("staging", {**raw, "smtpPassword": "x"}, {"smtpPassword"})
    assert cfg.app.log_level == "DEBUG"
    assert cfg.app.session_queries_per_hour == 100
    assert not cfg.ports.caddy_public
    prod_ports = {80, 443, 9090, 9093}
    staging_ports = {cfg.ports.http, cfg.ports.https, cfg.ports.prometheus, cfg.ports.alertmanager}
    assert not staging_ports & prod_ports


BAD_INPUTS = [
    # (stack, overrides, key named in the message, value shown)
    ("prod", {"alertEmail": "admin-at-example.com"}, "alertEmail", "admin-at-example.com"),
    ("prod", {"smtpFrom": "alerts@"}, "smtpFrom", "alerts@"),
    ("prod", {"smtpHost": "smtp.example.com"}, "smtpHost", "smtp.example.com"),
    ("prod", {"smtpHost": "smtp.example.com:99999"}, "smtpHost", "smtp.example.com:99999"),
    ("prod", {"domain": "not a domain"}, "domain", "not a domain"),
    ("prod", {"image": "ghcr.io/Owner/Rag:latest"}, "image", "ghcr.io/Owner/Rag:latest"),
    ("prod", {"imageTag": "-bad"}, "imageTag", "-bad"),
    ("prod", {"imageDigest": "sha256:1234"}, "imageDigest", "sha256:1234"),
    ("staging", {"portOffset": "0"}, "portOffset", "0"),
    ("staging", {"portOffset": None}, "portOffset", None),
    ("staging", {"portOffset": "60000"}, "portOffset", "60000"),
    ("staging", {"prometheusPort": "9090"}, "prometheusPort", "9090"),
    ("prod", {"prometheusPort": "9093"}, "prometheusPort", "9093"),
    ("prod", {"logLevel": "LOUD"}, "logLevel", "LOUD"),
    ("prod", {"sessionQueriesPerHour": "many"}, "sessionQueriesPerHour", "many"),
    ("prod", {"caddyTls": "selfsigned"}, "caddyTls", "selfsigned"),
    ("prod", {"heartbeatUrl": "ftp://x"}, "heartbeatUrl", "ftp://x"),
    ("prod", {"docsHostPath": "/does/not/exist"}, "docsHostPath", "/does/not/exist"),
    ("prod", {"docsHostPath": "relative/docs"}, "docsHostPath", "relative/docs"),
    ("prod", {"buildContext": "/does/not/exist"}, "buildContext", "/does/not/exist"),
    ("prod", {"backupTime": "25:00"}, "backupTime", "25:00"),
    ("prod", {"drillWeekday": "someday"}, "drillWeekday", "someday"),
    ("prod", {"backupPgLogicalWeekday": "weekly"}, "backupPgLogicalWeekday", "weekly"),
    ("prod", {"adoptVolumes": '{"mongo": "x"}'}, "adoptVolumes", '{"mongo": "x"}'),
    ("prod", {"adoptVolumes": "not json"}, "adoptVolumes", "not json"),
    ("prod", {"cacheHitsMetric": "cache-hits"}, "cacheHitsMetric", "cache-hits"),
    ("prod", {"smtpHostname": "typo"}, "smtpHostname", None),
]


@pytest.mark.parametrize(("stack", "overrides", "key", "shown"), BAD_INPUTS)
def test_bad_value_names_key_and_value(
    stack: str, overrides: dict[str, str | None], key: str, shown: str | None
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_overrides(stack, overrides)
    message = str(excinfo.value)
    assert f"personal-rag:{key}" in message
    if shown is not None:
        assert repr(shown) in message
    assert "expected" in message or "not a known setting" in message
    assert SECRET_VALUE not in message


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match="did you mean smtpHost"):
        parse("prod", smtpHosts="smtp.example.com:587")


def test_unknown_stack_name() -> None:
    with pytest.raises(ConfigError, match="stack name 'production' is unknown"):
        parse_stack_config("production", stack_config("prod"), SECRET_KEYS)


def test_ephemeral_stacks_are_allowed_with_an_offset() -> None:
    cfg = parse_stack_config(
        "ephemeral-ci1", stack_config("staging", portOffset="20000"), SECRET_KEYS
    )
    assert cfg.ports.http == 28080


def test_missing_secret() -> None:
    with pytest.raises(ConfigError, match=r"smtpPassword is not set; expected a secret"):
        parse("prod", smtpPassword=None)


def test_secret_in_plaintext_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse("prod", secret_keys=set())
    assert "smtpPassword is stored in plaintext" in str(excinfo.value)
    assert SECRET_VALUE not in str(excinfo.value)


def test_secret_is_hidden_in_repr() -> None:
    cfg = parse("prod")
    assert SECRET_VALUE not in repr(cfg)
    assert cfg.smtp.password.reveal() == SECRET_VALUE


def test_build_mode_requires_the_registry_token(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile.prod").write_text("FROM scratch\n")
    with pytest.raises(ConfigError, match="ghcrToken is not set"):
        parse("prod", buildContext=str(tmp_path))


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse("prod", alertEmail="x", smtpHost="y", logLevel="z")
    assert len(excinfo.value.problems) == 3


def test_remote_docker_host_skips_local_path_checks() -> None:
    cfg = parse_stack_config(
        "prod",
        stack_config("prod", docsHostPath="/srv/rag/docs"),
        SECRET_KEYS,
        docker_host="ssh://deploy@vps",
    )
    assert cfg.docs_host_path == "/srv/rag/docs"


def test_bad_config_fails_before_any_resource_is_registered() -> None:
    # Run the real program: the error must come before the first registration.
    error, seen = failure_before_registration("prod", stack_config("prod", alertEmail="nope"))
    assert isinstance(error, ConfigError) and "alertEmail" in str(error), error
    assert seen == []


def test_load_reads_config_the_way_the_engine_passes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Python language host hands config over in PULUMI_CONFIG (JSON) and the secret
    keys in PULUMI_CONFIG_SECRET_KEYS; nothing is set in-process."""
    import json

    import pulumi

    from components.config import load_stack_config
    from tests.pulumi_harness import RecordingMocks

    pulumi.runtime.set_mocks(RecordingMocks("staging"), project="personal-rag", stack="staging")
    pulumi.runtime.set_all_config({}, [])
    raw = stack_config("staging")
    monkeypatch.setenv(
        "PULUMI_CONFIG",
        json.dumps({**{f"personal-rag:{k}": v for k, v in raw.items()}, "docker:host": "ssh://x"}),
    )
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", json.dumps(["personal-rag:smtpPassword"]))
    cfg = load_stack_config()
    assert cfg.stack == "staging" and cfg.app.log_level == "DEBUG"
    assert cfg.smtp.password.reveal() == SECRET_VALUE

    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", "[]")
    with pytest.raises(ConfigError, match="smtpPassword is stored in plaintext"):
        load_stack_config()
