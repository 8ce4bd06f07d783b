"""The SLO keys of the stack config: defaults, values reaching the rules, and clear errors
naming the key before any resource exists (the same checks the monitoring settings use)."""

from __future__ import annotations

import pytest

from components.config import ConfigError, parse_stack_config
from components.monitoring_config import (
    BURN_WINDOWS,
    SLO_KINDS,
    SloObjectives,
    burn_rate_expression,
)
from components.monitoring_render import settings_from_config
from tests.pulumi_harness import (
    SECRET_KEYS,
    failure_before_registration,
    stack_config,
)


def _parse(**overrides: str) -> SloObjectives:
    return parse_stack_config("staging", stack_config("staging", **overrides), SECRET_KEYS).slo


def test_defaults_and_values_reach_the_rules() -> None:
    assert _parse() == SloObjectives(99.5, 99.0, 1.0)
    slo = _parse(sloAvailability="99.9", sloLatency="95", sloLatencyThreshold="2.5")
    assert slo == SloObjectives(99.9, 95.0, 2.5)
    cfg = parse_stack_config(
        "staging", stack_config("staging", sloAvailability="99.9"), SECRET_KEYS
    )
    monitoring = settings_from_config(cfg)
    availability, latency = SLO_KINDS
    fast = BURN_WINDOWS[0]
    # 14.4 x a 0.1 % budget.
    assert "> 0.0144)" in burn_rate_expression(monitoring, availability, fast)
    assert 'le=~"1(' in burn_rate_expression(monitoring, latency, fast)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("sloAvailability", "90", "a percentage above 93.06 and below 100"),
        ("sloAvailability", "100", "a percentage above 93.06 and below 100"),
        ("sloLatency", "ninety", "a number, e.g. 99.5"),
        ("sloLatency", "nan", "a percentage above 93.06 and below 100"),
        ("sloLatencyThreshold", "0.3", "one of Caddy's histogram buckets"),
    ],
)
def test_bad_slo_values_name_the_key_and_what_is_expected(
    key: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        _parse(**{key: value})
    message = str(raised.value)
    assert f"personal-rag:{key} = {value!r} is invalid; expected" in message
    assert expected in message


def test_a_bad_slo_stops_the_program_before_any_resource() -> None:
    config = stack_config("staging", sloAvailability="50")
    error, seen = failure_before_registration("staging", config)
    assert isinstance(error, ConfigError), error
    assert "personal-rag:sloAvailability = '50'" in str(error)
    assert seen == []
