"""The durable outbox: every record waits here, in SQLite, until the broker has it.

Records get a per-device sequence number in the same transaction that stores them;
the next number lives in its own row, so it survives restarts and the deletion of
acknowledged rows, and is never reused. Rows are leased to the uplink while a
message carrying them is in flight and deleted only on the broker's acknowledgement;
a lease lives in memory only, so after a crash everything unacknowledged is sent
again (the cloud drops duplicates by device and sequence).

Each write transaction is an fsync and rewrites whole pages, and that is what wears an
SD card; so writes that need not be on disk this instant are held and ride along with
the next transaction: acknowledged rows (``ack_later``: no longer leased or counted,
deleted by the next append) and the fusion kernel's counters (``keep_state``: written
only when they changed). ``flush_held`` writes them on their own when no append comes.
A power cut may bring held acknowledgements back (those rows are sent again, and the
cloud drops the duplicates) and lose the counters' last change.

A full disk is never a crash. In WAL mode SQLite needs room even to DELETE, so the
outbox keeps away from the edge: its quota is clamped at open to 90 % of the space
free for it, and a ballast file beside it is released the moment the disk is full
anyway (other files fill it too). Then rows go by the quota's policy (oldest history
first, alarms last), announced to the cloud with a gap record, until the append fits;
the quota is lowered to what the disk held, and the ballast comes back once there is
room again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import StorageUnwritable, StoreError

log = logging.getLogger(__name__)

LANE_ALARM = 0
LANE_LIVE = 1
LANE_EVENT = 2
LANE_HISTORY = 3
# Every sample of the signals reported raw (agent/raw.py): the bulkiest and least
# important, so sent last and, over quota, dropped first.
LANE_RAW = 4
LANES = {"alarm": LANE_ALARM, "live": LANE_LIVE, "event": LANE_EVENT, "history": LANE_HISTORY, "raw": LANE_RAW}

FREE_SHARE = 0.9  # of the space free for the outbox at open: the most its quota may be
BALLAST_MAX = 4 << 20  # bytes kept in reserve beside the outbox, released when the disk is full
ROOM_ROUNDS = 64  # drops tried for one append on a full disk before its records are refused
PAGE_GUESS = 4096  # WAL bytes a write transaction adds beyond its records (b-tree and meta pages)
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    lane INTEGER NOT NULL,
    t REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_lane_seq ON records (lane, seq);
CREATE TABLE IF NOT EXISTS kernel_state (key TEXT PRIMARY KEY, value REAL NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1), ('last_acked', 0);
"""


class Outbox:
    """SQLite outbox in WAL mode; one writer (the agent's main loop)."""

    def __init__(self, path: str, quota_bytes: int,
                 gap_body: Callable[[list[tuple[int, int]], str], bytes] | None = None) -> None:
        """``gap_body(runs, why)`` encodes the record announcing dropped sequence numbers."""
        self.path = path
        self.gap_body = gap_body
        self.configured_quota = quota_bytes
        self.dropped = 0
        self.moved_aside = ""
        self.ballast = path + ".ballast"
        self.disk_full = 0  # times the disk was found full (once per episode)
        self.full = False  # in such an episode: until the disk has room for the ballast again
        self.shrink_due = False  # the episode has not lowered the quota yet
        self.wal_debt = 0  # bytes written since the last checkpoint this object saw succeed
        self.refused = 0  # records not stored at all: the disk full and nothing left to drop
        self.unannounced: list[int] = []  # dropped for a full disk, gap record not stored yet
        self.leased: set[int] = set()
        # Every row is leased or held since the last lease found none: the next lease needs no
        # query (the send stage asks every turn of the loop, records come every few seconds).
        self.drained = False
        self.acked_held: set[int] = set()  # acknowledged, deleted by the next transaction
        self.state_held: dict[str, float] | None = None  # kernel state for the next transaction
        self.state_on_disk: dict[str, float] = {}
        self.held_at: float | None = None  # monotonic time the oldest held write was held
        self.appended = 0
        self.acked = 0
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = self._open_checked()
            self.quota_bytes, self.ballast_bytes = self._clamp_quota(quota_bytes)
            # The WAL holds at most a quarter of the ballast beyond the database file, so the
            # released ballast always has room for the checkpoint that brings it back.
            (page,) = self.db.execute("PRAGMA page_size").fetchone()
            self.db.execute(f"PRAGMA wal_autocheckpoint={max(16, self.ballast_bytes // page // 4)}")
        except (OSError, sqlite3.Error) as e:
            if hasattr(self, "db"):
                self.db.close()
            raise _failure(path, f"cannot open outbox {path}", e) from e
        self._restore_ballast()

    def _clamp_quota(self, configured: int) -> tuple[int, int]:
        """The quota in force and the ballast's size: the outbox may fill at most 90 % of
        what is free for it (free space, its own file and ballast), less the ballast, so
        SQLite's WAL always has room to work."""
        room = self._free() + self._file_bytes() + _file_size(self.ballast)
        ballast = min(BALLAST_MAX, room // 32)
        limit = int(FREE_SHARE * (room - ballast))
        if limit < configured:
            log.warning("outbox %s: quota %.2f MB clamped to %.2f MB, 90 %% of the %.2f MB free for it on its "
                        "filesystem", self.path, configured / 1e6, limit / 1e6, room / 1e6)
        return min(configured, limit), ballast

    def _free(self) -> int:
        disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        return disk.f_bavail * disk.f_frsize

    def _file_bytes(self) -> int:
        (pages,) = self.db.execute("PRAGMA page_count").fetchone()
        (page,) = self.db.execute("PRAGMA page_size").fetchone()
        return int(pages * page)

    def _watch_the_disk(self) -> None:
        """Before each append: a disk that other files filled is noticed while SQLite still
        has room to delete (the ballast stays for when it has not); once there is room
        again, the ballast and the quota come back."""
        try:
            free = self._free()
        except OSError as e:
            log.warning("outbox %s: cannot see the free space: %s", self.path, e)
            return
        if not self.full:
            if free < self.ballast_bytes:
                self._disk_full_now(f"{free} bytes free")
            return
        if free >= 2 * self.ballast_bytes and self._restore_ballast():
            self.full = False
            self.quota_bytes, _ = self._clamp_quota(self.configured_quota)
            log.warning("outbox %s: the disk has room again: ballast back, quota %.2f MB", self.path,
                        self.quota_bytes / 1e6)

    def _disk_full_now(self, why: str) -> None:
        if not self.full:
            self.full = self.shrink_due = True
            self.disk_full += 1
            log.error("OUTBOX %s: DISK FULL (%s): dropping the oldest, lowest-priority rows to go on", self.path, why)

    def _restore_ballast(self) -> bool:
        """Put the ballast (back); False if the disk has no room for it."""
        have = _file_size(self.ballast)
        if have >= self.ballast_bytes:
            return True
        try:
            fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.ballast_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            Path(self.ballast).unlink(missing_ok=True)
            log.warning("outbox %s: no room for its %d-byte ballast: %s", self.path, self.ballast_bytes, e)
            return False
        return True

    def _release_ballast(self) -> bool:
        """Free the reserve and checkpoint into it, so SQLite can delete; False if it was gone."""
        if not _file_size(self.ballast):
            return False
        Path(self.ballast).unlink(missing_ok=True)
        log.warning("outbox %s: disk full: released the %d-byte ballast", self.path, self.ballast_bytes)
        self._checkpoint()
        return True

    def _open(self) -> sqlite3.Connection:
        """A connection set up, or none left open: the agent retries a failed storage
        every few seconds and must not leak a file handle each time."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def _open_checked(self) -> sqlite3.Connection:
        """Open, and if the file fails SQLite's check, move it aside (never wipe it) and
        start a new one whose sequence numbers cannot collide with the old ones."""
        reason = ""
        last_seq = 0
        try:
            db = self._open()
            try:
                (verdict,) = db.execute("PRAGMA quick_check").fetchone()
                if verdict == "ok":
                    db.executescript(_SCHEMA)
                    return db
                reason = str(verdict)
                last_seq = _salvage_last_seq(db)
            except BaseException:
                db.close()
                raise
            db.close()
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                raise  # the storage's fault, not the file's: never moved aside
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
        """Store ``(lane, time, body)`` records in one transaction; returns their sequence
        numbers ([] if a full disk left no room even after every drop)."""
        self._watch_the_disk()
        if self.shrink_due:
            self._make_room(0)
        seqs = self._store(list(records))
        dropped = self._enforce_quota()
        if dropped and self.gap_body is not None:
            # Tell the cloud what went and why, as an alarm-lane record of its own.
            self._store([(LANE_ALARM, time.time(), self.gap_body(seq_runs(dropped), "quota"))])
        return seqs

    def _store(self, rows: list[tuple[int, float, bytes]]) -> list[int]:
        """Insert ``rows``, with the announcement of earlier drops for a full disk in the same
        transaction; a full disk drops old rows by the quota's policy until they fit."""
        for _ in range(ROOM_ROUNDS):
            batch = rows + self._announcement()
            if not batch:
                return []
            seqs = self._write(partial(self._insert, batch), "append", sum(len(body) for _, _, body in batch))
            if seqs is not None:
                self.appended += len(batch)
                if len(batch) > len(rows):
                    self.unannounced = []
                if self.shrink_due:
                    # Stored in the room the ballast left: shrink now, while a DELETE still fits.
                    self._make_room(0)
                return seqs[:len(rows)]
            if not self._make_room(sum(len(body) for _, _, body in batch)):
                break
        self.refused += len(rows)
        log.error("OUTBOX %s: DISK FULL and nothing left to drop: %d records not stored", self.path, len(rows))
        return []

    def _announcement(self) -> list[tuple[int, float, bytes]]:
        if not self.unannounced or self.gap_body is None:
            return []
        return [(LANE_ALARM, time.time(), self.gap_body(seq_runs(self.unannounced), "disk-full"))]

    def _insert(self, rows: list[tuple[int, float, bytes]]) -> list[int]:
        self.drained = False
        (first,) = self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        seqs = list(range(first, first + len(rows)))
        self.db.executemany(
            "INSERT INTO records (seq, lane, t, body) VALUES (?, ?, ?, ?)",
            [(seq, lane, t, body) for seq, (lane, t, body) in zip(seqs, rows, strict=True)],
        )
        self.db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (first + len(rows),))
        return seqs

    def _write(self, work: Callable[[], _T], what: str, size: int = 0) -> _T | None:
        """``work()`` (which returns something, not None) in one write transaction of about
        ``size`` bytes. On a full disk: checkpoint (the WAL gives its space back when the
        database file need not grow for it) and try again, then release the ballast and
        try once more; None if the disk is still full. Any other failure is a StoreError.

        SQLite's own checkpoints fail silently on a full disk, and the WAL then grows into
        whatever space it already holds until no checkpoint fits even in the ballast; so
        every quarter ballast written, and after every write while the disk is full, a
        checkpoint of ours runs and a full disk is noticed there.

        The held writes go first in the same transaction: rows acknowledged are gone before
        ``work`` looks for rows to drop or purge, and nothing costs a transaction of its own."""
        for remedy in (None, self._checkpoint, self._release_ballast):
            if remedy is not None and not remedy():
                continue
            acked, state = sorted(self.acked_held), self.state_held
            try:
                with self._transaction():
                    self._write_held(acked, state)
                    done = work()
            except sqlite3.Error as e:
                if not _disk_full(e):
                    raise _failure(self.path, f"outbox {self.path}: {what} failed", e) from e
                self._disk_full_now(str(e))
                continue
            self._held_written(acked, state)
            self.wal_debt += size + PAGE_GUESS
            if self.full or self.wal_debt >= self.ballast_bytes // 4:
                self._checkpoint()
            return done
        return None

    def _write_held(self, acked: list[int], state: dict[str, float] | None) -> None:
        if acked:
            self.db.execute("UPDATE meta SET value=max(value, ?) WHERE key='last_acked'", (acked[-1],))
            self._delete(acked)
        if state is not None:
            self.db.executemany("INSERT OR REPLACE INTO kernel_state (key, value) VALUES (?, ?)", state.items())

    def _held_written(self, acked: list[int], state: dict[str, float] | None) -> None:
        """The transaction that carried them is committed: they are on disk."""
        self.acked_held.difference_update(acked)
        self.acked += len(acked)
        if state is not None:
            self.state_on_disk = state
            if self.state_held is state:
                self.state_held = None
        if not self.acked_held and self.state_held is None:
            self.held_at = None

    def _hold(self) -> None:
        if self.held_at is None:
            self.held_at = time.monotonic()

    def _make_room(self, need: int) -> bool:
        """The disk is full: drop the oldest rows of the lowest-priority lane (alarms last),
        at least twice ``need`` bytes and a tenth of the outbox, so the next appends fit
        too; lower the quota to what is left, so the outbox stops growing. False when
        nothing could be dropped."""
        try:
            target = max(2 * need, self._size() // 10)
            victims: list[int] = []
            total = 0
            for seq, size in self.db.execute("SELECT seq, length(body) FROM records ORDER BY lane DESC, seq"):
                if seq in self.acked_held:
                    continue  # deleted with the drop, and not announced: the cloud has it
                victims.append(seq)
                total += size
                if total >= target:
                    break
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: read failed: {e}") from e
        if not victims or self._write(lambda: self._delete(victims), "drop") is None:
            return False
        self.shrink_due = False
        self.dropped += len(victims)
        if self.gap_body is not None:
            self.unannounced += victims
        self.leased.difference_update(victims)
        left = self._size()
        if left < self.quota_bytes:
            log.warning("outbox %s: quota lowered from %.2f MB to %.2f MB, what the full disk held",
                        self.path, self.quota_bytes / 1e6, left / 1e6)
            self.quota_bytes = left
        return True

    def _delete(self, seqs: list[int]) -> int:
        self.db.executemany("DELETE FROM records WHERE seq=?", [(s,) for s in seqs])
        return len(seqs)

    def _checkpoint(self) -> bool:
        """Copy the WAL into the database, so the next write starts the WAL over in the
        space it already has (PASSIVE: a reader is never waited for); False if not all of
        it could be copied (no room for the database to grow, or a reader in the way)."""
        try:
            (_, frames, copied) = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            if not _disk_full(e):
                raise _failure(self.path, f"outbox {self.path}: checkpoint failed", e) from e
            self._disk_full_now(f"checkpoint: {e}")
            return False
        if frames == copied:
            self.wal_debt = 0
        return bool(frames == copied)

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
                gone = self._write(partial(self._drop_oldest, row[0]), "quota enforcement")
                if gone is None:
                    break  # the disk is full even for a delete; the next append makes room
                dropped += gone
        except sqlite3.Error as e:
            raise _failure(self.path, f"outbox {self.path}: quota enforcement failed", e) from e
        self.dropped += len(dropped)
        self.leased.difference_update(dropped)
        return dropped

    def _drop_oldest(self, lane: int) -> list[int]:
        return [seq for (seq,) in self.db.execute(
            "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE lane=? ORDER BY seq LIMIT 64)"
            " RETURNING seq", (lane,)).fetchall()]

    def lease(self, max_records: int, max_bytes: int, newest_live_first: bool = False,
              overhead: int = 0) -> list[tuple[int, bytes]]:
        """The next records to send, not already in flight: by lane priority, oldest first;
        with ``newest_live_first`` (after a reconnect) alarms, then the newest live window,
        so the cloud sees the vehicle as it is now before the backlog. ``max_bytes`` bounds
        the bodies plus ``overhead`` bytes per record (what the batch adds around each)."""
        if self.drained and not newest_live_first:
            return []
        try:
            if newest_live_first:
                cur = self.db.execute(
                    "SELECT seq, body FROM records ORDER BY lane = ? DESC,"
                    " seq = (SELECT max(seq) FROM records WHERE lane = ?) DESC, lane, seq", (LANE_ALARM, LANE_LIVE))
            else:
                cur = self.db.execute("SELECT seq, body FROM records ORDER BY lane, seq")
            rows = ((seq, body) for seq, body in cur if seq not in self.acked_held)
            out = lease_from(rows, self.leased, max_records, max_bytes, overhead)
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: read failed: {e}") from e
        self.drained = not out
        return out

    def release(self, seqs: Iterable[int]) -> None:
        """Give leased rows back (the message carrying them failed); they will be sent again."""
        before = len(self.leased)
        self.leased.difference_update(seqs)
        if len(self.leased) != before:
            self.drained = False

    def release_all(self) -> None:
        self.leased.clear()
        self.drained = False

    def ack(self, seqs: list[int]) -> None:
        """The broker has these: delete them now, durably (with any held)."""
        self.ack_later(seqs)
        if not self.flush_held():
            # Kept, still held: deleted by the first write the disk takes again.
            log.warning("outbox %s: disk full: %d acknowledged rows kept for now", self.path, len(self.acked_held))

    def ack_later(self, seqs: list[int]) -> None:
        """The broker has these: never leased or counted again, deleted by the next write
        transaction (an append, or ``flush_held``)."""
        if not seqs:
            return
        self.leased.difference_update(seqs)
        self.acked_held.update(seqs)
        self._hold()

    def held_since(self) -> float | None:
        """Monotonic time the oldest write still held was held; None when none is."""
        return self.held_at

    def flush_held(self) -> bool:
        """The held writes, now, in a transaction of their own; False if the disk is full
        (they stay held, as if held now: a full disk is not tried again every turn)."""
        if self.held_at is None:
            return True
        if self._write(lambda: True, "writing acknowledgements and kernel state") is None:
            self.held_at = time.monotonic()
            return False
        return True

    def adopt(self, rows: list[tuple[int, int, float, bytes]], next_seq: int) -> None:
        """Store ``(seq, lane, time, body)`` rows numbered elsewhere (while the agent ran
        from memory) under their own numbers, and go on numbering above ``next_seq``."""
        self.drained = False

        def put() -> int:
            self.db.executemany("INSERT OR IGNORE INTO records (seq, lane, t, body) VALUES (?, ?, ?, ?)", rows)
            self.db.execute("UPDATE meta SET value=max(value, ?) WHERE key='next_seq'", (next_seq,))
            return len(rows)

        if self._write(put, "storing the records kept in memory", sum(len(r[3]) for r in rows)) is None:
            raise StorageUnwritable(self.path, "no space left on device")
        self.appended += len(rows)

    def purge(self, lane: int, keep: Callable[[bytes], bool] | None = None) -> list[int] | None:
        """Delete ``lane``'s rows that are not in flight (nor kept by ``keep(body)``) and
        announce them to the cloud as a gap ("purged") in the same transaction, so no
        number goes missing unexplained; the numbers deleted, or None when a full disk
        left no room even to delete."""
        def work() -> list[int]:
            columns = "seq, body" if keep is not None else "seq, NULL"
            gone = purge_victims(self.db.execute(f"SELECT {columns} FROM records WHERE lane=? ORDER BY seq",
                                                 (lane,)).fetchall(), self.leased, keep)
            if gone:
                self._delete(gone)
                if self.gap_body is not None:
                    self._insert([(LANE_ALARM, time.time(), self.gap_body(seq_runs(gone), "purged"))])
            return gone

        gone = self._write(work, "purge")
        if gone and self.gap_body is not None:
            self.appended += 1
        return gone

    def next_seq(self) -> int:
        """The number the next record gets; 0 when the file cannot be read."""
        try:
            (value,) = self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        except sqlite3.Error:
            return 0
        return int(value)

    def save_state(self, values: Mapping[str, float]) -> bool:
        """Keep the fusion kernel's counters (trip, energy, SoH) for the next start, now;
        False if the disk is full (they stay held, and are written later)."""
        self.keep_state(values)
        return self.flush_held()

    def keep_state(self, values: Mapping[str, float]) -> None:
        """The counters, written with the next transaction; nothing if the disk has them."""
        state = dict(values)
        if state == self.state_on_disk:
            self.state_held = None
            if not self.acked_held:
                self.held_at = None
            return
        self.state_held = state
        self._hold()

    def load_state(self) -> dict[str, float]:
        try:
            self.state_on_disk = dict(self.db.execute("SELECT key, value FROM kernel_state").fetchall())
            return dict(self.state_on_disk)
        except sqlite3.Error as e:
            raise StoreError(f"outbox {self.path}: cannot read the kernel state: {e}") from e

    def stats(self) -> dict[str, Any]:
        return dict(stored_stats(self.db, self.path, self.acked_held), in_flight=len(self.leased),
                    acked_held=len(self.acked_held), moved_aside=self.moved_aside,
                    dropped=self.dropped, quota_bytes=self.quota_bytes, configured_quota_bytes=self.configured_quota,
                    disk_full=self.disk_full, disk_full_now=self.full, refused=self.refused,
                    ballast_bytes=_file_size(self.ballast))

    def close(self) -> None:
        self.db.close()

    def _transaction(self) -> Transaction:
        return Transaction(self.db)


def _corrupt(e: sqlite3.Error) -> bool:
    """SQLite itself says the file is not a database, or a malformed one."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def unwritable_cause(path: str, e: BaseException) -> str:
    """Why the storage under ``path`` refuses it, in a technician's words; '' when the
    failure is not the storage's (the directory, filesystem, permissions or space)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except PermissionError:
        return f"permission denied (on the way to {directory})"
    except OSError:
        return f"its directory {directory} does not exist"
    err = e.errno if isinstance(e, OSError) else None
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or err == errno.EROFS:
        return f"read-only filesystem ({directory})"
    if err in (errno.EACCES, errno.EPERM) or not os.access(directory, os.W_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"permission denied ({directory})"
    if err == errno.ENOSPC or (isinstance(e, sqlite3.Error) and _disk_full(e)):
        return f"no space left on device ({directory})"
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM):
        # SQLite keeps the errno to itself: a file made beside the outbox tells it.
        probe = probe_write(path)
        return probe or f"{getattr(e, 'sqlite_errorname', 'SQLITE_ERROR')}: {e}"
    return ""


_ERRNO_WORDS = {errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
                errno.EIO: "input/output error (the storage is failing)"}


def probe_write(path: str) -> str:
    """Words for what a write beside ``path`` meets; '' if it succeeds."""
    probe = path + ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        words = _ERRNO_WORDS.get(e.errno or 0, os.strerror(e.errno or 0))
        return f"{words} ({os.path.dirname(os.path.abspath(path))})"
    return ""


def _failure(path: str, what: str, e: BaseException) -> StoreError:
    """The error for a failed open or write: StorageUnwritable when the storage is to
    blame (the agent then runs from memory), else a StoreError with SQLite's words."""
    cause = unwritable_cause(path, e)
    return StorageUnwritable(path, cause) if cause else StoreError(f"{what}: {e}")


def _disk_full(e: sqlite3.Error) -> bool:
    """SQLite's word for ENOSPC: on the database or WAL, or growing the -shm index."""
    code = getattr(e, "sqlite_errorcode", 0)
    return code & 0xFF == sqlite3.SQLITE_FULL or code == sqlite3.SQLITE_IOERR_SHMSIZE


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def lease_from(rows: Iterable[tuple[int, bytes]], leased: set[int], max_records: int, max_bytes: int,
               overhead: int) -> list[tuple[int, bytes]]:
    """The next ``(seq, body)`` of ``rows`` (in sending order) not in ``leased``, within
    the batch's limits, now added to ``leased``: the outbox's and the memory queue's rule."""
    out: list[tuple[int, bytes]] = []
    size = 0
    for seq, body in rows:
        if seq in leased:
            continue
        if out and size + len(body) + overhead > max_bytes:
            break
        out.append((seq, bytes(body)))
        size += len(body) + overhead
        if len(out) >= max_records:
            break
    leased.update(seq for seq, _ in out)
    return out


def seq_runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted sequence numbers as contiguous ``(first, last)`` runs."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def purge_victims(rows: Iterable[tuple[int, bytes | None]], leased: set[int],
                  keep: Callable[[bytes], bool] | None) -> list[int]:
    """The sequence numbers of ``rows`` a purge deletes: not in flight (the broker may
    be acknowledging them now) and not kept by ``keep(body)``: the outbox's and the
    memory queue's rule."""
    return [seq for seq, body in rows
            if seq not in leased and not (keep is not None and body is not None and keep(body))]


def stored_stats(db: sqlite3.Connection, path: str, acked: Collection[int] = ()) -> dict[str, Any]:
    """What the file holds: depth per lane, bytes, oldest record (of each lane too), the
    first waiting, last committed and last acknowledged sequence numbers (also readable
    while the agent runs, read-only). Rows in ``acked`` (acknowledged, their deletion
    held) are not waiting and are left out."""
    skip = json.dumps(sorted(acked))
    waiting = "FROM records WHERE seq NOT IN (SELECT value FROM json_each(?))"
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        depth = {name: 0 for name in LANES}
        oldest_by_lane: dict[str, float | None] = {name: None for name in LANES}
        names = {v: k for k, v in LANES.items()}
        for lane, count, lane_oldest in db.execute(f"SELECT lane, count(*), min(t) {waiting} GROUP BY lane",
                                                   (skip,)):
            depth[names.get(lane, str(lane))] = count
            oldest_by_lane[names.get(lane, str(lane))] = lane_oldest
        size, oldest, first = db.execute(
            f"SELECT coalesce(sum(length(body)), 0), min(t), min(seq) {waiting}", (skip,)).fetchone()
    except sqlite3.Error as e:
        raise StoreError(f"outbox {path}: stats failed: {e}") from e
    return {"depth": depth, "records": sum(depth.values()), "bytes": size, "oldest": oldest,
            "oldest_by_lane": oldest_by_lane, "first_seq": first,
            "last_seq": meta["next_seq"] - 1, "last_acked": max(meta["last_acked"], max(acked, default=0))}


def open_read_only(path: str, timeout: float = 2.0) -> sqlite3.Connection:
    """The outbox file opened for reading only: nothing written, no lock taken, so a
    technician can look while the agent runs (WAL readers never block its writer). A
    WAL database on a read-only filesystem opens only as immutable, which ignores the
    WAL: trusted so only when there is no WAL file (nothing left uncheckpointed)."""
    uris = [f"file:{path}?mode=ro"]
    if not os.path.exists(path + "-wal"):
        uris.append(f"file:{path}?immutable=1")
    failure: sqlite3.Error | None = None
    for uri in uris:
        try:
            db = sqlite3.connect(uri, uri=True, timeout=timeout)
        except sqlite3.Error as e:
            failure = e
            continue
        try:
            db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        except sqlite3.Error as e:
            db.close()
            failure = e
            continue
        return db
    raise StoreError(f"cannot open outbox {path}: {failure}") from failure


def read_stats(path: str) -> dict[str, Any]:
    """``stored_stats`` of an outbox file opened read-only (a technician's look)."""
    db = open_read_only(path)
    try:
        return stored_stats(db, path)
    finally:
        db.close()


def read_records(db: sqlite3.Connection, path: str, lane: int | None = None) -> Iterator[tuple[int, int, float, bytes]]:
    """``(seq, lane, time, body)`` of every stored record (of ``lane`` only, if given),
    oldest first, from a connection of ``open_read_only``."""
    where, args = ("WHERE lane=?", (lane,)) if lane is not None else ("", ())
    try:
        for seq, row_lane, t, body in db.execute(f"SELECT seq, lane, t, body FROM records {where} ORDER BY seq",
                                                 args):
            yield seq, row_lane, t, bytes(body)
    except sqlite3.Error as e:
        raise StoreError(f"outbox {path}: read failed: {e}") from e


def _salvage_last_seq(db: sqlite3.Connection) -> int:
    """The last sequence number a damaged file still shows, or 0."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    except sqlite3.DatabaseError:
        return 0
    return int(row[0]) - 1 if row else 0


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, a failed COMMIT too (a full
    disk fails the WAL write at COMMIT and may leave the transaction open); the sqlite3
    module's own context manager does not begin a transaction in autocommit mode."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            return
        self._rollback()

    def _rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
