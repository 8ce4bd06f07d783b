"""The host firewall step under mocks: local and remote (SSH) modes, triggers, opt-out,
and the errors for hosts it cannot reach. tests/docker/test_host_firewall_command.py
runs the very commands on a real host (and over a real SSH session)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

import pytest

from components import host_firewall
from components.app_stack import backend_bridge_name
from components.config import ConfigError
from tests.pulumi_harness import ProgramRun, Recorded, is_secret, run_program
from tests.pulumi_harness import stack_config as make_config

LOCAL = "command:local:Command"
REMOTE = "command:remote:Command"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheDockerHostForTests0000000000"
CLIENT_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key-for-mocks\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


def commands(run: ProgramRun) -> list[Recorded]:
    return [r for r in run.resources if r.typ in (LOCAL, REMOTE)]


@pytest.fixture
def ssh_files(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "id_ed25519"
    key.write_text(CLIENT_KEY)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"other.example.com {HOST_KEY}X\n[docker.example.com]:2222 {HOST_KEY}\n")
    return {"hostSshKeyFile": str(key), "hostSshKnownHostsFile": str(known_hosts)}


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_local_docker_host_gets_a_local_command_for_its_backend_bridge(stack: str) -> None:
    run = run_program(stack)
    (cmd,) = commands(run)
    assert cmd.typ == LOCAL
    bridge = backend_bridge_name(stack)
    inputs = cmd.inputs
    assert inputs["stdin"] == (host_firewall.FIREWALL_SCRIPT).read_text()
    assert inputs["create"].endswith(f"bash -s -- {bridge}; fi")
    assert inputs["delete"].endswith(f"bash -s -- --remove {bridge}; fi")
    assert bridge in inputs["triggers"]
    script_hash = hashlib.sha256(inputs["stdin"].encode()).hexdigest()
    assert script_hash in inputs["triggers"]
    # The bridge exists before the rules and outlives them; old rules go before new ones.
    opts = run.options[(LOCAL, f"rag-{stack}-host-firewall")]
    assert opts.delete_before_replace is True
    assert run.networks[f"rag-{stack}-backend"]
    depends_on = opts.depends_on
    assert isinstance(depends_on, list)
    assert any(getattr(dep, "_name", None) == f"rag-{stack}-backend" for dep in depends_on)


def test_a_changed_script_changes_the_trigger(monkeypatch: pytest.MonkeyPatch) -> None:
    before = commands(run_program("staging"))[0].inputs["triggers"]
    monkeypatch.setattr(host_firewall, "script_text", lambda: "#!/bin/bash\necho changed\n")
    after = commands(run_program("staging"))[0].inputs["triggers"]
    assert before != after and before[1] == after[1]


def test_ssh_docker_host_gets_a_remote_command_with_a_verified_host_key(
    ssh_files: dict[str, str],
) -> None:
    config = make_config("prod", **ssh_files)
    config["docker:host"] = "ssh://deploy@docker.example.com:2222"
    run = run_program("prod", config)
    (cmd,) = commands(run)
    assert cmd.typ == REMOTE
    connection = cmd.inputs["connection"]
    assert connection["host"] == "docker.example.com"
    assert connection["port"] == 2222
    assert connection["user"] == "deploy"
    assert connection["hostKey"] == HOST_KEY
    assert connection["privateKey"] == CLIENT_KEY
    # The key reaches the state encrypted: the whole connection is a secret.
    raw = cmd.raw_inputs["connection"]
    assert is_secret(raw) or is_secret(raw["privateKey"])
    assert cmd.inputs["create"].endswith("bash -s -- rag-prod-be; fi")
    assert cmd.inputs["stdin"] == host_firewall.FIREWALL_SCRIPT.read_text()


def test_the_docker_host_environment_variable_counts_like_the_provider_reads_it(
    ssh_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workflows give the provider DOCKER_HOST, not docker:host.
    monkeypatch.setenv("DOCKER_HOST", "ssh://deploy@docker.example.com:2222")
    (cmd,) = commands(run_program("prod", make_config("prod", **ssh_files)))
    assert cmd.typ == REMOTE and cmd.inputs["connection"]["host"] == "docker.example.com"


def test_hashed_known_hosts_entries_are_matched(tmp_path: Path) -> None:
    salt = os.urandom(20)
    name = "[docker.example.com]:2222"
    mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"
    target = host_firewall.SshTarget(user="deploy", host="docker.example.com", port=2222)
    assert host_firewall.host_key_from_known_hosts(f"{hashed} {HOST_KEY}\n", target) == HOST_KEY
    other = host_firewall.SshTarget(user="deploy", host="docker.example.com", port=22)
    assert host_firewall.host_key_from_known_hosts(f"{hashed} {HOST_KEY}\n", other) is None


def test_opt_out_declares_no_command() -> None:
    run = run_program("prod", make_config("prod", hostFirewall="external"))
    assert commands(run) == []
    assert not [r for r in run.registrations if r.typ == "personal-rag:index:HostFirewall"]


@pytest.mark.parametrize(
    ("overrides", "docker_host", "expected"),
    [
        ({"hostFirewall": "off"}, None, "personal-rag:hostFirewall = 'off' is invalid"),
        ({}, "tcp://docker.example.com:2376", "docker:host = 'tcp://docker.example.com:2376'"),
        ({"hostSshKeyFile": "id_ed25519"}, None, "personal-rag:hostSshKeyFile = 'id_ed25519'"),
    ],
)
def test_bad_settings_name_the_key(
    overrides: dict[str, str], docker_host: str | None, expected: str
) -> None:
    config: dict[str, Any] = make_config("staging", **overrides)
    if docker_host:
        config["docker:host"] = docker_host
    with pytest.raises(Exception) as raised:
        run_program("staging", config)
    error: BaseException = raised.value
    while not isinstance(error, ConfigError) and error.__cause__ is not None:
        error = error.__cause__
    assert expected in str(error)


def test_tcp_docker_host_is_fine_when_the_firewall_is_managed_elsewhere() -> None:
    config = make_config("staging", hostFirewall="external")
    config["docker:host"] = "tcp://docker.example.com:2376"
    assert commands(run_program("staging", config)) == []


@pytest.mark.parametrize("missing", ["hostSshKeyFile", "hostSshKnownHostsFile"])
def test_missing_ssh_files_fail_before_any_resource(
    ssh_files: dict[str, str], tmp_path: Path, missing: str
) -> None:
    files = dict(ssh_files)
    files[missing] = str(tmp_path / "nowhere")
    config = make_config("prod", **files)
    config["docker:host"] = "ssh://deploy@docker.example.com:2222"
    with pytest.raises(Exception, match=f"personal-rag:{missing}"):
        run_program("prod", config)
