"""Each scenario injects what it claims, at the times its fault records say; the
closing-the-loop inputs (JBD MOS write, Bafang speed-limit write, KT lock) are obeyed.

Runs the MicroPython-safe core in process; the JBD BMS is polled once per sim second
through ``Ride.serve`` as a host would, and frames are decoded with the agent's decoders.
"""

from __future__ import annotations

import pytest

from agent.protocols import protocol
from firmware_sim import scenario
from firmware_sim.encoders import bafang, jbd, kt, wire
from firmware_sim.link import PtyPort, SlcanAdapter

CTRL_T = "Vehicle.LEV.Controller.Temperature"
SPEED = "Vehicle.Speed"
MOTOR_I = "Vehicle.LEV.Controller.MotorCurrent"
FIX = "Vehicle.LEV.GNSS.FixQuality"


class Rec:
    """Writer that keeps frames and faults, and polls the JBD BMS every sim second."""

    def __init__(self, poll_jbd: bool = True, actions=None) -> None:
        self.frames: list[tuple[str, float, object, str, dict]] = []
        self.faults: list[dict] = []
        self.ride = None
        self.poll_jbd = poll_jbd
        self.actions = dict(actions or {})

    def attach(self, ride) -> None:
        self.ride = ride

    def fault(self, rec) -> None:
        self.faults.append(rec)

    def frame(self, bus, t, payload, kind, values) -> None:
        self.frames.append((bus, t, payload, kind, values))

    def tick(self, t) -> bool:
        for at in list(self.actions):
            if t >= at:
                self.actions.pop(at)(self.ride)
        if self.poll_jbd and abs(t - round(t)) < 1e-9:
            self.ride.serve("jbd", jbd.request(3) + jbd.request(4))
        return True

    def of(self, bus: str, kind: str) -> list[tuple[float, dict]]:
        return [(t, v) for b, t, _p, k, v in self.frames if b == bus and k == kind]

    def fault_t(self, what: str) -> float:
        (rec,) = [f for f in self.faults if f["what"] == what]
        return rec["t"]


def _close(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(abs(got[k] - want[k]) < 1e-9 for k in want)


def _same(got: dict, want: dict) -> None:
    assert _close(got, want), (got, want)


def _ride(name: str, duration: float = 60.0, seed: int = 4, **kw) -> Rec:
    w = Rec(**{k: kw.pop(k) for k in ("poll_jbd", "actions") if k in kw})
    scenario.run(w, name, seed, duration, buses=kw.pop("buses", ("can", "nmea", "kt")), **kw)
    assert w.faults == w.ride.faults
    return w


def test_commute_injects_nothing():
    w = _ride("commute", 30.0)
    assert w.faults == []
    assert max(v[SPEED] for _t, v in w.of("can", "32/01")) > 15.0


def test_composed_names_and_unknown():
    assert scenario.check_scenario("commute+noisy-line") == ["commute", "noisy-line"]
    with pytest.raises(ValueError, match="bms-fault"):
        scenario.check_scenario("commute+tsunami")


def test_charge():
    w = _ride("charge", 60.0)
    assert w.fault_t("charger") == 0.0
    basic = w.of("jbd", "03")
    assert all(v[jbd.CURRENT] > 3.0 for t, v in basic if t > 0)
    rem = [v[jbd.REMAINING] for _t, v in basic]
    assert rem[-1] > rem[0] and rem == sorted(rem)
    assert all(v[SPEED] == 0.0 for _t, v in w.of("can", "32/01"))


def test_park_stands_still_and_locked():
    w = _ride("park", 30.0)
    assert w.fault_t("parked") == 0.0
    kt_frames = [p for b, _t, p, k, _v in w.frames if b == "kt"]
    assert all(p[3:5] == b"\x17\x70" and p[7] & 0x10 for p in kt_frames)   # standing, locked
    assert all(v[jbd.CURRENT] > -0.1 for _t, v in w.of("jbd", "03"))       # a trickle only


def test_theft_moves_while_locked():
    w = _ride("theft", 60.0)
    t0 = w.fault_t("moved")
    assert t0 == pytest.approx(18.0)
    before = [v for t, v in w.of("can", "32/01") if t < t0]
    after = [v for t, v in w.of("can", "32/01") if t > t0 + 0.1]
    assert all(v[SPEED] == 0.0 for v in before)
    assert all(v[SPEED] == pytest.approx(8.0, abs=0.01) and v[MOTOR_I] == 0.0 for v in after)
    pos = [(v["Vehicle.CurrentLocation.Latitude"], v["Vehicle.CurrentLocation.Longitude"])
           for t, v in w.of("nmea", "GGA") if t >= t0]
    moved = ((pos[-1][0] - pos[0][0]) ** 2 + ((pos[-1][1] - pos[0][1]) * 0.87) ** 2) ** 0.5 * 111320
    assert 40.0 < moved < 150.0                   # ~93 m at 8 km/h in 42 s, plus GNSS noise


def test_overheat_climbs_past_limits():
    w = _ride("overheat", 100.0)
    t0 = w.fault_t("overheat")
    temps = w.of("can", "32/01")
    at0 = [v[CTRL_T] for t, v in temps if t <= t0][-1]
    assert max(v[CTRL_T] for t, v in temps if t < t0) < 30
    assert temps[-1][1][CTRL_T] > 85 and temps[-1][1][CTRL_T] - at0 > 70
    assert temps[-1][1]["Vehicle.Powertrain.ElectricMotor.Temperature"] > 110
    kt_t = [v["Vehicle.Powertrain.ElectricMotor.Temperature"] for _t, v in w.of("kt", "41")]
    assert kt_t[-1] > 110


def test_thermal_runaway_one_sensor_only():
    w = _ride("thermal-runaway", 60.0)
    t0 = w.fault_t("thermal-runaway")
    ntc = [(t, v["Vehicle.LEV.Battery.Temperature.1"], v["Vehicle.LEV.Battery.Temperature.2"])
           for t, v in w.of("jbd", "03")]
    before = [x for x in ntc if x[0] <= t0]
    late = [x for x in ntc if x[0] >= t0 + 20]
    assert all(abs(a - b) < 1.0 for _t, a, b in before)
    assert all(b - a > 55 for _t, a, b in late)             # 3 C/s from t0
    assert max(a for _t, a, _b in ntc) - min(a for _t, a, _b in ntc) < 1.0   # the rest stay cool


def test_cell_imbalance_one_cell_sags():
    w = _ride("cell-imbalance", 60.0)
    rec = [f for f in w.faults if f["what"] == "cell-imbalance"][0]
    t0, cell = rec["t"], rec["cell"]
    for t, v in w.of("jbd", "04"):
        spread = v[wire.CELL_MAX] - v[wire.CELL_MIN]
        if t <= t0:
            assert spread < 0.06
        elif t >= t0 + 20:
            assert spread > 0.2 and v[wire.CELL_MIN] == v[f"Vehicle.LEV.Battery.CellVoltage.{cell}"]


def test_overspeed_above_25():
    w = _ride("overspeed", 90.0)
    assert w.fault_t("derestricted") == 0.0
    assert max(v[SPEED] for _t, v in w.of("can", "32/01")) > 27.0
    assert all(v["Vehicle.LEV.SpeedLimit"] == 45.0 for _t, v in w.of("can", "32/03"))
    assert max(v[SPEED] for _t, v in w.of("kt", "41")) > 27.0


def test_gnss_outage_fix_lost_exactly_then():
    w = _ride("gnss-outage", 40.0, buses=("nmea",), poll_jbd=False)
    t0, t1 = w.fault_t("gnss-lost"), w.fault_t("gnss-restored")
    assert (t0, t1) == (12.0, 24.0)
    p = protocol("nmea")
    sentences = p.framer().feed(b"".join(x[2] for x in w.frames))
    assert len(sentences) == len(w.frames)
    for f, (_bus, t, _payload, kind, values) in zip(sentences, w.frames, strict=True):
        got = p.decode(f)
        _same(got, values)
        if kind == "GGA":
            assert got[FIX] == (0 if t0 <= t < t1 else 1)
            assert ("Vehicle.CurrentLocation.Latitude" in got) == (not t0 <= t < t1)


def test_noisy_line_corrupts_what_it_records():
    w = _ride("commute+noisy-line", 60.0, buses=("kt", "nmea"), noise_rate=0.1)
    flips = [f for f in w.faults if f["what"] == "bit-error"]
    junk = [f for f in w.faults if f["what"] == "garbage"]
    assert w.fault_t("noisy-line") == 0.0
    assert len(flips) > 30 and len(junk) > 30
    for bus, name in (("kt", "kt-lcd3"), ("nmea", "nmea")):
        frames = [(t, p, k, v) for b, t, p, k, v in w.frames if b == bus]
        bad = {(f["t"], f["kind"]) for f in flips if f["bus"] == bus}
        clean = [(p, v) for t, p, k, v in frames if k != "garbage" and (t, k) not in bad]
        assert len(clean) < len([1 for _t, _p, k, _v in frames if k != "garbage"])
        proto = protocol(name)
        good = []
        for f in proto.framer().feed(b"".join(p for _t, p, _k, _v in frames)):
            try:
                good.append(proto.decode(f))
            except Exception:       # noqa: BLE001 - a corrupted NMEA line fails its checksum
                continue
        clean_values = [v for _p, v in clean]
        for g in good:              # nothing corrupted passes as data ...
            assert any(_close(g, c) for c in clean_values)
        assert len(good) >= 0.9 * len(clean)          # ... and the clean frames get through


def test_bms_fault_sets_flags_and_opens_discharge():
    w = _ride("bms-fault", 60.0)
    t0, t1 = w.fault_t("bms-protection"), w.fault_t("bms-recovered")
    for t, v in w.of("jbd", "03"):
        inside = t0 <= t < t1
        assert v[jbd.PROTECTION] == (0x0200 if inside else 0)
        assert v[jbd.DISCHARGE_ON] == (0 if inside else 1)
        if inside:
            assert v[jbd.CURRENT] == 0.0
    assert all(v[MOTOR_I] == 0.0 for t, v in w.of("can", "32/01") if t0 + 0.01 < t < t1)


def test_controller_fault_codes():
    w = _ride("controller-fault", 60.0)
    t0, t1 = w.fault_t("controller-fault"), w.fault_t("controller-recovered")
    codes = w.of("can", "12/00")
    assert len(codes) == 60
    for t, v in codes:
        assert v["Vehicle.LEV.Controller.FaultCode"] == (0x21 if t0 <= t < t1 else 0)
    for t, v in w.of("kt", "41"):
        assert v["Vehicle.LEV.Controller.FaultCode"] == (0x21 if t0 <= t < t1 else 0)
        if t0 < t < t1:
            assert v[MOTOR_I] == 0.0


# Closing the loop ------------------------------------------------------------------

def test_speed_limit_write_caps_speed():
    can_id, data = bafang.speed_limit_write(15.0)
    assert can_id == 0x03103203
    w = _ride("commute", 120.0, poll_jbd=False, buses=("can",),
              actions={10.0: lambda ride: ride.can_write(can_id, data)})
    late = [v for t, v in w.of("can", "32/01") if t > 40.0]
    # No assistance at or above the new cut-off; the rider cruises at it (a downhill
    # or the rider's own variation can carry the bike a little faster, unassisted).
    assert all(v[MOTOR_I] == 0.0 for v in late if v[SPEED] >= 15.0)
    assert any(v[SPEED] > 13.0 for v in late) and max(v[SPEED] for v in late) < 18.5
    assert sum(v[SPEED] for v in late if v[SPEED] > 5) / sum(1 for v in late if v[SPEED] > 5) < 15.5
    assert all(v["Vehicle.LEV.SpeedLimit"] == 15.0 for t, v in w.of("can", "32/03") if t > 10.0)
    assert not w.ride.can_write(bafang.make_id(3, 2, 1, 0x32, 0x03), data)   # a read is not a write


def test_slcan_adapter_passes_host_frames_on(tmp_path):
    port = PtyPort(str(tmp_path / "can"))
    try:
        a = SlcanAdapter(port)
        seen = []
        a.on_tx = lambda i, d: seen.append((i, d))
        assert a.handle("O") == b"\r"
        assert a.handle("T031032032DC05") == b"Z\r"
        assert seen == [(0x03103203, b"\xdc\x05")]
    finally:
        port.close()


def test_jbd_mos_write_opens_discharge_switch():
    wbody = jbd.request(jbd.REG_MOS, b"\x00\x02", write=True)
    w = _ride("commute", 60.0, actions={10.0: lambda ride: ride.serve("jbd", wbody)})
    (ack,) = [v for b, _t, p, k, v in w.frames if b == "jbd" and k == "E1"]
    for t, v in w.of("jbd", "03"):
        assert v[jbd.DISCHARGE_ON] == (1 if t < 10.0 else 0)
        if t > 10.0:
            assert v[jbd.CURRENT] == 0.0
    late = [v for t, v in w.of("can", "32/01") if t > 10.05]
    assert all(v[MOTOR_I] == 0.0 for v in late)
    assert not w.ride.vehicle.discharge_on and w.ride.vehicle.charge_on


def test_kt_lock_stops_assistance():
    lock = kt.display_frame(0, lock=True)
    w = _ride("commute", 60.0, poll_jbd=False, actions={5.0: lambda ride: ride.serve("kt", lock)})
    late = [v for t, v in w.of("can", "32/01") if t > 5.05]
    assert any(v[SPEED] > 5.0 for v in late)             # the rider still pedals ...
    assert all(v[MOTOR_I] == 0.0 for v in late)          # ... but the motor gives nothing
    assert w.ride.vehicle.locked
