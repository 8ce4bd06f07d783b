"""The Caddyfile each stack's Caddy container receives, loaded by the real ``caddy``.

``caddy validate`` provisions every module without serving (offline: no ACME request is
made); ``caddy adapt`` shows what Caddy understood: the stack's domain proxied to the
stack's api over HTTPS, certificates from Caddy's own CA in staging and from ACME with the
alert address in prod.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from components.monitoring_config import SERVICE_PORTS
from tests.encryption.conftest import STACKS
from tests.encryption.helpers import TOOL_TIMEOUT_S, container_inputs, uploaded_files, write_files
from tests.pulumi_harness import ProgramRun
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

API_PORT = 8000  # the api's in-network port (shared naming conventions)


def _caddyfile(run: ProgramRun, directory: Path) -> Path:
    command = container_inputs(run, "caddy")["command"]
    config_path = command[command.index("--config") + 1]
    assert config_path.startswith("/etc/rag/"), command
    write_files(uploaded_files(run, "caddy"), directory)
    return directory / config_path.removeprefix("/etc/rag/")


def _caddy(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # Caddy keeps its local CA under XDG dirs: keep them in the test's temp dir.
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [require_tool("caddy"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("stack", STACKS)
def test_caddy_validates_the_stacks_caddyfile(
    stack: str, runs: dict[str, ProgramRun], tmp_path: Path
) -> None:
    caddyfile = _caddyfile(runs[stack], tmp_path / "etc")
    result = _caddy("validate", "--config", str(caddyfile), "--adapter", "caddyfile", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def _adapted(run: ProgramRun, tmp_path: Path) -> dict[str, Any]:
    caddyfile = _caddyfile(run, tmp_path / "etc")
    result = _caddy("adapt", "--config", str(caddyfile), "--adapter", "caddyfile", home=tmp_path)
    assert result.returncode == 0, result.stderr
    adapted: dict[str, Any] = json.loads(result.stdout)
    return adapted


def _routes_by_host(adapted: dict[str, Any]) -> dict[str, list[str]]:
    """host -> upstream dial addresses, from the adapted JSON."""
    found: dict[str, list[str]] = {}

    def dials(handlers: list[dict[str, Any]]) -> list[str]:
        out = []
        for handler in handlers:
            if handler.get("handler") == "reverse_proxy":
                out += [u["dial"] for u in handler.get("upstreams", [])]
            for route in handler.get("routes", []):
                out += dials(route.get("handle", []))
        return out

    for server in adapted["apps"]["http"]["servers"].values():
        if server["listen"] == [f":{SERVICE_PORTS['caddy-metrics']}"]:
            # Prometheus's listener: metrics only, never a route to the api.
            assert dials([h for r in server["routes"] for h in r["handle"]]) == []
            continue
        assert server["listen"] == [":443"], server["listen"]
        for route in server["routes"]:
            for match in route.get("match", []):
                for host in match.get("host", []):
                    found.setdefault(host, []).extend(dials(route.get("handle", [])))
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_caddy_proxies_the_stacks_domain_to_its_own_api_over_https(
    stack: str, runs: dict[str, ProgramRun], tmp_path: Path
) -> None:
    run = runs[stack]
    routes = _routes_by_host(_adapted(run, tmp_path))
    assert routes == {run.config["domain"]: [f"rag-{stack}-api:{API_PORT}"]}


def _issuers(adapted: dict[str, Any], domain: str) -> list[dict[str, Any]]:
    for policy in adapted["apps"]["tls"]["automation"]["policies"]:
        if domain in policy.get("subjects", []):
            return list(policy["issuers"])
    raise AssertionError(f"no TLS automation policy for {domain}")


def test_staging_uses_caddys_own_ca_and_prod_uses_acme(
    runs: dict[str, ProgramRun], tmp_path: Path
) -> None:
    staging, prod = runs["staging"], runs["prod"]
    staging_issuers = _issuers(_adapted(staging, tmp_path / "staging"), staging.config["domain"])
    assert [issuer["module"] for issuer in staging_issuers] == ["internal"]
    prod_issuers = _issuers(_adapted(prod, tmp_path / "prod"), prod.config["domain"])
    assert "acme" in [issuer["module"] for issuer in prod_issuers]
    assert "internal" not in [issuer["module"] for issuer in prod_issuers]
    assert {issuer.get("email") for issuer in prod_issuers} == {prod.config["alertEmail"]}
