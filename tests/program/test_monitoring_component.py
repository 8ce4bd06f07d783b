"""The Monitoring component under mocks: containers, networks, files, secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.monitoring_render import main as render_main
from tests.pulumi_harness import ProgramRun, is_secret, run_program, uploaded_files

STACKS = ("staging", "prod")
SERVICES = ("prometheus", "alertmanager", "node-exporter", "redis-exporter", "postgres-exporter")


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


def test_monitoring_services_exist_per_stack(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        assert any(r.typ == "personal-rag:index:Monitoring" for r in run.resources)
        for service in SERVICES:
            assert f"rag-{stack}-{service}" in run.containers


def test_exporters_stay_on_the_internal_backend(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        for exporter in ("node-exporter", "redis-exporter", "postgres-exporter"):
            nets = {
                n["name"]
                for n in run.containers[f"rag-{stack}-{exporter}"].inputs["networksAdvanced"]
            }
            assert nets == {f"rag-{stack}-backend"}
        prom = {
            n["name"] for n in run.containers[f"rag-{stack}-prometheus"].inputs["networksAdvanced"]
        }
        # The frontend for Caddy's metrics listener (the api's SLOs).
        assert prom == {f"rag-{stack}-backend", f"rag-{stack}-monitoring", f"rag-{stack}-frontend"}
        am = {
            n["name"]
            for n in run.containers[f"rag-{stack}-alertmanager"].inputs["networksAdvanced"]
        }
        assert am == {f"rag-{stack}-monitoring"}


def test_uis_publish_on_loopback_with_per_stack_ports(runs: dict[str, ProgramRun]) -> None:
    published = {}
    for stack, run in runs.items():
        for service, internal in (("prometheus", 9090), ("alertmanager", 9093)):
            (port,) = run.containers[f"rag-{stack}-{service}"].inputs["ports"]
            assert port["ip"] == "127.0.0.1" and port["internal"] == internal
            published[(stack, service)] = port["external"]
    assert published[("prod", "prometheus")] == 9090
    assert published[("prod", "alertmanager")] == 9093
    assert len(set(published.values())) == 4


def test_alertmanager_reads_the_smtp_password_from_a_secret_file(
    runs: dict[str, ProgramRun],
) -> None:
    for stack, run in runs.items():
        name = f"rag-{stack}-alertmanager"
        files = uploaded_files(run, "alertmanager")
        config = yaml.safe_load(files["alertmanager.yml"])
        password_file = config["global"]["smtp_auth_password_file"]
        assert "smtp-password-for-tests" not in files["alertmanager.yml"]
        relative = password_file.removeprefix("/etc/rag/")
        assert files[relative] == "smtp-password-for-tests"
        assert is_secret(run.containers[f"{name}-config-init"].raw_inputs["uploads"])
        assert not any("SMTP" in e for e in run.containers[name].inputs.get("envs", []))
        command = run.containers[name].inputs["command"]
        assert "--config.file=/etc/rag/alertmanager.yml" in command


def test_prometheus_config_points_at_this_stacks_services(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        files = uploaded_files(run, "prometheus")
        config = yaml.safe_load(files["prometheus.yml"])
        assert config["global"]["external_labels"]["stack"] == stack
        targets = [
            t
            for job in config["scrape_configs"]
            for sc in job["static_configs"]
            for t in sc["targets"]
        ]
        # Scrape targets are host:port; probe targets URLs of this stack's containers.
        hosts = [t.split("://")[-1] for t in targets]
        assert hosts and all(h.startswith(f"rag-{stack}-") for h in hosts), targets
        assert "alerts.yml" in files


def test_redis_exporter_uses_its_own_user_cert_and_password_file(
    runs: dict[str, ProgramRun],
) -> None:
    for stack, run in runs.items():
        name = f"rag-{stack}-redis-exporter"
        command = run.containers[name].inputs["command"]
        assert f"--redis.addr=rediss://rag-{stack}-redis:6379" in command
        assert "--redis.user=exporter" in command
        assert not any(c.startswith("--redis.password=") for c in command)
        files = uploaded_files(run, "redis-exporter")
        password_map = json.loads(files["secrets/redis_password.json"])
        assert list(password_map) == [f"rediss://rag-{stack}-redis:6379"]
        assert {"tls/ca.crt", "tls/client.crt", "tls/client.key"} <= set(files)


def test_render_command_writes_what_the_stack_deploys(
    runs: dict[str, ProgramRun], tmp_path: Path
) -> None:
    """The PR lint command and `pulumi up` must agree, file for file."""
    for stack, run in runs.items():
        out = tmp_path / stack
        assert render_main(["--stack", stack, "--out", str(out)]) == 0
        deployed = {
            **uploaded_files(run, "prometheus"),
            **uploaded_files(run, "alertmanager"),
        }
        for name in ("prometheus.yml", "alerts.yml", "alertmanager.yml"):
            assert (out / name).read_text() == deployed[name], (stack, name)
