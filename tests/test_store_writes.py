"""SD-card care in the store: every write transaction is an fsync of whole pages, so
the deletions of acknowledged rows and the kernel's counters ride along with the next
commit instead of costing one of their own, unchanged counters are not written again,
and a parked vehicle commits every PARKED_COMMIT_S instead of every commit_interval.

Real SQLite files and the real (pure) fusion kernel; the recorder's clock is a fake one,
so minutes of parking take no time. The bytes per hour these choices give are measured
by ``make bench`` (devtools/bench_writes.py), not here.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import wire
from agent.config import Config, OutboxConfig
from agent.feed import make_kernel
from agent.signals import BY_NAME
from agent.store import outbox as outbox_module
from agent.store import recorder as recorder_module
from agent.store.memory import Storage
from agent.store.outbox import LANE_HISTORY, LANE_LIVE, Outbox
from agent.store.recorder import PARKED_AFTER_S, PARKED_COMMIT_S, PARKED_LIVE_MERGE, Recorder

BIG = 1 << 40


def body(tag: int, size: int = 8) -> bytes:
    return tag.to_bytes(4, "big") + b"x" * (size - 4)


def commits(db: sqlite3.Connection) -> list[str]:
    """Every COMMIT the connection runs from now on (each one an fsync of the WAL)."""
    seen: list[str] = []
    db.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def on_disk(path: Path) -> list[int]:
    """Sequence numbers in the file, as another process would read them."""
    with sqlite3.connect(path) as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM records ORDER BY seq")]


def state_on_disk(path: Path) -> dict[str, float]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT key, value FROM kernel_state").fetchall())


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(str(tmp_path / "outbox.sqlite"), BIG)
    yield ob
    ob.close()


def test_acknowledgements_ride_along_with_the_next_append(box: Outbox, tmp_path: Path) -> None:
    """Held acknowledgements cost no transaction: the next append deletes them in its own."""
    box.append([(LANE_LIVE, float(i), body(i)) for i in range(5)])
    box.lease(5, BIG)
    seen = commits(box.db)
    box.ack_later([1, 2])
    assert seen == [] and on_disk(tmp_path / "outbox.sqlite") == [1, 2, 3, 4, 5]
    assert box.append([(LANE_LIVE, 6.0, body(6))]) == [6]
    assert seen == ["COMMIT"], "the deletions took a transaction of their own"
    assert on_disk(tmp_path / "outbox.sqlite") == [3, 4, 5, 6]
    assert box.acked == 2 and box.held_since() is None


def test_held_acknowledgements_are_neither_sent_again_nor_counted(box: Outbox) -> None:
    box.append([(LANE_LIVE, float(i), body(i)) for i in range(4)])
    box.lease(4, BIG)
    box.ack_later([1, 3])
    box.release_all()  # a reconnect: whatever is not acknowledged goes again
    assert [seq for seq, _ in box.lease(100, BIG)] == [2, 4]
    stats = box.stats()
    assert (stats["records"], stats["depth"]["live"], stats["first_seq"], stats["last_acked"]) == (2, 2, 2, 3)
    assert stats["acked_held"] == 2


def test_held_writes_go_on_their_own_when_asked(box: Outbox, tmp_path: Path) -> None:
    """No append coming (a backlog drained with the sources silent): ``flush_held``."""
    box.append([(LANE_LIVE, float(i), body(i)) for i in range(3)])
    box.lease(3, BIG)
    box.ack_later([1, 2, 3])
    assert box.held_since() is not None
    seen = commits(box.db)
    assert box.flush_held()
    assert seen == ["COMMIT"] and on_disk(tmp_path / "outbox.sqlite") == []
    assert box.flush_held() and seen == ["COMMIT"], "nothing held, and still a transaction"


def test_unchanged_kernel_state_is_not_written_again(box: Outbox, tmp_path: Path) -> None:
    """A parked vehicle's counters stand still: handing them over costs nothing; changed
    ones go with the next append, in its transaction."""
    assert box.save_state({"trip_km": 1.5, "soh_pct": 96.0})
    seen = commits(box.db)
    box.keep_state({"trip_km": 1.5, "soh_pct": 96.0})
    assert box.held_since() is None and box.flush_held() and seen == []
    box.keep_state({"trip_km": 1.75, "soh_pct": 96.0})
    assert seen == [] and state_on_disk(tmp_path / "outbox.sqlite")["trip_km"] == 1.5
    box.append([(LANE_LIVE, 1.0, body(1))])
    assert seen == ["COMMIT"] and state_on_disk(tmp_path / "outbox.sqlite")["trip_km"] == 1.75
    assert box.save_state({"trip_km": 1.75, "soh_pct": 96.0}) and seen == ["COMMIT"]


def test_state_on_disk_is_known_after_reopening(tmp_path: Path) -> None:
    """After a restart, the counters restored are not written back unchanged."""
    path = str(tmp_path / "outbox.sqlite")
    first = Outbox(path, BIG)
    first.save_state({"trip_km": 3.0})
    first.close()
    again = Outbox(path, BIG)
    try:
        assert again.load_state() == {"trip_km": 3.0}
        seen = commits(again.db)
        assert again.save_state({"trip_km": 3.0}) and seen == []
    finally:
        again.close()


def test_a_crash_brings_held_acknowledgements_back_never_records(tmp_path: Path) -> None:
    """What a power cut costs: rows acknowledged since the last commit are in the file
    again and are sent again (the cloud drops them as duplicates); no record is lost."""
    path = str(tmp_path / "outbox.sqlite")
    first = Outbox(path, BIG)
    first.append([(LANE_LIVE, float(i), body(i)) for i in range(3)])
    first.lease(3, BIG)
    first.ack_later([1, 2])
    first.db.close()  # the process dies: no flush, no clean close
    again = Outbox(path, BIG)
    try:
        assert [seq for seq, _ in again.lease(100, BIG)] == [1, 2, 3]
    finally:
        again.close()


def test_a_clean_stop_deletes_what_was_acknowledged(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.sqlite")
    store = Storage(path, BIG)
    store.append([(LANE_LIVE, float(i), body(i)) for i in range(3)])
    store.ack([seq for seq, _ in store.lease(100, BIG)])
    assert store.stats()["records"] == 0 and on_disk(tmp_path / "outbox.sqlite") == [1, 2, 3]
    store.close()
    assert on_disk(tmp_path / "outbox.sqlite") == []


def test_quota_never_announces_acknowledged_rows_as_dropped(tmp_path: Path) -> None:
    """The cloud has the held rows: they go first, silently, and what the quota drops
    after them is announced; no acknowledged number is in a gap record."""
    announced: list[list[tuple[int, int]]] = []

    def gap_body(runs: list[tuple[int, int]], why: str) -> bytes:
        announced.append(runs)
        return b"gap"

    box = Outbox(str(tmp_path / "outbox.sqlite"), 300_000, gap_body=gap_body)
    try:
        first = box.append([(LANE_HISTORY, float(i), body(i, 1000)) for i in range(200)])
        box.lease(50, BIG)
        box.ack_later(first[:50])
        box.append([(LANE_HISTORY, float(i), body(i, 1000)) for i in range(400)])
        gone = {seq for runs in announced for a, b in runs for seq in range(a, b + 1)}
        assert gone, "the quota dropped nothing: the test proves nothing"
        assert not gone & set(first[:50]), "acknowledged rows announced as dropped"
    finally:
        box.close()


STEP = 0.125  # s of the fake clock per turn: a binary fraction, so the times add up exactly


class Clock:
    """``time`` for the recorder and the outbox: monotonic and wall time move only when
    told to; anything else is the real module's."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1.7e9

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(recorder_module, "time", c)
    monkeypatch.setattr(outbox_module, "time", c)
    return c


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


class Ride:
    """A recorder on a real outbox, turned as the runtime turns it every STEP of the fake
    clock: read, close, commit, send (acknowledged at once), save the counters."""

    def __init__(self, tmp_path: Path, clock: Clock) -> None:
        self.clock = clock
        self.cfg = Config(path="agent.toml", device_id="bike-1", sources=(),
                          outbox=OutboxConfig(path=str(tmp_path / "outbox.sqlite")))
        self.kernel = make_kernel(self.cfg, None)
        self.store = Storage(self.cfg.outbox.path, BIG)
        self.rec = Recorder(self.cfg, self.kernel, self.store)
        assert self.store.disk is not None
        self.seen = commits(self.store.disk.db)
        self.at: list[float] = []  # monotonic times of the commits
        # Each live record: (wall time, its length in s, the windows the budget is told it stands for).
        self.live: list[tuple[float, float, float]] = []
        self.rec.on_stored = self._stored
        self.wheel = BY_NAME["Vehicle.Speed"].id

    def _stored(self, kind: str, size: int, windows: float, t: float) -> None:
        if kind == "live":
            length_ms = wire.strict_loads(self.rec.pending[-1][2], "window", 8)["d"]
            self.live.append((self.clock.wall, length_ms / 1000.0, windows))

    def __call__(self, seconds: float, kmh: float) -> None:
        for _ in range(int(seconds / STEP)):
            self.clock.advance(STEP)
            wall = self.clock.wall
            self.rec.add(self.kernel.feed_values([self.wheel], [wall], [kmh]), wall)
            self.rec.add(self.kernel.close_due(wall), wall)
            before = len(self.seen)
            self.rec.commit()
            if len(self.seen) > before:
                self.at.append(self.clock.mono)
            self.store.ack([seq for seq, _ in self.store.lease(1000, BIG)])
            self.rec.save_state_when_due()


def test_a_parked_vehicle_commits_every_parked_interval(tmp_path: Path, clock: Clock) -> None:
    """Riding, a commit every commit_interval; still for PARKED_AFTER_S, every
    PARKED_COMMIT_S; a command result is committed at once even then, and the first
    turns after the vehicle moves commit what waited. The pump's acknowledgements and
    the counters never add a transaction of their own."""
    ride = Ride(tmp_path, clock)
    rec, store, seen, at = ride.rec, ride.store, ride.seen, ride.at
    interval = ride.cfg.outbox.commit_interval
    ride(60, 18.0)
    assert len(at) >= 10 and gaps(at) == [interval] * (len(at) - 1)
    parked_from = clock.mono + PARKED_AFTER_S + interval
    ride(PARKED_AFTER_S + 3.5 * PARKED_COMMIT_S, 0.0)
    parked = [t for t in at if t > parked_from]
    assert len(parked) >= 3 and gaps(parked) == [PARKED_COMMIT_S] * (len(parked) - 1)
    assert len(seen) == len(at), "acknowledgements or counters took transactions of their own"
    assert rec.records > 0 and store.stats()["records"] == 0 and rec.pending

    rec.result(b"\xa0", clock.wall)
    rec.commit()
    assert len(seen) == len(at) + 1 and not rec.pending, "a command result waited for the parked interval"
    ride(30, 0.0)
    assert len(seen) == len(at) + 1 and rec.pending
    moved = clock.mono
    ride(2, 18.0)
    assert at[-1] - moved <= 1.0 + STEP, "moving again, the parked records waited"


def test_a_parked_vehicle_merges_its_live_windows(tmp_path: Path, clock: Clock) -> None:
    """Riding, a live record per 1 s window; parked, one per PARKED_LIVE_MERGE windows,
    each told to the data budget as the one record its level 0 makes parked (else the
    budget would see a parked hour as ten times what it costs); moving again, what was
    gathered is stored at once and 1 s windows come back."""
    ride = Ride(tmp_path, clock)
    ride(30, 18.0)
    assert len(ride.live) >= 25 and {(d, w) for _, d, w in ride.live} == {(1.0, 1.0)}
    ride(PARKED_AFTER_S + 5 * PARKED_LIVE_MERGE + 2, 0.0)
    assert [(d, w) for _, d, w in ride.live[-4:]] == [(float(PARKED_LIVE_MERGE), 1.0)] * 4, ride.live[-8:]
    ride(0.5 * PARKED_LIVE_MERGE, 0.0)
    gathered = len(ride.live)
    moved = clock.wall
    ride(10, 18.0)
    t, length, windows = ride.live[gathered]
    assert t - moved <= 1.0 + STEP and 0 < length < PARKED_LIVE_MERGE, "moving again, the gathered windows waited"
    assert windows == length / PARKED_LIVE_MERGE, "the gathered parked windows told to the budget at their base"
    assert {(d, w) for _, d, w in ride.live[gathered + 1:]} == {(1.0, 1.0)} and len(ride.live) - gathered >= 8


def test_parked_windows_follow_the_budget_level_ten_times_coarser(tmp_path: Path, clock: Clock) -> None:
    """The budget merging live windows 10 to 1 (its level 2): riding 10 s records, parked
    100 s ones; each told to the budget as 10 windows at its own full resolution."""
    ride = Ride(tmp_path, clock)
    ride.rec.coarsen(1, 10)
    ride(40, 18.0)
    assert {(d, w) for _, d, w in ride.live[1:]} == {(10.0, 10.0)}, ride.live
    ride(PARKED_AFTER_S + 3 * 10 * PARKED_LIVE_MERGE, 0.0)
    assert [(d, w) for _, d, w in ride.live[-2:]] == [(10.0 * PARKED_LIVE_MERGE, 10.0)] * 2, ride.live[-4:]
