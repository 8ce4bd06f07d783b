"""The blackbox probe and Caddy's metrics under Pulumi mocks, for both stacks: the container
is hardened like the others, sits on the networks it must reach (and no other), presents a
client certificate of its own stack's CA, and deploys exactly the rendered blackbox.yml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from components.monitoring_render import main as render_main
from tests.pulumi_harness import ProgramRun, is_secret, run_program, uploaded_files

STACKS = ("staging", "prod")
BLACKBOX = "blackbox-exporter"


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


def _networks(run: ProgramRun, service: str) -> set[str]:
    container = run.containers[f"rag-{run.stack}-{service}"]
    return {n["name"] for n in container.inputs["networksAdvanced"]}


@pytest.mark.parametrize("stack", STACKS)
def test_blackbox_is_hardened(stack: str, runs: dict[str, ProgramRun]) -> None:
    inputs = runs[stack].containers[f"rag-{stack}-{BLACKBOX}"].inputs
    assert inputs["capabilities"] == {"drops": ["ALL"], "adds": []}
    assert "no-new-privileges:true" in inputs["securityOpts"]
    assert inputs["readOnly"] is True
    assert inputs.get("privileged", False) is False
    assert inputs["user"] == "65534:65534"
    assert inputs["memory"] > 0 and inputs["memorySwap"] == inputs["memory"]
    assert inputs["restart"] == "on-failure"
    assert inputs["healthcheck"]["tests"][0] == "CMD"
    assert "ports" not in inputs or not inputs["ports"], "the prober is never published"
    assert inputs["image"].startswith("prom/blackbox-exporter:")
    assert inputs["command"] == ["--config.file=/etc/rag/blackbox.yml"]


@pytest.mark.parametrize("stack", STACKS)
def test_probe_and_scraper_networks(stack: str, runs: dict[str, ProgramRun]) -> None:
    run = runs[stack]
    own = {f"rag-{stack}-{n}" for n in ("monitoring", "frontend", "backend")}
    # Scraped on monitoring; Caddy on the frontend; the api and Redis on the backend.
    assert _networks(run, BLACKBOX) == own
    # Prometheus reaches Caddy's metrics listener on the frontend; Caddy itself is not moved.
    assert f"rag-{stack}-frontend" in _networks(run, "prometheus")
    assert _networks(run, "caddy") == {f"rag-{stack}-frontend"}


@pytest.mark.parametrize("stack", STACKS)
def test_probe_presents_its_own_client_certificate_of_its_stacks_ca(
    stack: str, runs: dict[str, ProgramRun]
) -> None:
    run = runs[stack]
    files = uploaded_files(run, BLACKBOX)
    ca = x509.load_pem_x509_certificate(files["tls/ca.crt"].encode())
    cert = x509.load_pem_x509_certificate(files["tls/client.crt"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string().startswith(f"CN=rag-{stack}-{BLACKBOX}")
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
    # Not another client's pair: the exporter's certificate differs.
    assert files["tls/client.crt"] != uploaded_files(run, "redis-exporter")["tls/client.crt"]
    assert files["tls/ca.crt"] == uploaded_files(run, "redis")["tls/ca.crt"], "Redis's own CA"
    init = run.containers[f"rag-{stack}-{BLACKBOX}-config-init"]
    assert is_secret(init.raw_inputs["uploads"]), "the private key travels as a secret"
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)


def test_stacks_do_not_trust_each_other(runs: dict[str, ProgramRun]) -> None:
    staging = uploaded_files(runs["staging"], BLACKBOX)
    prod = uploaded_files(runs["prod"], BLACKBOX)
    prod_ca = x509.load_pem_x509_certificate(prod["tls/ca.crt"].encode())
    staging_cert = x509.load_pem_x509_certificate(staging["tls/client.crt"].encode())
    with pytest.raises(ValueError, match="issuer"):
        staging_cert.verify_directly_issued_by(prod_ca)


@pytest.mark.parametrize("stack", STACKS)
def test_blackbox_config_is_the_rendered_one_and_probes_this_stack(
    stack: str, runs: dict[str, ProgramRun], tmp_path: Path
) -> None:
    run = runs[stack]
    deployed = uploaded_files(run, BLACKBOX)["blackbox.yml"]
    assert render_main(["--stack", stack, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "blackbox.yml").read_text() == deployed
    modules = yaml.safe_load(deployed)["modules"]
    domain = run.config["domain"]
    assert modules["https_site"]["http"]["headers"] == {"Host": domain}
    redis_tls = modules["tls_redis"]["tcp"]["tls_config"]
    assert redis_tls["server_name"] == f"rag-{stack}-redis"
    # The files it names are the ones uploaded next to it.
    for key in ("ca_file", "cert_file", "key_file"):
        assert redis_tls[key].removeprefix("/etc/rag/") in uploaded_files(run, BLACKBOX)
    prometheus = yaml.safe_load(uploaded_files(run, "prometheus")["prometheus.yml"])
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["caddy"]["static_configs"] == [{"targets": [f"rag-{stack}-caddy:2020"]}]
    assert jobs["probe-site"]["static_configs"] == [
        {"targets": [f"https://rag-{stack}-caddy:443/health"]}
    ]
