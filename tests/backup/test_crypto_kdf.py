"""gpg's passphrase stretching follows the key: the program's long generated key is
stretched less (each WAL segment pays it on decrypt), a short human one fully. Real gpg."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from rag_backup.crypto import Cipher, CipherSettings

pytestmark = pytest.mark.integration


def _encrypt_and_count(tmp_path: Path, passphrase: str) -> tuple[int, bytes]:
    key = tmp_path / "key"
    key.write_text(passphrase + "\n")
    key.chmod(0o600)
    plain = b"a WAL segment's bytes\n" * 1000
    with Cipher(CipherSettings("gpg", key_file=key)) as cipher:
        sealed = subprocess.run(cipher.encrypt_argv(), input=plain, capture_output=True, check=True)
        packets = subprocess.run(
            [
                "gpg",
                "--batch",
                "--list-packets",
                "--pinentry-mode",
                "loopback",
                "--passphrase-file",
                str(key),
                "--homedir",
                str(cipher._home),
            ],
            input=sealed.stdout,
            capture_output=True,
            check=False,
        )
        opened = subprocess.run(
            cipher.decrypt_argv(None), input=sealed.stdout, capture_output=True, check=True
        )
    found = re.search(r"count (\d+)", packets.stdout.decode() + packets.stderr.decode())
    assert found, packets.stderr.decode()
    return int(found.group(1)), opened.stdout


def test_a_generated_64_character_key_is_stretched_less(tmp_path: Path) -> None:
    count, opened = _encrypt_and_count(
        tmp_path, "k" * 20 + "0123456789abcdefghijklmnopqrstuvwxyzABCD"
    )
    assert count <= 2_000_000
    assert opened == b"a WAL segment's bytes\n" * 1000


def test_a_short_passphrase_keeps_the_full_stretching(tmp_path: Path) -> None:
    count, opened = _encrypt_and_count(tmp_path, "correct horse battery")
    assert count >= 60_000_000
    assert opened == b"a WAL segment's bytes\n" * 1000
