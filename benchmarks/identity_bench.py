"""Benchmark: what identifying a base backup by its head and MDC saves in a restore's
extraction, against the full SHA-256 of the ciphertext, in the same process.

Builds one encrypted base-backup-shaped archive with rag-backup's own backup pipeline (a tar
of 8 KiB pages, mostly random, compressing about as a 1.1 GB database did; real
zstd and gpg, the deployed key's shape), then extracts it the way a physical restore does
(``physical.extract_base_backup`` fed by ``streams.decrypt_into``, durable: write-back and
fsync), alternating two checks of the same file:

  full   the manifest without head_sha256 (a backup from before 2026-12): the whole
         ciphertext hashed with SHA-256 while read, then the MDC
  head   size and the first 64 KiB's SHA-256 before decrypting, then the MDC

and prints every round and the median of the paired ratios head / full (below 1: faster).
Usage:
  ./venv/bin/python benchmarks/identity_bench.py [--size-mb 768] [--rounds 6] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import secrets
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rag_backup import physical, streams  # noqa: E402
from rag_backup.crypto import Cipher, CipherSettings  # noqa: E402
from rag_backup.progress import Progress  # noqa: E402

PAGE = 8192
RELATION_FILE_MB = 64
# The members a base backup must hold (physical._require_members), with stand-in content.
REQUIRED = {
    "PG_VERSION": b"15\n",
    "global/pg_control": bytes(8192),
    "backup_label": b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
    "backup_manifest": b"{}\n",
}


def _pages(count: int) -> bytes:
    # Five eighths random: the archive compresses to about 0.63, as a 1.1 GB database did.
    random_bytes = PAGE * 5 // 8
    text = (b"feedback row: the answer was helpful, score 4, model rag-1 " * 80)[
        : PAGE - random_bytes
    ]
    return b"".join(os.urandom(random_bytes) + text for _ in range(count))


def _write_archive(sink: IO[bytes], size_mb: int) -> None:
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in REQUIRED.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        left = size_mb
        number = 16384
        while left > 0:
            mb = min(RELATION_FILE_MB, left)
            data = _pages(mb * (1 << 20) // PAGE)
            info = tarfile.TarInfo(f"base/5/{number}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            left -= mb
            number += 1


def _extract(
    cipher: Cipher, artifact: Path, expected: streams.ExpectedCiphertext, target: Path
) -> tuple[float, float]:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(mode=0o700)
    os.sync()  # the previous round's write-back is not this one's
    started, cpu = time.perf_counter(), time.process_time()
    physical.extract_base_backup(
        lambda sink: streams.decrypt_into(cipher, artifact, "postgres", sink, expected),
        target,
        durable=True,
    )
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=768, help="plaintext of the archive")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.size_mb < 1 or args.rounds < 1:
        parser.error("--size-mb and --rounds must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="identity-bench-", dir=args.work_dir))
    try:
        key = work / "key"
        key.write_text(secrets.token_urlsafe(48) + "\n")
        key.chmod(0o600)
        artifact = work / "postgres.tar.zst.gpg"
        with Cipher(CipherSettings("gpg", key_file=key)) as cipher:
            record = streams.write_encrypted(
                name="postgres",
                kind=physical.KIND,
                out_path=artifact,
                cipher=cipher,
                zstd_level=3,
                zstd_threads=2,
                progress=Progress(enabled=False),
                feeder=lambda sink: _write_archive(sink, args.size_mb),
            )
            print(f"archive: {args.size_mb} MiB of plaintext, {record.size / (1 << 20):.0f} MiB")
            by_head = streams.ExpectedCiphertext.of(record.to_json())
            checks = {"full": dataclasses.replace(by_head, head_sha256=None), "head": by_head}
            walls: dict[str, list[float]] = {"full": [], "head": []}
            for round_number in range(1, args.rounds + 1):
                # Alternate which goes first: a round's order is not the result.
                order = ["full", "head"] if round_number % 2 else ["head", "full"]
                for check in order:
                    wall, cpu = _extract(cipher, artifact, checks[check], work / "target")
                    walls[check].append(wall)
                    print(f"round {round_number} {check}: {wall:.2f} s wall, {cpu:.2f} CPU-s")
        ratios = [h / f for h, f in zip(walls["head"], walls["full"], strict=True)]
        print(
            f"median: full {statistics.median(walls['full']):.2f} s, "
            f"head {statistics.median(walls['head']):.2f} s; "
            f"head / full {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} paired rounds"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
