"""The reference cloud-side consumer: what a fleet backend must do with our batches.

Each record becomes one row, unique on (device, sequence), so a batch delivered twice
(QoS 1 after a reconnect) is stored once; the set of sequence numbers per device
shows gaps, which must never appear unless the device announced a drop.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from typing import Any

from agent.errors import DecodeError, StoreError
from agent.fleet.signing import Signer
from agent.wire import (
    KIND_CHANGE,
    KIND_GAP,
    KIND_RAW,
    KIND_WINDOW,
    batch_digest,
    decode_batch,
    encode_ack,
    raw_samples,
    record_bytes,
    window_values,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, t_ms INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS window_signals (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_ms INTEGER NOT NULL, dur_ms INTEGER NOT NULL,
    signal INTEGER NOT NULL, count INTEGER NOT NULL, min REAL, max REAL, mean REAL, last REAL,
    PRIMARY KEY (device, seq, signal)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS raw_samples (
    device TEXT NOT NULL, seq INTEGER NOT NULL, signal INTEGER NOT NULL, t_ms INTEGER NOT NULL, value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS raw_samples_signal ON raw_samples (device, signal, t_ms);
CREATE TABLE IF NOT EXISTS raw_lost (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_ms INTEGER NOT NULL, dur_ms INTEGER NOT NULL,
    lost INTEGER NOT NULL, skipped INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS announced_gaps (
    device TEXT NOT NULL, seq INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, why TEXT NOT NULL
);
"""


def _subtract(span: tuple[int, int], covers: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``span`` outside every ``(first, last)`` in ``covers``."""
    parts = [span]
    for first, last in covers:
        parts = [piece for lo, hi in parts
                 for piece in ((lo, min(hi, first - 1)), (max(lo, last + 1), hi)) if piece[0] <= piece[1]]
    return parts


OPEN_TIMEOUT_S = 30.0


def _open(path: str) -> sqlite3.Connection:
    """Open and set up the consumers' database. Consumers of one shared subscription
    start together, and SQLite answers "database is locked" at once, without waiting,
    to one of two connections that switch a new file to WAL or create its tables at the
    same moment; so the set-up is retried, jittered, for ``OPEN_TIMEOUT_S`` at most."""
    deadline = time.monotonic() + OPEN_TIMEOUT_S
    while True:
        db = sqlite3.connect(path, timeout=OPEN_TIMEOUT_S)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if e.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                    or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0.01, 0.1))


def _record_time(rec: dict[str, Any]) -> int:
    """A record's time in ms: its ``t``; a change record has one per change, the first."""
    if rec["k"] == KIND_CHANGE:
        return min((t for _sig, t, _value in rec["c"]), default=0)
    return int(rec["t"])


def ack_for(topic: str, seqs: list[int], payload: bytes, signer: Signer | None = None) -> tuple[str, bytes]:
    """The device's ack topic (beside the telemetry topic it published on) and the ack of
    the batch ``payload`` (its digest and the ``seqs`` stored); with ``signer``, a
    COSE_Sign1 of it, for devices that require signed acks."""
    ack = encode_ack(batch_digest(payload), seqs)
    return topic.rsplit("/", 1)[0] + "/ack", signer.sign(ack) if signer is not None else ack


class Ingest:
    """Stores decoded batches; counts what arrived, twice, or broken."""

    def __init__(self, path: str) -> None:
        try:
            self.db = _open(path)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {path}: {e}") from e
        self.batches = 0
        self.records = 0
        self.duplicates = 0
        self.bad_batches = 0
        self.last_error = ""

    def handle(self, topic: str, payload: bytes) -> list[int]:
        """One MQTT message; returns the sequence numbers now safely stored (duplicates
        included), for the ack to the device. A bad batch is counted, never fatal."""
        try:
            device, records = decode_batch(payload)
        except DecodeError as e:
            self.bad_batches += 1
            self.last_error = f"{topic}: {e}"
            log.warning("bad batch on %s: %s", topic, e)
            return []
        if topic.split("/")[-2:-1] != [device]:
            self.bad_batches += 1
            self.last_error = f"{topic}: device {device!r} does not match the topic"
            return []
        # One look for the numbers already stored, then one insert per table: a batch is
        # hundreds of records of tens of signals, and per-record statements were most of
        # the consumer's time. The look is inside the write transaction, so consumers
        # sharing the database (a shared subscription) cannot both store a resent record.
        seqs = [seq for seq, _ in records]
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                seen = {seq for (seq,) in self.db.execute(
                    "SELECT seq FROM records WHERE device=? AND seq BETWEEN ? AND ?",
                    (device, min(seqs, default=0), max(seqs, default=0)))}
                fresh = {seq: rec for seq, rec in records if seq not in seen}
                self.db.executemany(
                    "INSERT INTO records (device, seq, kind, t_ms, body) VALUES (?, ?, ?, ?, ?)",
                    [(device, seq, rec["k"], _record_time(rec), record_bytes(rec)) for seq, rec in fresh.items()])
                self.db.executemany(
                    "INSERT INTO announced_gaps VALUES (?, ?, ?, ?, ?)",
                    [(device, seq, first, last, rec["why"]) for seq, rec in fresh.items() if rec["k"] == KIND_GAP
                     for first, last in rec["runs"]])
                self.db.executemany(
                    "INSERT INTO window_signals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(device, seq, rec["t"], rec["d"], *window_values(row)) for seq, rec in fresh.items()
                     if rec["k"] == KIND_WINDOW for row in rec["s"]])
                raw = {seq: rec for seq, rec in fresh.items() if rec["k"] == KIND_RAW}
                self.db.executemany(
                    "INSERT INTO raw_samples VALUES (?, ?, ?, ?, ?)",
                    [(device, seq, sid, t_ms, value) for seq, rec in raw.items()
                     for sid, t_ms, value in raw_samples(rec)])
                self.db.executemany(
                    "INSERT INTO raw_lost VALUES (?, ?, ?, ?, ?, ?)",
                    [(device, seq, rec["t"], rec["d"], rec.get("lost", 0), rec.get("skip", 0))
                     for seq, rec in raw.items() if rec.get("lost") or rec.get("skip")])
        except (sqlite3.Error, OverflowError) as e:
            # Decodes but cannot be stored (a signal twice in one window, a uint beyond
            # int64): the whole batch is rolled back and counted; the consumer goes on.
            self.bad_batches += 1
            self.last_error = f"{topic}: batch not stored: {e}"
            log.warning("batch on %s not stored: %s", topic, e)
            return []
        stored = len(fresh)
        duplicates = len(records) - stored
        self.records += stored
        self.duplicates += duplicates
        self.batches += 1
        return [seq for seq, _ in records]

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Missing sequence ranges per device, between the first and last seen, that no gap
        record of the device explains: these are lost records."""
        out: dict[str, list[tuple[int, int]]] = {}
        rows = self.db.execute(
            "SELECT device, seq, nxt FROM (SELECT device, seq, lead(seq) OVER (PARTITION BY device ORDER BY seq)"
            " AS nxt FROM records) WHERE nxt > seq + 1"
        )
        announced = self.announced()
        for device, seq, nxt in rows:
            for gap in _subtract((seq + 1, nxt - 1), announced.get(device, [])):
                out.setdefault(device, []).append(gap)
        return out

    def announced(self) -> dict[str, list[tuple[int, int]]]:
        """Sequence numbers each device said it dropped (gap records)."""
        out: dict[str, list[tuple[int, int]]] = {}
        for device, first, last in self.db.execute(
                "SELECT device, first, last FROM announced_gaps ORDER BY device, first"):
            out.setdefault(device, []).append((first, last))
        return out

    def raw(self, device: str, signal: int) -> list[tuple[int, float]]:
        """Every raw sample stored of one signal of a device: ``(ms, value)``, by time."""
        return list(self.db.execute("SELECT t_ms, value FROM raw_samples WHERE device=? AND signal=?"
                                    " ORDER BY t_ms, rowid", (device, signal)))

    def report(self) -> dict[str, Any]:
        devices = {d: {"records": n, "first": lo, "last": hi} for d, n, lo, hi in self.db.execute(
            "SELECT device, count(*), min(seq), max(seq) FROM records GROUP BY device")}
        return {
            "batches": self.batches, "records": self.records, "duplicates": self.duplicates,
            "bad_batches": self.bad_batches, "devices": devices,
            "gaps": {d: [list(g) for g in gs] for d, gs in self.gaps().items()},
            "announced_drops": {d: [list(g) for g in gs] for d, gs in self.announced().items()},
            "raw_samples": dict(self.db.execute("SELECT device, count(*) FROM raw_samples GROUP BY device").fetchall()),
            "raw_lost": dict(self.db.execute("SELECT device, sum(lost) FROM raw_lost GROUP BY device").fetchall()),
        }

    def close(self) -> None:
        self.db.close()
