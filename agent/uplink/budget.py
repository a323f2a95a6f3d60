"""The data budget of a metered SIM: what the agent sends, counted, and the resolution
lowered in steps when the month's pace would overrun ``[uplink] budget_mb_per_month``.

Counted: every MQTT publish the agent makes (batches, command results), its payload
and an estimate of what MQTT, TLS and TCP/IP add around it (the constants below), the
acknowledgements coming back, the keepalive pings of an idle link and each connection's
set-up. Mobile operators bill the IP bytes both ways, so both ways are counted.

The month is the calendar month in UTC: SIM plans reset on a calendar day, and the
budget is then a figure a fleet manager can set against the bill (the plan's reset may
be local midnight: a few hours' traffic falls into the neighbouring month).

The pace is ``used + rate x the rest of the month``. The rate is what the records of
the last few days cost, as an exponentially weighted average (RATE_TAU_S): long enough
that a day's pattern (a ride, then parked) does not swing it much, short enough to
follow a change of use. It is kept per kind of record, at full resolution (a merged
window counts as the windows it stands for), so the cost of every level is known
without trying it: the record stage reports what it stores (``stored``), the payload
published per record byte (deflate, batching) is measured on the batches sent, and
what the link costs whatever the level (the overheads of each publish and its acks,
whose number follows the commits; keepalive pings; connections) is added as measured.

Every EVAL_S the level moves at most one step: coarser when the pace at the current
level exceeds HIGH of the budget, finer when the pace at the finer level has stayed
under LOW of it for a day (the gap between the two and the day are the hysteresis: the
rate's daily swing must not move the level every day). Alarms, events,
command results and gap announcements are never withheld or merged: at the last level
the budget may still be overrun by them, and status says so.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

# --- the overhead estimate (bytes) -----------------------------------------------------
# MQTT 5 PUBLISH at QoS 1 around the payload: fixed header (1 + the remaining length's
# 1-4 bytes, computed), topic (2 + its length), packet id 2, property length 1.
MQTT_PUBLISH_VARIABLE = 2 + 2 + 1
# PUBACK, success without reason code or properties (MQTT 5 section 3.4.2.1).
MQTT_PUBACK = 4
# PINGREQ + PINGRESP: an idle link pings once per keepalive.
MQTT_PING = 2
# TLS 1.3 application record: 5 header + 1 inner content type + 16 AEAD tag, each
# record carrying at most 16 KiB.
TLS_RECORD_OVERHEAD = 22
TLS_RECORD_MAX = 16384
# TCP/IPv4 with timestamps (20 + 20 + 12) per segment, segments of a 1500-byte MTU; the
# peer's ACK segments, one per two segments (delayed ACK), counted too.
TCP_IP_HEADERS = 52
TCP_MSS = 1448
# The consumer's ack of a batch (ack = "cloud"): [2, digest, ranges], a signature
# where acks are signed; its topic is about as long as the telemetry topic.
CLOUD_ACK_PAYLOAD = 120
# A (re)connection: TCP handshake, a TLS 1.3 handshake with a server chain and a client
# certificate (~5 KB), CONNECT/CONNACK, SUBSCRIBEs and the retained birth message.
CONNECT_BYTES = 6000

# --- the pace ----------------------------------------------------------------------------
RATE_TAU_S = 3 * 86400.0  # a daily ride/parked pattern swings the rate by about +-17 %
RATE_MIN_SPAN_S = 86400.0  # until a day is seen, the bytes so far count as one day's
EVAL_S = 10.0
# The count is handed to the outbox at most this often (and at a stop): a parked unit's
# pings would otherwise rewrite the state at every commit. A power cut loses at most this
# much of the count.
SAVE_S = 600.0
HIGH = 0.95
LOW = 0.85
# A step back to finer resolution waits until the finer level's pace has stayed under
# LOW for this long: a whole daily cycle, the ride (when the rate is highest) included.
RETURN_AFTER_S = 86400.0
# Level: (history windows merged, live windows merged, raw lanes on, what it means).
HISTORY_FACTOR = 10
LIVE_FACTOR = 10
LEVELS = (
    (1, 1, True, "full resolution"),
    (HISTORY_FACTOR, 1, True, f"history windows merged {HISTORY_FACTOR} to 1"),
    (HISTORY_FACTOR, LIVE_FACTOR, True, f"history and live windows merged {HISTORY_FACTOR} to 1"),
    (HISTORY_FACTOR, LIVE_FACTOR, False, f"windows merged {HISTORY_FACTOR} to 1, raw lanes off"),
)
CATEGORIES = ("history", "live", "raw", "other")
STATE_PREFIX = "budget."
MB = 1e6


def _framed(n: int) -> int:
    """Bytes on the link for ``n`` bytes written to a TLS connection: TLS records, TCP/IP
    segments and the peer's ACKs for them."""
    tls = n + TLS_RECORD_OVERHEAD * max(1, -(-n // TLS_RECORD_MAX))
    segments = max(1, -(-tls // TCP_MSS))
    return tls + TCP_IP_HEADERS * (segments + -(-segments // 2))


def publish_bytes(topic_len: int, payload_len: int) -> int:
    """Estimated link bytes of one QoS 1 publish and its PUBACK."""
    remaining = topic_len + MQTT_PUBLISH_VARIABLE + payload_len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return _framed(1 + length_bytes + remaining) + _framed(MQTT_PUBACK)


def month_bounds(now: float) -> tuple[int, float, float]:
    """(year x 12 + month - 1, its first second, its end) of the UTC calendar month of ``now``."""
    tm = time.gmtime(now)
    start = calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0))
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return tm.tm_year * 12 + tm.tm_mon - 1, float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _first_second(month: int) -> float:
    """The first second (UTC) of month ``year x 12 + month - 1``."""
    return float(calendar.timegm((month // 12, month % 12 + 1, 1, 0, 0, 0)))


class Rate:
    """Bytes per second over the last RATE_TAU_S or so, exponentially weighted."""

    def __init__(self, total: float = 0.0, at: float = 0.0) -> None:
        self.total = total  # decayed to ``at``
        self.at = at

    def add(self, n: float, now: float) -> None:
        self.total = self.decayed(now) + n
        self.at = max(self.at, now)

    def decayed(self, now: float) -> float:
        return self.total * math.exp(-max(0.0, now - self.at) / RATE_TAU_S)

    def hold(self, now: float) -> None:
        """No decay up to ``now``: a kind of record switched off keeps its last rate."""
        self.at = max(self.at, now)

    def per_s(self, now: float, since: float) -> float:
        """The average rate, corrected for the span seen so far (at least RATE_MIN_SPAN_S)."""
        span = max(now - since, RATE_MIN_SPAN_S)
        return self.decayed(now) / (RATE_TAU_S * -math.expm1(-span / RATE_TAU_S))


class Budget:
    """Counts the link's bytes of the month and chooses the level of resolution.

    ``coarsen(history k, live k)`` and ``set_raw_enabled(on)`` are called at each change
    of level (and at the start, with the level restored)."""

    def __init__(self, budget_mb: float, keepalive: float, cloud_acks: bool, topic_len: int,
                 coarsen: Callable[[int, int], None] | None = None,
                 set_raw_enabled: Callable[[bool], None] | None = None) -> None:
        self.budget = budget_mb * MB
        self.keepalive = keepalive
        self.cloud_acks = cloud_acks
        self.topic_len = topic_len
        self.coarsen = coarsen
        self.set_raw_enabled = set_raw_enabled
        self.month = -1
        self.month_start = self.month_end = 0.0
        self.used = 0.0
        self.payload = 0.0
        self.since: float | None = None
        self.full = {c: Rate() for c in CATEGORIES}  # stored, at full resolution
        # Batches published: the record bytes in them, and their payload (deflated, framed):
        # measured on the publishes themselves, so an outage's backlog does not skew it.
        self.records_rate = Rate()
        self.payload_rate = Rate()
        # On the link whatever the level: overheads, acks, pings, connections (the
        # batches, and so their overheads, follow the commits, not the bytes stored).
        self.fixed_rate = Rate()
        self.level = 0
        self.changes = 0
        self.finer_since: float | None = None  # since when the finer level's pace fits
        self.evaluated = -EVAL_S
        self.last_traffic: float | None = None
        self.saved: dict[str, float] = {}
        self.saved_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def start(self, saved: Mapping[str, float], now: float) -> None:
        """The month's count and the rates as saved (``state``), then the level applied."""
        p = STATE_PREFIX
        if p + "month" in saved:
            self.month = int(saved[p + "month"])
            self.used = saved.get(p + "used", 0.0)
            self.payload = saved.get(p + "payload", 0.0)
            self.since = saved.get(p + "since")
            at = saved.get(p + "at", now)
            for c in CATEGORIES:
                self.full[c] = Rate(saved.get(p + c, 0.0), at)
            self.records_rate = Rate(saved.get(p + "records", 0.0), at)
            self.payload_rate = Rate(saved.get(p + "payload_rate", 0.0), at)
            self.fixed_rate = Rate(saved.get(p + "fixed", 0.0), at)
            self.level = min(len(LEVELS) - 1, max(0, int(saved.get(p + "level", 0)))) if self.enabled else 0
        self._roll(now)
        self._apply()
        self.snapshot(now)

    def state(self) -> dict[str, float]:
        """What ``start`` takes back, kept beside the kernel's counters in the outbox: the
        count as of the last ``snapshot``."""
        return self.saved

    def snapshot(self, now: float) -> None:
        """The count as it is now, for ``state``."""
        self.saved_at = now
        p = STATE_PREFIX
        at = max(r.at for r in (*self.full.values(), self.records_rate, self.payload_rate, self.fixed_rate))
        out = {p + "month": float(self.month), p + "used": self.used, p + "payload": self.payload,
               p + "level": float(self.level), p + "at": at,
               p + "records": self.records_rate.decayed(at), p + "payload_rate": self.payload_rate.decayed(at),
               p + "fixed": self.fixed_rate.decayed(at)}
        out.update({p + c: r.decayed(at) for c, r in self.full.items()})
        if self.since is not None:
            out[p + "since"] = self.since
        self.saved = out

    def _roll(self, now: float) -> None:
        """A new month starts the count again. A clock behind the month counted (a unit
        without a real-time clock boots in the past until NTP or GNSS sets it) keeps
        counting into that month instead of losing it."""
        month, start, end = month_bounds(now)
        if month > self.month:
            self.month, self.used, self.payload = month, 0.0, 0.0
        if month == self.month:
            self.month_start, self.month_end = start, end
        elif not self.month_end:
            _, self.month_start, self.month_end = month_bounds(_first_second(self.month))
        if self.since is None:
            self.since = now

    # --- counting ------------------------------------------------------------------

    def _link(self, n: int, now: float, rate: Rate) -> None:
        self._roll(now)
        self.used += n
        rate.add(n, now)
        self.last_traffic = now

    def published(self, topic_len: int, payload_len: int, now: float, record_bytes: int = 0) -> None:
        """One publish that paho took: its payload and the estimated overhead; with cloud
        acks, the consumer's ack of it and our PUBACK of that. ``record_bytes``: the
        record bodies a batch carries (0: not a batch, e.g. a command result)."""
        n = publish_bytes(topic_len, payload_len)
        if self.cloud_acks and record_bytes:
            n += publish_bytes(self.topic_len, CLOUD_ACK_PAYLOAD)
        self.payload += payload_len
        if record_bytes:
            self.records_rate.add(record_bytes, now)
            self.payload_rate.add(payload_len, now)
            self._link(n - payload_len, now, self.fixed_rate)
            self.used += payload_len
        else:
            self._link(n, now, self.fixed_rate)

    def connected(self, now: float) -> None:
        self._link(CONNECT_BYTES, now, self.fixed_rate)

    def idle(self, now: float, connected: bool) -> None:
        """A keepalive ping (and its answer) for each keepalive without traffic."""
        if not connected:
            self.last_traffic = None
        elif self.last_traffic is None:
            self.last_traffic = now
        elif now - self.last_traffic >= self.keepalive:
            self._link(2 * _framed(MQTT_PING), now, self.fixed_rate)

    def stored(self, category: str, nbytes: int, windows: float, now: float) -> None:
        """A record the record stage stored: ``windows`` merged windows count as that
        many records of its size at full resolution."""
        self.full[category].add(nbytes * windows, now)

    # --- the pace --------------------------------------------------------------------

    def pace(self, level: int, now: float) -> float:
        """Bytes at the end of the month if the rest of it goes at ``level``."""
        since = self.since if self.since is not None else now
        hist_k, live_k, raw_on, _ = LEVELS[level]
        full = {c: r.per_s(now, since) for c, r in self.full.items()}
        cost = full["other"] + full["history"] / hist_k + full["live"] / live_k + (full["raw"] if raw_on else 0.0)
        records = self.records_rate.per_s(now, since)
        per_stored = self.payload_rate.per_s(now, since) / records if records > 0 else 1.0
        rate = self.fixed_rate.per_s(now, since) + per_stored * cost
        return self.used + rate * max(0.0, self.month_end - now)

    def step(self, now: float) -> None:
        """Every EVAL_S: one step coarser when the pace overruns HIGH x budget, one step
        finer when the finer level's pace has stayed under LOW x budget RETURN_AFTER_S."""
        if now - self.saved_at >= SAVE_S:
            self.snapshot(now)
        if not self.enabled or now - self.evaluated < EVAL_S:
            return
        self.evaluated = now
        self._roll(now)
        if now < self.month_start:
            return  # the clock is behind the month counted: no pace to judge until it is set
        if not LEVELS[self.level][2]:
            self.full["raw"].hold(now)
        if self.level > 0 and self.pace(self.level - 1, now) < LOW * self.budget:
            self.finer_since = now if self.finer_since is None else self.finer_since
        else:
            self.finer_since = None
        if self.level < len(LEVELS) - 1 and self.pace(self.level, now) > HIGH * self.budget:
            self.level += 1
        elif self.finer_since is not None and now - self.finer_since >= RETURN_AFTER_S:
            self.level -= 1
        else:
            return
        self.finer_since = None
        self.changes += 1
        self._apply()

    def _apply(self) -> None:
        hist_k, live_k, raw_on, _ = LEVELS[self.level]
        if self.coarsen is not None:
            self.coarsen(hist_k, live_k)
        if self.set_raw_enabled is not None:
            self.set_raw_enabled(raw_on)

    def status(self, now: float) -> dict[str, Any]:
        """The budget in ``status``: MB used this month, the budget, the pace, the level."""
        hist_k, live_k, raw_on, meaning = LEVELS[self.level]
        out: dict[str, Any] = {
            "budget_mb": self.budget / MB, "month": time.strftime("%Y-%m", time.gmtime(self.month_start)),
            "used_mb": self.used / MB, "payload_mb": self.payload / MB,
            "pace_mb": self.pace(self.level, now) / MB, "level": self.level, "meaning": meaning,
            "history_merged": hist_k, "live_merged": live_k, "raw_enabled": raw_on, "level_changes": self.changes,
        }
        if self.enabled and self.level == len(LEVELS) - 1 and out["pace_mb"] > out["budget_mb"]:
            out["meaning"] += "; still over: alarms, events and command results are never withheld"
        return out
