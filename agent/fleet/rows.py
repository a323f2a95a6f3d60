"""What every consumer store shares: a checked batch, the rows each record kind gives,
and the SQL of the two views the database judges with (the same in SQLite and
PostgreSQL), so both stores answer alike."""

from __future__ import annotations

from typing import Any, NamedTuple

from agent.wire import KIND_CHANGE


def gaps_view(dev: str) -> str:
    """The query of the view ``unannounced_gaps``: missing sequence numbers no gap
    record explains, per device, between the first and last known. Every stored record
    and every announced run is a span; sorted, a span starting past the furthest reach
    of those before it leaves a hole. Plain SQL (window functions), the same in SQLite
    and PostgreSQL; ``dev`` is the device column."""
    return f"""
WITH spans AS (
    SELECT {dev} AS dev, seq AS lo, seq AS hi FROM records
    UNION ALL SELECT {dev}, first, last FROM announced_gaps
), reach AS (
    SELECT dev, max(hi) OVER w AS upto, lead(lo) OVER (PARTITION BY dev ORDER BY lo, hi) AS nxt
    FROM spans WINDOW w AS (PARTITION BY dev ORDER BY lo, hi ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT dev AS {dev}, upto + 1 AS first, nxt - 1 AS last FROM reach WHERE nxt > upto + 1
"""


def alarms_view(dev: str) -> str:
    """The query of the view ``active_alarms``: alarms whose latest record (by sequence
    number: the device's order) raised them."""
    return f"""
SELECT {dev}, code, instance, name, level, t_ms, seq FROM (
    SELECT a.*, row_number() OVER (PARTITION BY {dev}, code, instance ORDER BY seq DESC) AS n FROM alarms a
) latest WHERE n = 1 AND raised
"""


class Batch(NamedTuple):
    """One MQTT message, decoded and checked: what a store writes and an ack names."""

    topic: str
    payload: bytes
    device: str
    records: list[tuple[int, dict[str, Any]]]


def record_time(rec: dict[str, Any]) -> int:
    """A record's time in ms: its ``t``; a change record has one per change, the first."""
    if rec["k"] == KIND_CHANGE:
        return min((t for _sig, t, _value in rec["c"]), default=0)
    return int(rec["t"])


def alarm_row(rec: dict[str, Any]) -> tuple[Any, ...]:
    """``(t_ms, code, name, instance, level, raised, value, threshold)`` of an alarm record."""
    return rec["t"], rec["code"], rec["name"], rec["inst"], rec["lvl"], rec["on"], rec["v"], rec["thr"]


def gap_rows(rec: dict[str, Any]) -> list[tuple[int, int, str]]:
    """``(first, last, why)`` of each run a gap record announces."""
    return [(first, last, rec["why"]) for first, last in rec["runs"]]


def raw_lost_row(rec: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """``(t_ms, dur_ms, lost, skipped)`` of a raw record that lost or skipped samples."""
    if not rec.get("lost") and not rec.get("skip"):
        return None
    return rec["t"], rec["d"], rec.get("lost", 0), rec.get("skip", 0)
