"""The durable outbox: every record waits here, in SQLite, until the broker has it.

Records get a per-device sequence number in the same transaction that stores them;
the next number lives in its own row, so it survives restarts and the deletion of
acknowledged rows, and is never reused. Rows are leased to the uplink while a
message carrying them is in flight and deleted only on the broker's acknowledgement;
a lease lives in memory only, so after a crash everything unacknowledged is sent
again (the cloud drops duplicates by device and sequence).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.errors import StoreError

log = logging.getLogger(__name__)

LANE_ALARM = 0
LANE_LIVE = 1
LANE_EVENT = 2
LANE_HISTORY = 3
LANES = {"alarm": LANE_ALARM, "live": LANE_LIVE, "event": LANE_EVENT, "history": LANE_HISTORY}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    lane INTEGER NOT NULL,
    t REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_lane_seq ON records (lane, seq);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('last_acked', 0);
"""


class Outbox:
    """SQLite outbox in WAL mode; one writer (the agent's main loop)."""

    def __init__(self, path: str, quota_bytes: int,
                 gap_body: Callable[[list[tuple[int, int]], str], bytes] | None = None) -> None:
        """``gap_body(runs, why)`` encodes the record announcing dropped sequence numbers."""
        self.path = path
        self.gap_body = gap_body
        self.quota_bytes = quota_bytes
        self.dropped = 0
        self.moved_aside = ""
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = self._open_checked()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open outbox {path}: {e}") from e
        self.leased: set[int] = set()
        self.appended = 0
        self.acked = 0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _open_checked(self) -> sqlite3.Connection:
        """Open, and if the file fails SQLite's check, move it aside (never wipe it) and
        start a new one whose sequence numbers cannot collide with the old ones."""
        reason = ""
        last_seq = 0
        try:
            db = self._open()
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict == "ok":
                db.executescript(_SCHEMA)
                return db
            reason = str(verdict)
            last_seq = _salvage_last_seq(db)
            db.close()
        except sqlite3.DatabaseError as e:
            reason = str(e)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.moved_aside = f"{self.path}.corrupt-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, self.moved_aside + suffix)
        log.error("OUTBOX %s IS CORRUPT (%s): moved aside to %s, starting a new one; records in it were "
                  "not sent", self.path, reason, self.moved_aside)
        db = self._open()
        db.executescript(_SCHEMA)
        # Sequence numbers must never be reused: continue above anything the old file can
        # have used (microseconds since the epoch exceed any counter this agent reaches).
        db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (max(last_seq + 1, time.time_ns() // 1000),))
        return db

    def append(self, records: Iterable[tuple[int, float, bytes]]) -> list[int]:
        """Store ``(lane, time, body)`` records in one transaction; returns their sequence numbers."""
        seqs = self._insert(list(records))
        dropped = self._enforce_quota()
        if dropped and self.gap_body is not None:
            # Tell the cloud what went and why, as an alarm-lane record of its own.
            self._insert([(LANE_ALARM, time.time(), self.gap_body(_runs(dropped), "quota"))])
        return seqs

    def _insert(self, rows: list[tuple[int, float, bytes]]) -> list[int]:
        if not rows:
            return []
        try:
            with self._transaction():
                (first,) = self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
                seqs = list(range(first, first + len(rows)))
                self.db.executemany(
                    "INSERT INTO records (seq, lane, t, body) VALUES (?, ?, ?, ?)",
                    [(seq, lane, t, body) for seq, (lane, t, body) in zip(seqs, rows, strict=True)],
                )
                self.db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (first + len(rows),))
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: append failed: {e}") from e
        self.appended += len(rows)
        return seqs

    def _size(self) -> int:
        (pages,) = self.db.execute("PRAGMA page_count").fetchone()
        (free,) = self.db.execute("PRAGMA freelist_count").fetchone()
        (page,) = self.db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * page)

    def _enforce_quota(self) -> list[int]:
        """Over quota, drop the oldest rows of the lowest-priority lane first (alarms last);
        returns the sequence numbers dropped."""
        dropped: list[int] = []
        try:
            while self._size() > self.quota_bytes:
                row = self.db.execute("SELECT lane FROM records ORDER BY lane DESC, seq LIMIT 1").fetchone()
                if row is None:
                    break
                with self._transaction():
                    dropped += [seq for (seq,) in self.db.execute(
                        "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE lane=? ORDER BY seq LIMIT 64)"
                        " RETURNING seq", (row[0],)).fetchall()]
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: quota enforcement failed: {e}") from e
        self.dropped += len(dropped)
        self.leased.difference_update(dropped)
        return dropped

    def lease(self, max_records: int, max_bytes: int, newest_live_first: bool = False,
              overhead: int = 0) -> list[tuple[int, bytes]]:
        """The next records to send, not already in flight: by lane priority, oldest first;
        with ``newest_live_first`` (after a reconnect) alarms, then the newest live window,
        so the cloud sees the vehicle as it is now before the backlog. ``max_bytes`` bounds
        the bodies plus ``overhead`` bytes per record (what the batch adds around each)."""
        out: list[tuple[int, bytes]] = []
        size = 0
        try:
            if newest_live_first:
                cur = self.db.execute(
                    "SELECT seq, body FROM records ORDER BY lane = ? DESC,"
                    " seq = (SELECT max(seq) FROM records WHERE lane = ?) DESC, lane, seq", (LANE_ALARM, LANE_LIVE))
            else:
                cur = self.db.execute("SELECT seq, body FROM records ORDER BY lane, seq")
            for seq, body in cur:
                if seq in self.leased:
                    continue
                if out and size + len(body) + overhead > max_bytes:
                    break
                out.append((seq, bytes(body)))
                size += len(body) + overhead
                if len(out) >= max_records:
                    break
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: read failed: {e}") from e
        self.leased.update(seq for seq, _ in out)
        return out

    def release(self, seqs: Iterable[int]) -> None:
        """Give leased rows back (the message carrying them failed); they will be sent again."""
        self.leased.difference_update(seqs)

    def release_all(self) -> None:
        self.leased.clear()

    def ack(self, seqs: list[int]) -> None:
        """The broker has these: delete them, durably."""
        if not seqs:
            return
        try:
            with self._transaction():
                self.db.executemany("DELETE FROM records WHERE seq=?", [(s,) for s in seqs])
                self.db.execute("UPDATE meta SET value=max(value, ?) WHERE key='last_acked'", (max(seqs),))
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: ack failed: {e}") from e
        self.leased.difference_update(seqs)
        self.acked += len(seqs)

    def stats(self) -> dict[str, Any]:
        return dict(stored_stats(self.db, self.path), in_flight=len(self.leased), moved_aside=self.moved_aside,
                    dropped=self.dropped, quota_bytes=self.quota_bytes)

    def close(self) -> None:
        self.db.close()

    def _transaction(self) -> _Txn:
        return _Txn(self.db)


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted sequence numbers as contiguous ``(first, last)`` runs."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def stored_stats(db: sqlite3.Connection, path: str) -> dict[str, Any]:
    """What the file holds: depth per lane, bytes, oldest record, last committed and last
    acknowledged sequence numbers (also readable while the agent runs, read-only)."""
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        depth = {name: 0 for name in LANES}
        names = {v: k for k, v in LANES.items()}
        for lane, count in db.execute("SELECT lane, count(*) FROM records GROUP BY lane"):
            depth[names.get(lane, str(lane))] = count
        size, oldest = db.execute("SELECT coalesce(sum(length(body)), 0), min(t) FROM records").fetchone()
    except sqlite3.Error as e:
        raise StoreError(f"outbox {path}: stats failed: {e}") from e
    return {"depth": depth, "records": sum(depth.values()), "bytes": size, "oldest": oldest,
            "last_seq": meta["next_seq"] - 1, "last_acked": meta["last_acked"]}


def read_stats(path: str) -> dict[str, Any]:
    """``stored_stats`` of an outbox file opened read-only (a technician's look)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open outbox {path}: {e}") from e
    try:
        return stored_stats(db, path)
    finally:
        db.close()


def _salvage_last_seq(db: sqlite3.Connection) -> int:
    """The last sequence number a damaged file still shows, or 0."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    except sqlite3.DatabaseError:
        return 0
    return int(row[0]) - 1 if row else 0


class _Txn:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the sqlite3 module's own
    context manager does not begin a transaction in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
