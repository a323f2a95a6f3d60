"""The record stage: the kernel's outputs become outbox records, committed in groups.

Closed windows, changes, alarms and event snapshots become wire records in their lanes
and wait in ``pending`` until a commit: every ``commit_interval``, or at once after an
alarm or a command result (``urgent``: those are never left in the group-commit window).
The stage also saves the kernel's persistent counters (trip, energy, SoH) beside the
records and restores them at start.

Every commit is an fsync of a few pages on the unit's SD card, so the stage bounds them
(README, "SD-card care"): the counters and the deletions of acknowledged rows ride along
with the commits (``Outbox.keep_state``, ``Outbox.ack_later``), written on their own
only when no records come within the interval; and once the kernel has said the vehicle
is still for PARKED_AFTER_S, records are committed every PARKED_COMMIT_S instead, and
its live windows are merged PARKED_LIVE_MERGE times more (agent/store/coalesce.py, as the
data budget merges them), until it moves again. Alarms and command results are committed at
once whatever the interval.

The raw lane (docs/raw.md): the kernel hands the raw signals' samples at every live
window's close (OUT_RAW); they gather in memory for ``[reporting] raw_block_s`` (of
sample time, or of the clock when the samples stop coming) and become one raw record
(agent/wire.py raw_record), compressed as a whole, in the raw lane, which is sent last
and dropped first. ``set_raw_enabled(False)`` switches the lane off at run time (the
data budget's last step): what is gathered goes out, later samples are counted and not
recorded, until it is switched on again.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from agent import wire
from agent.config import Config
from agent.fusion.kernel import KernelApi
from agent.fusion.spec import (
    ALARM_NAMES,
    MOTION_STILL,
    OUT_ALARM,
    OUT_CHANGE,
    OUT_RAW,
    OUT_SNAPSHOT,
    OUT_WINDOW,
    PERSISTENT,
    WIN_LIVE,
)
from agent.signals import raw_decimals
from agent.store.coalesce import Coalescer, Row
from agent.store.memory import Storage
from agent.store.outbox import LANE_ALARM, LANE_EVENT, LANE_HISTORY, LANE_LIVE, LANE_RAW

log = logging.getLogger(__name__)

# How often the kernel's counters are handed to the outbox, which writes them with its
# next commit if they changed; a power cut loses at most this much of them, plus a
# commit interval.
STATE_SAVE_S = 60.0
# Parked: still (the kernel's stationary decision) this long, a commit every
# PARKED_COMMIT_S (or commit_interval, if longer); the decision is asked every MOTION_CHECK_S.
PARKED_AFTER_S = 60.0
PARKED_COMMIT_S = 120.0
# While parked, live windows are merged this many to 1 (1 s -> 10 s): a parked vehicle's
# 1 s windows were most of what it wrote to the SD card and sent over the SIM, and a
# parked vehicle's state changes slowly; its alarms and changes still go at once.
PARKED_LIVE_MERGE = 10


def live_merge(budget_live: int, parked: bool) -> int:
    """Live windows merged into one record: the data budget's factor, times
    PARKED_LIVE_MERGE while parked."""
    return budget_live * (PARKED_LIVE_MERGE if parked else 1)
MOTION_CHECK_S = 1.0
# Alarm events a diagnostics bundle carries.
RECENT_ALARMS = 50
# Live windows and alarms kept in memory for ``ebike-agent plot --last``: the outbox
# deletes what the cloud has acknowledged, so on a connected unit it holds next to
# nothing. 10 min of 1 s windows is about 1 MB.
RECENT_S = 600.0


class Recorder:
    """Kernel outputs into ``pending`` records, and ``pending`` into the outbox."""

    def __init__(self, cfg: Config, kernel: KernelApi, outbox: Storage,
                 can_decimals: dict[int, int] | None = None) -> None:
        self.cfg = cfg
        self.kernel = kernel
        self.outbox = outbox
        self.pending: list[tuple[int, float, bytes]] = []
        self.urgent = False
        self.records = 0  # committed since the start
        self.last_commit = time.monotonic()
        self.recent_alarms: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ALARMS)
        self.recent: collections.deque[tuple[int, float, bytes]] = collections.deque()
        self.state_saved = time.monotonic()
        self.still_since: float | None = None
        self.parked = False
        self.budget_merge = (1, 1)  # (history, live) windows merged to 1 by the data budget
        # Live windows merged by parking alone in each live record being gathered: the budget
        # is told what a record stands for at its own full resolution.
        self.live_base = 1
        self.motion_checked = -MOTION_CHECK_S
        # A raw record fits a batch with room for others (the pump sends one larger alone).
        self.raw = RawLane(cfg.raw_block_s, can_decimals or {}, cfg.broker.max_batch_bytes // 2)
        # The data budget (agent/uplink/budget.py): windows merged k to 1 before they are
        # stored, what is stored reported to it, its count saved with the counters.
        self.coalescers = {LANE_LIVE: Coalescer(), LANE_HISTORY: Coalescer()}
        self.on_stored: Callable[[str, int, float, float], None] | None = None
        self.more_state: Callable[[], dict[str, float]] | None = None
        self.saved_state: dict[str, float] = {}
        self._restore_state()

    def add(self, outputs: list[Any], now: float) -> None:
        """Kernel outputs become records in their lanes."""
        changes = []
        for out in outputs:
            kind = out[0]
            if kind == OUT_WINDOW:
                _, which, start, length, rows = out
                lane = LANE_LIVE if which == WIN_LIVE else LANE_HISTORY
                merged = self.coalescers[lane].add(start, length, rows)
                if merged is not None:
                    self._window(lane, *merged)
            elif kind == OUT_CHANGE:
                changes.append(out[1:])
            elif kind == OUT_ALARM:
                self._alarm(*out[1:])
            elif kind == OUT_SNAPSHOT:
                _, t, code, inst, start, end, ids, times, values = out
                log.info("event snapshot for alarm %s: %d samples", ALARM_NAMES.get(code, "request"), len(ids))
                for body in wire.snapshot_records(t, code, inst, start, end, ids, times, values):
                    self._keep(LANE_EVENT, t, body)
            elif kind == OUT_RAW:
                self._raw(self.raw.add(*out[1:]))
        if changes:
            self._keep(LANE_LIVE, now, wire.change_record(changes))
        self._raw(self.raw.due(now))

    def _raw(self, records: list[tuple[int, float, bytes]]) -> None:
        """Raw records into ``pending``, reported to the budget as the lane it can switch off."""
        self.pending.extend(records)
        if self.on_stored is not None:
            for _, t, body in records:
                self.on_stored("raw", len(body), 1, t)

    def set_raw_enabled(self, enabled: bool) -> None:
        """Switch the raw lane off (samples gathered so far still go out) or on again."""
        if not enabled:
            self._raw(self.raw.flush())
        self.raw.enabled = enabled

    def raw_status(self) -> dict[str, Any]:
        """The raw lane for ``status``: on or off, samples recorded, gathered, overwritten
        in the ring unread, and left out while it was off."""
        lane = self.raw
        return {"enabled": lane.enabled, "block_s": lane.block_s, "recorded": lane.recorded,
                "gathered": len(lane.samples), "lost": lane.lost_total, "off_dropped": lane.off_dropped}

    def _window(self, lane: int, start: float, length: float, rows: list[Row], windows: int) -> None:
        """A window record (``windows`` kernel windows merged into it) into ``pending``;
        to the budget, parked live windows count as the records its level 0 would make."""
        body = wire.window_record(start, length, rows)
        self.pending.append((lane, start, body))
        if lane == LANE_LIVE:
            self._remember(self.pending[-1])
            windows_at_full = windows / self.live_base
        else:
            windows_at_full = windows
        if self.on_stored is not None:
            self.on_stored("live" if lane == LANE_LIVE else "history", len(body), windows_at_full, start)

    def _keep(self, lane: int, t: float, body: bytes) -> None:
        """A record the budget never merges nor withholds (alarm, event, change, result)
        into ``pending``."""
        self.pending.append((lane, t, body))
        if self.on_stored is not None:
            self.on_stored("other", len(body), 1, t)

    def coarsen(self, history: int, live: int) -> None:
        """History and live windows merged ``history`` and ``live`` to 1 from now on (the
        data budget's levels; parked, live windows are merged PARKED_LIVE_MERGE times more,
        so the budget's model of a level, full resolution / k, holds parked too); what was
        gathered at the old factor is stored at once when the factor falls."""
        self.budget_merge = (history, live)
        self._merge_factors()

    def _merge_factors(self) -> None:
        history, live = self.budget_merge
        base = live_merge(1, self.parked)
        for lane, k in ((LANE_HISTORY, history), (LANE_LIVE, live_merge(live, self.parked))):
            merged = self.coalescers[lane].set_factor(k)
            if merged is not None:
                self._window(lane, *merged)  # gathered at the old base
        self.live_base = base

    def flush(self) -> None:
        """What is gathered in memory stored now (at a stop): the windows gathered for
        merging, as one, and the raw samples, as a record."""
        for lane, coalescer in self.coalescers.items():
            merged = coalescer.flush()
            if merged is not None:
                self._window(lane, *merged)
        self._raw(self.raw.flush())

    def _alarm(self, t: float, code: int, inst: int, level: int, raised: int, value: float, thr: float) -> None:
        name = ALARM_NAMES[code]
        log.warning("alarm %s%s level %d %s: value %g, threshold %g", name,
                    f" (source {self.cfg.sources[inst].name})" if inst >= 0 else "", level,
                    "raised" if raised else "cleared", value, thr)
        self._keep(LANE_ALARM, t, wire.alarm_record(t, code, name, inst, level, bool(raised), value, thr))
        self._remember(self.pending[-1])
        self.recent_alarms.append({"t": t, "name": name, "instance": inst, "level": level,
                                   "raised": bool(raised), "value": value, "threshold": thr})
        self.urgent = True

    def _remember(self, record: tuple[int, float, bytes]) -> None:
        self.recent.append(record)
        while record[1] - self.recent[0][1] > RECENT_S:
            self.recent.popleft()

    def result(self, message: bytes, now: float) -> None:
        """A command's result message, in the alarm lane, committed this turn."""
        self._keep(LANE_ALARM, now, wire.result_record(now, message))
        self.urgent = True

    def commit(self, force: bool = False) -> None:
        """Pending records into the outbox when urgent, forced, or the interval has passed;
        without records, the outbox's held writes once they are that old."""
        mono = time.monotonic()
        interval = self.interval(mono)
        if self.pending and (force or self.urgent or mono - self.last_commit >= interval):
            self.records += len(self.outbox.append(self.pending))
            self.pending = []
            self.urgent = False
            self.last_commit = mono
            return
        held = self.outbox.held_since()
        if held is not None and (force or mono - held >= interval):
            self.outbox.flush_held()

    def interval(self, mono: float) -> float:
        """Seconds between commits now: ``commit_interval``, or while parked PARKED_COMMIT_S;
        parking and moving again change the live windows' merge factor."""
        if mono - self.motion_checked >= MOTION_CHECK_S:
            self.motion_checked = mono
            if self.kernel.motion(time.time(), self.cfg.commands.stationary_kmh)[0] != MOTION_STILL:
                self.still_since = None
            elif self.still_since is None:
                self.still_since = mono
        parked = self.still_since is not None and mono - self.still_since >= PARKED_AFTER_S
        if parked != self.parked:
            self.parked = parked
            self._merge_factors()
        usual = self.cfg.outbox.commit_interval
        return max(usual, PARKED_COMMIT_S) if parked else usual

    def save_state_when_due(self) -> None:
        """The counters to the outbox every STATE_SAVE_S: written with its next commit,
        and only if they changed (a parked vehicle's mostly do not)."""
        mono = time.monotonic()
        if mono - self.state_saved >= STATE_SAVE_S:
            self.state_saved = mono
            self.outbox.keep_state(self._state())

    def save_state(self) -> None:
        """The counters on disk now (at a stop)."""
        self.state_saved = time.monotonic()
        self.outbox.save_state(self._state())

    def _state(self) -> dict[str, float]:
        """The kernel's counters, and the data budget's count beside them."""
        state = dict(zip(PERSISTENT, self.kernel.persistent(), strict=True))
        if self.more_state is not None:
            state.update(self.more_state())
        return state

    def _restore_state(self) -> None:
        """Trip, energy counters and the measured SoH carry on across restarts."""
        saved = self.saved_state = self.outbox.load_state()
        if not saved:
            return
        try:
            self.kernel.restore([saved[name] for name in PERSISTENT])
        except (KeyError, ValueError) as e:
            log.warning("kernel state in %s not restored, counting from zero: %s", self.cfg.outbox.path, e)
            return
        log.info("kernel state restored: trip %.3f km, energy out %.1f Wh", saved["trip_km"], saved["energy_out_wh"])


class RawLane:
    """OUT_RAW outputs gathered into raw records of ``block_s`` seconds each."""

    def __init__(self, block_s: float, can_decimals: dict[int, int], max_bytes: int) -> None:
        self.block_s = block_s
        self.max_bytes = max_bytes
        self.can_decimals = can_decimals
        self.decimals: dict[int, int] = {}
        self.enabled = True
        self.samples: list[tuple[int, float, float]] = []
        self.start: float | None = None
        self.end = 0.0
        self.lost = 0
        # Since the start: samples recorded, overwritten in the ring unread, and not
        # recorded because the lane was off (status).
        self.recorded = 0
        self.lost_total = 0
        self.off_dropped = 0

    def add(self, start: float, length: float, lost: int, ids: list[int], times: list[float],
            values: list[float]) -> list[tuple[int, float, bytes]]:
        """One live window's raw samples; the records (lane, time, body) now complete."""
        self.lost_total += lost
        if not self.enabled:
            self.off_dropped += len(ids)
            return []
        if self.start is None:
            self.start = start
        self.end = start + length
        self.lost += lost
        self.samples.extend(zip(ids, times, values, strict=True))
        if self.end - self.start >= self.block_s or len(self.samples) >= wire.RAW_RECORD_SAMPLES:
            return self.flush()
        return []

    def due(self, now: float) -> list[tuple[int, float, bytes]]:
        """The records of what is gathered once ``block_s`` has passed by the clock ``now``
        since its start: a block whose samples stopped coming is not held for ever."""
        if self.start is not None and now - self.start >= self.block_s:
            return self.flush()
        return []

    def flush(self) -> list[tuple[int, float, bytes]]:
        """What is gathered as raw records of the span (none if nothing is)."""
        if self.start is None:
            return []
        for sid, _t, _v in self.samples:
            if sid not in self.decimals:
                self.decimals[sid] = raw_decimals(sid, self.can_decimals)
        if self.lost:
            log.warning("raw samples from %.3f: %d samples overwritten unread in the kernel's ring",
                        self.start, self.lost)
        out = self._records(self.start, self.samples, self.lost)
        self.samples, self.start, self.lost = [], None, 0
        return out

    def _records(self, start: float, samples: list[tuple[int, float, float]],
                 lost: int) -> list[tuple[int, float, bytes]]:
        """One record, or halves of the samples if it would exceed ``max_bytes`` (so it
        fits a batch): each half covers the same span, the first says the loss."""
        body, skipped = wire.raw_record(start, self.end, samples, self.decimals, lost)
        if len(body) > self.max_bytes and len(samples) > 1:
            half = len(samples) // 2
            return self._records(start, samples[:half], lost) + self._records(start, samples[half:], 0)
        if skipped:
            log.warning("raw record from %.3f: %d samples not finite or too large, left out", start, skipped)
        self.recorded += len(samples) - skipped
        return [(LANE_RAW, start, body)]
