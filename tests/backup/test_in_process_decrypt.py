"""The restore's in-process decryption (rag_backup/openpgp.py, clibs.py, streams.py) on
messages made by the real gpg and zstd, as every backup is: the same plaintext as gpg gives,
the same verdicts on damage, and gpg itself for anything it does not take on."""

from __future__ import annotations

import random
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from rag_backup import clibs, streams
from rag_backup.crypto import Cipher, CipherSettings
from rag_backup.errors import BackupError
from rag_backup.progress import Progress
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

GENERATED_KEY = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("gpg", "zstd"):
        require_tool(tool)
    assert clibs.available(), "libgcrypt and libzstd (gnupg's and zstd's) must load"


def _key(tmp_path: Path, passphrase: str = GENERATED_KEY) -> Path:
    key = tmp_path / "key"
    key.write_text(passphrase + "\n")
    key.chmod(0o600)
    return key


def _plaintext(size: int, seed: int = 7) -> bytes:
    # Half random (incompressible), half zeros: zstd output of both kinds of block.
    rng = random.Random(seed)
    return rng.randbytes(size // 2) + bytes(size - size // 2)


def _seal(cipher: Cipher, path: Path, data: bytes) -> streams.ExpectedCiphertext:
    def feed(sink: IO[bytes]) -> None:
        sink.write(data)

    record = streams.write_encrypted(
        name="test",
        kind="test",
        out_path=path,
        cipher=cipher,
        zstd_level=3,
        zstd_threads=2,
        progress=Progress(enabled=False),
        feeder=feed,
    )
    return streams.ExpectedCiphertext(record.size, record.sha256)


def _open(cipher: Cipher, path: Path, expected: streams.ExpectedCiphertext | None = None) -> bytes:
    with streams.decrypted_stream(cipher, path, "test", expected) as stream:
        return stream.read()


# Sizes around gpg's 8 KiB partial-length chunks, the pipeline's 1 MiB pieces and zstd's
# output buffer, and a WAL segment's 16 MiB.
SIZES = [0, 1, 8191, 8192, 8193, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 16 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_in_process_gives_what_was_sealed(tmp_path: Path, size: int) -> None:
    data = _plaintext(size)
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, data)
        assert streams._in_process_session(cipher, sealed) is not None
        assert _open(cipher, sealed, expected) == data
        assert _open(cipher, sealed) == data


def test_a_short_passphrase_stretched_fully_decrypts_in_process(tmp_path: Path) -> None:
    data = _plaintext(100_000)
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path, "correct horse"))) as cipher:
        sealed = tmp_path / "sealed"
        _seal(cipher, sealed, data)
        assert streams._in_process_session(cipher, sealed) is not None
        assert _open(cipher, sealed) == data


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "cut in the middle":
        del data[len(data) // 2 :]
    elif how == "cut before the MDC":
        del data[-10:]
    elif how == "a byte flipped in the middle":
        data[len(data) // 2] ^= 0x01
    elif how == "the MDC's last byte flipped":
        data[-1] ^= 0x01
    elif how == "bytes appended":
        data += b"\x00" * 5
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("cut in the middle", "truncated: the encrypted data ends early"),
        ("cut before the MDC", "truncated: the encrypted data ends early"),
        ("a byte flipped in the middle", "corrupted:"),
        ("the MDC's last byte flipped", "corrupted: the integrity check (MDC)"),
        ("bytes appended", "corrupted:"),
    ],
)
def test_damage_is_named_as_gpg_would(tmp_path: Path, how: str, reason: str) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, _plaintext(3 << 20))
        _damage(sealed, how)
        assert streams._in_process_session(cipher, sealed) is not None
        with pytest.raises(streams.DecryptFailed, match="^test: " + re.escape(reason)):
            _open(cipher, sealed)
        # With the manifest's size and SHA-256, the mismatch is the reason given.
        with pytest.raises(streams.CiphertextMismatch):
            _open(cipher, sealed, expected)


def test_a_wrong_key_is_left_to_gpg_which_says_so(tmp_path: Path) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        _seal(cipher, sealed, _plaintext(10_000))
    other = tmp_path / "other"
    other.mkdir()
    with Cipher(CipherSettings("gpg", key_file=_key(other, GENERATED_KEY[::-1]))) as wrong:
        assert streams._in_process_session(wrong, sealed) is None
        with pytest.raises(streams.DecryptFailed, match="wrong key"):
            _open(wrong, sealed)


def test_a_message_it_does_not_take_on_is_decrypted_by_gpg(tmp_path: Path) -> None:
    # gpg's own compression inside (rag-backup turns it off): gpg, not this module.
    data = _plaintext(200_000)
    compressed = subprocess.run(
        ["zstd", "-q", "-3", "-c", "-"], input=data, capture_output=True, check=True
    ).stdout
    sealed = tmp_path / "sealed"
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        argv = cipher.encrypt_argv()
        argv[argv.index("--compress-algo") + 1] = "zlib"
        sealed.write_bytes(
            subprocess.run(argv, input=compressed, capture_output=True, check=True).stdout
        )
        assert streams._in_process_session(cipher, sealed) is None
        assert _open(cipher, sealed) == data


def test_a_consumer_that_fails_stops_the_pipeline(tmp_path: Path) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        _seal(cipher, sealed, _plaintext(32 << 20))
        before = set(threading.enumerate())
        started = time.monotonic()
        with (
            pytest.raises(RuntimeError, match="consumer gave up"),
            streams.decrypted_stream(cipher, sealed, "test") as stream,
        ):
            stream.read(4096)
            raise RuntimeError("consumer gave up")
        assert time.monotonic() - started < 30
        assert set(threading.enumerate()) <= before  # every stage has ended


def test_a_sink_that_refuses_stops_the_pipeline_with_its_own_error(tmp_path: Path) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        data = _plaintext(8 << 20)
        expected = _seal(cipher, sealed, data)
        got = bytearray()

        def refusing(piece: memoryview) -> None:
            got.extend(piece)
            if len(got) > (1 << 20):
                raise BackupError("the archive has a member it must not have")

        before = set(threading.enumerate())
        with pytest.raises(BackupError, match="must not have"):
            streams.decrypt_into(cipher, sealed, "test", refusing, expected)
        assert set(threading.enumerate()) <= before
        # And a sink that takes everything gets exactly the plaintext.
        whole = bytearray()
        streams.decrypt_into(cipher, sealed, "test", whole.extend, expected)
        assert whole == data


def test_age_goes_through_the_commands_into_the_same_sink(tmp_path: Path) -> None:
    require_tool("age")
    identity = tmp_path / "identity"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(
        ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout
    recipients = tmp_path / "recipients"
    recipients.write_text(recipient)
    settings = CipherSettings("age", age_recipients_file=recipients, age_identity_file=identity)
    data = _plaintext(3 << 20)
    with Cipher(settings) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, data)
        assert streams._in_process_session(cipher, sealed) is None
        whole = bytearray()
        streams.decrypt_into(cipher, sealed, "test", whole.extend, expected)
        assert whole == data
