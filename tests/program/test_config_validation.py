"""Config that used to be accepted but breaks the deployment (issue 10, items 13-18).

Each case names the key, shows the value and says what is expected, and is raised by
``parse_stack_config`` -- before any resource is registered (the program parses first;
test_config.py::test_bad_config_fails_before_any_resource_is_registered).
"""

from __future__ import annotations

from typing import Any

import pytest

from components.config import ConfigError, StackConfig, parse_stack_config
from tests.pulumi_harness import (
    SECRET_KEYS,
    failure_before_registration,
    stack_config,
)

OTHER_STACKS_STAGING_HTTP = "18080"  # Pulumi.staging.yaml: portOffset 10000


def parse(stack: str, **overrides: str | None) -> StackConfig:
    return parse_stack_config(stack, stack_config(stack, **overrides), SECRET_KEYS)


def problem(stack: str, **overrides: str | None) -> str:
    with pytest.raises(ConfigError) as excinfo:
        parse(stack, **overrides)
    return str(excinfo.value)


REFUSED = [
    # 13: a trailing newline passed `$`
    ("prod", {"alertEmail": "admin@example.com\n"}, "alertEmail"),
    ("prod", {"domain": "api.example.com\n"}, "domain"),
    ("prod", {"imageTag": "latest\n"}, "imageTag"),
    ("prod", {"imageDigest": "sha256:" + "a" * 64 + "\n"}, "imageDigest"),
    ("prod", {"apiUser": "1000:1000\n"}, "apiUser"),
    ("prod", {"backupTime": "03:00\n"}, "backupTime"),
    ("prod", {"cacheHitsMetric": "rag_cache_hits_total\n"}, "cacheHitsMetric"),
    ("prod", {"smtpHost": "smtp.example.com:587\n"}, "smtpHost"),
    ("prod", {"adoptVolumes": '{"postgres": "rag_postgres_data\\n"}'}, "adoptVolumes.postgres"),
    # 14: heartbeatUrl, validated with everything else
    ("prod", {"heartbeatUrl": "https://hc.example.com/ping\n"}, "heartbeatUrl"),
    ("prod", {"heartbeatUrl": 'https://hc.example.com/"x'}, "heartbeatUrl"),
    ("prod", {"heartbeatUrl": "https://hc.example.com/{{ .x }}"}, "heartbeatUrl"),
    ("prod", {"heartbeatUrl": "https://hc.example.com/a b"}, "heartbeatUrl"),
    ("prod", {"heartbeatUrl": "https://hc.example.com/a'b"}, "heartbeatUrl"),
    ("prod", {"heartbeatUrl": "https://"}, "heartbeatUrl"),
    ("prod", {"heartbeatUrl": "http://hc.example.com/ping"}, "heartbeatUrl"),
    # 15: root and out-of-range ids
    ("prod", {"apiUser": "0"}, "apiUser"),
    ("prod", {"apiUser": "0:0"}, "apiUser"),
    ("prod", {"apiUser": "1000:0"}, "apiUser"),
    ("prod", {"apiUser": "0:1000"}, "apiUser"),
    ("prod", {"apiUser": "000"}, "apiUser"),
    ("prod", {"apiUser": "70000:1000"}, "apiUser"),
    ("prod", {"apiUser": "1000:99999999999"}, "apiUser"),
    # 16: another stack's volumes, one volume twice, duplicate keys
    (
        "prod",
        {"adoptVolumes": '{"postgres": "rag-staging-postgres-data"}'},
        "adoptVolumes.postgres",
    ),
    ("staging", {"adoptVolumes": '{"redis": "rag-prod-redis-data"}'}, "adoptVolumes.redis"),
    ("prod", {"adoptVolumes": '{"redis": "shared", "chroma": "shared"}'}, "adoptVolumes"),
    ("prod", {"adoptVolumes": '{"postgres": "a", "postgres": "b"}'}, "adoptVolumes"),
    # 17: host paths that are the root, climb out, or are system directories
    ("prod", {"backupHostPath": "/"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/srv/../etc"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/srv/backups/.."}, "backupHostPath"),
    ("prod", {"backupHostPath": "/etc"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/etc/rag"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/var/lib/docker/volumes/x"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/usr/local/backups"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/root"}, "backupHostPath"),
    ("prod", {"backupHostPath": "//etc"}, "backupHostPath"),
    ("prod", {"backupHostPath": "/srv/backups\n"}, "backupHostPath"),
    ("prod", {"docsHostPath": "/boot"}, "docsHostPath"),
    ("prod", {"docsHostPath": "/proc/self"}, "docsHostPath"),
    ("prod", {"mdsHostPath": "/sys"}, "mdsHostPath"),
    ("prod", {"mdsHostPath": "/dev/shm"}, "mdsHostPath"),
    ("prod", {"mdsHostPath": "/"}, "mdsHostPath"),
    # 18: ports
    ("prod", {"httpPort": OTHER_STACKS_STAGING_HTTP}, "httpPort"),
    ("prod", {"prometheusPort": "19090"}, "prometheusPort"),
    ("staging", {"portOffset": None, "httpPort": "80", "httpsPort": "8443"}, "httpPort"),
    ("staging", {"httpsPort": "18080"}, "httpsPort"),
    ("staging", {"prometheusPort": "999"}, "prometheusPort"),
    ("prod", {"prometheusPort": "900"}, "prometheusPort"),
    ("prod", {"portOffset": "10000"}, "portOffset"),
]


@pytest.mark.parametrize(("stack", "overrides", "key"), REFUSED)
def test_refused_with_key_value_and_expectation(
    stack: str, overrides: dict[str, Any], key: str
) -> None:
    message = problem(stack, **overrides)
    assert f"personal-rag:{key} " in message, message
    shown = overrides.get(key.split(".")[0])
    if shown is not None and "." not in key:
        assert repr(shown) in message, message
    assert "expected" in message, message


ACCEPTED = [
    ("prod", {"heartbeatUrl": "https://hc-ping.com/0b5d-42/rag?x=1&y=%20"}),
    ("prod", {"heartbeatUrl": "http://10.0.0.5:8080/ping", "heartbeatAllowHttp": "true"}),
    ("prod", {"apiUser": "1000"}),
    ("prod", {"apiUser": "1001:1001"}),
    ("prod", {"apiUser": "65534:65534"}),
    ("prod", {"adoptVolumes": '{"postgres": "rag_postgres_data", "redis": "rag_redis_data"}'}),
    ("prod", {"adoptVolumes": '{"postgres": "rag-prod-old-pg"}'}),
    ("prod", {"backupHostPath": "/srv/rag/backups"}),
    ("prod", {"backupHostPath": "/mnt/offsite/rag/"}),
    ("prod", {"backupHostPath": "/var/backups/rag"}),
    ("prod", {"httpPort": "8081"}),
    ("prod", {"httpPort": "80", "httpsPort": "443"}),
    ("staging", {"portOffset": "10000"}),
]


@pytest.mark.parametrize(("stack", "overrides"), ACCEPTED)
def test_good_values_still_parse(stack: str, overrides: dict[str, str]) -> None:
    parse(stack, **overrides)


def test_heartbeat_over_http_needs_the_opt_in_and_names_it() -> None:
    message = problem("prod", heartbeatUrl="http://hc.example.com/ping")
    assert "heartbeatAllowHttp" in message
    with pytest.raises(ConfigError, match="heartbeatAllowHttp"):
        parse("prod", heartbeatAllowHttp="maybe")


def test_port_collision_with_the_other_stack_names_the_key_the_user_set() -> None:
    # The user set portOffset, not httpPort: the message names portOffset and the port.
    # 8080 + 1010 = 9090, prod's Prometheus port.
    message = problem("staging", portOffset="1010")
    assert "personal-rag:portOffset = '1010'" in message and "9090" in message
    message = problem("staging", httpPort="443")
    assert "personal-rag:httpPort = '443'" in message
    # prod's httpPort that staging's file uses: names httpPort, the port and staging.
    message = problem("prod", httpPort=OTHER_STACKS_STAGING_HTTP)
    assert f"personal-rag:httpPort = '{OTHER_STACKS_STAGING_HTTP}'" in message
    assert "staging" in message


def test_an_offset_that_lands_on_the_other_stacks_ports_names_portoffset() -> None:
    # An ephemeral stack with staging's offset would take staging's ports.
    with pytest.raises(ConfigError) as excinfo:
        parse_stack_config(
            "ephemeral-ci1", stack_config("staging", portOffset="10000"), SECRET_KEYS
        )
    message = str(excinfo.value)
    assert "personal-rag:portOffset = '10000'" in message and "staging" in message


def test_bad_heartbeat_fails_before_any_resource_is_registered() -> None:
    config = stack_config("prod", heartbeatUrl='https://x.example.com/"')
    error, seen = failure_before_registration("prod", config)
    assert isinstance(error, ConfigError) and "heartbeatUrl" in str(error), error
    assert seen == []
