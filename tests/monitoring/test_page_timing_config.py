"""The mailed alerts' Alertmanager timings as stack config (alertGroupWait,
alertGroupInterval): defaults, values reaching the alertmanager.yml the program uploads
(and amtool accepting it), and clear errors naming the key before any resource exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, parse_stack_config
from components.monitoring_config import PageTimings
from tests.monitoring.helpers import run_tool
from tests.pulumi_harness import (
    SECRET_KEYS,
    failure_before_registration,
    run_program,
    stack_config,
    uploaded_files,
)
from tests.tooling import require_tool


def _parse(**overrides: str) -> PageTimings:
    cfg = parse_stack_config("staging", stack_config("staging", **overrides), SECRET_KEYS)
    return cfg.page_timings


def test_defaults_are_the_production_timings() -> None:
    assert _parse() == PageTimings(group_wait="30s", group_interval="5m")


@pytest.mark.integration
def test_values_reach_the_uploaded_alertmanager_config_which_amtool_accepts(
    tmp_path: Path,
) -> None:
    run = run_program(
        "staging", stack_config("staging", alertGroupWait="10s", alertGroupInterval="1m")
    )
    text = uploaded_files(run, "alertmanager")["alertmanager.yml"]
    route = yaml.safe_load(text)["route"]
    assert (route["group_wait"], route["group_interval"]) == ("10s", "1m")
    (tmp_path / "alertmanager.yml").write_text(text)
    checked = run_tool(require_tool("amtool"), "check-config", "alertmanager.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The other stack keeps its own (default) timings.
    prod = yaml.safe_load(uploaded_files(run_program("prod"), "alertmanager")["alertmanager.yml"])
    assert (prod["route"]["group_wait"], prod["route"]["group_interval"]) == ("30s", "5m")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("alertGroupWait", "soon", "a duration from 0s to 1h"),
        ("alertGroupWait", "2h", "a duration from 0s to 1h"),
        ("alertGroupInterval", "0s", "a duration from 1s to 1h"),
        ("alertGroupInterval", "5 minutes", "a duration from 1s to 1h"),
    ],
)
def test_bad_timings_name_the_key_and_what_is_expected(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _parse(**{key: value})
    message = str(raised.value)
    assert f"personal-rag:{key} = {value!r} is invalid; expected {expected}" in message


def test_a_bad_timing_stops_the_program_before_any_resource() -> None:
    config = stack_config("staging", alertGroupInterval="0s")
    error, seen = failure_before_registration("staging", config)
    assert isinstance(error, ConfigError), error
    assert "personal-rag:alertGroupInterval = '0s'" in str(error)
    assert seen == []
