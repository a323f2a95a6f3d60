"""The SQLite outbox on a real file: sequence numbers, lanes, leases, acks, quota, crashes.

Everything the cloud relies on (gap detection, duplicate removal) rests on the
sequence numbers here, and nothing may leave the vehicle's disk before the broker
has it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.store.outbox import LANE_ALARM, LANE_EVENT, LANE_HISTORY, LANE_LIVE, Outbox

REPO = Path(__file__).resolve().parents[1]
BIG = 1 << 40


def body(tag: int, size: int = 8) -> bytes:
    return tag.to_bytes(4, "big") + b"x" * (size - 4)


def open_outbox(tmp_path: Path, quota: int = BIG) -> Outbox:
    return Outbox(str(tmp_path / "outbox.sqlite"), quota)


def test_sequence_numbers_consecutive_and_durable(tmp_path: Path) -> None:
    """Consecutive from 1, continued after a restart and after every row is gone:
    a reused number would make the cloud drop a new record as a duplicate."""
    box = open_outbox(tmp_path)
    assert box.append([(LANE_LIVE, 1.0, body(1))]) == [1]
    assert box.append([(LANE_LIVE, 2.0, body(2)), (LANE_ALARM, 2.5, body(3))]) == [2, 3]
    assert box.append([]) == []
    box.close()
    box = open_outbox(tmp_path)
    assert box.append([(LANE_HISTORY, 3.0, body(4))]) == [4]
    leased = box.lease(100, BIG)
    box.ack([seq for seq, _ in leased])
    assert box.stats()["records"] == 0
    box.close()
    box = open_outbox(tmp_path)
    assert box.stats()["last_seq"] == 4
    assert box.append([(LANE_LIVE, 5.0, body(5)) for _ in range(3)]) == [5, 6, 7]
    box.close()


def test_lease_order_lanes_then_age(tmp_path: Path) -> None:
    """Alarms first, then live data, then backlog; oldest first within a lane."""
    box = open_outbox(tmp_path)
    plan = [LANE_HISTORY, LANE_LIVE, LANE_ALARM, LANE_HISTORY, LANE_EVENT, LANE_LIVE, LANE_ALARM]
    seqs = box.append([(lane, float(i), body(i)) for i, lane in enumerate(plan)])
    by_lane = sorted(zip(plan, seqs, strict=True), key=lambda p: (p[0], p[1]))
    expected = [seq for _, seq in by_lane]
    assert expected[:2] == [3, 7] and expected[-2:] == [1, 4]
    leased = box.lease(100, BIG)
    assert [seq for seq, _ in leased] == expected
    assert [b for _, b in leased] == [body(seq - 1) for seq in expected]


def test_lease_respects_limits_and_never_doubles(tmp_path: Path) -> None:
    """A row in flight is never put in a second batch until its first one failed."""
    box = open_outbox(tmp_path)
    box.append([(LANE_LIVE, float(i), body(i, 100)) for i in range(10)])
    first = box.lease(3, BIG)
    assert [s for s, _ in first] == [1, 2, 3]
    second = box.lease(100, 250)
    assert [s for s, _ in second] == [4, 5]
    third = box.lease(100, 100)
    assert [s for s, _ in third] == [6]
    rest = box.lease(100, BIG)
    assert [s for s, _ in rest] == [7, 8, 9, 10]
    assert box.lease(100, BIG) == []
    assert box.stats()["in_flight"] == 10


def test_lease_sends_one_oversized_record(tmp_path: Path) -> None:
    """A record bigger than max_bytes still goes out alone, or it would block the outbox forever."""
    box = open_outbox(tmp_path)
    box.append([(LANE_LIVE, 1.0, body(1, 1000)), (LANE_LIVE, 2.0, body(2, 10))])
    assert [s for s, _ in box.lease(100, 500)] == [1]
    assert [s for s, _ in box.lease(100, 500)] == [2]


def test_ack_deletes_durably(tmp_path: Path) -> None:
    """Acknowledged rows are gone after a restart; unacknowledged ones are still there."""
    box = open_outbox(tmp_path)
    box.append([(LANE_LIVE, float(i), body(i)) for i in range(5)])
    box.lease(5, BIG)
    box.ack([2, 4])
    stats = box.stats()
    assert stats["records"] == 3 and stats["last_acked"] == 4 and stats["in_flight"] == 3
    box.ack([1])
    assert box.stats()["last_acked"] == 4, "last_acked must never go backwards"
    box.close()
    box = open_outbox(tmp_path)
    assert [s for s, _ in box.lease(100, BIG)] == [3, 5]
    assert box.stats()["last_acked"] == 4


def test_release_makes_rows_leasable_again(tmp_path: Path) -> None:
    """A failed message's rows are sent again, in their original order."""
    box = open_outbox(tmp_path)
    box.append([(LANE_LIVE, float(i), body(i)) for i in range(4)])
    box.lease(3, BIG)
    box.release([1, 3])
    assert [s for s, _ in box.lease(100, BIG)] == [1, 3, 4]
    box.release_all()
    assert [s for s, _ in box.lease(100, BIG)] == [1, 2, 3, 4]


def test_a_drained_outbox_still_leases_whatever_becomes_sendable(tmp_path: Path) -> None:
    """Once a lease finds nothing, the next ones ask no query (``drained``), yet every
    way a row becomes sendable ends that: an append, a release, a release of all, rows
    adopted from memory, and the newest-live-first lease after a reconnect."""
    box = open_outbox(tmp_path)
    box.append([(LANE_LIVE, float(i), body(i)) for i in range(2)])
    assert [s for s, _ in box.lease(100, BIG)] == [1, 2]
    assert box.lease(100, BIG) == [] and box.drained
    box.append([(LANE_LIVE, 2.0, body(2))])
    assert [s for s, _ in box.lease(100, BIG)] == [3]
    assert box.lease(100, BIG) == []
    box.release([])
    assert box.drained, "releasing nothing is no reason to ask again"
    box.release([2])
    assert [s for s, _ in box.lease(100, BIG)] == [2]
    assert box.lease(100, BIG) == []
    box.release_all()
    assert [s for s, _ in box.lease(100, BIG)] == [1, 2, 3]
    assert box.lease(100, BIG) == []
    box.adopt([(10, LANE_ALARM, 9.0, body(10))], 11)
    assert [s for s, _ in box.lease(100, BIG)] == [10]
    box.release_all()
    assert box.lease(100, BIG) and box.lease(100, BIG) == []
    box.release([3])
    assert [s for s, _ in box.lease(100, BIG, newest_live_first=True)] == [3]


def test_stats_fields(tmp_path: Path) -> None:
    box = open_outbox(tmp_path)
    empty = box.stats()
    assert empty["depth"] == {"alarm": 0, "live": 0, "event": 0, "history": 0, "raw": 0}
    assert (empty["records"], empty["bytes"], empty["oldest"], empty["last_seq"], empty["last_acked"]) == \
        (0, 0, None, 0, 0)
    box.append([(LANE_LIVE, 20.0, body(1, 10)), (LANE_ALARM, 15.0, body(2, 20)),
                (LANE_HISTORY, 30.0, body(3, 30)), (LANE_LIVE, 25.0, body(4, 40))])
    box.lease(1, BIG)
    stats = box.stats()
    assert stats["depth"] == {"alarm": 1, "live": 2, "event": 0, "history": 1, "raw": 0}
    assert stats["records"] == 4
    assert stats["bytes"] == 100
    assert stats["oldest"] == 15.0
    assert stats["last_seq"] == 4
    assert stats["last_acked"] == 0
    assert stats["in_flight"] == 1
    assert stats["dropped"] == 0 and stats["configured_quota_bytes"] == BIG
    assert 0 < stats["quota_bytes"] < BIG, "a quota beyond the free space must be clamped"
    assert stats["disk_full"] == 0 and stats["refused"] == 0 and stats["ballast_bytes"] > 0


def lane_seqs(box: Outbox) -> dict[int, list[int]]:
    """Remaining sequence numbers per lane, read through a lease that is given back."""
    rows = box.lease(1 << 30, BIG)
    box.release(s for s, _ in rows)
    out: dict[int, list[int]] = {LANE_ALARM: [], LANE_LIVE: [], LANE_HISTORY: []}
    for seq, b in rows:
        out[int.from_bytes(b[:4], "big")].append(seq)
    return out


def test_quota_drops_history_then_live_then_alarms(tmp_path: Path) -> None:
    """Over quota, the oldest low-priority rows go first and alarms last; drops are counted."""
    box = open_outbox(tmp_path, quota=64 * 1024)

    def add(lane: int, n: int, size: int) -> list[int]:
        return box.append([(lane, 0.0, lane.to_bytes(4, "big") + b"p" * (size - 4)) for _ in range(n)])

    alarms = add(LANE_ALARM, 20, 1000)
    live = add(LANE_LIVE, 300, 100)
    left = lane_seqs(box)
    assert left[LANE_ALARM] == alarms, "alarms dropped while live data was left"
    assert 0 < len(left[LANE_LIVE]) < len(live)
    assert left[LANE_LIVE] == live[-len(left[LANE_LIVE]):], "the oldest live rows must go first"
    assert box.stats()["dropped"] == len(live) - len(left[LANE_LIVE])

    live_before = left[LANE_LIVE]
    history = add(LANE_HISTORY, 100, 100)
    left = lane_seqs(box)
    assert left[LANE_ALARM] == alarms
    assert left[LANE_LIVE] == live_before, "live rows dropped while history was left"
    assert len(left[LANE_HISTORY]) < len(history)
    assert left[LANE_HISTORY] == history[len(history) - len(left[LANE_HISTORY]):]

    more_alarms = add(LANE_ALARM, 60, 1000)
    left = lane_seqs(box)
    assert left[LANE_HISTORY] == [] and left[LANE_LIVE] == []
    all_alarms = alarms + more_alarms
    assert 0 < len(left[LANE_ALARM]) < len(all_alarms)
    assert left[LANE_ALARM] == all_alarms[-len(left[LANE_ALARM]):]
    stats = box.stats()
    assert stats["dropped"] == len(all_alarms) + len(live) + len(history) - len(left[LANE_ALARM])
    assert stats["records"] == len(left[LANE_ALARM])


def test_committed_record_survives_sigkill(tmp_path: Path) -> None:
    """A record append() returned for is on disk even if the agent is killed right after."""
    path = tmp_path / "outbox.sqlite"
    child = textwrap.dedent(f"""
        import os, sys
        from agent.store.outbox import Outbox, LANE_ALARM
        box = Outbox({str(path)!r}, 1 << 30)
        seqs = box.append([(LANE_ALARM, 123.5, b"before the crash")])
        print(seqs[0], flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "1"
    box = Outbox(str(path), BIG)
    assert box.lease(10, BIG) == [(1, b"before the crash")]
    stats = box.stats()
    assert stats["depth"]["alarm"] == 1 and stats["oldest"] == 123.5
    assert box.append([(LANE_LIVE, 1.0, b"after")]) == [2]


def test_a_corrupt_outbox_is_moved_aside_not_wiped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged file is kept for forensics under a loud name; the new outbox continues
    with sequence numbers above anything the old one can have used."""
    path = tmp_path / "outbox.sqlite"
    box = Outbox(str(path), 1 << 30)
    box.append([(LANE_LIVE, 1.0, b"x" * 100) for _ in range(50)])
    box.close()
    raw = bytearray(path.read_bytes())
    raw[100:4096] = b"\xde\xad\xbe\xef" * ((4096 - 100) // 4)
    path.write_bytes(bytes(raw))
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with caplog.at_level("ERROR"):
        box = Outbox(str(path), 1 << 30)
    try:
        aside = box.stats()["moved_aside"]
        assert aside and Path(aside).read_bytes() == bytes(raw), "the damaged file was not kept as it was"
        assert "CORRUPT" in caplog.text and aside in caplog.text
        (seq,) = box.append([(LANE_LIVE, 2.0, b"y")])
        assert seq > 50, "a sequence number could repeat one the cloud already has"
    finally:
        box.close()


def test_garbage_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(str(path), 1 << 30)
    try:
        assert Path(box.stats()["moved_aside"]).read_bytes() == b"this is not a database" * 100
        assert box.append([(LANE_LIVE, 1.0, b"z")])[0] > 1
    finally:
        box.close()


def test_after_a_reconnect_the_newest_live_window_goes_first(tmp_path: Path) -> None:
    """After an outage the cloud first sees alarms and the vehicle as it is now, then the
    backlog oldest first; in steady state everything goes oldest first."""
    box = open_outbox(tmp_path)
    plan = [LANE_HISTORY, LANE_LIVE, LANE_ALARM, LANE_LIVE, LANE_EVENT, LANE_LIVE]
    box.append([(lane, float(i), body(i)) for i, lane in enumerate(plan)])
    assert [s for s, _ in box.lease(100, BIG, newest_live_first=True)] == [3, 6, 2, 4, 5, 1]
    box.release_all()
    assert [s for s, _ in box.lease(100, BIG)] == [3, 2, 4, 6, 5, 1]


def test_buffer_stats_reads_the_file_when_no_agent_runs(tmp_path: Path) -> None:
    """``ebike-agent buffer stats`` works for a technician on a stopped unit, read-only."""
    import json

    box = Outbox(str(tmp_path / "outbox.sqlite"), 1 << 30)
    box.append([(LANE_ALARM, 1.0, b"a"), (LANE_LIVE, 2.0, b"bb"), (LANE_LIVE, 3.0, b"ccc")])
    box.ack([1])
    box.close()
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "b1"\ncontrol_socket = "none.sock"\n'
                   '[[sources]]\nname = "g"\nkind = "uart"\nport = "/dev/null"\nprotocol = "nmea"\n'
                   '[outbox]\npath = "outbox.sqlite"\n')
    out = subprocess.run([sys.executable, "-m", "agent", "buffer", "stats", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["source"] == "file" and stats["records"] == 2 and stats["bytes"] == 5
    assert stats["depth"]["live"] == 2 and stats["last_seq"] == 3 and stats["last_acked"] == 1
    (tmp_path / "outbox.sqlite").unlink()
    gone = subprocess.run([sys.executable, "-m", "agent", "buffer", "stats", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "no agent running and no outbox" in gone.stderr


def test_quota_drops_are_announced_as_a_gap_record(tmp_path: Path) -> None:
    """What the quota throws away is told to the cloud: one alarm-lane record listing the
    dropped sequence numbers as runs, and why."""
    announced: list[tuple[list[tuple[int, int]], str]] = []

    def gap_body(runs: list[tuple[int, int]], why: str) -> bytes:
        announced.append((runs, why))
        return b"gap:" + repr(runs).encode()

    box = Outbox(str(tmp_path / "outbox.sqlite"), 300_000, gap_body=gap_body)
    try:
        plan = [LANE_HISTORY if i % 3 else LANE_LIVE for i in range(600)]
        seqs = box.append([(lane, float(i), body(i, 1000)) for i, lane in enumerate(plan)])
        kept = {s for s, _ in box.lease(10_000, BIG)}
        dropped = sorted(set(seqs) - kept)
        assert dropped and box.stats()["dropped"] == len(dropped)
        assert all(plan[s - 1] == LANE_HISTORY for s in dropped), "live rows went before history"
        (runs, why), = announced
        assert why == "quota" and [s for a, b in runs for s in range(a, b + 1)] == dropped
        gap_seq = max(kept)
        assert gap_seq == seqs[-1] + 1, "the announcement did not get its own sequence number"
        assert box.db.execute("SELECT lane FROM records WHERE seq=?", (gap_seq,)).fetchone() == (LANE_ALARM,)
    finally:
        box.close()


def test_kernel_state_is_kept_across_reopening(tmp_path: Path) -> None:
    """The fusion kernel's counters (trip, energy, SoH) live in the outbox's file: saved,
    replaced by newer values, and there after the file is opened again."""
    ob = open_outbox(tmp_path)
    assert ob.load_state() == {}
    assert ob.save_state({"trip_km": 1.5, "soh_pct": -1.0})
    assert ob.save_state({"trip_km": 2.25, "energy_out_wh": 10.0})
    ob.close()
    ob = open_outbox(tmp_path)
    try:
        assert ob.load_state() == {"trip_km": 2.25, "soh_pct": -1.0, "energy_out_wh": 10.0}
    finally:
        ob.close()
