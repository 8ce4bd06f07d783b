"""The restore's in-process decryption (rag_backup/openpgp.py, clibs.py, streams.py) on
messages made by the real gpg and zstd, as every backup is: the same plaintext as gpg gives,
the same verdicts on damage, and gpg itself for anything it does not take on."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import signal
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
    return streams.ExpectedCiphertext.of(record.to_json())


def _without_head(expected: streams.ExpectedCiphertext) -> streams.ExpectedCiphertext:
    """What a manifest written before head_sha256 existed says."""
    return dataclasses.replace(expected, head_sha256=None)


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


DAMAGE = [
    ("cut in the middle", "truncated: the encrypted data ends early", "truncated: "),
    ("cut before the MDC", "truncated: the encrypted data ends early", "truncated: "),
    ("a byte flipped in the middle", "corrupted:", "corrupted: SHA-256 does not match"),
    ("the MDC's last byte flipped", "corrupted: the integrity check (MDC)", "corrupted: SHA-256"),
    ("bytes appended", "corrupted:", "corrupted: "),
]


@pytest.mark.parametrize(("how", "reason", "against_manifest"), DAMAGE)
@pytest.mark.parametrize("head", ["with head_sha256", "without"])
def test_damage_is_named_as_gpg_would(
    tmp_path: Path, how: str, reason: str, against_manifest: str, head: str
) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, _plaintext(3 << 20))
        if head == "without":
            expected = _without_head(expected)
        _damage(sealed, how)
        assert streams._in_process_session(cipher, sealed) is not None
        with pytest.raises(streams.DecryptFailed, match="^test: " + re.escape(reason)):
            _open(cipher, sealed)
        # With the manifest's record, the mismatch is the reason given, whether the whole
        # file was hashed while read or only once the decryption failed.
        with pytest.raises(
            streams.CiphertextMismatch, match="^test: " + re.escape(against_manifest)
        ):
            _open(cipher, sealed, expected)


def test_a_backup_records_the_sha256_of_its_first_64_kib(tmp_path: Path) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        for size in (1000, 3 << 20):
            sealed = tmp_path / f"sealed-{size}"
            expected = _seal(cipher, sealed, _plaintext(size))
            written = sealed.read_bytes()
            assert expected.size == len(written)
            assert expected.sha256 == hashlib.sha256(written).hexdigest()
            assert expected.head_sha256 == hashlib.sha256(written[: 64 * 1024]).hexdigest()


class _CountingSha256:
    """hashlib for streams.py, counting the bytes given to SHA-256."""

    def __init__(self) -> None:
        self.hashed = 0

    def sha256(self, data: bytes = b"") -> _CountingSha256._Digest:
        return self._Digest(self, data)

    class _Digest:
        def __init__(self, owner: _CountingSha256, data: bytes) -> None:
            self._owner = owner
            self._digest = hashlib.sha256()
            self.update(data)

        def update(self, data: bytes) -> None:
            self._owner.hashed += len(data)
            self._digest.update(data)

        def hexdigest(self) -> str:
            return self._digest.hexdigest()


def test_a_good_file_is_hashed_only_at_its_head_when_the_manifest_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _plaintext(8 << 20)
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, data)
        counting = _CountingSha256()
        monkeypatch.setattr(streams, "hashlib", counting)
        assert _open(cipher, sealed, expected) == data
        assert counting.hashed == 64 * 1024  # the MDC, checked anyway, covers the rest
        counting.hashed = 0
        assert _open(cipher, sealed, _without_head(expected)) == data
        assert counting.hashed == expected.size


@pytest.mark.parametrize("head", ["with head_sha256", "without"])
def test_another_encryption_of_the_same_data_is_refused(tmp_path: Path, head: str) -> None:
    # Same plaintext, same key, same size: only the salt and the random prefix differ,
    # as between two backups of an unchanged database.
    data = _plaintext(3 << 20)
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed, other = tmp_path / "sealed", tmp_path / "other"
        expected = _seal(cipher, sealed, data)
        _seal(cipher, other, data)
        assert other.stat().st_size == expected.size
        if head == "without":
            expected = _without_head(expected)
        got = bytearray()
        with pytest.raises(streams.CiphertextMismatch, match=r"^test: corrupted: SHA-256"):
            streams.decrypt_into(cipher, other, "test", got.extend, expected)
        if head == "with head_sha256":
            assert not got  # refused before anything was decrypted
        else:
            assert got == data  # hashed while read: known only at the end


def test_a_file_of_another_size_is_refused_before_anything_is_decrypted(tmp_path: Path) -> None:
    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, _plaintext(3 << 20))
        with sealed.open("ab") as grown:
            grown.write(b"\0" * 5)
        got = bytearray()
        with pytest.raises(
            streams.CiphertextMismatch,
            match=f"^test: corrupted: {expected.size + 5} bytes, the manifest records "
            f"{expected.size}$",
        ):
            streams.decrypt_into(cipher, sealed, "test", got.extend, expected)
        assert not got


@pytest.mark.parametrize("value", [123, "ABC", "0" * 63, "g" * 64])
def test_a_malformed_head_sha256_is_named(value: object) -> None:
    record = {"size": 10, "sha256": "0" * 64, "head_sha256": value}
    with pytest.raises(BackupError, match=f"head_sha256 {re.escape(repr(value))} is not 64"):
        streams.ExpectedCiphertext.of(record)
    assert streams.ExpectedCiphertext.of({"size": 10, "sha256": "0" * 64}).head_sha256 is None


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


class _Interrupted(BaseException):
    """Like KeyboardInterrupt: not an Exception, so not a failure to explain."""


@pytest.mark.parametrize("head", ["with head_sha256", "without"])
def test_an_interrupted_restore_is_not_reported_as_a_damaged_file(
    tmp_path: Path, head: str
) -> None:
    # As Ctrl-C reaches a restore: a signal to the main thread, which waits while the
    # pipeline's threads hand the plaintext to the sink.
    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    with Cipher(CipherSettings("gpg", key_file=_key(tmp_path))) as cipher:
        sealed = tmp_path / "sealed"
        expected = _seal(cipher, sealed, _plaintext(32 << 20))
        if head == "without":
            expected = _without_head(expected)
        sent = threading.Event()

        def sink(piece: memoryview) -> None:
            if not sent.is_set():
                sent.set()
                os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)  # the restore is still running when the signal is handled

        previous = signal.signal(signal.SIGUSR1, interrupt)
        try:
            with pytest.raises(_Interrupted):
                streams.decrypt_into(cipher, sealed, "test", sink, expected)
        finally:
            signal.signal(signal.SIGUSR1, previous)
