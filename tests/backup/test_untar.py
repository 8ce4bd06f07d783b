"""The in-process extraction of a base backup's tar (rag_backup/untar.py): on a real
pg_basebackup archive it writes what GNU tar writes; on a hostile archive (it is untrusted
until the whole stream is authenticated) it refuses, and nothing lands outside the copy."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from rag_backup import physical, untar
from rag_backup.errors import BackupError
from tests.servers import start_postgres
from tests.tooling import require_tool


def _extract(archive: bytes, target: Path, piece: int = 1000) -> set[str]:
    """Fed in small, unaligned pieces: headers and data cut anywhere."""
    extractor = untar.TarExtractor(target, None)
    try:
        view = memoryview(archive)
        for start in range(0, len(view), piece):
            extractor.feed(view[start : start + piece])
        extractor.finish()
    finally:
        extractor.close()
    return extractor.names


def _tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "dir" if path.is_dir() else "file"
        body = path.read_bytes() if kind == "file" else b""
        found[path.relative_to(root).as_posix()] = (kind, info.st_mode & 0o7777, body)
    return found


@pytest.mark.integration
def test_a_real_base_backup_extracts_as_gnu_tar_extracts_it(tmp_path: Path) -> None:
    require_tool("pg_basebackup")
    require_tool("tar")
    server = start_postgres()
    try:
        server.psql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        archive = subprocess.run(
            ["pg_basebackup", "--pgdata=-", "--format=tar", "--wal-method=fetch",
             "--checkpoint=fast", "--no-password"],
            env={**os.environ, **server.env()}, capture_output=True, check=True, timeout=300,
        ).stdout  # fmt: skip
    finally:
        server.stop()
    by_gnu_tar, in_process = tmp_path / "gnu", tmp_path / "ours"
    for target in (by_gnu_tar, in_process):
        target.mkdir(mode=0o700)
    subprocess.run(
        ["tar", "-x", "-f", "-", "-C", str(by_gnu_tar), "--no-same-owner"],
        input=archive, check=True, timeout=300,
    )  # fmt: skip
    names = _extract(archive, in_process, piece=65_536 + 7)
    expected = _tree(by_gnu_tar)
    assert _tree(in_process) == expected
    physical.check_archive(io.BytesIO(archive))  # what verify does: passes, writes nothing
    for name in ("PG_VERSION", "global/pg_control"):
        with pytest.raises(BackupError, match=f"lacks {name}"):
            physical.check_archive(io.BytesIO(_without(archive, name)))
    assert {"PG_VERSION", "global/pg_control", "backup_label", "backup_manifest"} <= names
    assert len(expected) > 500


def _archive(*members: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, body = member
                info = tarfile.TarInfo(name)
                info.size = len(body)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def _without(archive: bytes, name: str) -> bytes:
    """``archive`` rewritten without member ``name``."""
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r") as source,
        tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for member in source:
            if member.name != name:
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
    return buffer.getvalue()


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (_archive(_link("PG_VERSION", tarfile.SYMTYPE, "/etc/passwd")), "not a file or dir"),
        (_archive(("x", b"1"), _link("y", tarfile.LNKTYPE, "x")), "not a file or directory"),
        (_archive(("../escaped", b"1")), "unsafe member path"),
        (_archive(("base/../../escaped", b"1")), "unsafe member path"),
        (_archive(("/escaped", b"1")), "unsafe member path"),
        (_archive(("twice", b"1"), ("twice", b"2")), "appears twice"),
        (_archive(("base", b"1"), ("base/1", b"2")), "both a file and a directory"),
        (_archive(("base/1", b"1"), ("base", b"2")), "both a file and a directory"),
    ],
    ids=[
        "symlink", "hard link", "dot-dot", "dot-dot inside", "absolute", "twice", "file/dir",
        "dir/file",
    ],
)  # fmt: skip
def test_a_hostile_member_is_refused(tmp_path: Path, archive: bytes, message: str) -> None:
    target = tmp_path / "copy"
    target.mkdir()
    with pytest.raises(BackupError, match=message):
        _extract(archive, target)
    assert not (tmp_path / "escaped").exists()
    assert all(not p.is_symlink() for p in target.rglob("*"))
    # verify reads the archive with the same checks, writing nothing.
    with pytest.raises(BackupError, match=message):
        physical.check_archive(io.BytesIO(archive))


def test_a_pax_header_is_refused(tmp_path: Path) -> None:
    # pg_basebackup writes plain ustar; a pax header (here for a long name) is not that.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("d/" + "n" * 200)
        tar.addfile(info, io.BytesIO(b""))
    target = tmp_path / "copy"
    target.mkdir()
    with pytest.raises(BackupError, match="not a file or directory"):
        _extract(buffer.getvalue(), target)


def test_a_damaged_header_or_a_cut_archive_is_refused(tmp_path: Path) -> None:
    archive = bytearray(_archive(("PG_VERSION", b"15\n"), ("big", b"x" * 5000)))
    damaged = bytearray(archive)
    damaged[10] ^= 0x01  # inside the first header's name: its checksum no longer matches
    (tmp_path / "a").mkdir()
    with pytest.raises(BackupError, match="checksum"):
        _extract(bytes(damaged), tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(BackupError, match="truncated"):
        _extract(bytes(archive[: 512 * 4]), tmp_path / "b")  # inside big's data


def test_a_planted_symlink_in_the_copy_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "copy"
    target.mkdir()
    (target / "base").symlink_to(outside)
    with pytest.raises(BackupError):
        _extract(_archive(("base/1", b"data")), target)
    assert list(outside.iterdir()) == []


def test_modes_are_owner_and_group_at_most_and_root_hands_files_to_the_owner(
    tmp_path: Path,
) -> None:
    wide = tarfile.TarInfo("wide")
    wide.mode = 0o4777  # setuid and world-writable in the archive
    directory = tarfile.TarInfo("dir")
    directory.type = tarfile.DIRTYPE
    directory.mode = 0o777
    target = tmp_path / "copy"
    target.mkdir()
    owner = (4321, 4321) if os.geteuid() == 0 else None
    extractor = untar.TarExtractor(target, owner)
    try:
        extractor.feed(memoryview(_archive(wide, directory, ("dir/f", b"1"))))
        extractor.finish()
    finally:
        extractor.close()
    assert (target / "wide").stat().st_mode & 0o7777 == 0o640
    assert (target / "dir").stat().st_mode & 0o7777 == 0o750
    if owner is not None:
        for path in ("wide", "dir", "dir/f"):
            info = (target / path).stat()
            assert (info.st_uid, info.st_gid) == owner, path
