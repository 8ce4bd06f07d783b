"""Off-host targets served for real on loopback: OpenSSH's sshd as an SFTP-only target
(``ForceCommand internal-sftp``, chrooted, key login, its host key pinned by the client)
and, when moto is installed, an S3-compatible server. rclone (Debian's) is the client, with
the config the program renders (``components.offsite``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.config import OffsiteSettings, Secret
from components.offsite import rclone_remote, render_rclone_config
from tests.backup.conftest import Stack, make_stack
from tests.servers import free_port, log_tail, wait_listening
from tests.tooling import require_tool, tools_required

STACK = "staging"


def rclone_env() -> dict[str, str]:
    """As rag-backup runs rclone: no AWS_*/RCLONE_* from the environment (an AWS_CA_BUNDLE,
    as some machines set, makes rclone's S3 backend refuse to start)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}


@dataclass
class Target:
    """An off-host target as rag-backup sees it, and where its files really are."""

    kind: str
    rclone_config: Path
    remote: str
    files: Path | None  # the target's directory of this stack's copies (sftp), for tampering

    def env(self) -> dict[str, str]:
        return {
            "RAG_BACKUP_OFFSITE_RCLONE_CONFIG": str(self.rclone_config),
            "RAG_BACKUP_OFFSITE_REMOTE": self.remote,
        }


def _keygen(path: Path) -> None:
    subprocess.run(
        [require_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def sftp_server(work: Path) -> Iterator[Target]:
    """A real OpenSSH sshd on loopback, SFTP only, chrooted, key login, its host key pinned
    in the rendered rclone config (also used by benchmarks/pitr_bench.py)."""
    sshd = require_tool("sshd")
    require_tool("rclone")
    work.mkdir(parents=True, exist_ok=True)
    host_key, client_key = work / "host_key", work / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized = work / "authorized_keys"
    shutil.copy(f"{client_key}.pub", authorized)
    # sshd checks every component of a chroot: root-owned, not writable by others (so not
    # under /tmp). /run is root's.
    chroot = Path(tempfile.mkdtemp(prefix="rag-offsite-sftp-", dir="/run"))
    (chroot / "backups").mkdir()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    port = free_port()
    config = work / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"PidFile {work}/sshd.pid\nAuthorizedKeysFile {authorized}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\n"
        f"ChrootDirectory {chroot}\nForceCommand internal-sftp\n"
        "Subsystem sftp internal-sftp\nAllowTcpForwarding no\nX11Forwarding no\n"
    )
    log = work / "sshd.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=handle, stderr=subprocess.STDOUT
        )
    try:
        wait_listening(port, proc, log)
        host_pub = (Path(f"{host_key}.pub").read_text().split())[:2]
        settings = OffsiteSettings(
            kind="sftp",
            path="/backups",
            host="127.0.0.1",
            port=port,
            user="root",
            ssh_key=Secret(client_key.read_text()),
            known_hosts=f"[127.0.0.1]:{port} {' '.join(host_pub)}\n",
        )
        known_hosts = work / "known_hosts"
        known_hosts.write_text(settings.known_hosts)
        rclone_config = work / "rclone.conf"
        rclone_config.write_text(
            render_rclone_config(
                settings, ssh_key_path=str(client_key), known_hosts_path=str(known_hosts)
            )
        )
        rclone_config.chmod(0o400)  # as deployed (a secret file)
        yield Target(
            "sftp", rclone_config, rclone_remote(STACK, settings), chroot / "backups" / STACK
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15, 255):
            print(log_tail(log), file=sys.stderr)
        shutil.rmtree(chroot, ignore_errors=True)


@pytest.fixture
def sftp_target(tmp_path: Path) -> Iterator[Target]:
    with sftp_server(tmp_path / "sshd") as target:
        yield target


def _moto_server() -> str | None:
    try:
        import moto  # noqa: F401
    except ImportError:
        return None
    return sys.executable


@pytest.fixture
def s3_target(tmp_path: Path) -> Iterator[Target]:
    """moto's S3 server (PyPI ``moto[server]``) on loopback; the bucket made beforehand
    (the rendered config never creates buckets)."""
    require_tool("rclone")
    python = _moto_server()
    if python is None:
        message = "moto[server] is not installed (requirements-dev.txt)"
        if tools_required():
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log = tmp_path / "moto.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
    try:
        wait_listening(port, proc, log)
        settings = OffsiteSettings(
            kind="s3",
            path="rag-offsite/backups",
            s3_endpoint=f"http://127.0.0.1:{port}",
            s3_region="us-east-1",
            s3_access_key_id=Secret("AKIAOFFSITETEST"),
            s3_secret_access_key=Secret("offsite-test-secret-key"),
        )
        rclone_config = tmp_path / "rclone-s3.conf"
        rclone_config.write_text(
            render_rclone_config(
                settings,
                ssh_key_path="",
                known_hosts_path="",
                s3_access_key_id="AKIAOFFSITETEST",
                s3_secret_access_key="offsite-test-secret-key",
            )
        )
        rclone_config.chmod(0o400)  # as deployed (a secret file)
        # The bucket exists beforehand, as at a provider (least-privilege keys cannot create it).
        import boto3  # comes with moto

        boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="AKIAOFFSITETEST",
            aws_secret_access_key="offsite-test-secret-key",
        ).create_bucket(Bucket="rag-offsite")
        yield Target("s3", rclone_config, rclone_remote(STACK, settings), None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """The host whose backups go off-host ("host A")."""
    root = tmp_path / "host-a"
    root.mkdir()
    yield from make_stack(root)


@contextlib.contextmanager
def a_new_host(lost: Stack, tmp_path: Path) -> Iterator[Stack]:
    """The VPS is gone: ``lost``'s backups (and WAL archive) with it; for the block, a new
    host's stack made from nothing (its own PostgreSQL, Redis, Chroma, backup dir)."""
    shutil.rmtree(lost.backup_dir)
    root = tmp_path / "host-b"
    root.mkdir()
    host = make_stack(root)
    try:
        yield next(host)
    finally:
        host.close()
