"""Each monitoring container's healthcheck command, run for real against the service.

The prom/*, postgres-exporter and redis_exporter-alpine images ship busybox, so the probe is
run with busybox's wget (the applet the images contain), pointed at the Debian build of the
same service on a free loopback port. It must pass while the service serves and fail once
it is stopped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from components.monitoring_config import (
    HEALTHCHECK_TESTS,
    MONITORING_IMAGES,
    healthcheck_test,
)
from tests.monitoring.helpers import render_to, settings
from tests.monitoring.live import Process, free_port, wait_until
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

BINARIES = {
    "prometheus": "prometheus",
    "alertmanager": "prometheus-alertmanager",
    "node-exporter": "prometheus-node-exporter",
    "redis-exporter": "prometheus-redis-exporter",
    "postgres-exporter": "prometheus-postgres-exporter",
    "blackbox-exporter": "prometheus-blackbox-exporter",
}


def _service_args(service: str, port: int, tmp_path: Path) -> list[str]:
    listen = f"--web.listen-address=127.0.0.1:{port}"
    if service == "prometheus":
        return [listen, f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}"]  # fmt: skip
    if service == "alertmanager":
        return [listen, f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am'}", "--cluster.listen-address="]  # fmt: skip
    if service == "blackbox-exporter":
        return [listen, f"--config.file={tmp_path / 'blackbox.yml'}"]
    return [listen]


def _probe(busybox: str, service: str, port: int) -> int:
    command = healthcheck_test(service, port)
    assert command[0] == "CMD"
    assert command[1] == "wget", "only wget exists in these images (no curl, no shell)"
    return subprocess.run(
        [busybox, *command[1:]], capture_output=True, timeout=15, check=False
    ).returncode


def test_every_monitoring_image_has_a_healthcheck() -> None:
    assert set(HEALTHCHECK_TESTS) == set(MONITORING_IMAGES)
    # redis_exporter's default image is FROM scratch: no wget for the probe.
    assert MONITORING_IMAGES["redis-exporter"].split("@")[0].endswith("-alpine")


@pytest.mark.parametrize("service", sorted(BINARIES))
def test_healthcheck_passes_when_serving_and_fails_when_stopped(
    service: str, tmp_path: Path
) -> None:
    busybox = require_tool("busybox")
    binary = require_tool(BINARIES[service])
    render_to(tmp_path, settings())
    port = free_port()
    # postgres_exporter refuses to start without a DSN; nothing needs to listen there.
    env = {"DATA_SOURCE_NAME": f"postgresql://monitor@127.0.0.1:{free_port()}/x?sslmode=disable"}
    process = Process(
        service, [binary, *_service_args(service, port, tmp_path)], tmp_path / "log", env
    )
    process.start()
    try:

        def healthy() -> bool:
            process.check_running()
            return _probe(busybox, service, port) == 0

        wait_until(healthy, 30, f"{service} healthcheck to pass", interval=0.2)
    finally:
        process.stop()
    assert _probe(busybox, service, port) != 0, "the probe must fail when nothing serves"
