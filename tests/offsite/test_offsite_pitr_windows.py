"""Which archive cycles a base backup's WAL chain reaches (pitr.window_of, and the segments
an off-host point-in-time pull takes: offsite_pitr._wanted_segments), on indexes recorded
the way wal-archive records them. A cycle's ``end_lsn`` is the server's WAL position read
*after* its pg_switch_wal(): when another session commits in between (any live server), it
lies past the switch point, in a segment that cycle did not archive. The cycle is still
complete: its switch closed the segment before, which it archived. Measured on PostgreSQL 15
under a write load (tests/backup/test_pitr_resolve.py and tests/offsite/test_offsite_pitr.py
prove it end to end); here the rule itself, without servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rag_backup import pitr, wal
from rag_backup.offsite_pitr import _wanted_segments
from rag_backup.store import BackupEntry

TIMELINE = "00000001"
BACKUP_START = 100.0


def _name(number: int) -> str:
    return pitr.segment_name(int(TIMELINE, 16), number * wal.SEGMENT_SIZE)


def _lsn(number: int, offset: int = 0) -> str:
    """The position ``offset`` bytes into segment ``number``, as pg_current_wal_lsn()."""
    value = number * wal.SEGMENT_SIZE + offset
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _entry() -> BackupEntry:
    manifest = {
        "id": "20261130T100000Z",
        "created_unix": BACKUP_START,
        "components": {
            "postgres": {
                "duration_seconds": 2,
                "artifacts": [],
                "physical": {"wal_start_at_least": _name(3)},
            }
        },
    }
    return BackupEntry("20261130T100000Z", Path("/nonexistent"), manifest, None)


def _index(cycles: list[tuple[float, str]], archived: dict[int, float]) -> dict[str, Any]:
    """As wal-archive writes it: ``archived`` segment number -> archived_at; each cycle
    (at, end_lsn); covered_until the last cycle's time."""
    return {
        "segments": {
            _name(n): {"file": f"{_name(n)}.zst.gpg", "archived_at": at}
            for n, at in archived.items()
        },
        "cycles": [
            {"at": at, "xid": 700 + i, "end_lsn": lsn} for i, (at, lsn) in enumerate(cycles)
        ],
        "covered_until": cycles[-1][0],
    }


# Cycle 1 at 110 (idle: the position is the switch point, 0/4000000) archives segment 3.
# Cycle 2 at 120 archives 4 and 5: its switch closed 5 (at 0/6000000), and a commit of
# another session landed before the position was read: 0/6000208, in segment 6, which
# only the next cycle (if any) archives.
WRITTEN_PAST_THE_SWITCH = _index(
    [(110.0, _lsn(4)), (120.0, _lsn(6, 0x208))],
    {3: 110.5, 4: 120.5, 5: 120.6},
)


def test_a_cycle_whose_position_was_read_past_its_switch_is_reached_by_what_it_archived() -> None:
    window = pitr.window_of(_entry(), WRITTEN_PAST_THE_SWITCH)
    # `--target latest` is the archive's end, covered_until: the newest chain reaches it.
    assert window.end == 120.0
    assert window.covers(WRITTEN_PAST_THE_SWITCH["covered_until"])
    assert window.segments == (_name(3), _name(4), _name(5))


def test_an_off_host_pull_to_a_time_before_such_a_cycle_takes_what_that_cycle_archived() -> None:
    window = pitr.window_of(_entry(), WRITTEN_PAST_THE_SWITCH)
    segments, until = _wanted_segments(window, WRITTEN_PAST_THE_SWITCH, 115.0)
    assert (segments, until) == ((_name(3), _name(4), _name(5)), 120.0)
    # A time the first cycle reaches: only its segment.
    assert _wanted_segments(window, WRITTEN_PAST_THE_SWITCH, 105.0) == ((_name(3),), 110.0)


def test_a_cycle_whose_closing_segment_is_not_archived_is_not_reached() -> None:
    # The switch closed segment 5 (position 0/6000000 exactly), which is missing (lost, or
    # not copied off-host): that cycle's time is not covered; the one before still is.
    missing = _index([(110.0, _lsn(4)), (120.0, _lsn(6))], {3: 110.5, 4: 120.5})
    window = pitr.window_of(_entry(), missing)
    assert window.end == 110.0
    assert not window.covers(missing["covered_until"])
    assert window.segments == (_name(3),)
    # Written past the switch, and the closing segment missing all the same: not reached.
    missing_past = _index([(110.0, _lsn(4)), (120.0, _lsn(6, 0x208))], {3: 110.5, 4: 120.5})
    assert pitr.window_of(_entry(), missing_past).end == 110.0


def test_more_than_a_segment_written_past_the_switch_needs_the_segments_received() -> None:
    # The position read a whole segment past the switch (a heavy load): the cycle received
    # up to it, so it archived segment 6 too; the rule asks for it (never less than the
    # switch needs, never a segment the cycle did not receive).
    heavy = _index([(110.0, _lsn(4)), (120.0, _lsn(7, 0x10))], {3: 110.5, 4: 120.5, 5: 120.6})
    assert pitr.window_of(_entry(), heavy).end == 110.0
    heavy["segments"][_name(6)] = {"file": f"{_name(6)}.zst.gpg", "archived_at": 120.7}
    window = pitr.window_of(_entry(), heavy)
    assert window.end == 120.0
    assert window.segments == (_name(3), _name(4), _name(5), _name(6))
