"""The fusion step of the kernel, both builds: derived signals against the simulator's
truth, alarms (level, debounce, hysteresis) against its injected faults, event capture,
reporting policy and source health; the builds against each other on recorded rides;
and the pure kernel under the MicroPython unix port.

Rides are simulated in process and in sim time (devtools/ride.py): the simulator's
frames reach the kernel through the agent's real decoders, so a 30-minute commute takes
seconds. The end-to-end path through ptys, the agent process and MQTT is in
tests/test_e2e_fusion.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.fusion import spec as kp
from agent.fusion.kernel import KERNELS
from agent.signals import BY_ID, ID_SPACE, signal_id
from devtools import ride
from firmware_sim.scenario import scenario_names
from tests.conftest import BUILD_REQUIRED, assert_same_outputs
from tests.helpers import REPO, micropython_binary

ALARM_ROWS = {row[1]: row for row in kp.ALARMS}
SPEED = signal_id("Vehicle.Speed")
GNSS_SPEED = signal_id("Vehicle.LEV.GNSS.Speed")
VOLTAGE = signal_id("Vehicle.Powertrain.TractionBattery.CurrentVoltage")
CURRENT = signal_id("Vehicle.Powertrain.TractionBattery.CurrentCurrent")
BMS_SOC = signal_id("Vehicle.Powertrain.TractionBattery.StateOfCharge.Current")
FIX = signal_id("Vehicle.LEV.GNSS.FixQuality")
LAT = signal_id("Vehicle.CurrentLocation.Latitude")
LON = signal_id("Vehicle.CurrentLocation.Longitude")


@functools.cache
def recording(scenario: str, duration: float, seed: int = 1, fault_at: float | None = None,
              kt: bool = False, values: bool = False) -> ride.Recorder:
    return ride.record(scenario, duration, seed, fault_at, kt, keep_values=values)


def run(kernel_cls: Any, calls: list[ride.Call]) -> tuple[Any, list[Any]]:
    k, slots = ride.new_kernel(kernel_cls)
    return k, ride.replay(k, slots, calls)


def alarms_of(out: list[Any]) -> list[tuple[float, str, int, int, bool, float]]:
    """(time, name, instance, level, raised, value) of each alarm event."""
    return [(o[1], kp.ALARM_NAMES[o[2]], o[3], o[4], bool(o[5]), o[6]) for o in out if o[0] == kp.OUT_ALARM]


def per_second(out: list[Any], sid: int) -> dict[int, float]:
    """The last value of ``sid`` in each closed live window, by the window's start second."""
    got = {}
    for o in out:
        if o[0] == kp.OUT_WINDOW and o[1] == kp.WIN_LIVE:
            for row in o[4]:
                if row[0] == sid:
                    got[int(round(o[2]))] = row[5]
    return got


def test_fusion_ids_are_the_catalogue_ids() -> None:
    expected = {
        "S_SPEED": "Vehicle.Speed", "S_ODOMETER": "Vehicle.TraveledDistance",
        "S_LAT": "Vehicle.CurrentLocation.Latitude", "S_LON": "Vehicle.CurrentLocation.Longitude",
        "S_HEADING": "Vehicle.CurrentLocation.Heading", "S_GNSS_SPEED": "Vehicle.LEV.GNSS.Speed",
        "S_FIX": "Vehicle.LEV.GNSS.FixQuality", "S_HDOP": "Vehicle.LEV.GNSS.HDOP",
        "S_PACK_V": "Vehicle.Powertrain.TractionBattery.CurrentVoltage",
        "S_PACK_I": "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
        "S_POWER": "Vehicle.Powertrain.TractionBattery.CurrentPower",
        "S_SOC": "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
        "S_SOH": "Vehicle.Powertrain.TractionBattery.StateOfHealth",
        "S_CELL_MIN": "Vehicle.Powertrain.TractionBattery.CellVoltage.Min",
        "S_CELL_MAX": "Vehicle.Powertrain.TractionBattery.CellVoltage.Max",
        "S_TEMP_MIN": "Vehicle.Powertrain.TractionBattery.Temperature.Min",
        "S_TEMP_MAX": "Vehicle.Powertrain.TractionBattery.Temperature.Max",
        "S_FULL_AH": "Vehicle.LEV.Battery.FullCapacity", "S_PROTECTION": "Vehicle.LEV.Battery.ProtectionFlags",
        "S_MOTOR_TEMP": "Vehicle.Powertrain.ElectricMotor.Temperature",
        "S_CTRL_TEMP": "Vehicle.LEV.Controller.Temperature", "S_FAULT": "Vehicle.LEV.Controller.FaultCode",
        "S_MOTOR_I": "Vehicle.LEV.Controller.MotorCurrent", "S_CADENCE": "Vehicle.LEV.Pedal.Cadence",
        "S_FUSED_SPEED": "Vehicle.LEV.Fused.Speed", "S_FUSED_LAT": "Vehicle.LEV.Fused.Latitude",
        "S_FUSED_LON": "Vehicle.LEV.Fused.Longitude", "S_POS_ESTIMATED": "Vehicle.LEV.Fused.PositionEstimated",
        "S_FUSED_ODOMETER": "Vehicle.LEV.Fused.Odometer", "S_FUSED_TRIP": "Vehicle.LEV.Fused.TripDistance",
        "S_ENERGY_OUT": "Vehicle.LEV.Energy.Out", "S_ENERGY_REGEN": "Vehicle.LEV.Energy.Regenerated",
        "S_ENERGY_CHARGED": "Vehicle.LEV.Energy.Charged", "S_CONSUMPTION": "Vehicle.LEV.Energy.Consumption",
        "S_FUSED_RANGE": "Vehicle.LEV.Fused.Range", "S_FUSED_SOC": "Vehicle.LEV.Fused.StateOfCharge",
        "S_FUSED_SOH": "Vehicle.LEV.Fused.StateOfHealth",
        "S_CELL_SPREAD": "Vehicle.LEV.Battery.CellVoltage.Spread",
        "S_TEMP_SPREAD": "Vehicle.LEV.Battery.Temperature.Spread",
        "S_TEMP_RISE": "Vehicle.LEV.Battery.Temperature.RiseRate", "S_LOCKED": "Vehicle.LEV.Locked",
        "S_CELL0": "Vehicle.LEV.Battery.CellVoltage.1", "S_TEMP0": "Vehicle.LEV.Battery.Temperature.1",
    }
    declared = {name for name in dir(kp) if name.startswith("S_")}
    assert declared == set(expected)
    for const, name in expected.items():
        assert BY_ID[getattr(kp, const)].name == name, const
    assert kp.FUSION_ID_SPACE <= ID_SPACE


def test_thirty_minute_commute_raises_nothing_and_tracks_the_truth(kernel_cls: Any) -> None:
    rec = recording("commute", 1800.0, kt=True)
    k, out = run(kernel_cls, rec.calls)
    assert alarms_of(out) == []
    truth = {int(round(s["t"])): s for s in rec.truth}
    soc = per_second(out, kp.S_FUSED_SOC)
    errors = [abs(v - truth[t + 1]["soc"]) for t, v in soc.items() if t + 1 in truth]
    assert len(errors) > 1700 and max(errors) < 3.0
    speed = per_second(out, kp.S_FUSED_SPEED)
    speed_err = [abs(v - truth[t + 1]["speed_kmh"]) for t, v in speed.items() if t + 1 in truth]
    assert sum(speed_err) / len(speed_err) < 1.0
    state = {s[0]: s[1] for s in k.state(1800.0)}
    last = rec.truth[-1]
    assert state[kp.S_FUSED_TRIP] == pytest.approx(last["trip_km"], rel=0.01)
    assert state[kp.S_FUSED_RANGE] == pytest.approx(last["range_km"], rel=0.10)
    assert state[kp.S_FUSED_SOH] == pytest.approx(last["soh"], abs=1.0)
    # Wh/km over the same distance-weighted window the kernel uses, from the true power.
    wh = km = 0.0
    for a, b in zip(rec.truth, rec.truth[1:], strict=False):
        dd = b["trip_km"] - a["trip_km"]
        decay = math.exp(-dd / kp.PARAMS[kp.P_CONSUMPTION_KM][1])
        wh = wh * decay - b["pack_v"] * b["pack_i"] / 3600.0
        km = km * decay + dd
    assert state[kp.S_CONSUMPTION] == pytest.approx(wh / km, rel=0.10)
    assert state[kp.S_ENERGY_OUT] == pytest.approx(sum(-s["pack_v"] * s["pack_i"] for s in rec.truth) / 3600.0,
                                                   rel=0.05)


def _onset(series: list[tuple[float, float]], threshold: float, hold: float) -> tuple[float, float]:
    """(start, end) of the first stretch the series stays above ``threshold`` for ``hold``
    seconds: the alarm may be raised from ``start`` and must be by ``end`` + 2 s."""
    start = None
    for t, v in series:
        if v > threshold:
            start = t if start is None else start
            if t - start >= hold:
                return start, t
        else:
            start = None
    raise AssertionError("the series never stays above the threshold")


def _spread(rec: ride.Recorder) -> list[tuple[float, float]]:
    cells: dict[float, list[float]] = {}
    for name, points in rec.values.items():
        if name.startswith("Vehicle.LEV.Battery.CellVoltage."):
            for t, v in points:
                cells.setdefault(t, []).append(v)
    return sorted((t, max(vs) - min(vs)) for t, vs in cells.items())


# scenario, the alarms it may raise, the one checked, its level, where its condition
# starts ("fault <what>" or a signal series with its threshold), the fault that ends it.
FAULTS = [
    ("overheat", {"controller_temperature", "motor_temperature"}, "controller_temperature", 2,
     "Vehicle.LEV.Controller.Temperature", None),
    ("overheat", {"controller_temperature", "motor_temperature"}, "motor_temperature", 2,
     "Vehicle.Powertrain.ElectricMotor.Temperature", None),
    ("thermal-runaway", {"temperature_rise", "temperature_difference", "battery_high_temperature"},
     "temperature_rise", 3, "fault thermal-runaway", None),
    ("cell-imbalance", {"poor_cell_consistency"}, "poor_cell_consistency", 2, "cell spread", None),
    ("overspeed", {"over_speed"}, "over_speed", 1, "Vehicle.Speed", None),
    ("bms-fault", {"bms_protection"}, "bms_protection", 2, "fault bms-protection", "bms-recovered"),
    ("controller-fault", {"controller_fault"}, "controller_fault", 2, "fault controller-fault",
     "controller-recovered"),
    ("gnss-outage", {"gnss_lost"}, "gnss_lost", 1, "fault gnss-lost", "gnss-restored"),
    ("theft", {"theft"}, "theft", 3, "fault moved", None),
]


@pytest.mark.parametrize(("scenario", "allowed", "name", "level", "onset", "end"), FAULTS,
                         ids=[f"{f[0]}-{f[2]}" for f in FAULTS])
def test_each_fault_raises_its_alarm_in_time_and_clears_when_it_ends(
        kernel_cls: Any, scenario: str, allowed: set[str], name: str, level: int, onset: str,
        end: str | None) -> None:
    rec = recording(scenario, 200.0, kt=True, values=True)
    _, out = run(kernel_cls, rec.calls)
    events = alarms_of(out)
    assert {e[1] for e in events} == allowed
    _, _, _, _, direction, threshold, _, delay, clear_delay, _, _ = ALARM_ROWS[name]
    faults = {f["what"]: f["t"] for f in rec.faults}
    if onset.startswith("fault "):
        start = faults[onset[6:]]
        due = start + delay
    else:
        series = _spread(rec) if onset == "cell spread" else rec.values[onset]
        start, due = _onset(series, threshold, delay)
    raised = [e for e in events if e[1] == name and e[4]]
    assert raised, f"{name} never raised"
    t, _, instance, got_level, _, value = raised[0]
    assert (got_level, instance) == (level, -1)
    assert start <= t <= due + 2.0, (start, t, due)
    assert value > threshold if direction == kp.ABOVE else value < threshold
    if end is not None:
        cleared = [e for e in events if e[1] == name and not e[4]]
        assert len(raised) == len(cleared) == 1
        assert faults[end] <= cleared[0][0] <= faults[end] + clear_delay + 2.0


def test_communication_lost_per_source_when_a_bus_goes_quiet(kernel_cls: Any) -> None:
    """CAN unplugged from 80 s to 120 s: the source is lost once every message it sent has
    missed 10 of its periods (the slowest, 1 Hz, decides), and found again at once."""
    rec = recording("commute", 200.0)
    calls = [c for c in rec.calls if not (c[0] == "can" and 80.0 <= c[1] < 120.0)]
    k, out = run(kernel_cls, calls)
    events = [e for e in alarms_of(out) if e[1] == "communication_lost"]
    assert [(e[2], e[3], e[4]) for e in events] == [(0, 2, True), (0, 2, False)]
    assert 80.0 <= events[0][0] <= 80.0 + 10 * 1.0 + 2.0
    assert 120.0 <= events[1][0] <= 120.0 + ALARM_ROWS["communication_lost"][8] + 2.0
    health = {h[0]: h for h in k.health(200.0)}
    assert all(h[4] >= 1 for h in health.values() if h[1] == 0)  # every CAN message timed out once
    assert abs(health[0][3] - 0.02) < 0.005  # 31/00 learned at 50 Hz
    assert not any(h[5] for h in health.values() if h[2] > 100)


def _straight_stretch(truth: list[dict[str, Any]], length: int) -> int:
    for t0 in range(20, len(truth) - length):
        heads = [truth[t]["heading"] for t in range(t0, t0 + length)]
        if max(abs((h - heads[0] + 180) % 360 - 180) for h in heads) < 2.0:
            return t0
    raise AssertionError("no straight stretch")


def test_dead_reckoning_keeps_the_position_through_a_gnss_outage(kernel_cls: Any) -> None:
    """GNSS lost for 60 s on a straight road: the position carries on from wheel speed and
    the last course, flagged as estimated, within 50 m of the truth. (No heading sensor:
    a turn during an outage cannot be followed.)"""
    # Straight for 10 s before the outage too: the last course over ground must be this road's.
    t0 = _straight_stretch(recording("commute", 400.0).truth, 75) + 10
    rec = recording("gnss-outage", 400.0, fault_at=float(t0))
    assert rec.faults[0]["t"] == t0 and rec.faults[1]["t"] - t0 >= 60.0
    _, out = run(kernel_cls, rec.calls)
    lat, lon = per_second(out, kp.S_FUSED_LAT), per_second(out, kp.S_FUSED_LON)
    est = per_second(out, kp.S_POS_ESTIMATED)
    truth = {int(round(s["t"])): s for s in rec.truth}
    m_per_deg_lon = 111320.0 * math.cos(math.radians(truth[t0]["lat"]))
    for t in range(t0 + 3, t0 + 60):
        tr = truth[t + 1]
        error = math.hypot((lat[t] - tr["lat"]) * 111320.0, (lon[t] - tr["lon"]) * m_per_deg_lon)
        assert error < 50.0, (t, error)
        assert est[t] == 1.0
    assert est[t0 - 2] == 0.0


def test_event_snapshot_spans_before_and_after_the_alarm(kernel_cls: Any) -> None:
    rec = recording("overheat", 200.0, kt=True, values=True)
    _, out = run(kernel_cls, rec.calls)
    raised = [o for o in out if o[0] == kp.OUT_ALARM and o[5]]
    snaps = [o for o in out if o[0] == kp.OUT_SNAPSHOT]
    assert len(snaps) == 2 and [s[1:4] for s in snaps] == [(r[1], r[2], r[3]) for r in raised]
    for snap in snaps:
        _, t, _, _, lo, hi, ids, times, values = snap
        assert (lo, hi) == (t - 10.0, t + 5.0)
        assert len(ids) == len(times) == len(values) > 5000
        assert lo <= min(times) < lo + 0.1 and hi - 0.1 < max(times) <= hi
        assert {SPEED, kp.S_CTRL_TEMP, kp.S_FUSED_SPEED, kp.S_FUSED_LAT} <= set(ids)
        # Every controller temperature the simulator sent in the span is in the snapshot.
        sent = [v for ts, v in rec.values["Vehicle.LEV.Controller.Temperature"] if lo <= ts <= hi]
        kept = [v for i, v in zip(ids, values, strict=True) if i == kp.S_CTRL_TEMP]
        assert len(kept) >= len(sent) - 1 and len(sent) > 40
    positions = [i for i, o in enumerate(out) if o[0] == kp.OUT_SNAPSHOT]
    window_after = [o for o in out[:positions[0]] if o[0] == kp.OUT_WINDOW and o[2] + o[3] >= snaps[0][5] - 1.0]
    assert window_after, "the snapshot is handed over once its after-part has passed"


def test_a_ring_too_small_for_the_load_gives_a_counted_truncated_snapshot(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0, 60.0, 1024)
    out = []
    for i in range(4000):
        t = 100.0 + i * 0.01
        out += k.feed_values([VOLTAGE, kp.S_FAULT], [t, t], [40.0, 33.0 if t >= 130.0 else 0.0])
    snaps = [o for o in out if o[0] == kp.OUT_SNAPSHOT]
    assert len(snaps) == 1 and k.counters()["snapshots_truncated"] == 1
    _, t, _, _, lo, hi, ids, times, _ = snaps[0]
    assert min(times) > lo + 1.0 and len(ids) <= 1024


def test_snapshot_on_request_holds_the_last_seconds(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    for i in range(300):
        k.feed_values([VOLTAGE], [100.0 + i * 0.1], [36.0 + i * 0.01])  # no alarm, no capture of its own
    out = k.snapshot(129.9)
    assert out[:6] == (kp.OUT_SNAPSHOT, 129.9, 0, -1, 129.9 - 10.0, 129.9)
    ids, times, values = out[6:]
    assert set(ids) == {VOLTAGE} and len(times) == 101 and values[-1] == 36.0 + 299 * 0.01  # both ends in
    assert min(times) >= 119.9 - 1e-9 and max(times) == 129.9
    assert k.counters()["snapshots"] == 1


def test_reporting_on_change_beyond_a_deadband(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.set_policy(VOLTAGE, kp.REPORT_CHANGE, 0.5)
    out = []
    for i, v in enumerate((40.0, 40.2, 40.6, 40.7, 41.3, 40.9, 40.75)):
        out += k.feed_values([VOLTAGE, SPEED], [10.0 + i, 10.0 + i], [v, 5.0])
    out += k.flush()
    assert [(o[1], o[2], o[3]) for o in out if o[0] == kp.OUT_CHANGE] == [
        (VOLTAGE, 10.0, 40.0), (VOLTAGE, 12.0, 40.6), (VOLTAGE, 14.0, 41.3), (VOLTAGE, 16.0, 40.75)]
    live = [o for o in out if o[0] == kp.OUT_WINDOW and o[1] == kp.WIN_LIVE]
    assert len(live) == 7 and all(VOLTAGE not in {r[0] for r in o[4]} for o in live)
    history = [o for o in out if o[0] == kp.OUT_WINDOW and o[1] == kp.WIN_HISTORY]
    assert [r[1] for o in history for r in o[4] if r[0] == VOLTAGE] == [7]
    k.set_policy(VOLTAGE, kp.REPORT_WINDOW | kp.REPORT_CHANGE, 0.0)
    out = k.feed_values([VOLTAGE], [30.0], [40.75]) + k.flush()
    assert [o[3] for o in out if o[0] == kp.OUT_CHANGE] == [40.75]
    assert any(VOLTAGE in {r[0] for r in o[4]} for o in out if o[0] == kp.OUT_WINDOW and o[1] == kp.WIN_LIVE)
    with pytest.raises(ValueError):
        k.set_policy(VOLTAGE, 8, 0.0)  # 4 is REPORT_RAW, 1-7 any sum of the bits


def _gnss_and_wheel(k: Any, t0: float, t1: float, wheel: float | None, gnss: float = 20.0) -> list[Any]:
    """10 Hz of GNSS (heading north at ``gnss`` km/h) and wheel speed from ``t0`` to ``t1``."""
    out = []
    t = t0
    while t < t1:
        ids, values = [LAT, LON, FIX, GNSS_SPEED], [29.6 + t * gnss / 3.6 / kp.M_PER_DEG, 106.5, 1.0, gnss]
        if wheel is not None:
            ids.append(SPEED)
            values.append(wheel)
        out += k.feed_values(ids, [t] * len(ids), values)
        t = round(t + 0.1, 6)
    return out


def test_stuck_wheel_speed_is_implausible_and_gnss_takes_over(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    out = _gnss_and_wheel(k, 100.0, 130.0, 20.2)
    assert alarms_of(out) == []
    out = _gnss_and_wheel(k, 130.0, 150.0, 0.0)
    events = alarms_of(out)
    delay = ALARM_ROWS["wheel_speed_implausible"][7]
    assert [(e[1], e[3], e[4]) for e in events] == [("wheel_speed_implausible", 2, True)]
    assert 130.0 + delay <= events[0][0] <= 130.0 + delay + 2.0
    fused = {s[0]: s[1] for s in k.state(150.0)}[kp.S_FUSED_SPEED]
    assert fused == pytest.approx(20.0, abs=0.5), "falls back to GNSS"
    out = _gnss_and_wheel(k, 150.0, 175.0, 20.1)
    assert [(e[1], e[4]) for e in alarms_of(out)] == [("wheel_speed_implausible", False)]


def test_missing_wheel_speed_while_gnss_moves_is_implausible(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    _gnss_and_wheel(k, 100.0, 110.0, 20.0)
    events = alarms_of(_gnss_and_wheel(k, 110.0, 130.0, None))
    assert [(e[1], e[4]) for e in events] == [("wheel_speed_implausible", True)]


def test_state_of_health_from_capacity_seen_over_a_big_swing(kernel_cls: Any) -> None:
    """A 12 Ah pack (design 14 Ah) discharged at 60 A from 90 % to 30 %: the BMS SoC
    swing against the counted Ah says 85.7 % health."""
    k = kernel_cls(ID_SPACE, 1.0)
    capacity, current = 12.0, -60.0
    soc, t = 90.0, 1000.0
    while soc > 30.0:
        k.feed_values([CURRENT, VOLTAGE, BMS_SOC], [t, t, t], [current, 36.0, float(round(soc))])
        soc += 100.0 * current * 0.1 / 3600.0 / capacity
        t = round(t + 0.1, 6)
    state = {s[0]: s[1] for s in k.state(t)}
    assert state[kp.S_FUSED_SOH] == pytest.approx(100.0 * capacity / 14.0, abs=2.0)


def test_alarm_hysteresis_and_debounce(kernel_cls: Any) -> None:
    """Controller temperature (75 C raise after 3 s, 70 C clear after 5 s): a blip does
    not raise it, a value between the thresholds neither raises nor clears. (A fusion step
    sees the samples stamped before it: the one at 30.0 s is first seen by the step at 30.1 s.)"""
    k = kernel_cls(ID_SPACE, 1.0)
    ctrl = kp.S_CTRL_TEMP

    def feed(t0: float, t1: float, v: float) -> list[Any]:
        out = []
        t = t0
        while t < t1:
            out += k.feed_values([ctrl], [t], [v])
            t = round(t + 0.1, 6)
        return alarms_of(out)

    assert feed(10.0, 20.0, 60.0) == []
    assert feed(20.0, 22.0, 80.0) == []          # 2 s above: debounced away
    assert feed(22.0, 30.0, 72.0) == []          # between: nothing
    raised = feed(30.0, 40.0, 80.0)
    assert [(round(e[0], 1), e[4], e[5]) for e in raised] == [(33.1, True, 80.0)]
    assert feed(40.0, 60.0, 72.0) == []          # hysteresis: still raised
    assert [(round(e[0], 1), e[4]) for e in feed(60.0, 70.0, 65.0)] == [(65.1, False)]
    assert k.alarms() == []


def test_config_tables_reach_the_kernel(kernel_cls: Any) -> None:
    rows = tuple(r if r[1] != "controller_temperature" else r[:5] + (90.0, 85.0, 0.0) + r[8:] for r in kp.ALARMS)
    k = kernel_cls(ID_SPACE, 1.0)
    k.set_alarms(rows)
    out = []
    for i in range(20):
        out += k.feed_values([kp.S_CTRL_TEMP], [10.0 + i * 0.1], [80.0 + i])
    assert [(e[1], e[5]) for e in alarms_of(out)] == [("controller_temperature", 91.0)]
    with pytest.raises(ValueError, match="safe side"):
        k.set_alarms(tuple(r if r[1] != "soc_low" else r[:6] + (5.0,) + r[7:] for r in kp.ALARMS))
    with pytest.raises(ValueError, match="> 0"):
        k.set_params([0.0] + [p[1] for p in kp.PARAMS[1:]])


RECORDED = [("thermal-runaway", 120.0), ("gnss-outage+bms-fault+controller-fault", 150.0),
            ("theft+cell-imbalance", 100.0)]


@pytest.mark.parametrize(("scenario", "duration"), RECORDED, ids=[r[0] for r in RECORDED])
def test_compiled_and_pure_agree_on_recorded_rides(scenario: str, duration: float) -> None:
    if "c" not in KERNELS:
        if BUILD_REQUIRED:
            pytest.fail("EBIKE_AGENT_BUILD_EXT=1 but the compiled kernel is not importable")
        pytest.skip("the compiled kernel was not built")
    rec = recording(scenario, duration, kt=True)
    kc, out_c = run(KERNELS["c"], rec.calls)
    kpy, out_py = run(KERNELS["py"], rec.calls)
    assert any(o[0] == kp.OUT_SNAPSHOT for o in out_c)
    assert_same_outputs(out_c, out_py)
    assert_same_outputs(kc.state(duration), kpy.state(duration))
    assert_same_outputs(kc.alarms(), kpy.alarms())
    assert_same_outputs(kc.health(duration), kpy.health(duration))
    assert kc.counters() == kpy.counters()
    assert_same_outputs(list(kc.persistent()), list(kpy.persistent()))


def test_pure_kernel_under_micropython_gives_cpython_outputs(tmp_path: Path) -> None:
    """The recorded ride (every kernel call) replayed by devtools/mp_kernel_run.py under
    the MicroPython unix port and under CPython's pure kernel: the same outputs."""
    rec = recording("thermal-runaway+gnss-outage", 90.0, kt=True)
    fixture = tmp_path / "ride.jsonl"
    ride.save(rec.calls, fixture)
    mp = subprocess.run([micropython_binary(), "-X", "heapsize=96M", "devtools/mp_kernel_run.py", str(fixture)],
                        cwd=REPO, env=dict(os.environ, MICROPYPATH=str(REPO)), capture_output=True, timeout=300)
    assert mp.returncode == 0, mp.stderr.decode()[-2000:]
    cp = subprocess.run([sys.executable, "-m", "devtools.mp_kernel_run", str(fixture)], cwd=REPO,
                        env=dict(os.environ, EBIKE_AGENT_PUREPYTHON="1"), capture_output=True, timeout=300)
    assert cp.returncode == 0, cp.stderr.decode()[-2000:]
    ours = [json.loads(line) for line in mp.stdout.decode().splitlines()]
    theirs = [json.loads(line) for line in cp.stdout.decode().splitlines()]
    assert len(ours) > 90 and any(o[0] == kp.OUT_ALARM for o in ours)
    assert_same_outputs(ours, theirs)


def test_counters_carry_on_across_a_restart(kernel_cls: Any) -> None:
    """Trip, energy counters, the consumption average and the measured SoH survive a
    restart of the agent: a new kernel given what the old one saved goes on from there,
    and ends where one kernel riding the whole way ends."""
    rec = recording("commute", 240.0)
    half = len(rec.calls) // 2
    first, _ = run(kernel_cls, rec.calls[:half])
    saved = list(first.persistent())
    assert len(saved) == len(kp.PERSISTENT) and saved[0] > 0.2 and saved[1] > 1.0, saved
    second, slots = ride.new_kernel(kernel_cls)
    second.restore(saved)
    assert list(second.persistent()) == saved
    trips = per_second(ride.replay(second, slots, rec.calls[half:]), kp.S_FUSED_TRIP)
    assert trips and min(trips.values()) >= round(saved[0], 3), "the trip started again from zero"
    whole, _ = run(kernel_cls, rec.calls)
    split, unsplit = second.persistent(), whole.persistent()
    for name, a, b in zip(kp.PERSISTENT[:3], split[:3], unsplit[:3], strict=True):
        assert a == pytest.approx(b, rel=0.03), name


@pytest.mark.parametrize("values, why", [
    ([1.0] * 6, "expected 7 values"),
    ([float("nan"), 0, 0, 0, 0, 0, -1.0], "trip_km is not a finite number"),
    ([0, float("inf"), 0, 0, 0, 0, -1.0], "energy_out_wh is not a finite number"),
    ([0, 0, -1.0, 0, 0, 0, -1.0], "energy_regen_wh cannot be negative"),
    ([0, 0, 0, 0, 0, 0, 151.0], "soh_pct must be -1"),
    ([0, 0, 0, 0, 0, 0, 0.0], "soh_pct must be -1"),
])
def test_restore_refuses_what_no_kernel_saved(kernel_cls: Any, values: list[float], why: str) -> None:
    k, _ = ride.new_kernel(kernel_cls)
    before = list(k.persistent())
    with pytest.raises(ValueError, match=why):
        k.restore(values)
    assert list(k.persistent()) == before, "a refused restore changed the kernel"


def _alarm_inputs(seed: int) -> tuple[tuple[Any, ...], list[int], dict[int, list[float]]]:
    """A random alarm table over the signal alarms' inputs (thresholds, clear thresholds
    and delays drawn anew, zero delays included) and, per input, a few levels either side
    of its thresholds, so a ride of them raises, holds and clears."""
    rng = random.Random(seed)
    rows = []
    levels: dict[int, list[float]] = {}
    for r in kp.ALARMS:
        if r[3] == kp.SPECIAL:
            rows.append(r)
            continue
        thr = round(rng.uniform(1.0, 50.0), 1)
        gap = round(rng.uniform(0.0, 5.0), 1)
        clr = thr - gap if r[4] == kp.ABOVE else thr + gap
        on = rng.choice([0.0, 0.1, 0.5, 2.0])
        off = rng.choice([0.0, 0.3, 1.0, 3.0])
        rows.append(r[:5] + (thr, clr, on, off) + r[9:])
        levels.setdefault(r[3], []).extend([thr - 2.0 * gap - 1.0, clr, (thr + clr) / 2.0, thr, thr + 1.0, -0.0, 0.0])
    return tuple(rows), sorted(levels), levels


def _judged_ride(kernel_cls: Any, seed: int, incremental: bool) -> tuple[list[Any], Any]:
    """A random ride of the alarm inputs (levels repeated, inputs that fall silent long
    enough to go stale and come back, the storage condition toggled) through a kernel with
    the random table of ``_alarm_inputs``; every output and the kernel."""
    rows, sids, levels = _alarm_inputs(seed)
    rng = random.Random(seed + 1)
    k = kernel_cls(ID_SPACE, 1.0)
    k.set_alarms(rows)
    k.incremental = incremental
    out: list[Any] = []
    t = 100.0
    silent: dict[int, float] = {}
    value = {sid: rng.choice(levels[sid]) for sid in sids}
    while t < 400.0:
        ids, times, values = [], [], []
        for sid in sids:
            if silent.get(sid, 0.0) > t:
                continue
            if rng.random() < 0.002:
                silent[sid] = t + rng.uniform(0.5, 30.0)
                continue
            if rng.random() < 0.05:
                value[sid] = rng.choice(levels[sid])
            if rng.random() < 0.7:
                ids.append(sid)
                times.append(t)
                values.append(value[sid])
        if rng.random() < 0.01:
            k.set_condition(kp.A_STORAGE_FAILED, rng.choice([0.0, 1.0]))
        out += k.feed_values(ids, times, values)
        t = round(t + rng.choice([0.05, 0.1, 0.1, 0.2, 0.35]), 6)
    out += k.close_due(t + 20.0)
    return out + k.flush(), k


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_judging_equals_judging_everything(kernel_cls: Any, seed: int) -> None:
    """An alarm at rest given the value it was judged on is skipped: on random tables and
    rides (raises, holds, clears, inputs going stale, zero delays) every output and every
    active alarm are exactly those of judging everything at every step."""
    out_full, k_full = _judged_ride(kernel_cls, seed, False)
    out_inc, k_inc = _judged_ride(kernel_cls, seed, True)
    events = alarms_of(out_full)
    assert any(e[4] for e in events) and any(not e[4] for e in events), "the ride must raise and clear alarms"
    assert out_inc == out_full
    assert k_inc.alarms() == k_full.alarms()
    assert k_inc.state(400.0) == k_full.state(400.0)


def test_compiled_and_pure_judge_random_tables_alike() -> None:
    if "c" not in KERNELS:
        if BUILD_REQUIRED:
            pytest.fail("EBIKE_AGENT_BUILD_EXT=1 but the compiled kernel is not importable")
        pytest.skip("the compiled kernel was not built")
    for seed in (4, 5):
        out_c, kc = _judged_ride(KERNELS["c"], seed, True)
        out_py, kpy = _judged_ride(KERNELS["py"], seed, True)
        assert_same_outputs(out_c, out_py)
        assert_same_outputs(kc.alarms(), kpy.alarms())


@pytest.mark.parametrize(("scenario", "duration"), RECORDED, ids=[r[0] for r in RECORDED])
def test_incremental_step_equals_full_evaluation_on_recorded_rides(kernel_cls: Any, scenario: str,
                                                                   duration: float) -> None:
    """The recorded fault rides give exactly the same outputs, alarms, state and health
    with the step's skipping as with everything evaluated at every step."""
    rec = recording(scenario, duration, kt=True)
    got = []
    for incremental in (False, True):
        k, slots = ride.new_kernel(kernel_cls)
        k.incremental = incremental
        got.append((ride.replay(k, slots, rec.calls), k.alarms(), k.state(duration), k.health(duration),
                    k.counters(), list(k.persistent())))
    assert any(o[0] == kp.OUT_ALARM for o in got[0][0])
    assert got[1] == got[0]


def _random_fault_rides(n: int, seed: int) -> list[tuple[str, int, float]]:
    """``n`` random rides: two or three of the simulator's scenarios composed, a seed, the
    time their faults start."""
    rng = random.Random(seed)
    return [("+".join(rng.sample(scenario_names(), rng.randint(2, 3))), rng.randint(1, 1000),
             float(rng.randint(10, 40))) for _ in range(n)]


@pytest.mark.parametrize(("scenario", "seed", "fault_at"), _random_fault_rides(3, 18))
def test_random_fault_rides_agree_between_builds_and_with_full_evaluation(scenario: str, seed: int,
                                                                           fault_at: float) -> None:
    """Random compositions of the simulator's faults: the compiled and the pure kernel give
    the same outputs, and each gives exactly the outputs of judging everything at every step."""
    rec = ride.record(scenario, 90.0, seed, fault_at, kt=True)
    results = {}
    for kind in KERNELS:
        for incremental in (False, True):
            k, slots = ride.new_kernel(KERNELS[kind])
            k.incremental = incremental
            results[kind, incremental] = (ride.replay(k, slots, rec.calls), k.alarms(), k.state(90.0),
                                          k.health(90.0))
        assert results[kind, True] == results[kind, False]
    if "c" in KERNELS:
        assert_same_outputs(results["c", True], results["py", True])
