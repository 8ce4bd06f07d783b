"""The SLO ratios the burn-rate rules use, evaluated by a real Prometheus scraping a real
Caddy that runs the generated Caddyfile: the api answering 500 for a share of requests,
then not reachable at all (Caddy's own 502s), show up as that share of bad requests.

promtool (test_alert_rules.py) proves the rules on synthetic series; this proves the series
are the ones Caddy really exposes. Only ports move: the site's 443/80 and the admin
endpoint to free loopback ports, and trust installation is skipped (Caddy's internal CA
must not touch the machine's trust store).
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.monitoring_config import (
    SLO_KINDS,
    dump_yaml,
    render_prometheus_config,
    slo_bad_ratio,
)
from components.service_files import render_caddyfile
from tests.monitoring.helpers import settings
from tests.monitoring.live import Process, _http_ok, wait_until
from tests.servers import free_port
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

DOMAIN = "staging.api.example.com"
WINDOW = "1m"
SLOW_S = 1.3


class Upstream:
    """The api stand-in behind Caddy: every ``fail_every``-th request answers 500, every
    ``slow_every``-th takes SLOW_S (over the 1 s latency threshold)."""

    def __init__(self, port: int) -> None:
        self.fail_every = 0
        self.slow_every = 0
        self.count = 0
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream.count += 1
                n = upstream.count
                failing = upstream.fail_every and n % upstream.fail_every == 0
                if upstream.slow_every and n % upstream.slow_every == 0:
                    time.sleep(SLOW_S)
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _get(port: int) -> int:
    """One HTTPS request to Caddy as a browser sends it (SNI and Host = the domain)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # Caddy's internal CA, not trusted here
    request = f"GET /ask HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=DOMAIN) as tls,
    ):
        tls.sendall(request)
        status_line = tls.recv(64).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, object]]:
    caddy_bin, prometheus_bin = require_tool("caddy"), require_tool("prometheus")
    ports = {n: free_port() for n in ("api", "https", "http", "admin", "metrics", "prom")}
    upstream = Upstream(ports["api"])
    caddyfile = render_caddyfile(
        DOMAIN, f"127.0.0.1:{ports['api']}", "internal", "ops@example.com", ports["metrics"]
    )
    moved = caddyfile.replace(
        "admin localhost:2019",
        f"admin localhost:{ports['admin']}\n\thttps_port {ports['https']}\n"
        f"\thttp_port {ports['http']}\n\tskip_install_trust",
    )
    assert moved != caddyfile
    (tmp_path / "Caddyfile").write_text(moved)
    monitoring = settings(
        scrape_interval="1s",
        scrape_timeout="1s",
        evaluation_interval="1s",
        targets={"caddy": f"127.0.0.1:{ports['metrics']}", "alertmanager": "127.0.0.1:9"},
    )
    (tmp_path / "prometheus.yml").write_text(dump_yaml(render_prometheus_config(monitoring)))
    (tmp_path / "alerts.yml").write_text("groups: []\n")
    home = tmp_path / "home"
    caddy = Process(
        "caddy",
        [caddy_bin, "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"],
        tmp_path / "caddy.log",
        extra_env={
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
        },
    )
    prometheus = Process(
        "prometheus",
        [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{ports['prom']}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        for process, url in (
            (caddy, f"http://127.0.0.1:{ports['metrics']}/metrics"),
            (prometheus, f"http://127.0.0.1:{ports['prom']}/-/ready"),
        ):
            process.start()

            def ready(process: Process = process, url: str = url) -> bool:
                process.check_running()
                return _http_ok(url)

            wait_until(ready, 30, f"{process.name} to serve")
        yield {"ports": ports, "upstream": upstream, "settings": monitoring}
    finally:
        prometheus.stop()
        caddy.stop()
        upstream.close()


def _bad_ratio(stack: dict[str, object], kind: str) -> float | None:
    import json
    import urllib.parse
    import urllib.request

    ports = stack["ports"]
    assert isinstance(ports, dict)
    slo = next(k for k in SLO_KINDS if k.name == kind)
    query = slo_bad_ratio(stack["settings"], slo, WINDOW)  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{ports['prom']}/api/v1/query?" + urllib.parse.urlencode(
        {"query": query}
    )
    with urllib.request.urlopen(url, timeout=5) as response:
        result = json.loads(response.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def _traffic_until(stack: dict[str, object], kind: str, low: float, high: float) -> float:
    """Send requests until the SLO's bad ratio (as Prometheus computes it) is in range."""
    ports = stack["ports"]
    assert isinstance(ports, dict)
    seen: list[float | None] = []

    def in_range() -> bool:
        for _ in range(20):
            _get(ports["https"])
        seen.append(_bad_ratio(stack, kind))
        value = seen[-1]
        return value is not None and low <= value <= high

    try:
        wait_until(in_range, 60, f"{kind} bad ratio in [{low}, {high}]", interval=0.5)
    except TimeoutError as error:
        raise AssertionError(f"{error}; ratios seen: {seen[-10:]}") from None
    value = seen[-1]
    assert value is not None
    return value


def test_api_5xx_slow_answers_and_caddys_own_502s_are_bad_requests(
    stack: dict[str, object],
) -> None:
    upstream = stack["upstream"]
    assert isinstance(upstream, Upstream)
    ports = stack["ports"]
    assert isinstance(ports, dict)
    assert _get(ports["https"]) == 200
    # All good: both ratios are 0 (not "no data", which would hide a wrong selector).
    _traffic_until(stack, "availability", 0.0, 0.0)
    _traffic_until(stack, "latency", 0.0, 0.0)

    upstream.fail_every = 4  # the api answers 500 to a quarter of the requests
    _traffic_until(stack, "availability", 0.15, 0.3)

    upstream.fail_every, upstream.slow_every = 0, 4  # a quarter take 1.3 s
    _traffic_until(stack, "latency", 0.1, 0.3)

    upstream.close()  # the api is gone: Caddy answers 502 itself
    assert _get(ports["https"]) == 502
    _traffic_until(stack, "availability", 0.6, 1.0)
