"""The host firewall step's own commands, run for real: exactly what pulumi-command runs
(local: ``/bin/sh -c <create>`` with the script on stdin; remote: the same command string
in an SSH session to a real sshd on 127.0.0.1), against this host's real iptables.

That the script's rule closes the host to a backend container is proven on a real
engine by tests/docker/test_isolation.py; here: create adds exactly the script's rules,
create twice adds nothing more, delete removes exactly what create added (and nothing
else), delete twice is harmless, and without root the step fails loudly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.config import SshTarget
from components.host_firewall import firewall_commands, host_key_from_known_hosts, script_text
from tests.tooling import require_tool, tools_required

pytestmark = [pytest.mark.integration, pytest.mark.docker]

# Not a real bridge: iptables accepts rules for interfaces that do not exist (yet).
INTERFACE = "rag-pst-be"
UNRELATED_RULE = ["INPUT", "-i", "rag-pst-other", "-j", "ACCEPT"]


def rules() -> list[str]:
    """INPUT rules (IPv4 then IPv6) that name this test's interfaces: other tests on the
    same host may change other rules meanwhile."""
    text = "".join(
        subprocess.run(
            [tool, "-S", "INPUT"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        for tool in ("iptables", "ip6tables")
    )
    return [line for line in text.splitlines() if "-i rag-pst-" in line]


def our_rules() -> list[str]:
    return [line for line in rules() if f"-i {INTERFACE} " in line]


@pytest.fixture
def firewall() -> Iterator[None]:
    for tool in ("iptables", "ip6tables"):
        require_tool(tool)
    if os.geteuid() != 0:
        message = "changing the host firewall needs root (CI runs tests/docker with sudo)"
        if tools_required():
            pytest.fail(message)
        pytest.skip(message)
    # An unrelated rule that must survive everything the step does.
    for tool in ("iptables", "ip6tables"):
        subprocess.run([tool, "-I", *UNRELATED_RULE], check=True, timeout=30)
    try:
        yield
    finally:
        for tool in ("iptables", "ip6tables"):
            subprocess.run([tool, "-D", *UNRELATED_RULE], check=False, timeout=30)
            while (
                subprocess.run(
                    [
                        tool,
                        "-D",
                        "INPUT",
                        "-i",
                        INTERFACE,
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "NEW",
                        "-j",
                        "DROP",
                    ],
                    capture_output=True,
                    check=False,
                    timeout=30,
                ).returncode
                == 0
            ):
                pass


def run_local(command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """What command.local.Command does: its default interpreter, the script as stdin."""
    argv = ["/bin/sh", "-c", command]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(
        argv, input=script_text(), capture_output=True, text=True, timeout=60, check=False
    )


def assert_lifecycle(run: object) -> None:
    create, delete = firewall_commands(INTERFACE)
    before = rules()
    assert our_rules() == []
    for _ in range(2):  # a re-run (pulumi up after a failed one) adds nothing more
        done = run(create)  # type: ignore[operator]
        assert done.returncode == 0, done.stderr
        assert sorted(our_rules()) == sorted(
            [f"-A INPUT -i {INTERFACE} -m conntrack --ctstate NEW -j DROP"] * 2
        ), rules()
    for _ in range(2):  # delete is idempotent: a retried destroy does not fail
        done = run(delete)  # type: ignore[operator]
        assert done.returncode == 0, done.stderr
        assert rules() == before  # exactly what create added is gone; the rest untouched


def test_local_create_and_delete_commands_add_and_remove_exactly_the_rules(
    firewall: None,
) -> None:
    assert_lifecycle(run_local)


def test_without_root_the_step_fails_instead_of_passing_silently(firewall: None) -> None:
    create, _ = firewall_commands(INTERFACE)
    done = run_local(create, user="nobody")
    assert done.returncode != 0
    assert our_rules() == []


@dataclass
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path
    host_public_key: str

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """What command.remote.Command does: the command string in a session, the script
        as the session's stdin; the host key checked against known_hosts."""
        return subprocess.run(
            [
                "ssh",
                "-i",
                str(self.client_key),
                "-p",
                str(self.port),
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "root@127.0.0.1",
                command,
            ],
            input=script_text(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    sshd_bin = require_tool("sshd")
    for tool in ("ssh", "ssh-keygen", "ssh-keyscan"):
        require_tool(tool)
    host_key = tmp_path / "host_ed25519"
    client_key = tmp_path / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"PidFile {tmp_path / 'sshd.pid'}\nStrictModes no\n"
    )
    proc = subprocess.Popen(
        [sshd_bin, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        known_hosts = tmp_path / "known_hosts"
        while True:
            scan = subprocess.run(
                ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            if scan.stdout.strip():
                known_hosts.write_text(scan.stdout)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"sshd did not start: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.2)
        public = Path(f"{host_key}.pub").read_text().split()
        yield Sshd(port, client_key, known_hosts, f"{public[0]} {public[1]}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_remote_create_and_delete_commands_over_a_real_ssh_session(
    firewall: None, sshd: Sshd
) -> None:
    assert_lifecycle(sshd.run)


def test_the_host_key_passed_to_the_remote_command_is_the_hosts_real_key(sshd: Sshd) -> None:
    # known_hosts as ssh-keyscan writes it ([127.0.0.1]:port) resolves to the key the
    # server actually presents.
    target = SshTarget(user="root", host="127.0.0.1", port=sshd.port)
    assert host_key_from_known_hosts(sshd.known_hosts.read_text(), target) == sshd.host_public_key
