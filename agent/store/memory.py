"""When the outbox cannot be written, the vehicle stays visible: records go to a bounded
queue in RAM and are sent as usual, until the file can be written again.

SD cards switch to read-only when they wear out, the most common storage failure on
Pi-class units; a permission or a missing mount does the same. Stopping the agent then
would hide the vehicle as well as lose the records, so ``Storage`` runs the outbox
from memory meanwhile (the alarm and live lanes only: history, events and raw samples are what the
cloud can do without, and RAM is small), tries the file again every ``RETRY_S``, and
moves what is still unacknowledged into it, under the numbers it was sent with, once
it opens. The agent raises ``storage_failed`` meanwhile (the runtime asks ``failed``).

Sequence numbers must never be reused: memory numbering continues from the file's own
next number where the file can still be read, else from microseconds since the epoch
(above anything a file's counter reaches, as a moved-aside outbox does).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent import wire
from agent.errors import StorageUnwritable, StoreError
from agent.store.outbox import (
    LANE_ALARM,
    LANE_LIVE,
    LANES,
    Outbox,
    lease_from,
    open_read_only,
    purge_victims,
    seq_runs,
    unwritable_cause,
)

log = logging.getLogger(__name__)

RETRY_S = 5.0  # between attempts to open the file again
MEMORY_BYTES = 4 << 20  # bodies kept in RAM at most; the oldest live records go first
KEPT_LANES = (LANE_ALARM, LANE_LIVE)

GapBody = Callable[[list[tuple[int, int]], str], bytes]


class MemoryQueue:
    """The outbox's interface over a dict: ``seq -> (lane, time, body)``."""

    def __init__(self, next_seq: int, gap_body: GapBody | None, limit: int = MEMORY_BYTES) -> None:
        self.first = self.next = next_seq
        self.gap_body = gap_body
        self.limit = limit
        self.rows: dict[int, tuple[int, float, bytes]] = {}
        self.size = 0
        self.leased: set[int] = set()
        self.not_kept = 0  # history, event and raw records, not kept in memory
        self.dropped = 0  # kept, then dropped for room before they were acknowledged
        self.appended = 0
        self.acked = 0

    def append(self, records: Iterable[tuple[int, float, bytes]]) -> list[int]:
        seqs = []
        for lane, t, body in records:
            if lane not in KEPT_LANES:
                self.not_kept += 1
                continue
            seqs.append(self._put(lane, t, body))
        self._bound()
        return seqs

    def _put(self, lane: int, t: float, body: bytes) -> int:
        seq = self.next
        self.next += 1
        self.rows[seq] = (lane, t, body)
        self.size += len(body)
        self.appended += 1
        return seq

    def _bound(self) -> None:
        """Over the limit, the oldest live records go (alarms last), announced to the cloud
        as a gap like any drop."""
        if self.size <= self.limit:
            return
        gone = []
        for seq in sorted(self.rows, key=lambda s: (self.rows[s][0] != LANE_LIVE, s)):
            if self.size <= self.limit * 3 // 4:
                break
            self.size -= len(self.rows.pop(seq)[2])
            self.leased.discard(seq)
            gone.append(seq)
        self.dropped += len(gone)
        self._announce(gone, "memory-full")

    def _announce(self, gone: list[int], why: str) -> None:
        """Records dropped before they were acknowledged, told to the cloud as a gap."""
        if gone and self.gap_body is not None:
            self._put(LANE_ALARM, time.time(), self.gap_body(seq_runs(sorted(gone)), why))

    def purge(self, lane: int, keep: Callable[[bytes], bool] | None = None) -> list[int]:
        """``Outbox.purge`` over the dict: ``lane``'s records not in flight (nor kept),
        deleted and announced as a gap."""
        gone = purge_victims([(seq, row[2]) for seq, row in sorted(self.rows.items()) if row[0] == lane],
                             self.leased, keep)
        for seq in gone:
            self.size -= len(self.rows.pop(seq)[2])
        self._announce(gone, "purged")
        return gone

    def lease(self, max_records: int, max_bytes: int, newest_live_first: bool = False,
              overhead: int = 0) -> list[tuple[int, bytes]]:
        """The same order as the outbox's: by lane then age; after a reconnect, alarms and
        then the newest live record first."""
        newest_live = max((s for s, row in self.rows.items() if row[0] == LANE_LIVE), default=-1)

        def order(seq: int) -> tuple[int, ...]:
            lane = self.rows[seq][0]
            if newest_live_first:
                return (lane != LANE_ALARM, seq != newest_live, lane, seq)
            return (lane, seq)

        return lease_from(((seq, self.rows[seq][2]) for seq in sorted(self.rows, key=order)), self.leased,
                          max_records, max_bytes, overhead)

    def release(self, seqs: Iterable[int]) -> None:
        self.leased.difference_update(seqs)

    def release_all(self) -> None:
        self.leased.clear()

    def ack(self, seqs: list[int]) -> None:
        for seq in seqs:
            row = self.rows.pop(seq, None)
            if row is not None:
                self.size -= len(row[2])
                self.acked += 1
        self.leased.difference_update(seqs)

    def unacknowledged(self) -> list[tuple[int, int, float, bytes]]:
        """``(seq, lane, time, body)`` of every record still held, oldest first."""
        return [(seq, *self.rows[seq]) for seq in sorted(self.rows)]

    def stats(self) -> dict[str, Any]:
        depth = {name: sum(1 for row in self.rows.values() if row[0] == lane) for name, lane in LANES.items()}
        oldest = {name: min((row[1] for row in self.rows.values() if row[0] == lane), default=None)
                  for name, lane in LANES.items()}
        return {"depth": depth, "records": len(self.rows), "bytes": self.size, "limit_bytes": self.limit,
                "oldest": min((row[1] for row in self.rows.values()), default=None),
                "oldest_by_lane": oldest, "first_seq": min(self.rows, default=None),
                "last_seq": self.next - 1, "in_flight": len(self.leased), "not_kept": self.not_kept,
                "dropped": self.dropped}


def _readable_next_seq(path: str) -> int:
    """The file's next sequence number read without writing anything; 0 if unreadable."""
    try:
        db = open_read_only(path, timeout=1.0)
    except StoreError:
        return 0
    try:
        row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    except sqlite3.Error:
        return 0
    finally:
        db.close()
    return int(row[0]) if row else 0


def _announces_a_gap(body: bytes) -> bool:
    """Whether a stored body is a gap record: those explain earlier drops to the cloud,
    and a purge of the alarm lane keeps them."""
    try:
        record = wire.strict_loads(body, "record", 8)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("k") == wire.KIND_GAP


def purge_plan(lane: str) -> tuple[int, Callable[[bytes], bool] | None]:
    """The lane number a ``buffer purge --lane`` names, and what a purge of it keeps."""
    if lane not in LANES:
        raise StoreError(f"no lane {lane!r} in the outbox (lanes: {', '.join(LANES)})")
    number = LANES[lane]
    return number, _announces_a_gap if number == LANE_ALARM else None


class Storage:
    """The outbox, or while its file cannot be written the memory queue; the runtime
    uses this one interface and never sees the switch but through ``failed``."""

    def __init__(self, path: str, quota_bytes: int, gap_body: GapBody | None = None,
                 memory_bytes: int = MEMORY_BYTES) -> None:
        self.path = path
        self.quota_bytes = quota_bytes
        self.gap_body = gap_body
        self.memory_bytes = memory_bytes
        self.disk: Outbox | None = None
        self.memory: MemoryQueue | None = None
        self.failed = ""  # the cause in words while running from memory
        self.failed_since = 0.0
        self.failures = 0
        self.retry_at = 0.0
        try:
            self.disk = Outbox(path, quota_bytes, gap_body)
        except StoreError as e:
            self._fail(e, _readable_next_seq(path))

    def _fail(self, e: StoreError, next_seq: int) -> None:
        """From now on, from memory; numbering goes on where the file left off."""
        cause = e.cause if isinstance(e, StorageUnwritable) else (unwritable_cause(self.path, e) or str(e))
        start = max(next_seq, self.memory.next if self.memory is not None else 0)
        if start <= 0:
            start = time.time_ns() // 1000
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        if self.memory is None:
            self.memory = MemoryQueue(start, self.gap_body, self.memory_bytes)
            self.failed_since = time.time()
            self.failures += 1
        self.failed = cause
        self.retry_at = time.monotonic() + RETRY_S
        log.error("OUTBOX %s CANNOT BE WRITTEN (%s): running from memory (alarms and live data, at most %.1f MB), "
                  "history is not kept; trying the file again every %.0f s", self.path, cause,
                  self.memory_bytes / 1e6, RETRY_S)

    def _guarded(self, work: Callable[[Outbox], Any]) -> Any:
        """``work`` on the file; on a failure the switch to memory (and None)."""
        assert self.disk is not None
        disk = self.disk
        try:
            return work(disk)
        except StoreError as e:
            self._fail(e, disk.next_seq())
            return None

    def retry(self) -> bool:
        """While from memory, at most every RETRY_S: the file again; True once back on it."""
        if self.memory is None or time.monotonic() < self.retry_at:
            return False
        self.retry_at = time.monotonic() + RETRY_S
        try:
            disk = Outbox(self.path, self.quota_bytes, self.gap_body)
        except StoreError as e:
            cause = e.cause if isinstance(e, StorageUnwritable) else str(e)
            if cause != self.failed:
                log.error("OUTBOX %s still cannot be written, now: %s", self.path, cause)
                self.failed = cause
            return False
        held = self.memory.unacknowledged()
        skipped = disk.next_seq()
        try:
            disk.adopt(held, self.memory.next)
            if self.gap_body is not None and skipped < self.memory.first:
                # Memory numbered from the clock (the file was unreadable): the numbers
                # between were never used, and the cloud is told so.
                disk.append([(LANE_ALARM, time.time(), self.gap_body([(skipped, self.memory.first - 1)],
                                                                     "renumbered"))])
        except StoreError as e:
            disk.close()
            log.error("OUTBOX %s opens but cannot take the records kept in memory: %s", self.path, e)
            return False
        disk.leased.update(self.memory.leased)
        log.warning("outbox %s can be written again after %.0f s: %d records kept in memory stored in it, "
                    "%d history/event records were not kept", self.path, time.time() - self.failed_since,
                    len(held), self.memory.not_kept)
        self.disk, self.memory, self.failed = disk, None, ""
        return True

    def append(self, records: Iterable[tuple[int, float, bytes]]) -> list[int]:
        rows = list(records)
        if self.disk is not None:
            seqs = self._guarded(lambda d: d.append(rows))
            if seqs is not None:
                return list(seqs)
        assert self.memory is not None
        return self.memory.append(rows)

    def lease(self, max_records: int, max_bytes: int, newest_live_first: bool = False,
              overhead: int = 0) -> list[tuple[int, bytes]]:
        if self.disk is not None:
            out = self._guarded(lambda d: d.lease(max_records, max_bytes, newest_live_first, overhead))
            if out is not None:
                return list(out)
        assert self.memory is not None
        return self.memory.lease(max_records, max_bytes, newest_live_first, overhead)

    def release(self, seqs: Iterable[int]) -> None:
        (self.disk or self.memory).release(seqs)  # type: ignore[union-attr]

    def release_all(self) -> None:
        (self.disk or self.memory).release_all()  # type: ignore[union-attr]

    def ack(self, seqs: list[int]) -> None:
        """Rows of the file are deleted with its next write (``Outbox.ack_later``).
        Acknowledged rows of the file stay in it if the file fails first: sent again once
        it is back, and dropped as duplicates by the cloud."""
        if self.disk is not None:
            self.disk.ack_later(seqs)
        elif self.memory is not None:
            self.memory.ack(seqs)

    def held_since(self) -> float | None:
        """Since when the file has writes held for its next transaction (None: none)."""
        return self.disk.held_since() if self.disk is not None else None

    def flush_held(self) -> None:
        if self.disk is not None:
            self._guarded(lambda d: d.flush_held())

    def keep_state(self, values: Mapping[str, float]) -> None:
        """The kernel's counters, written with the file's next transaction; not kept from
        memory (they are kept again once the file is back)."""
        if self.disk is not None:
            self.disk.keep_state(values)

    def save_state(self, values: Mapping[str, float]) -> bool:
        if self.disk is None:
            return False
        return bool(self._guarded(lambda d: d.save_state(values)))

    def load_state(self) -> dict[str, float]:
        if self.disk is None:
            return {}
        return dict(self._guarded(lambda d: d.load_state()) or {})

    def purge(self, lane: str) -> int:
        """``buffer purge``: delete ``lane``'s unacknowledged records that are not in
        flight, announced to the cloud as a gap; how many went. Gap records stay."""
        number, keep = purge_plan(lane)
        if self.disk is not None:
            done = self._guarded(lambda d: [d.purge(number, keep)])
            if done is not None:
                if done[0] is None:
                    raise StoreError(f"outbox {self.path}: the disk is too full even to delete: nothing purged")
                return len(done[0])
        assert self.memory is not None
        return len(self.memory.purge(number, keep))

    def stats(self) -> dict[str, Any]:
        if self.disk is not None:
            stats = self._guarded(lambda d: d.stats())
            if stats is not None:
                return dict(stats, storage_failed=None)
        assert self.memory is not None
        return dict(self.memory.stats(), storage_failed={"cause": self.failed, "since": self.failed_since,
                                                         "memory_only": True})

    def close(self) -> None:
        """The held writes go to the file first: a clean stop leaves no acknowledged row."""
        if self.disk is not None:
            try:
                done = self.disk.flush_held()
            except StoreError as e:
                done, why = False, str(e)
            else:
                why = "disk full"
            if not done:
                log.warning("outbox %s: acknowledged rows not deleted at the stop (%s): they are sent again after "
                            "the next start", self.path, why)
            self.disk.close()
        if self.memory is not None and self.memory.rows:
            log.error("outbox %s could not be written: %d records held in memory are lost with this stop",
                      self.path, len(self.memory.rows))
