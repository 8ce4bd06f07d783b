"""The off-host target under mocks, both stacks: egress only for a job with a target,
credentials only as secret files, the remote path per stack; and config validation."""

from __future__ import annotations

import pytest

from components.config import ConfigError, parse_stack_config
from tests.pulumi_harness import (
    SECRET_KEYS,
    ProgramRun,
    container_env,
    container_inputs,
    is_secret,
    plaintext_strings,
    run_program,
    stack_config,
    uploaded_files,
)

STACKS = ("staging", "prod")
SSH_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
KNOWN_HOSTS = "[backup.example.net]:23 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOffsiteTestHostKey"
S3_KEY_ID = "AKIAOFFSITEKEYID"
S3_SECRET = "s3-secret-access-key-for-tests"
SFTP = {
    "offsiteTarget": "sftp://rag@backup.example.net:23/rag-backups",
    "offsiteSshKey": SSH_KEY,
    "offsiteSshKnownHosts": KNOWN_HOSTS,
}
S3 = {
    "offsiteTarget": "s3://rag-offsite/hosts/vps1",
    "offsiteS3Endpoint": "https://s3.eu-central-1.example.com",
    "offsiteS3AccessKeyId": S3_KEY_ID,
    "offsiteS3SecretAccessKey": S3_SECRET,
}
OFFSITE_SECRETS = {"offsiteSshKey", "offsiteS3AccessKeyId", "offsiteS3SecretAccessKey"}


def _assert_nowhere_in_plaintext(run: ProgramRun, *values: str) -> None:
    """Not in any input of any resource outside a secret marker (what state would show)."""
    for resource in run.resources:
        for path, text in plaintext_strings(resource.raw_inputs):
            for value in values:
                assert value not in text, f"{resource.name}{path}"


def _assert_secret_mode(run: ProgramRun, *paths: str) -> None:
    script = " ".join(container_inputs(run, "backup-config-init")["entrypoints"])
    for path in paths:
        assert f"chmod 0400 /etc/rag/{path}" in script, path


def _run(stack: str, settings: dict[str, str]) -> ProgramRun:
    return run_program(
        stack,
        stack_config(stack, **settings),
        secret_keys=SECRET_KEYS | (OFFSITE_SECRETS & set(settings)),
    )


@pytest.mark.parametrize("stack", STACKS)
def test_without_a_target_the_job_has_no_egress(stack: str) -> None:
    run = run_program(stack)
    nets = {n["name"] for n in container_inputs(run, "backup")["networksAdvanced"]}
    assert nets == {f"rag-{stack}-backend"}
    assert run.networks[f"rag-{stack}-backend"].inputs["internal"] is True
    assert not [name for name in run.networks if "offsite" in name]
    assert not [k for k in container_env(run, "backup") if k.startswith("RAG_BACKUP_OFFSITE")]


@pytest.mark.parametrize("stack", STACKS)
def test_an_sftp_target_adds_an_egress_network_only_to_the_backup_job(stack: str) -> None:
    run = _run(stack, SFTP)
    egress = f"rag-{stack}-offsite-egress"
    nets = {n["name"] for n in container_inputs(run, "backup")["networksAdvanced"]}
    assert nets == {f"rag-{stack}-backend", egress}
    network = run.networks[egress].inputs
    assert network["internal"] is False
    assert network["options"]["com.docker.network.bridge.name"] == f"rag-{stack}-eg"
    # No other container joins it; the backend stays internal.
    for name, container in run.containers.items():
        joined = {n["name"] for n in container.inputs.get("networksAdvanced") or []}
        assert egress not in joined or name == f"rag-{stack}-backup", name
    assert run.networks[f"rag-{stack}-backend"].inputs["internal"] is True
    # Hardening unchanged: no capability added, read-only root, no-new-privileges.
    job = container_inputs(run, "backup")
    assert job["capabilities"] == {"drops": ["ALL"], "adds": []}
    assert job["readOnly"] is True
    assert "no-new-privileges:true" in job["securityOpts"]


@pytest.mark.parametrize("stack", STACKS)
def test_sftp_credentials_reach_the_job_only_as_secret_files(stack: str) -> None:
    run = _run(stack, SFTP)
    env = container_env(run, "backup")
    assert env["RAG_BACKUP_OFFSITE_REMOTE"] == f"offsite:rag-backups/{stack}"
    config_path = env["RAG_BACKUP_OFFSITE_RCLONE_CONFIG"]
    assert config_path == "/etc/rag/secrets/offsite_rclone.conf"
    files = uploaded_files(run, "backup")
    assert files["secrets/offsite_ssh_key"] == SSH_KEY + "\n"
    assert files["offsite_known_hosts"] == KNOWN_HOSTS + "\n"
    conf = files["secrets/offsite_rclone.conf"]
    assert "key_file = /etc/rag/secrets/offsite_ssh_key" in conf
    assert "known_hosts_file = /etc/rag/offsite_known_hosts" in conf
    assert "host = backup.example.net" in conf and "port = 23" in conf
    init = run.containers[f"rag-{stack}-backup-config-init"]
    assert is_secret(init.raw_inputs["uploads"])
    _assert_nowhere_in_plaintext(run, "OPENSSH PRIVATE KEY", SSH_KEY.splitlines()[1])
    _assert_secret_mode(run, "secrets/offsite_ssh_key", "secrets/offsite_rclone.conf")


@pytest.mark.parametrize("stack", STACKS)
def test_s3_keys_reach_the_job_only_in_the_secret_rclone_config(stack: str) -> None:
    run = _run(stack, S3)
    env = container_env(run, "backup")
    assert env["RAG_BACKUP_OFFSITE_REMOTE"] == f"offsite:rag-offsite/hosts/vps1/{stack}"
    conf = uploaded_files(run, "backup")["secrets/offsite_rclone.conf"]
    assert f"secret_access_key = {S3_SECRET}" in conf
    assert "endpoint = https://s3.eu-central-1.example.com" in conf
    assert "no_check_bucket = true" in conf
    _assert_nowhere_in_plaintext(run, S3_SECRET, S3_KEY_ID)
    _assert_secret_mode(run, "secrets/offsite_rclone.conf")
    nets = {n["name"] for n in container_inputs(run, "backup")["networksAdvanced"]}
    assert f"rag-{stack}-offsite-egress" in nets


def _problems(settings: dict[str, str], secret: set[str] | None = None) -> str:
    raw = stack_config("staging", **settings)
    keys = set(SECRET_KEYS) | (OFFSITE_SECRETS & set(settings) if secret is None else secret)
    with pytest.raises(ConfigError) as error:
        parse_stack_config("staging", raw, keys)
    return str(error.value)


def test_bad_targets_are_named_with_what_is_expected() -> None:
    message = _problems({"offsiteTarget": "ftp://host/x"})
    assert "personal-rag:offsiteTarget = 'ftp://host/x' is invalid" in message
    assert "sftp://user@host[:port]/path or s3://bucket[/prefix]" in message
    message = _problems({"offsiteTarget": "sftp://rag@host/../etc"})
    assert "offsiteTarget" in message
    message = _problems({**SFTP, "offsiteSshKnownHosts": "trust me"})
    assert "personal-rag:offsiteSshKnownHosts = 'trust me' is invalid" in message
    message = _problems({**S3, "offsiteS3Endpoint": "http://s3.example.com"})
    assert "personal-rag:offsiteS3Endpoint = 'http://s3.example.com' is invalid" in message


def test_offsite_credentials_must_be_secret_and_are_never_echoed() -> None:
    message = _problems(SFTP, secret=set())
    assert "personal-rag:offsiteSshKey is stored in plaintext" in message
    assert "PRIVATE KEY" not in message
    message = _problems(S3, secret=set())
    assert "offsiteS3SecretAccessKey is stored in plaintext" in message
    assert S3_SECRET not in message
    message = _problems({"offsiteTarget": "s3://rag-offsite"})
    assert "personal-rag:offsiteS3AccessKeyId is not set" in message
