"""The remote WAL index is untrusted when read back (pull, prune of another lineage): every
field is checked before a name becomes a path or a number a limit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rag_backup.errors import BackupError
from rag_backup.offsite_wal import SEGMENT_MAX_BYTES, _check_consecutive, parse_remote_index

SYSTEM = "7713880310647303576"
NAME = "000000010000000000000003"


def _index(**segment: Any) -> dict[str, Any]:
    item = {"file": f"{NAME}.zst.gpg", "size": 1234, "sha256": "a" * 64, "archived_at": 1.5}
    item.update(segment)
    return {
        "system_identifier": SYSTEM,
        "segments": {NAME: item},
        "covered_until": 2.0,
        "cycles": [{"at": 1.0, "xid": 7, "end_lsn": "0/3000000"}],
    }


def _parse(index: Any) -> dict[str, Any]:
    return parse_remote_index(json.dumps(index).encode(), SYSTEM)


def test_a_well_formed_index_is_read() -> None:
    parsed = _parse(_index())
    assert parsed["segments"][NAME]["size"] == 1234
    assert parsed["covered_until"] == 2.0
    assert parsed["cycles"] == [{"at": 1.0, "xid": 7, "end_lsn": "0/3000000"}]


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (_index(file="../../../etc/passwd"), "is not 000000010000000000000003.zst.gpg/.age"),
        (_index(file="000000010000000000000004.zst.gpg"), "is not 0000000100000000000000"),
        (_index(file=f"{NAME}.zst.gpg/x"), "is not"),
        (_index(size=SEGMENT_MAX_BYTES + 1), "is not a segment's"),
        (_index(size=True), "is not a segment's"),
        (_index(size="12"), "is not a segment's"),
        (_index(sha256="A" * 64), "sha256 is not 64 hex digits"),
        (_index(archived_at="yesterday"), "archived_at is not a time"),
        ({**_index(), "system_identifier": "1"}, f"not an index of system {SYSTEM}"),
        ({**_index(), "segments": {"../x": {}}}, "is not a WAL segment entry"),
        ({**_index(), "segments": []}, "no segments"),
        ({**_index(), "covered_until": "now"}, "covered_until is not a time"),
        ({**_index(), "cycles": [{"at": 1, "xid": 1, "end_lsn": "0/3; rm"}]}, "a cycle is not"),
        ([1, 2], f"not an index of system {SYSTEM}"),
    ],
)
def test_a_hostile_index_is_refused_naming_what_is_wrong(index: Any, message: str) -> None:
    with pytest.raises(BackupError, match="off-host wal/") as error:
        _parse(index)
    assert message in str(error.value)


def test_not_json_is_refused() -> None:
    with pytest.raises(BackupError, match="not valid JSON"):
        parse_remote_index(b'{"segments": ', SYSTEM)


def test_a_gap_on_a_timeline_is_refused_across_a_log_boundary_too() -> None:
    # 0x...00FF is followed by the next "log" file's 0x...0000 (16 MiB segments).
    _check_consecutive(
        [
            "0000000100000000000000FE",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000020000000100000000",
        ],
        SYSTEM,
    )
    with pytest.raises(BackupError, match="has a gap on timeline 00000001"):
        _check_consecutive(["0000000100000000000000FE", "000000010000000100000000"], SYSTEM)
