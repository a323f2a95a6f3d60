"""The data budget ([uplink] budget_mb_per_month): windows merged correctly, the budget
honoured over an accelerated month, the degradation order and its way back, the count
across a restart, and the configuration refused with its key and reason.

The month runs on a fake clock through the real parts of the data path: the real
fusion kernel (the build under test), the recorder, a real SQLite outbox and the wire's
batch encoder (deflated, as by default); what a batch would cost on the link is the
budget's own estimate, counted as the uplink counts it. The end-to-end run through
the agent process, mosquitto and ``ingest`` is in tests/test_e2e_budget.py.

The raw lanes (every sample, lossless) are stood in for by a record of the speed, the
current and the voltage at 10 Hz while riding, on while the budget's hook says so.

The days' pattern, "short commuter": a ride 07:30-07:40 and 17:30-17:40 UTC (speed,
voltage, current and state of charge every second; a controller fault raised for 5 s at
07:35), parked the rest of the day with the BMS's voltage every 30 min. Windows are
30 s live and 15 min history (the default is 1 s and 1 min), and the rides short, so
a month takes seconds with the compiled kernel and a few minutes with the pure one
(it runs the fusion step at 10 Hz of simulated time).
"""

from __future__ import annotations

import calendar
import math
import random
from pathlib import Path
from typing import Any

import pytest

from agent import config, wire
from agent.cli.config_cmd import effective
from agent.errors import ConfigError
from agent.feed import make_kernel
from agent.fusion import spec as kp
from agent.signals import signal_id
from agent.store.coalesce import Coalescer, merge_rows
from agent.store.memory import Storage
from agent.store.outbox import LANE_HISTORY, LANE_LIVE
from agent.store.recorder import Recorder
from agent.uplink import budget as budget_module
from agent.uplink.budget import LEVELS, Budget, month_bounds, publish_bytes
from devtools import bench_budget
from tests.test_cli_status import assert_fits, one_line, rendered, status_reply

SPEED = signal_id("Vehicle.Speed")
VOLTAGE = signal_id("Vehicle.Powertrain.TractionBattery.CurrentVoltage")
CURRENT = signal_id("Vehicle.Powertrain.TractionBattery.CurrentCurrent")
SOC = signal_id("Vehicle.Powertrain.TractionBattery.StateOfCharge.Current")
DEVICE = "budget-bike"
TOPIC = f"ebike/v1/{DEVICE}/telemetry"
FEBRUARY = float(calendar.timegm((2026, 2, 1, 0, 0, 0)))
DAY = 86400.0
# A metered unit's keepalive: at the default 30 s, the idle link's pings alone cost
# more than this commuter's data (the budget counts them, and cannot lower them).
KEEPALIVE_S = 3600
STEP = 60.0
PARKED_SAMPLE_S = 1800.0
SEND_S = 3600.0  # a commit and the batches it makes every hour (and at each alarm)
RIDES = ((7.5 * 3600.0, 7.5 * 3600.0 + 600.0), (17.5 * 3600.0, 17.5 * 3600.0 + 600.0))
FAULT_AT = 7.5 * 3600.0 + 300.0


def agent_config(tmp: Path, budget_mb: float) -> config.Config:
    return config.parse(str(tmp / "agent.toml"), {
        "device_id": DEVICE,
        "sources": [{"name": "gnss", "kind": "uart", "port": "/dev/null", "protocol": "nmea"}],
        "outbox": {"path": "outbox.sqlite"},
        "broker": {"keepalive": KEEPALIVE_S},
        "windows": {"live": 30.0, "history": 900.0},
        "uplink": {"budget_mb_per_month": budget_mb},
    })


class Month:
    """Kernel, recorder, outbox and budget on a fake clock; a "link" that sends every
    batch at once and counts what it costs. ``raw`` records the raw-lane hook's calls."""

    def __init__(self, tmp: Path, budget_mb: float, now: float) -> None:
        self.cfg = agent_config(tmp, budget_mb)
        self.kernel = make_kernel(self.cfg, None)
        self.outbox = Storage(self.cfg.outbox.path, 1 << 40)
        self.recorder = Recorder(self.cfg, self.kernel, self.outbox)
        self.raw: list[bool] = []  # the raw lanes' hook, called by the budget
        self.coarsened: list[tuple[int, int]] = []
        self.budget = Budget(budget_mb, self.cfg.broker.keepalive, True, len(TOPIC), coarsen=self._coarsen,
                             set_raw_enabled=self.raw.append)
        self.recorder.on_stored = self.budget.stored
        self.recorder.more_state = self.budget.state
        self.budget.start(self.recorder.saved_state, now)
        self.levels = [self.budget.level]
        self.changes = [(now, self.budget.level)]  # (time, level) at each change
        self.alarms_raised = 0
        self.alarms_received = 0
        self.window_lengths: dict[int, set[int]] = {LANE_LIVE: set(), LANE_HISTORY: set()}
        self.rng = random.Random(7)

    def _coarsen(self, history: int, live: int) -> None:
        self.coarsened.append((history, live))
        self.recorder.coarsen(history, live)

    def run(self, start: float, end: float, rides: tuple[tuple[float, float], ...] = RIDES) -> None:
        t = start
        while t < end:
            in_day = t % DAY
            riding = any(a <= in_day < b for a, b in rides)
            t += STEP
            if riding or t % PARKED_SAMPLE_S == 0:  # parked, the kernel has nothing to do between samples
                out = self._feed(t - STEP, riding, fault=riding and in_day <= FAULT_AT < in_day + STEP)
                if riding and self.raw[-1]:
                    self._raw(t - STEP)
                self.recorder.add(out + self.kernel.close_due(t), t)
            if t % SEND_S == 0 or self.recorder.urgent:
                self.recorder.commit(force=True)
                self._send(t)
            self.budget.idle(t, True)
            self.budget.step(t)
            if self.budget.level != self.levels[-1]:
                self.levels.append(self.budget.level)
                self.changes.append((t, self.budget.level))

    def _feed(self, t: float, riding: bool, fault: bool) -> list[Any]:
        ids: list[int] = []
        times: list[float] = []
        values: list[float] = []
        if riding:
            for i in range(int(STEP)):
                ts = t + i
                speed = round(16.0 + 6.0 * math.sin(ts / 60.0) + self.rng.random(), 1)
                row = ((SPEED, speed), (VOLTAGE, round(40.0 - ts % 3600 / 3600.0, 2)),
                       (CURRENT, round(8.0 + self.rng.random() * 4, 2)), (SOC, 70.0),
                       (kp.S_FAULT, 1.0 if fault and i < 5 else 0.0))
                for sid, v in row:
                    ids.append(sid)
                    times.append(ts)
                    values.append(v)
        else:
            ids, times, values = [VOLTAGE], [t], [41.0]
        out = list(self.kernel.feed_values(ids, times, values))
        self.alarms_raised += sum(1 for o in out if o[0] == kp.OUT_ALARM and o[5])
        return out

    def _raw(self, t: float) -> None:
        """The stand-in for a raw lane: every sample of the step at 10 Hz, at its own
        time, as one record (a change record here), reported to the budget as raw."""
        samples = [(sid, t + i / 10.0, round(base + self.rng.random(), 2)) for i in range(int(STEP * 10))
                   for sid, base in ((SPEED, 16.0), (CURRENT, 8.0), (VOLTAGE, 39.0))]
        body = wire.change_record(samples)
        self.recorder.pending.append((LANE_LIVE, t, body))
        self.budget.stored("raw", len(body), 1, t)

    def _send(self, now: float) -> None:
        while True:
            batch = self.outbox.lease(200, 262144 - wire.batch_overhead(DEVICE), overhead=wire.RECORD_OVERHEAD)
            if not batch:
                return
            payload = wire.encode_batch(DEVICE, batch, deflate=True)
            self.budget.published(len(TOPIC), len(payload), now, sum(len(b) for _, b in batch))
            for _seq, rec in wire.decode_batch(payload)[1]:
                if rec["k"] == wire.KIND_ALARM and rec["on"]:
                    self.alarms_received += 1
                if rec["k"] == wire.KIND_WINDOW:
                    lane = LANE_LIVE if rec["d"] < 900_000 else LANE_HISTORY
                    self.window_lengths[lane].add(rec["d"])
            self.outbox.ack([seq for seq, _ in batch])

    def close(self, now: float) -> None:
        self.recorder.flush()
        self.recorder.commit(force=True)
        self.budget.snapshot(now)
        self.recorder.save_state()
        self.outbox.close()


def days(n: int) -> float:
    return FEBRUARY + n * DAY


# The last step of the run ends at the last minute of February (a step ending at
# midnight would count into March).
MONTH_END = days(28) - STEP


@pytest.fixture(scope="module")
def unbudgeted(tmp_path_factory: pytest.TempPathFactory) -> float:
    """MB the commuter's February costs at full resolution (no budget): its 28 days are
    alike, so 28 times the first."""
    month = Month(tmp_path_factory.mktemp("free"), 0.0, FEBRUARY)
    month.run(FEBRUARY, days(1))
    assert month.levels == [0] and month.coarsened == [(1, 1)]
    return 28 * month.budget.used / 1e6


def test_merge_rows_merges_count_min_max_mean_and_last() -> None:
    a = [(1, 2, 1.0, 3.0, 2.0, 3.0, 10.5), (2, 1, 5.0, 5.0, 5.0, 5.0, 10.2)]
    b = [(1, 3, 0.5, 2.5, 1.5, 0.5, 11.9)]
    c = [(2, 2, 4.0, 9.0, 6.5, 9.0, 12.0), (1, 1, 4.0, 4.0, 4.0, 4.0, 12.1)]
    merged = {row[0]: row for row in merge_rows([a, b, c])}
    assert merged[1] == (1, 6, 0.5, 4.0, (2 * 2.0 + 3 * 1.5 + 4.0) / 6, 4.0, 12.1)
    assert merged[2] == (2, 3, 4.0, 9.0, (5.0 + 2 * 6.5) / 3, 9.0, 12.0)


def test_a_coalescer_merges_k_windows_and_gives_back_what_it_gathered_when_k_falls() -> None:
    co = Coalescer()
    assert co.add(0.0, 1.0, [(1, 1, 2.0, 2.0, 2.0, 2.0, 0.5)]) == (0.0, 1.0, [(1, 1, 2.0, 2.0, 2.0, 2.0, 0.5)], 1)
    co.set_factor(3)
    assert co.add(1.0, 1.0, [(1, 1, 2.0, 2.0, 2.0, 2.0, 1.5)]) is None
    assert co.add(2.0, 1.0, [(1, 1, 4.0, 4.0, 4.0, 4.0, 2.5)]) is None
    assert co.add(3.0, 1.0, [(1, 2, 0.0, 6.0, 3.0, 6.0, 3.9)]) == (1.0, 3.0, [(1, 4, 0.0, 6.0, 3.0, 6.0, 3.9)], 3)
    assert co.add(4.0, 1.0, [(1, 1, 1.0, 1.0, 1.0, 1.0, 4.5)]) is None
    assert co.set_factor(1) == (4.0, 1.0, [(1, 1, 1.0, 1.0, 1.0, 1.0, 4.5)], 1)


def test_a_merged_window_is_an_ordinary_window_record_on_the_wire() -> None:
    """``ingest`` needs nothing new: the merged record decodes as any window, its
    length the span of its parts, its aggregates exact."""
    parts = [[(SPEED, 10, round(12.3 + i, 1), round(20.1 + i, 1), 15.0 + i, round(18.4 + i, 1), 1.0 + i)]
             for i in range(10)]
    start, length, rows, n = merge_rows_window(parts)
    body = wire.window_record(start, length, rows)
    _, records = wire.decode_batch(wire.encode_batch(DEVICE, [(1, body)], deflate=True))
    rec = records[0][1]
    assert (rec["t"], rec["d"], n) == (100_000, 10_000, 10)
    sid, count, vmin, vmax, mean, last = wire.window_values(rec["s"][0])
    assert (sid, count, vmin, vmax, last) == (SPEED, 100, 12.3, 29.1, 27.4)
    assert mean == pytest.approx(19.5, rel=1e-12)


def merge_rows_window(parts: list[list[Any]]) -> tuple[float, float, list[Any], int]:
    co = Coalescer()
    co.set_factor(len(parts))
    got = None
    for i, rows in enumerate(parts):
        got = co.add(100.0 + i, 1.0, rows)
    assert got is not None
    return got


def test_the_overhead_estimate_grows_with_the_payload() -> None:
    small, big = publish_bytes(len(TOPIC), 100), publish_bytes(len(TOPIC), 100_000)
    assert small > 100 + len(TOPIC) + budget_module.TLS_RECORD_OVERHEAD + budget_module.TCP_IP_HEADERS
    segments = math.ceil(100_000 / budget_module.TCP_MSS)
    assert big > 100_000 + segments * budget_module.TCP_IP_HEADERS


def test_the_month_is_the_utc_calendar_month() -> None:
    key, start, end = month_bounds(days(27) + 3600.0)
    assert (start, end - start) == (FEBRUARY, 28 * DAY)
    assert month_bounds(end)[0] == key + 1 and month_bounds(end - 0.001)[0] == key


@pytest.fixture(scope="module")
def halved(tmp_path_factory: pytest.TempPathFactory, unbudgeted: float) -> Month:
    """The commuter's February with half its full-resolution cost as budget."""
    month = Month(tmp_path_factory.mktemp("halved"), unbudgeted / 2, FEBRUARY)
    month.run(FEBRUARY, MONTH_END)
    return month


def test_the_budget_is_honoured_within_5_percent_and_every_alarm_arrives(halved: Month) -> None:
    """The agent degrades, ends the month within 5 % of the budget, and every alarm
    raised reaches the link."""
    used, budget_mb = halved.budget.used / 1e6, halved.budget.budget / 1e6
    assert used <= 1.05 * budget_mb, f"{used:.3f} MB sent of a {budget_mb:.3f} MB budget"
    assert used >= 0.5 * budget_mb, "degraded far more than the budget asked"
    assert max(halved.levels) == 3 and halved.window_lengths[LANE_LIVE] >= {30_000, 300_000}
    assert halved.alarms_raised == 28 and halved.alarms_received == 28


def test_the_level_returns_to_finer_only_after_a_day_within_the_band(halved: Month) -> None:
    """Hysteresis: a step back to finer resolution comes at least RETURN_AFTER_S after
    the level was last changed (the pace of the finer level under LOW all that time),
    so the daily swing of a commuter's rate does not move the level every ride."""
    finer = [(t, level) for (t, level), (_, before) in zip(halved.changes[1:], halved.changes, strict=False)
             if level < before]
    assert finer, "never went back to a finer level"
    for (t, level), (t_before, _) in zip(halved.changes[1:], halved.changes, strict=False):
        if (t, level) in finer:
            assert t - t_before >= budget_module.RETURN_AFTER_S
    assert len(halved.changes) - 1 <= 28


def test_levels_go_one_step_at_a_time_in_order_and_back_to_full_resolution(tmp_path: Path,
                                                                           unbudgeted: float) -> None:
    """Put in service on 18 February, ridden an hour a day for three days, then only
    parked: the levels climb one at a time (history first, then live, then raw lanes
    off) and come back down to full resolution once the pace allows; the raw lanes'
    hook follows level 3."""
    month = Month(tmp_path, unbudgeted / 5, days(17))
    month.run(days(17), days(20), rides=((6 * 3600.0, 6.5 * 3600.0), (16 * 3600.0, 16.5 * 3600.0)))
    month.run(days(20), MONTH_END, rides=())
    assert month.levels[:4] == [0, 1, 2, 3] and month.levels[-4:] == [3, 2, 1, 0], month.levels
    assert all(abs(a - b) == 1 for a, b in zip(month.levels, month.levels[1:], strict=False))
    assert month.coarsened == [LEVELS[level][:2] for level in month.levels]
    assert month.raw == [LEVELS[level][2] for level in month.levels] and month.raw[3] is False
    assert month.budget.used / 1e6 <= 1.05 * unbudgeted / 5


def test_the_count_and_the_level_survive_a_restart(tmp_path: Path, unbudgeted: float) -> None:
    first = Month(tmp_path, unbudgeted / 4, FEBRUARY)
    first.run(FEBRUARY, days(5))
    used, level = first.budget.used, first.budget.level
    assert level > 0
    first.close(days(5))
    again = Month(tmp_path, unbudgeted / 4, days(5))
    assert again.budget.used == used and again.budget.level == level
    assert again.coarsened[-1] == LEVELS[level][:2]
    again.run(days(5), days(6))
    assert again.budget.used > used
    again.close(days(6))
    march = Month(tmp_path, unbudgeted / 4, days(28) + 60.0)
    assert march.budget.used == 0.0 and march.budget.status(days(28) + 60.0)["month"] == "2026-03"


def test_no_budget_counts_but_never_degrades(tmp_path: Path) -> None:
    month = Month(tmp_path, 0.0, FEBRUARY)
    month.run(FEBRUARY, FEBRUARY + DAY)
    st = month.budget.status(FEBRUARY + DAY)
    assert st["used_mb"] > 0 and st["level"] == 0 and st["budget_mb"] == 0 and month.levels == [0]


@pytest.mark.parametrize(("value", "reason"), [
    (-1.0, "must be >= 0"),
    ("20 MB", "must be float, not str"),
    (True, "must be float, not bool"),
])
def test_a_bad_budget_is_refused_with_file_key_and_reason(tmp_path: Path, value: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        agent_config(tmp_path, value)
    assert (e.value.path, e.value.key, e.value.reason) == (str(tmp_path / "agent.toml"),
                                                            "uplink.budget_mb_per_month", reason)


def test_an_unknown_uplink_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(str(tmp_path / "agent.toml"), {"device_id": DEVICE, "uplink": {"budget": 5},
                                                    "sources": [{"name": "g", "kind": "uart", "port": "/dev/null",
                                                                 "protocol": "nmea"}]})
    assert e.value.key == "uplink.budget" and e.value.reason.startswith("unknown key")


def test_the_budget_defaults_to_none(tmp_path: Path) -> None:
    cfg = config.parse(str(tmp_path / "agent.toml"), {"device_id": DEVICE, "sources": [
        {"name": "g", "kind": "uart", "port": "/dev/null", "protocol": "nmea"}]})
    assert cfg.uplink.budget_mb_per_month == 0.0


def test_the_bench_figure_comes_from_the_agents_output() -> None:
    """devtools/bench_budget.py on short rides: a figure, each level costing no more than
    the one before, payload under the link's bytes."""
    fig = bench_budget.measure(riding_s=60.0, parked_s=300.0)
    months = [lv["mb_per_month"] for lv in fig["levels"]]
    assert fig["mb_per_month_typical"] == months[0] > 0
    # Level 2 merges the riding hours' live windows too (parked ones are merged at level 0).
    assert all(a >= b for a, b in zip(months, months[1:], strict=False)) and months[2] < months[0]
    assert all(0 < lv["payload_mb_per_month"] < lv["mb_per_month"] for lv in fig["levels"])


def test_status_shows_the_month_the_pace_and_the_level() -> None:
    st = status_reply()
    st["budget"] = {"budget_mb": 5.0, "month": "2026-02", "used_mb": 4.21, "payload_mb": 3.02, "pace_mb": 6.34,
                    "level": 2, "meaning": LEVELS[2][3], "history_merged": 10, "live_merged": 10,
                    "raw_enabled": True, "level_changes": 2}
    text = rendered(st)
    assert_fits(text)
    flat = one_line(text)
    assert "DATA BUDGET" in flat and "4.2 MB sent in 2026-02 (payload 3.0 MB) of 5.0 MB" in flat
    assert "pace 6.3 MB at month end" in flat and f"level 2: {LEVELS[2][3]}" in flat
    st["budget"].update(budget_mb=0.0, level=0, meaning=LEVELS[0][3])
    assert "no budget set" in one_line(rendered(st))


def test_a_clock_behind_the_month_counted_keeps_its_count(tmp_path: Path) -> None:
    """A unit without a real-time clock boots in 1970 until NTP sets the time: the
    month's count restored is kept (counted on), and the level is not judged meanwhile."""
    budget = Budget(1.0, 30, True, len(TOPIC))
    budget.start({"budget.month": float(month_bounds(days(10))[0]), "budget.used": 5e5, "budget.level": 2.0},
                 days(10))
    booted = 3600.0
    budget.start(budget.state() | {"budget.used": 5e5}, booted)
    budget.published(len(TOPIC), 1000, booted, 5000)
    budget.stored("live", 10**9, 1, booted)
    budget.step(booted)
    assert budget.used > 5e5 and budget.level == 2 and budget.status(booted)["month"] == "2026-02"
    budget.step(days(11))
    assert budget.month == month_bounds(days(11))[0] and budget.used > 5e5


def test_config_show_has_the_budget(tmp_path: Path) -> None:
    assert effective(agent_config(tmp_path, 5.0))["uplink"] == {"budget_mb_per_month": 5.0}
