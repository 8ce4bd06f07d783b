"""Streaming pipelines: producer | zstd | encrypt -> file (hashed while written), and
encrypted file -> decrypt | zstd -d -> consumer. Plaintext only ever sits in pipes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rag_backup.crypto import Cipher
from rag_backup.errors import BackupError
from rag_backup.procs import Proc, last_lines
from rag_backup.progress import Progress

CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactRecord:
    name: str
    size: int  # bytes of the encrypted file
    sha256: str  # of the encrypted file
    kind: str  # what the plaintext is: pg_dump_custom, redis_rdb, tar

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "kind": self.kind}


def zstd_compress_argv(level: int, threads: int) -> list[str]:
    return ["zstd", "-q", f"-{level}", f"-T{threads}", "-c", "-"]


Feeder = Callable[[IO[bytes]], None]


def write_encrypted(
    *,
    name: str,
    kind: str,
    out_path: Path,
    cipher: Cipher,
    zstd_level: int,
    zstd_threads: int,
    progress: Progress,
    producer: Proc | None = None,
    feeder: Feeder | None = None,
) -> ArtifactRecord:
    """Compress and encrypt one stream into ``out_path`` (must not exist).

    The plaintext comes from ``producer``'s stdout (wired straight into zstd) or is written by
    ``feeder`` into zstd's stdin from a thread. The file is hashed as it is written and
    fsynced before this returns.
    """
    if (producer is None) == (feeder is None):
        raise ValueError("exactly one of producer and feeder")
    procs: list[Proc] = []
    feed_errors: list[BaseException] = []
    feed_thread: threading.Thread | None = None
    try:
        if producer is not None:
            zstd = Proc(
                f"zstd ({name})",
                zstd_compress_argv(zstd_level, zstd_threads),
                stdin=producer.stdout,
            )
            producer.stdout.close()  # zstd holds the pipe now; EOF/SIGPIPE propagate
        else:
            zstd = Proc(
                f"zstd ({name})",
                zstd_compress_argv(zstd_level, zstd_threads),
                stdin=subprocess.PIPE,
            )
        procs.append(zstd)
        encrypt = Proc(f"encryption ({name})", cipher.encrypt_argv(), stdin=zstd.stdout)
        procs.append(encrypt)
        zstd.stdout.close()

        if feeder is not None:

            def feed() -> None:
                try:
                    assert feeder is not None
                    feeder(zstd.stdin)
                except BaseException as error:
                    feed_errors.append(error)
                finally:
                    with suppress(OSError):
                        zstd.stdin.close()

            feed_thread = threading.Thread(target=feed, name=f"feed-{name}", daemon=True)
            feed_thread.start()

        digest = hashlib.sha256()
        size = 0
        task = progress.task(f"{name}: encrypted")
        try:
            with open(out_path, "xb") as out:
                while True:
                    chunk = encrypt.stdout.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    task.update(size)
                out.flush()
                os.fsync(out.fileno())
        except OSError as error:
            raise BackupError(f"writing {out_path} failed: {error.strerror or error}") from error
        finally:
            task.done(size)
        if feed_thread is not None:
            feed_thread.join()
        if feed_errors:
            first = feed_errors[0]
            if isinstance(first, BackupError):
                raise first
            raise BackupError(f"reading data for {name} failed: {first}") from first
        if producer is not None:
            producer.check()
        zstd.check()
        encrypt.check()
        return ArtifactRecord(name=name, size=size, sha256=digest.hexdigest(), kind=kind)
    finally:
        for proc in procs:
            proc.close()
        if producer is not None:
            producer.close()


def file_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class DecryptFailed(BackupError):
    """Decryption or decompression failed; the message says which and why."""


@dataclass(frozen=True)
class ExpectedCiphertext:
    """What the manifest says the encrypted file is: checked while it is decrypted."""

    size: int
    sha256: str


class _HashingFeeder:
    """Feeds the encrypted file to the decryptor's stdin from a thread, hashing every byte
    read, so the SHA-256 check costs no extra pass over the file. If the decryptor stops
    early (wrong key, damage), the rest of the file is still hashed: a SHA-256 mismatch is
    then the reason reported, as the more precise one."""

    def __init__(self, path: Path, sink: IO[bytes], name: str) -> None:
        self._path = path
        self._sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None
        self.cpu_seconds = 0.0  # this thread's: reading, hashing, writing into the pipe
        self._thread = threading.Thread(target=self._run, name=f"hash-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        sink_open = True
        try:
            with open(self._path, "rb") as handle:
                while True:
                    chunk = handle.read(CHUNK)
                    if not chunk:
                        break
                    self.digest.update(chunk)
                    self.size += len(chunk)
                    if sink_open:
                        try:
                            self._sink.write(chunk)
                        except (BrokenPipeError, ValueError, OSError):
                            sink_open = False  # the decryptor gave up; keep hashing
        except BaseException as error:
            self.error = error
        finally:
            with suppress(OSError, ValueError):
                self._sink.close()
            self.cpu_seconds = time.thread_time() - started

    def join(self) -> None:
        self._thread.join()

    def mismatch(self, expected: ExpectedCiphertext) -> str | None:
        if self.error is not None:
            return f"cannot read the encrypted file: {self.error}"
        if self.size < expected.size:
            return f"truncated: {self.size} bytes, the manifest records {expected.size}"
        if self.size > expected.size:
            return f"corrupted: {self.size} bytes, the manifest records {expected.size}"
        if self.digest.hexdigest() != expected.sha256:
            return "corrupted: SHA-256 does not match the manifest"
        return None


class CiphertextMismatch(BackupError):
    """The encrypted file is not the one the manifest describes."""


@contextmanager
def decrypted_stream(
    cipher: Cipher,
    path: Path,
    name: str,
    expected: ExpectedCiphertext | None = None,
    cpu: dict[str, float] | None = None,
) -> Iterator[IO[bytes]]:
    """Yield the decrypted, decompressed plaintext of ``path`` as a readable pipe.

    The consumer must read to EOF. On leaving, both processes are checked and a failure is
    raised as DecryptFailed with a reason (wrong key, truncated, corrupted). With
    ``expected``, the encrypted file is hashed while it is fed to the decryptor and a
    mismatch is raised as CiphertextMismatch (after the consumer has finished, so a consumer
    writing into a staging area must treat everything it wrote as unchecked until this
    context has exited without error). ``cpu`` gets the CPU seconds of each stage (hash,
    decrypt, decompress) where known."""
    feeder: _HashingFeeder | None = None
    if expected is None:
        decrypt = Proc(f"decryption ({name})", cipher.decrypt_argv(path))
    else:
        decrypt = Proc(f"decryption ({name})", cipher.decrypt_argv(None), stdin=subprocess.PIPE)
        feeder = _HashingFeeder(path, decrypt.stdin, name)
    zstd = Proc(f"zstd -d ({name})", ["zstd", "-q", "-d", "-c", "-"], stdin=decrypt.stdout)
    decrypt.stdout.close()
    consumer_error: BaseException | None = None
    try:
        yield zstd.stdout
    except BaseException as error:
        consumer_error = error
    finally:
        # Drain so the producers are not blocked on a full pipe, then judge them.
        if consumer_error is None:
            while zstd.stdout.read(CHUNK):
                pass
        else:
            zstd.kill()
            decrypt.kill()
        if feeder is not None:
            # Even after a failure the feeder hashes the rest of the file (no more than one
            # read pass), so a damaged file is reported as such rather than as bad data.
            feeder.join()
        decrypt_code = decrypt.wait(timeout=3600)
        zstd_code = zstd.wait(timeout=3600)
        decrypt_err = decrypt.stderr_text()
        zstd_err = zstd.stderr_text()
        decrypt.close()
        zstd.close()
        if cpu is not None:
            if feeder is not None:
                cpu["hash"] = feeder.cpu_seconds
            for stage, proc in (("decrypt", decrypt), ("decompress", zstd)):
                if proc.cpu_seconds is not None:
                    cpu[stage] = proc.cpu_seconds
    mismatch = None
    if feeder is not None and expected is not None:
        mismatch = feeder.mismatch(expected)
    if mismatch is not None:
        raise CiphertextMismatch(f"{name}: {mismatch}") from consumer_error
    if consumer_error is not None:
        if decrypt_code not in (0, None) and decrypt_code > 0:
            raise DecryptFailed(
                f"{name}: {cipher.explain_decrypt_failure(decrypt_err)}"
            ) from consumer_error
        raise consumer_error
    if decrypt_code != 0:
        raise DecryptFailed(f"{name}: {cipher.explain_decrypt_failure(decrypt_err)}")
    if zstd_code != 0:
        raise DecryptFailed(
            f"{name}: corrupted: the compressed data is damaged ({last_lines(zstd_err, 1)})"
        )


def copy_stream(
    source: IO[bytes], target: IO[bytes], progress_label: str, progress: Progress
) -> int:
    total = 0
    task = progress.task(progress_label)
    try:
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                return total
            target.write(chunk)
            total += len(chunk)
            task.update(total)
    finally:
        task.done(total)


def now() -> float:
    return time.time()
