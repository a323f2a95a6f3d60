"""The consumers' PostgreSQL store (psycopg 3; the one module that imports it).

Any number of consumers write one database. A flush is one transaction: the records'
keys go in first with ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, which says which
are new (a record another consumer stored, or this one before a crash, is a duplicate,
refused and counted), then the new records' contents by COPY into their tables, then
each device's row (last seen, duplicates refused). Rows are written in (device, seq)
order, so two consumers storing the same devices lock them in the same order. The
schema is docs/ingest.md; ``ingest --init`` creates and migrates it.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from agent.errors import StoreError, StoreUnavailable
from agent.fleet.rows import (
    Batch,
    alarm_row,
    alarms_view,
    gap_rows,
    gaps_view,
    raw_lost_row,
    record_time,
)
from agent.wire import (
    KIND_ALARM,
    KIND_CHANGE,
    KIND_GAP,
    KIND_RAW,
    KIND_WINDOW,
    raw_samples,
    record_bytes,
    window_values,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 3
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 5.0
# Deadlocks and serialisation failures are retried this often before the flush is given up.
WRITE_ATTEMPTS = 3
# pg_advisory_xact_lock key that serialises concurrent ``ingest --init`` runs.
MIGRATION_LOCK = 0x65626B65

_V1 = """
CREATE TABLE devices (
    device_id text PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    duplicates bigint NOT NULL DEFAULT 0
);
CREATE TABLE records (
    device_id text NOT NULL, seq bigint NOT NULL, kind text NOT NULL, t_ms bigint NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE windows (
    device_id text NOT NULL, seq bigint NOT NULL, t_ms bigint NOT NULL, dur_ms bigint NOT NULL,
    signal integer[] NOT NULL, count integer[] NOT NULL,
    min float8[] NOT NULL, max float8[] NOT NULL, mean float8[] NOT NULL, last float8[] NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE changes (
    device_id text NOT NULL, seq bigint NOT NULL,
    signal integer[] NOT NULL, t_ms bigint[] NOT NULL, value float8[] NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE alarms (
    device_id text NOT NULL, seq bigint NOT NULL, t_ms bigint NOT NULL, code integer NOT NULL, name text NOT NULL,
    instance integer NOT NULL, level smallint NOT NULL, raised boolean NOT NULL, value float8, threshold float8,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE events (
    device_id text NOT NULL, seq bigint NOT NULL, t_ms bigint NOT NULL, kind text NOT NULL, code integer,
    body bytea NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE raw_series (
    device_id text NOT NULL, seq bigint NOT NULL, signal integer NOT NULL,
    t_ms bigint[] NOT NULL, value float8[] NOT NULL,
    PRIMARY KEY (device_id, seq, signal)
);
CREATE TABLE raw_lost (
    device_id text NOT NULL, seq bigint NOT NULL, t_ms bigint NOT NULL, dur_ms bigint NOT NULL,
    lost bigint NOT NULL, skipped bigint NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE announced_gaps (
    device_id text NOT NULL, seq bigint NOT NULL, first bigint NOT NULL, last bigint NOT NULL, why text NOT NULL,
    PRIMARY KEY (device_id, seq, first)
);
CREATE VIEW unannounced_gaps AS """ + gaps_view("device_id") + """;
CREATE VIEW active_alarms AS """ + alarms_view("device_id") + ";"

MIGRATIONS = {1: _V1}

# Each content table's columns and their types, for a binary COPY (the text form escaped
# every array element through a regular expression: most of a consumer's time).
_TABLES: dict[str, tuple[str, list[str]]] = {
    "windows": ("device_id, seq, t_ms, dur_ms, signal, count, min, max, mean, last",
                ["text", "int8", "int8", "int8", "int4[]", "int4[]", "float8[]", "float8[]", "float8[]", "float8[]"]),
    "changes": ("device_id, seq, signal, t_ms, value", ["text", "int8", "int4[]", "int8[]", "float8[]"]),
    "alarms": ("device_id, seq, t_ms, code, name, instance, level, raised, value, threshold",
               ["text", "int8", "int8", "int4", "text", "int4", "int2", "bool", "float8", "float8"]),
    "events": ("device_id, seq, t_ms, kind, code, body", ["text", "int8", "int8", "text", "int4", "bytea"]),
    "raw_series": ("device_id, seq, signal, t_ms, value", ["text", "int8", "int4", "int8[]", "float8[]"]),
    "raw_lost": ("device_id, seq, t_ms, dur_ms, lost, skipped", ["text", "int8", "int8", "int8", "int8", "int8"]),
    "announced_gaps": ("device_id, seq, first, last, why", ["text", "int8", "int8", "int8", "text"]),
}


_INT_BOUNDS = {"int2": 1 << 15, "int4": 1 << 31, "int8": 1 << 63}


def _misfit(table: str, row: tuple[Any, ...]) -> str | None:
    """Why ``row`` cannot go into ``table`` as it is, or None: an integer beyond its
    column. A binary COPY would not refuse it but keep its low bits (2^40 arrives as 0
    in an int4), so it is checked here, and the batch refused, never stored wrong."""
    for column, value, typ in zip(_TABLES[table][0].split(", "), row, _TABLES[table][1], strict=True):
        bound = _INT_BOUNDS.get(typ.removesuffix("[]"))
        if bound is None or value is None:
            continue
        values = value if typ.endswith("[]") else (value,)
        if values and not (-bound <= min(values) and max(values) < bound):
            return f"{table}.{column}: a value beyond {typ.removesuffix('[]')}"
    return None


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _rows(device: str, seq: int, rec: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """``(table, row)`` of a new record's contents (the records table has its key)."""
    kind = rec["k"]
    if kind == KIND_WINDOW:
        cols = list(zip(*(window_values(row) for row in rec["s"]), strict=True)) or [()] * 6
        return [("windows", (device, seq, rec["t"], rec["d"], *(list(c) for c in cols)))]
    if kind == KIND_CHANGE:
        return [("changes", (device, seq, [c[0] for c in rec["c"]], [c[1] for c in rec["c"]],
                             [float(c[2]) for c in rec["c"]]))]
    if kind == KIND_ALARM:
        t, code, name, inst, lvl, on, v, thr = alarm_row(rec)
        return [("alarms", (device, seq, t, code, name, inst, lvl, on, float(v), float(thr)))]
    if kind == KIND_GAP:
        return [("announced_gaps", (device, seq, *run)) for run in gap_rows(rec)]
    if kind == KIND_RAW:
        series: dict[int, tuple[list[int], list[float]]] = {}
        for sid, t_ms, value in raw_samples(rec):
            col = series.setdefault(sid, ([], []))
            col[0].append(t_ms)
            col[1].append(value)
        out: list[tuple[str, tuple[Any, ...]]] = [
            ("raw_series", (device, seq, sid, ts, vs)) for sid, (ts, vs) in series.items()]
        lost = raw_lost_row(rec)
        if lost is not None:
            out.append(("raw_lost", (device, seq, *lost)))
        return out
    # Snapshots of captured events, command results, update reports: kept whole, as CBOR.
    return [("events", (device, seq, rec["t"], kind, rec.get("code"), record_bytes(rec)))]


class PostgresStore:
    """One connection to the fleet's database; lost, it is made again with backoff."""

    device_column = "device_id"

    def __init__(self, url: str, init: bool = False) -> None:
        self.url = url
        self.last_error = ""
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN_S
        try:
            self.conn: psycopg.Connection[Any] | None = self._connect()
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to {redact(url)}: {str(e).strip()}") from e
        if init:
            self._migrate()
        try:
            self._check_schema()
        except psycopg.Error as e:
            raise StoreError(f"{redact(url)}: cannot read the schema version: {str(e).strip()}") from e

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="ebike-ingest")

    def _migrate(self) -> None:
        """Create the schema, or bring an older one up to ``SCHEMA_VERSION``, in one
        transaction under an advisory lock: consumers may all be started with --init."""
        assert self.conn is not None
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                self.conn.execute("CREATE TABLE IF NOT EXISTS ingest_schema (version integer NOT NULL)")
                row = self.conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
                have = row[0] if row and row[0] is not None else 0
                if have > SCHEMA_VERSION:
                    raise StoreError(f"{redact(self.url)}: schema version {have} is newer than this consumer's "
                                     f"{SCHEMA_VERSION}: upgrade ebike-agent")
                for version in range(have + 1, SCHEMA_VERSION + 1):
                    self.conn.execute(MIGRATIONS[version])
                    log.info("ingest: schema of %s now at version %d", redact(self.url), version)
                self.conn.execute("DELETE FROM ingest_schema")
                self.conn.execute("INSERT INTO ingest_schema VALUES (%s)", (max(have, SCHEMA_VERSION),))
        except psycopg.Error as e:
            raise StoreError(f"{redact(self.url)}: cannot create the schema: {str(e).strip()}") from e

    def _check_schema(self) -> None:
        """Refuse a database without our schema, or with another version of it."""
        assert self.conn is not None
        try:
            row = self.conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
        except pgerrors.UndefinedTable as e:
            raise StoreError(f"{redact(self.url)} has no ingest schema: create it with "
                             f"'ebike-agent ingest --init --db URL'") from e
        have = row[0] if row else None
        if have != SCHEMA_VERSION:
            how = "upgrade ebike-agent" if (have or 0) > SCHEMA_VERSION else \
                "migrate it with 'ebike-agent ingest --init --db URL'"
            raise StoreError(f"{redact(self.url)}: schema version {have}, this consumer needs "
                             f"{SCHEMA_VERSION}: {how}")

    def _lost(self, e: Exception) -> StoreUnavailable:
        """The connection is gone: closed, and the next attempt waits out the backoff."""
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.retry_at = time.monotonic() + self.backoff
        why = f"database {redact(self.url)} unavailable: {str(e).strip() or type(e).__name__}" \
              f" (retrying in {self.backoff:.2f} s)"
        self.backoff = min(BACKOFF_MAX_S, self.backoff * 2)
        if why.split(" (")[0] != self.last_error.split(" (")[0]:
            log.warning("ingest: %s; nothing is acknowledged until it is back", why)
        self.last_error = why
        return StoreUnavailable(why)

    def _connection(self) -> psycopg.Connection[Any]:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        if time.monotonic() < self.retry_at:
            raise StoreUnavailable(self.last_error)
        try:
            self.conn = self._connect()
            self._check_schema()
        except psycopg.Error as e:
            raise self._lost(e) from e
        log.info("ingest: database %s reachable again", redact(self.url))
        self.backoff = BACKOFF_MIN_S
        return self.conn

    def put(self, batches: list[Batch]) -> list[int | str]:
        contents: list[dict[tuple[str, int], list[tuple[str, tuple[Any, ...]]]] | None] = []
        reasons: list[int | str] = []
        for b in batches:
            rows = {(b.device, seq): _rows(b.device, seq, rec) for seq, rec in b.records}
            why = next((w for pairs in rows.values() for table, row in pairs if (w := _misfit(table, row))), None)
            contents.append(None if why is not None else rows)
            reasons.append(f"batch not stored: {why}")
        kept = [i for i, c in enumerate(contents) if c is not None]
        out: list[int | str] = reasons
        if kept:
            stored = self._put([batches[i] for i in kept], [contents[i] or {} for i in kept])
            for i, n in zip(kept, stored, strict=True):
                out[i] = n
        return out

    def _put(self, batches: list[Batch],
             contents: list[dict[tuple[str, int], list[tuple[str, tuple[Any, ...]]]]]) -> list[int | str]:
        for attempt in range(WRITE_ATTEMPTS):
            conn = self._connection()
            try:
                return self._write(conn, batches, contents)
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure) as e:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise self._lost(e) from e
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                raise self._lost(e) from e
            except psycopg.Error as e:
                # A value this database refuses (a NUL in a text, a time beyond bigint):
                # find the batch, store the others.
                if len(batches) == 1:
                    return [f"batch not stored: {str(e).strip()}"]
                return [self._put([b], [c])[0] for b, c in zip(batches, contents, strict=True)]
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _write(self, conn: psycopg.Connection[Any], batches: list[Batch],
               contents: list[dict[tuple[str, int], list[tuple[str, tuple[Any, ...]]]]]) -> list[int | str]:
        # A number twice in one flush keeps its first record, as the contents below do
        # (and as ON CONFLICT does across flushes): key and contents always agree.
        first: dict[tuple[str, int], tuple[str, int]] = {}
        for b in batches:
            for seq, rec in b.records:
                first.setdefault((b.device, seq), (rec["k"], record_time(rec)))
        keys = sorted(first.items())
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "INSERT INTO records (device_id, seq, kind, t_ms)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[]) ORDER BY 1, 2"
                " ON CONFLICT DO NOTHING RETURNING device_id, seq",
                ([d for (d, _), _ in keys], [s for (_, s), _ in keys],
                 [k for _, (k, _) in keys], [t for _, (_, t) in keys]))
            fresh = {(d, s) for d, s in cur.fetchall()}
            rows: dict[str, list[tuple[Any, ...]]] = {}
            written = set()
            for batch_rows in contents:
                for key, pairs in batch_rows.items():
                    if key in fresh and key not in written:
                        written.add(key)
                        for table, row in pairs:
                            rows.setdefault(table, []).append(row)
            for table, table_rows in rows.items():
                columns, types = _TABLES[table]
                with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(types)
                    for row in table_rows:
                        copy.write_row(row)
            sent = Counter(b.device for b in batches for _ in b.records)
            new = Counter(d for d, _ in fresh)
            devices = sorted(sent)
            cur.execute(
                "INSERT INTO devices (device_id, duplicates) SELECT * FROM unnest(%s::text[], %s::bigint[])"
                " ORDER BY 1 ON CONFLICT (device_id) DO UPDATE SET last_seen = now(),"
                " duplicates = devices.duplicates + excluded.duplicates",
                (devices, [sent[d] - new[d] for d in devices]))
        out: list[int | str] = []
        claimed: set[tuple[str, int]] = set()
        for b in batches:
            mine = {(b.device, seq) for seq, _ in b.records} & (fresh - claimed)
            claimed |= mine
            out.append(len(mine))
        return out

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        try:
            with self._connection().cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self._lost(e) from e
        except psycopg.Error as e:
            raise StoreError(f"{redact(self.url)}: {str(e).strip()}") from e

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
