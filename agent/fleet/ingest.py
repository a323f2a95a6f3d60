"""The reference cloud-side consumer: what a fleet backend must do with our batches.

Each record becomes one row, unique on (device, sequence), so a batch delivered twice
(QoS 1 after a reconnect, or a device's resend to another consumer of the shared
subscription) is stored once; the set of sequence numbers per device shows gaps, which
must never appear unless the device announced a drop. The database judges gaps,
duplicates and active alarms (views ``unannounced_gaps`` and ``active_alarms``), so the
answer is right whichever consumer stored which batch, and consumers keep no state.

Two stores: SQLite (one file, the embedded default for one machine) and PostgreSQL
(``postgresql://...``: any number of consumers, see agent/fleet/pgstore.py and
docs/ingest.md).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.errors import DecodeError, StoreError, StoreUnavailable
from agent.fleet.rows import Batch, alarm_row, alarms_view, gap_rows, gaps_view, raw_lost_row, record_time
from agent.fleet.signing import Signer
from agent.wire import (
    KIND_ALARM,
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

INT64_MAX = (1 << 63) - 1


_SQLITE_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS alarms (
    device TEXT NOT NULL, seq INTEGER NOT NULL, t_ms INTEGER NOT NULL, code INTEGER NOT NULL, name TEXT NOT NULL,
    instance INTEGER NOT NULL, level INTEGER NOT NULL, raised INTEGER NOT NULL, value REAL, threshold REAL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, last_seen REAL NOT NULL, duplicates INTEGER NOT NULL DEFAULT 0
);
CREATE VIEW IF NOT EXISTS unannounced_gaps AS """ + gaps_view("device") + """;
CREATE VIEW IF NOT EXISTS active_alarms AS """ + alarms_view("device") + ";"


class Store(Protocol):
    """Where batches go. ``put`` returns, per batch, how many of its records were new
    (the rest were stored before: duplicates), or why the store refused it (values it
    cannot hold); it raises StoreUnavailable when the database does not
    answer, and then nothing of those batches may be acknowledged."""

    device_column: str

    def put(self, batches: list[Batch]) -> list[int | str]: ...

    def query(self, sql: str) -> list[tuple[Any, ...]]: ...

    def close(self) -> None: ...


def _unstorable(records: list[tuple[int, dict[str, Any]]]) -> str | None:
    """Why a batch that decodes still cannot be stored, or None: a sequence number no
    database integer holds, or a signal twice in one window (which of the two is it?)."""
    for seq, rec in records:
        if seq > INT64_MAX:
            return f"sequence number {seq} beyond a 64-bit integer"
        if rec["k"] == KIND_WINDOW:
            sids = [row[0] for row in rec["s"]]
            if len(set(sids)) != len(sids):
                return f"record {seq}: a signal twice in one window"
    return None


OPEN_TIMEOUT_S = 30.0


def _open_sqlite(path: str) -> sqlite3.Connection:
    """Open and set up the consumers' database. Consumers of one shared subscription
    start together, and SQLite answers "database is locked" at once, without waiting,
    to one of two connections that switch a new file to WAL or create its tables at the
    same moment; so the set-up is retried, jittered, for ``OPEN_TIMEOUT_S`` at most."""
    deadline = time.monotonic() + OPEN_TIMEOUT_S
    while True:
        db = sqlite3.connect(path, timeout=OPEN_TIMEOUT_S)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SQLITE_SCHEMA)
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if e.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                    or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0.01, 0.1))


class SqliteStore:
    """One SQLite file: every batch in its own transaction; a window is one row per signal."""

    device_column = "device"

    def __init__(self, path: str) -> None:
        try:
            self.db = _open_sqlite(path)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {path}: {e}") from e

    def put(self, batches: list[Batch]) -> list[int | str]:
        return [self._put(batch) for batch in batches]

    def _put(self, batch: Batch) -> int | str:
        # One look for the numbers already stored, then one insert per table: a batch is
        # hundreds of records of tens of signals, and per-record statements were most of
        # the consumer's time. The look is inside the write transaction, so consumers
        # sharing the database (a shared subscription) cannot both store a resent record.
        device, records = batch.device, batch.records
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
                    [(device, seq, rec["k"], record_time(rec), record_bytes(rec)) for seq, rec in fresh.items()])
                self.db.executemany(
                    "INSERT INTO announced_gaps VALUES (?, ?, ?, ?, ?)",
                    [(device, seq, *run) for seq, rec in fresh.items() if rec["k"] == KIND_GAP
                     for run in gap_rows(rec)])
                self.db.executemany(
                    "INSERT INTO alarms VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(device, seq, *alarm_row(rec)) for seq, rec in fresh.items() if rec["k"] == KIND_ALARM])
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
                    [(device, seq, *lost) for seq, rec in raw.items() if (lost := raw_lost_row(rec))])
                self.db.execute(
                    "INSERT INTO devices VALUES (?, ?, ?) ON CONFLICT (device) DO UPDATE SET"
                    " last_seen = excluded.last_seen, duplicates = duplicates + excluded.duplicates",
                    (device, time.time(), len(records) - len(fresh)))
        except (sqlite3.Error, OverflowError) as e:
            # Decodes but cannot be stored (a uint beyond int64 in a value): the whole
            # batch is rolled back and refused; the consumer goes on.
            return f"batch not stored: {e}"
        return len(fresh)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        return self.db.execute(sql).fetchall()

    def close(self) -> None:
        self.db.close()


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db: str, init: bool = False) -> Store:
    """The store ``db`` names: a ``postgresql://`` URL (``init`` creates or migrates its
    schema; without it the schema must be there already) or a SQLite file (made as needed)."""
    if is_postgres(db):
        from agent.fleet.pgstore import PostgresStore

        return PostgresStore(db, init=init)
    return SqliteStore(db)


def ack_for(topic: str, seqs: list[int], payload: bytes, signer: Signer | None = None) -> tuple[str, bytes]:
    """The device's ack topic (beside the telemetry topic it published on) and the ack of
    the batch ``payload`` (its digest and the ``seqs`` stored); with ``signer``, a
    COSE_Sign1 of it, for devices that require signed acks."""
    ack = encode_ack(batch_digest(payload), seqs)
    return topic.rsplit("/", 1)[0] + "/ack", signer.sign(ack) if signer is not None else ack


def _iso(value: Any) -> str:
    """A device's last-seen time as ISO 8601 UTC: SQLite keeps Unix seconds, PostgreSQL a timestamptz."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="seconds")
    return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="seconds")


class Ingest:
    """The consumer: decodes and checks batches, has them stored, says what to ack;
    counts what arrived, twice, or broken. Messages are taken in (``accept``) and
    stored together (``flush``: one transaction on PostgreSQL), and only what a
    committed transaction holds is handed back for acknowledgement."""

    def __init__(self, db: str, init: bool = False) -> None:
        self.store = open_store(db, init)
        self.pending: list[Batch] = []
        self.batches = 0
        self.records = 0
        self.duplicates = 0
        self.bad_batches = 0
        self.deferred = 0
        self.last_error = ""

    @property
    def db(self) -> Any:
        """The SQLite connection (tests and the bench read the file's tables through it)."""
        return getattr(self.store, "db", None)

    def _bad(self, topic: str, why: str) -> None:
        self.bad_batches += 1
        self.last_error = f"{topic}: {why}"
        log.warning("batch on %s refused, not acknowledged: %s", topic, why)

    def accept(self, topic: str, payload: bytes) -> None:
        """Take one MQTT message in; a batch off the CDDL, or not storable, is counted,
        logged and never acknowledged, and the consumer goes on."""
        try:
            device, records = decode_batch(payload)
        except DecodeError as e:
            self._bad(topic, str(e))
            return
        if topic.split("/")[-2:-1] != [device]:
            self._bad(topic, f"device {device!r} does not match the topic")
            return
        why = _unstorable(records)
        if why is not None:
            self._bad(topic, why)
            return
        self.pending.append(Batch(topic, payload, device, records))

    def flush(self) -> list[tuple[str, list[int], bytes]]:
        """Store what was accepted; ``(topic, seqs, payload)`` of each batch now safely
        stored (its duplicates included), for the acks. If the database is unreachable,
        nothing is acknowledged: the batches are dropped here, the devices resend them."""
        batches, self.pending = self.pending, []
        if not batches:
            return []
        try:
            results = self.store.put(batches)
        except StoreUnavailable as e:
            self.deferred += len(batches)
            self.last_error = str(e)
            return []
        out = []
        for batch, fresh in zip(batches, results, strict=True):
            if isinstance(fresh, str):
                self._bad(batch.topic, fresh)
                continue
            self.records += fresh
            self.duplicates += len(batch.records) - fresh
            self.batches += 1
            out.append((batch.topic, [seq for seq, _ in batch.records], batch.payload))
        return out

    def available(self) -> bool:
        """Whether the database answers now (a reconnection is tried, within its backoff)."""
        try:
            self.store.query("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    def handle(self, topic: str, payload: bytes) -> list[int]:
        """One message taken in and stored at once; the sequence numbers to acknowledge."""
        self.accept(topic, payload)
        stored = self.flush()
        return stored[0][1] if stored else []

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Missing sequence ranges per device, between the first and last seen, that no gap
        record of the device explains: these are lost records."""
        out: dict[str, list[tuple[int, int]]] = {}
        for device, first, last in self.store.query(
                f"SELECT {self.store.device_column}, first, last FROM unannounced_gaps ORDER BY 1, 2"):
            out.setdefault(device, []).append((first, last))
        return out

    def announced(self) -> dict[str, list[tuple[int, int]]]:
        """Sequence numbers each device said it dropped (gap records)."""
        out: dict[str, list[tuple[int, int]]] = {}
        for device, first, last in self.store.query(
                f"SELECT {self.store.device_column}, first, last FROM announced_gaps ORDER BY 1, 2"):
            out.setdefault(device, []).append((first, last))
        return out

    def raw(self, device: str, signal: int) -> list[tuple[int, float]]:
        """Every raw sample stored of one signal of a device: ``(ms, value)``, by time."""
        if not isinstance(self.store, SqliteStore):
            raise StoreError("raw samples are read back from the SQLite store only")
        return list(self.store.db.execute("SELECT t_ms, value FROM raw_samples WHERE device=? AND signal=?"
                                          " ORDER BY t_ms, rowid", (device, signal)))

    def fleet(self) -> dict[str, dict[str, Any]]:
        """Per device, from the database (whichever consumer stored what): last seen,
        records, first and last sequence number, records missing that no gap record
        explains, duplicates refused, active alarms."""
        dev = self.store.device_column
        out: dict[str, dict[str, Any]] = {
            d: {"records": n, "first": lo, "last": hi, "last_seen": "", "duplicates": 0, "unannounced": 0,
                "gaps": [], "active_alarms": []}
            for d, n, lo, hi in self.store.query(
                f"SELECT {dev}, count(*), min(seq), max(seq) FROM records GROUP BY {dev}")}
        for d, seen, dups in self.store.query(f"SELECT {dev}, last_seen, duplicates FROM devices"):
            if d in out:
                out[d].update(last_seen=_iso(seen), duplicates=dups)
        for d, gaps in self.gaps().items():
            if d in out:
                out[d]["gaps"] = [list(g) for g in gaps]
                out[d]["unannounced"] = sum(last - first + 1 for first, last in gaps)
        for d, name, inst, level in self.store.query(
                f"SELECT {dev}, name, instance, level FROM active_alarms ORDER BY 1, code, instance"):
            if d in out:
                out[d]["active_alarms"].append({"name": name, "instance": inst, "level": level})
        return out

    def counters(self) -> dict[str, Any]:
        """What this consumer saw: batches stored, records new and duplicate, batches
        refused, batches not acknowledged because the database was away."""
        return {"batches": self.batches, "records": self.records, "duplicates": self.duplicates,
                "bad_batches": self.bad_batches, "deferred": self.deferred}

    def report(self) -> dict[str, Any]:
        """This consumer's counters and the database's view of every device."""
        devices = self.fleet()
        report: dict[str, Any] = {
            **self.counters(), "devices": devices,
            "gaps": {d: v["gaps"] for d, v in devices.items() if v["gaps"]},
            "announced_drops": {d: [list(g) for g in gs] for d, gs in self.announced().items()},
        }
        if isinstance(self.store, SqliteStore):
            report["raw_samples"] = dict(self.store.query("SELECT device, count(*) FROM raw_samples GROUP BY device"))
            report["raw_lost"] = dict(self.store.query("SELECT device, sum(lost) FROM raw_lost GROUP BY device"))
        else:
            report["raw_samples"] = dict(self.store.query(
                "SELECT device_id, sum(cardinality(t_ms))::bigint FROM raw_series GROUP BY device_id"))
            report["raw_lost"] = dict(self.store.query(
                "SELECT device_id, sum(lost)::bigint FROM raw_lost GROUP BY device_id"))
        return report

    def close(self) -> None:
        self.store.close()
