"""Streaming pipelines: producer | zstd | encrypt -> file (hashed while written), and
encrypted file -> decrypt | zstd -d -> consumer. Plaintext only ever sits in pipes.

Decryption runs in this process where it can (gpg's messages, libgcrypt and libzstd
present: openpgp.py, clibs.py): three threads read and hash, decrypt, decompress into the
consumer's pipe, where gpg and zstd would be two more processes and two more pipes; that
pipeline's CPU was most of a large restore's time (docs/backup.md). Anything else (age,
another message shape, a key gpg may read otherwise) goes through the commands."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from rag_backup import clibs, openpgp
from rag_backup.crypto import Cipher
from rag_backup.errors import BackupError
from rag_backup.manifest import SHA256_HEX
from rag_backup.procs import Proc, enlarge_pipe, last_lines
from rag_backup.progress import Progress

CHUNK = 1 << 20
# The in-process pipeline: pieces waiting between two threads (bounds its memory), and how
# often a thread blocked on a queue looks whether the pipeline was cancelled.
PIPELINE_QUEUE = 4
PIPELINE_POLL_S = 0.1
# The pipeline's threads need the GIL briefly between their C calls; with Python's default
# 5 ms turns they waited on the decrypting thread's Python code (a 1.1 GB extraction took
# 4.0-4.2 s of wall time with 0.5 ms turns, 4.6-4.9 s with 5 ms, same machine and load).
GIL_SWITCH_INTERVAL_S = 0.0005
# A manifest's head_sha256 covers this many first bytes of the encrypted file (all of a
# shorter one): the session packet's random salt and the data's encrypted random prefix are
# in them. Part of the manifest format: another length needs another field name.
IDENTITY_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ArtifactRecord:
    name: str
    size: int  # bytes of the encrypted file
    sha256: str  # of the encrypted file
    kind: str  # what the plaintext is: pg_dump_custom, redis_rdb, tar
    head_sha256: str  # of its first IDENTITY_HEAD_BYTES

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "head_sha256": self.head_sha256,
            "kind": self.kind,
        }


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
        head = hashlib.sha256()
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
                    if size < IDENTITY_HEAD_BYTES:
                        head.update(chunk[: IDENTITY_HEAD_BYTES - size])
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
        return ArtifactRecord(
            name=name,
            size=size,
            sha256=digest.hexdigest(),
            kind=kind,
            head_sha256=head.hexdigest(),
        )
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
    """What the manifest says the encrypted file is: checked while it is decrypted.

    With ``head_sha256`` (backups since 2026-12) and in-process decryption, a file that
    decrypts is identified without hashing all of it: its size and first bytes (salt and
    random prefix: which encryption this is) must match before any plaintext exists, and
    the MDC, checked anyway, covers the rest -- under the key, no other bytes pass it. Only
    when something fails is the whole file hashed, so the reason given is the same as with a
    full hash. gpg and age as commands, and older manifests, hash all of it while reading."""

    size: int
    sha256: str
    head_sha256: str | None = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> ExpectedCiphertext:
        """From a manifest's artifact or a WAL index's segment; ``head_sha256`` is optional
        (the other fields are checked by the record's reader)."""
        head = record.get("head_sha256")
        if head is not None and (not isinstance(head, str) or not SHA256_HEX.fullmatch(head)):
            raise BackupError(f"head_sha256 {head!r} is not 64 lowercase hex digits")
        return cls(int(record["size"]), str(record["sha256"]), head)


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
        return _size_and_digest_mismatch(self.size, self.digest.hexdigest(), expected)


def _size_mismatch(size: int, expected: ExpectedCiphertext) -> str | None:
    if size < expected.size:
        return f"truncated: {size} bytes, the manifest records {expected.size}"
    if size > expected.size:
        return f"corrupted: {size} bytes, the manifest records {expected.size}"
    return None


def _size_and_digest_mismatch(size: int, sha256: str, expected: ExpectedCiphertext) -> str | None:
    if (wrong_size := _size_mismatch(size, expected)) is not None:
        return wrong_size
    if sha256 != expected.sha256:
        return "corrupted: SHA-256 does not match the manifest"
    return None


def _head_mismatch(handle: IO[bytes], expected: ExpectedCiphertext) -> str | None:
    """The file's size and first bytes against the manifest, before anything is decrypted."""
    if (wrong_size := _size_mismatch(os.fstat(handle.fileno()).st_size, expected)) is not None:
        return wrong_size
    head = handle.read(IDENTITY_HEAD_BYTES)
    if hashlib.sha256(head).hexdigest() != expected.head_sha256:
        return (
            "corrupted: SHA-256 does not match the manifest (head_sha256, of its first "
            f"{IDENTITY_HEAD_BYTES} bytes: another encrypted file, or a damaged one)"
        )
    return None


def _whole_file_mismatch(path: Path, expected: ExpectedCiphertext) -> str | None:
    """After a failure: whether the file is still the one the manifest describes."""
    try:
        size, sha256 = file_sha256(path)
    except OSError as error:
        return f"cannot read the encrypted file: {error}"
    return _size_and_digest_mismatch(size, sha256, expected)


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
    session = _in_process_session(cipher, path)
    if session is not None:
        with _in_process_plaintext(session, path, name, expected, cpu) as stream:
            yield stream
        return
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


Sink = Callable[[memoryview], None]


def decrypt_into(
    cipher: Cipher,
    path: Path,
    name: str,
    sink: Sink,
    expected: ExpectedCiphertext | None = None,
    cpu: dict[str, float] | None = None,
) -> None:
    """decrypted_stream's plaintext handed to ``sink`` piece by piece (each piece valid only
    during the call), with the same checks and failure reasons. In process, the sink runs
    in a thread of its own: no pipe and no consumer process in the way. An error
    the sink raises stops the pipeline and is raised here, unless the ciphertext mismatch or
    a decryption failure explains it better."""
    session = _in_process_session(cipher, path)
    if session is not None:
        with _in_process_plaintext(session, path, name, expected, cpu, sink) as stream:
            assert not stream.read(1)  # everything went to the sink
        return
    with decrypted_stream(cipher, path, name, expected, cpu) as stream:
        while chunk := stream.read(CHUNK):
            sink(memoryview(chunk))


def _in_process_session(cipher: Cipher, path: Path) -> openpgp.Session | None:
    """The key for decrypting ``path`` in this process, or None: use gpg."""
    key_file = cipher.settings.key_file
    if cipher.settings.method != "gpg" or key_file is None or not clibs.available():
        return None
    try:
        return openpgp.probe(path, openpgp.passphrase_of(key_file))
    except (openpgp.Unsupported, OSError):
        return None


_Item = TypeVar("_Item")


class _Cancelled(Exception):
    pass


class _Stage:
    """One thread of the in-process pipeline: its error, its CPU time, and queue moves that
    give up once the pipeline is cancelled (the consumer stopped, another stage failed)."""

    def __init__(self, name: str, run: Callable[[_Stage], None], cancel: threading.Event) -> None:
        self.error: BaseException | None = None
        self.cpu_seconds = 0.0
        self._cancel = cancel
        self._run = run
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        started = time.thread_time()
        try:
            self._run(self)
        except _Cancelled:
            pass
        except BaseException as error:
            self.error = error
            self._cancel.set()
        finally:
            self.cpu_seconds = time.thread_time() - started

    def put(self, into: queue.Queue[_Item | None], item: _Item | None) -> None:
        while True:
            if self._cancel.is_set():
                raise _Cancelled
            try:
                into.put(item, timeout=PIPELINE_POLL_S)
                return
            except queue.Full:
                continue

    def get(self, source: queue.Queue[_Item | None]) -> _Item | None:
        while True:
            if self._cancel.is_set():
                raise _Cancelled
            try:
                return source.get(timeout=PIPELINE_POLL_S)
            except queue.Empty:
                continue

    def join(self) -> None:
        self._thread.join()


@contextmanager
def _in_process_plaintext(
    session: openpgp.Session,
    path: Path,
    name: str,
    expected: ExpectedCiphertext | None,
    cpu: dict[str, float] | None,
    consumer_sink: Sink | None = None,
) -> Iterator[IO[bytes]]:
    """decrypted_stream's work in threads: read and hash | decrypt | decompress into a pipe
    whose read end is the consumer's (or, through a fourth thread, into ``consumer_sink``;
    the pipe then stays empty). Same contract, same failure reasons."""
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    cancel = threading.Event()
    ciphertext: queue.Queue[bytes | None] = queue.Queue(PIPELINE_QUEUE)
    compressed: queue.Queue[bytes | None] = queue.Queue(PIPELINE_QUEUE)
    read_end, write_end = os.pipe()
    enlarge_pipe(write_end)
    consumer = os.fdopen(read_end, "rb")
    digest = hashlib.sha256()
    size = 0
    read_error: list[OSError] = []
    # The size and first bytes, checked before the first piece goes on; the whole file is
    # hashed only while reading without them (an older manifest) or after a failure.
    by_head = expected is not None and expected.head_sha256 is not None
    refused: list[str] = []
    read_all = False

    def read(stage: _Stage) -> None:
        # Without a head to check, hashes the whole file even when a later stage gave up:
        # a damaged file is then reported as such (the manifest's SHA-256) rather than as
        # bad data.
        nonlocal size, read_all
        with open(path, "rb") as handle:
            if by_head:
                assert expected is not None
                refused_because = _head_mismatch(handle, expected)
                if refused_because is not None:
                    refused.append(refused_because)
                    cancel.set()
                    return
                handle.seek(0)
            while True:
                try:
                    chunk = handle.read(CHUNK)
                except OSError as error:
                    read_error.append(error)
                    cancel.set()  # the later stages stop; the message says why
                    break
                if not chunk:
                    read_all = True
                    break
                if expected is not None and not by_head:
                    digest.update(chunk)
                size += len(chunk)
                if cancel.is_set():
                    if by_head:
                        break  # the failure's reason comes from hashing it all afterwards
                    continue
                with suppress(_Cancelled):
                    stage.put(ciphertext, chunk)
        stage.put(ciphertext, None)

    def decrypt(stage: _Stage) -> None:
        message = openpgp.MessageReader(session)
        try:
            while (chunk := stage.get(ciphertext)) is not None:
                plain = message.feed(chunk)
                if plain:
                    stage.put(compressed, plain)
            message.finish()
        finally:
            message.close()
        stage.put(compressed, None)

    def to_pipe(data: memoryview) -> None:
        while data:
            data = data[os.write(write_end, data) :]

    # To the sink's own thread: zstd fills buffers from a pool and the consumer gives each
    # back once used (a fresh copy of every piece cost a tenth of decompression's time).
    plaintext: queue.Queue[memoryview | None] = queue.Queue(PIPELINE_QUEUE)
    free: queue.Queue[bytearray | None] = queue.Queue()
    for _ in range(PIPELINE_QUEUE + 2 if consumer_sink else 0):  # queued, consumed, filled
        free.put(bytearray(CHUNK))

    def decompress(stage: _Stage) -> None:
        def take() -> bytearray:
            buffer = stage.get(free)
            assert buffer is not None
            return buffer

        def to_sink_thread(part: memoryview) -> None:
            if part:
                stage.put(plaintext, part)
            else:
                free.put(part.obj)  # type: ignore[arg-type]

        sink: Sink
        if consumer_sink is None:
            zstd = clibs.ZstdDecompressor(CHUNK)
            sink = to_pipe
        else:
            zstd = clibs.ZstdDecompressor(CHUNK, buffers=take)
            sink = to_sink_thread
        try:
            while (chunk := stage.get(compressed)) is not None:
                zstd.feed(chunk, sink)
            zstd.finish(sink)
            if consumer_sink is not None:
                stage.put(plaintext, None)
        finally:
            zstd.close()
            os.close(write_end)  # EOF for the consumer

    def consume(stage: _Stage) -> None:
        assert consumer_sink is not None
        while (part := stage.get(plaintext)) is not None:
            consumer_sink(part)
            free.put(part.obj)  # type: ignore[arg-type]

    stages = {
        "hash": _Stage(f"read-{name}", read, cancel),
        "decrypt": _Stage(f"decrypt-{name}", decrypt, cancel),
        "decompress": _Stage(f"zstd-{name}", decompress, cancel),
    }
    if consumer_sink is not None:
        stages["consume"] = _Stage(f"consume-{name}", consume, cancel)
    consumer_error: BaseException | None = None
    try:
        yield consumer
    except BaseException as error:
        consumer_error = error
        cancel.set()
    finally:
        if consumer_error is None:
            while consumer.read(CHUNK):
                pass
        consumer.close()  # a stage still writing gets EPIPE and stops
        for stage in stages.values():
            stage.join()
        if cpu is not None:
            # The consumer reports its own thread's time (e.g. untar's ``cpu_seconds``).
            cpu.update({k: stage.cpu_seconds for k, stage in stages.items() if k != "consume"})
    mismatch = None
    if read_error:
        mismatch = f"cannot read the encrypted file: {read_error[0]}"
    elif refused:
        mismatch = refused[0]
    elif expected is not None and not by_head:
        mismatch = _size_and_digest_mismatch(size, digest.hexdigest(), expected)
    elif expected is not None and isinstance(consumer_error, Exception | None):
        # (An interrupt -- KeyboardInterrupt, SystemExit -- is no failure to explain: it
        # stopped the reading, and is raised as it is.)
        failed = consumer_error is not None or any(
            stage.error is not None for stage in stages.values()
        )
        if failed:
            mismatch = _whole_file_mismatch(path, expected)
        elif not read_all:
            mismatch = "the encrypted file was not read to its end"  # never seen: be sure
        else:
            mismatch = _size_mismatch(size, expected)  # it changed while being read
    if mismatch is not None:
        raise CiphertextMismatch(f"{name}: {mismatch}") from consumer_error
    reason = _in_process_failure(stages["decrypt"].error, stages["decompress"].error)
    if reason is not None:
        raise DecryptFailed(f"{name}: {reason}") from consumer_error
    if consumer_error is not None:
        raise consumer_error
    consumed = stages["consume"].error if "consume" in stages else None
    written = consumed or stages["decompress"].error
    if isinstance(written, BackupError):
        raise written  # the sink's own (a refused archive member, ...)
    if written is not None:
        raise BackupError(f"{name}: handing on the plaintext failed: {written}") from written
    if stages["hash"].error is not None:
        raise BackupError(f"{name}: reading the encrypted file failed: {stages['hash'].error}")


def _in_process_failure(
    decrypt_error: BaseException | None, decompress_error: BaseException | None
) -> str | None:
    """The operator's reason for a failed in-process decryption, as gpg's would read."""
    if isinstance(decrypt_error, openpgp.Damaged):
        return decrypt_error.reason
    if isinstance(decrypt_error, openpgp.Unsupported):
        # probe accepted the file's head: its later packets are not what that promised.
        return f"corrupted: {decrypt_error}"
    if decrypt_error is not None:
        return f"decryption failed: {decrypt_error}"
    if isinstance(decompress_error, clibs.ZstdError):
        return f"corrupted: the compressed data is damaged ({decompress_error})"
    return None  # a failed write: the consumer's (or sink's) own error says why


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
