"""What the kernel believes, both builds: values outside their signal's range or rate
are refused and counted (per source, signal and reason) and raise ``data_quality`` when
they persist; the fail-safe stationary decision (``Kernel.motion``) over every input
able to see motion; fused speed and the over-speed alarm against noise frames that carry
real Bafang ids. The same decisions end to end, through the agent: tests/test_e2e_safety.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.dbc.compile import compile_dbc, frame_key, profile_path
from agent.errors import ConfigError
from agent.fusion import motion
from agent.fusion import spec as kp
from agent.signals import BY_ID, ID_SPACE, limits, signal_id
from devtools import ride
from tests.test_fusion import BMS_SOC, FIX, GNSS_SPEED, LAT, LON, SPEED

MOTOR_I = signal_id("Vehicle.LEV.Controller.MotorCurrent")
CADENCE = signal_id("Vehicle.LEV.Pedal.Cadence")
CTRL_TEMP = signal_id("Vehicle.LEV.Controller.Temperature")
STILL_KMH = 1.0


def kernel(kernel_cls: Any) -> Any:
    k = kernel_cls(ID_SPACE, 1.0)
    k.set_limits(*limits(ID_SPACE))
    return k


def seen(k: Any) -> dict[int, float]:
    return {sid: v for sid, v, _t in k.latest()}


# --- Range and rate ------------------------------------------------------------------

@pytest.mark.parametrize(("sid", "value"), [(SPEED, -0.5), (SPEED, 273.0), (BMS_SOC, 100.5), (BMS_SOC, -1.0),
                                            (CTRL_TEMP, 500.0), (SPEED, float("nan")), (SPEED, float("inf"))])
def test_a_value_outside_its_range_is_not_sampled_and_is_counted(kernel_cls: Any, sid: int, value: float) -> None:
    k = kernel(kernel_cls)
    k.source = 2
    out = k.feed_values([sid], [10.0], [value])
    assert sid not in seen(k) and k.counters()["samples"] == 0
    out += k.close_due(12.0)
    assert not any(o[0] == kp.OUT_WINDOW for o in out), "a refused value reached a window"
    assert k.refusals(2) == [(sid, 1, 0)]
    assert k.refusals(1) == []


def test_the_edges_of_a_range_are_believed(kernel_cls: Any) -> None:
    k = kernel(kernel_cls)
    sig = BY_ID[BMS_SOC]
    k.feed_values([BMS_SOC, BMS_SOC], [10.0, 100.0], [sig.minimum, sig.maximum])
    assert seen(k)[BMS_SOC] == sig.maximum and k.counters()["refused"] == 0


def test_a_jump_faster_than_the_signal_can_change_is_refused_until_time_allows_it(kernel_cls: Any) -> None:
    """Wheel speed changes at most 60 km/h per second: 20 -> 80 km/h in 0.25 s is refused
    (and counted as rate), 20 -> 30 is believed; a value far off is believed once as much
    time has passed as the change needs (a real crash stop reaches the kernel late, never
    never)."""
    k = kernel(kernel_cls)
    rate = BY_ID[SPEED].max_rate
    k.feed_values([SPEED], [10.0], [20.0])
    k.feed_values([SPEED], [10.25], [80.0])
    assert seen(k)[SPEED] == 20.0 and k.refusals(0) == [(SPEED, 0, 1)]
    k.feed_values([SPEED], [10.5], [30.0])
    assert seen(k)[SPEED] == 30.0
    k.feed_values([SPEED], [10.5 + 29.0 / rate], [0.5])
    assert seen(k)[SPEED] == 30.0, "29 km/h down in less time than the rate allows"
    k.feed_values([SPEED], [10.5 + 30.0 / rate], [0.5])
    assert seen(k)[SPEED] == 0.5
    assert k.refusals(0) == [(SPEED, 0, 2)]


def test_frames_of_one_read_are_judged_over_rate_min_s(kernel_cls: Any) -> None:
    """Every frame of one read carries the read's time: the change allowed between two of
    them is the rate over ``rate_min_s``, not zero."""
    k = kernel(kernel_cls)
    rate = BY_ID[SPEED].max_rate
    step = rate * kp.PARAMS[kp.P_RATE_MIN][1]
    k.feed_values([SPEED, SPEED, SPEED], [10.0] * 3, [20.0, 20.0 + 0.9 * step, 20.0 + 3 * step])
    assert seen(k)[SPEED] == pytest.approx(20.0 + 0.9 * step) and k.refusals(0) == [(SPEED, 0, 1)]


def bafang(kernel_cls: Any, soc_max: float | None = None) -> Any:
    """A kernel with the Bafang tables as the agent sets it up; ``soc_max`` replaces the
    DBC's own SoC maximum (it says [0|100])."""
    dbc = compile_dbc(profile_path("bafang"))
    if soc_max is not None:
        for s, sid in enumerate(dbc.sig_id):
            if sid == BMS_SOC:
                dbc.sig_max[s] = soc_max
    k = kernel_cls(dbc.id_space, 1.0)
    k.set_can_tables(*dbc.kernel_tables())
    k.set_limits(*limits(dbc.id_space))
    return k


def test_a_can_value_beyond_the_catalogue_range_is_refused(kernel_cls: Any) -> None:
    """Bafang's 32/01 carries speed in 0.01 km/h on 16 bits (up to 655 km/h): 273 km/h is
    refused; the frame's other values are believed."""
    k = bafang(kernel_cls)
    speed = 27300
    k.feed_frames([frame_key(0x02F83201, True)], [bytes([speed & 0xFF, speed >> 8, 0x5E, 1, 0x3C, 0x0F, 60, 55])],
                  [10.0])
    assert SPEED not in seen(k) and seen(k)[CTRL_TEMP] == 20.0
    assert k.refusals(0) == [(SPEED, 1, 0)]


@pytest.mark.parametrize(("raw", "believed"), [(15000, True), (14999, True), (15001, False), (65535, False), (0, True)])
def test_the_raw_span_of_a_can_row_ends_exactly_at_its_range(kernel_cls: Any, raw: int, believed: bool) -> None:
    """The decode loop tests raw bits against a span worked out once from the range
    (0.01 km/h steps, 150 km/h the top): exactly the values the range believes, no float
    rounding letting 150.01 through or keeping 150.00 out."""
    k = bafang(kernel_cls)
    k.feed_frames([frame_key(0x02F83201, True)], [bytes([raw & 0xFF, raw >> 8, 0x5E, 1, 0x3C, 0x0F, 60, 55])],
                  [10.0])
    assert (SPEED in seen(k)) == believed
    assert k.refusals(0) == ([] if believed else [(SPEED, 1, 0)])


def test_a_dbc_range_narrows_only_its_own_rows(kernel_cls: Any) -> None:
    """A DBC declaring SoC [0|50] has the CAN bus's SoC 60 refused, while a BMS on a UART
    saying 60 % is believed: a DBC speaks for its own frames only."""
    k = bafang(kernel_cls, soc_max=50.0)
    soc_key = frame_key(0x02F83200, True)
    k.feed_frames([soc_key, soc_key], [bytes([40, 0, 0, 0, 0, 0, 0, 0]), bytes([45, 0, 0, 0, 0, 0, 0, 0])],
                  [10.0, 20.0])
    k.feed_frames([soc_key], [bytes([60, 0, 0, 0, 0, 0, 0, 0])], [30.0])
    assert seen(k)[BMS_SOC] == 45.0 and (BMS_SOC, 1, 0) in k.refusals(0)
    k.source = 2
    k.feed_values([BMS_SOC], [40.0], [60.0])
    assert seen(k)[BMS_SOC] == 60.0 and k.refusals(2) == []


def test_a_dbc_range_that_holds_no_believable_value_refuses_the_start(kernel_cls: Any, tmp_path: Path) -> None:
    """A DBC declaring Speed [200|300] km/h names the file, the signal and why, instead of
    having every speed it carries refused."""
    text = (Path(profile_path("bafang")).read_text()
            .replace('SG_ Speed : 0|16@1+ (0.01,0) [0|655.35]', 'SG_ Speed : 0|16@1+ (0.01,0) [200|300]'))
    assert "[200|300]" in text
    path = tmp_path / "fast.dbc"
    path.write_text(text)
    with pytest.raises(ConfigError, match="Vehicle.Speed") as e:
        compile_dbc(str(path))
    assert e.value.path == str(path) and "Speed" in e.value.key
    with pytest.raises(ValueError, match="Vehicle.Speed"):
        limits(ID_SPACE, {SPEED: (200.0, 300.0)})
    dbc = compile_dbc(profile_path("bafang"))
    dbc.sig_min[list(dbc.sig_id).index(SPEED)] = 200.0
    k = kernel_cls(dbc.id_space, 1.0)
    k.set_limits(*limits(dbc.id_space))
    with pytest.raises(ValueError, match="holds no believable value"):
        k.set_can_tables(*dbc.kernel_tables())


def test_limits_that_do_not_fit_are_refused(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    lo, hi, rate = limits(ID_SPACE)
    with pytest.raises(ValueError, match="id space"):
        k.set_limits(lo[:-1], hi, rate)
    with pytest.raises(ValueError, match="must not be empty"):
        k.set_limits(hi, lo, rate)


def test_data_quality_is_raised_per_source_when_refusals_persist_and_clears(kernel_cls: Any) -> None:
    """Two refused values a second from source 1 for 20 s: ``data_quality`` (instance 1)
    after its delay; a single refusal now and then raises nothing; it clears once the
    values are good again."""
    k = kernel(kernel_cls)
    row = next(r for r in kp.ALARMS if r[0] == kp.A_DATA_QUALITY)
    out = []
    t = 100.0
    while t < 120.0:
        k.source = 1
        out += k.feed_values([SPEED], [t], [300.0 if round(t * 10) % 5 == 0 else 20.0])
        k.source = 0
        out += k.feed_values([BMS_SOC], [t], [50.0 if round(t * 10) % 80 else 101.0])
        t = round(t + 0.1, 6)
    raised = [o for o in out if o[0] == kp.OUT_ALARM and o[2] == kp.A_DATA_QUALITY]
    assert [(o[3], o[5]) for o in raised] == [(1, 1)]
    assert 100.0 + row[7] <= raised[0][1] <= 100.0 + row[7] + 2.0
    assert (kp.A_DATA_QUALITY, 1) in [(a[0], a[1]) for a in k.alarms()]
    while t < 140.0:
        k.source = 1
        out += k.feed_values([SPEED], [t], [20.0])
        t = round(t + 0.1, 6)
    cleared = [o for o in out if o[0] == kp.OUT_ALARM and o[2] == kp.A_DATA_QUALITY and not o[5]]
    assert [o[3] for o in cleared] == [1] and k.alarms() == []


# --- The stationary decision -----------------------------------------------------------

class Bike:
    """Feeds a kernel 10 Hz of wheel speed, GNSS (fix, position moving at its speed),
    motor current and cadence; each None is a sensor that says nothing."""

    def __init__(self, k: Any) -> None:
        self.k = k
        self.t = 100.0
        self.lat = 29.6

    def ride(self, seconds: float, wheel: float | None = 20.0, gnss: float | None = 20.0, motor: float | None = 3.0,
             cadence: float | None = 60.0, fix: float = 1.0, frozen: bool = False) -> None:
        end = self.t + seconds
        while self.t < end:
            ids: list[int] = []
            values: list[float] = []
            if gnss is not None:
                if not frozen:
                    self.lat += gnss / 3.6 * 0.1 / kp.M_PER_DEG
                ids += [FIX, GNSS_SPEED] if fix == 0.0 else [LAT, LON, FIX, GNSS_SPEED]
                values += [fix, gnss] if fix == 0.0 else [self.lat, 106.5, fix, gnss]
            for sid, v in ((SPEED, wheel), (MOTOR_I, motor), (CADENCE, cadence)):
                if v is not None:
                    ids.append(sid)
                    values.append(v)
            self.k.feed_values(ids, [self.t] * len(ids), values)
            self.t = round(self.t + 0.1, 6)
        self.k.close_due(self.t)

    def motion(self) -> tuple[Any, ...]:
        return self.k.motion(self.t, STILL_KMH)


V = kp.VOTE_NAMES


def votes(m: tuple[Any, ...]) -> tuple[str, str, str, str]:
    return V[m[1]], V[m[3]], V[m[5]], V[m[7]]


@pytest.mark.parametrize(("case", "ride", "verdict", "expected_votes"), [
    ("all agree moving", {}, kp.MOTION_MOVING, ("moving", "moving", "moving", "moving")),
    ("all agree still", dict(wheel=0.0, gnss=0.0, motor=0.0, cadence=0.0), kp.MOTION_STILL,
     ("still", "still", "still", "still")),
    ("GNSS stuck at 0 with a fix", dict(gnss=0.0), kp.MOTION_MOVING, ("moving", "still", "moving", "moving")),
    ("GNSS stuck at 0, coasting", dict(gnss=0.0, motor=0.0, cadence=0.0), kp.MOTION_MOVING,
     ("moving", "still", "still", "still")),
    ("wheel magnet unplugged", dict(wheel=0.0, cadence=0.0), kp.MOTION_MOVING, ("still", "moving", "moving", "still")),
    ("wheel 0, GNSS 20, motor off", dict(wheel=0.0, motor=0.0, cadence=0.0), kp.MOTION_MOVING,
     ("still", "moving", "still", "still")),
    ("motor pulls a stopped wheel", dict(wheel=0.0, gnss=0.0, motor=8.0, cadence=0.0), kp.MOTION_MOVING,
     ("still", "still", "moving", "still")),
    ("void fix, wheel still", dict(wheel=0.0, gnss=0.0, fix=0.0, motor=0.0, cadence=0.0), kp.MOTION_STILL,
     ("still", "no fix", "still", "still")),
    ("void fix, wheel moving", dict(gnss=0.0, fix=0.0, motor=0.0, cadence=0.0), kp.MOTION_MOVING,
     ("moving", "no fix", "still", "still")),
    ("no wheel sensor, GNSS still", dict(wheel=None, gnss=0.0, motor=None, cadence=None), kp.MOTION_STILL,
     ("absent", "still", "absent", "absent")),
    ("no speed sensor at all", dict(wheel=None, gnss=None, motor=0.0, cadence=0.0), kp.MOTION_UNKNOWN,
     ("absent", "absent", "still", "still")),
])
def test_the_stationary_decision_table(kernel_cls: Any, case: str, ride: dict[str, Any], verdict: int,
                                       expected_votes: tuple[str, ...]) -> None:
    """docs/fusion.md's table: any input that sees motion makes it moving; still needs a
    speed source saying so and nobody disagreeing."""
    bike = Bike(kernel(kernel_cls))
    bike.ride(10.0, **ride)
    m = bike.motion()
    assert (m[0], votes(m)) == (verdict, expected_votes), case


def test_stale_inputs_abstain_and_nothing_fresh_is_unknown(kernel_cls: Any) -> None:
    bike = Bike(kernel(kernel_cls))
    bike.ride(5.0, wheel=0.0, gnss=0.0, motor=0.0, cadence=0.0)
    bike.t += 30.0
    m = bike.motion()
    assert m[0] == kp.MOTION_UNKNOWN and votes(m) == ("stale",) * 4
    assert motion.words(m) == "wheel stale, GNSS stale, motor stale, cadence stale: no wheel or GNSS speed to tell"


def test_a_refused_gnss_speed_abstains_instead_of_voting_its_last_good_value(kernel_cls: Any) -> None:
    """A receiver that starts sending a negative speed: its last believed speed (0, from
    a stop) must not vote "still" while the wheel turns, nor block a stop afterwards."""
    k = kernel(kernel_cls)
    bike = Bike(k)
    bike.ride(5.0, wheel=0.0, gnss=0.0, motor=0.0, cadence=0.0)
    bike.ride(3.0, wheel=21.0, gnss=-21.0, motor=0.0, cadence=0.0)
    m = bike.motion()
    assert m[0] == kp.MOTION_MOVING and votes(m)[:2] == ("moving", "refused")
    assert motion.words(m) == "wheel 21.0 km/h, GNSS refused, motor 0.0 A, cadence 0 rpm disagree"
    bike.ride(1.0, wheel=0.0, gnss=-0.5, motor=0.0, cadence=0.0)
    bike.ride(3.0, wheel=0.0, gnss=-0.5, motor=0.0, cadence=0.0)
    assert bike.motion()[0] == kp.MOTION_STILL


def test_a_frozen_gnss_abstains_and_the_wheel_decides(kernel_cls: Any) -> None:
    """The receiver repeats its last fix (21 km/h, the same position) after the bike has
    stopped: after gnss_frozen_s its speed no longer votes, so the stop is seen."""
    bike = Bike(kernel(kernel_cls))
    bike.ride(5.0, wheel=21.0, gnss=21.0)
    bike.ride(1.0, wheel=0.0, gnss=21.0, motor=0.0, cadence=0.0, frozen=True)
    m = bike.motion()
    assert m[0] == kp.MOTION_MOVING and motion.words(m).endswith("disagree")
    bike.ride(kp.PARAMS[kp.P_GNSS_FROZEN][1] + 0.5, wheel=0.0, gnss=21.0, motor=0.0, cadence=0.0, frozen=True)
    m = bike.motion()
    assert m[0] == kp.MOTION_STILL and votes(m)[1] == "frozen"


def test_words_name_the_disagreement(kernel_cls: Any) -> None:
    bike = Bike(kernel(kernel_cls))
    bike.ride(10.0, wheel=21.4, gnss=0.0, motor=None, cadence=None)
    assert motion.words(bike.motion()) == "wheel 21.4 km/h, GNSS 0.0 km/h disagree"
    assert motion.to_json(bike.motion(), 0.0)["gnss"] == {"vote": "still", "gnss_kmh": 0.0}


def test_top_speed_is_the_highest_voting_speed(kernel_cls: Any) -> None:
    """set_speed_limit waits unless the new limit is above every believable speed."""
    bike = Bike(kernel(kernel_cls))
    bike.ride(2.0, wheel=0.0, gnss=18.0)
    assert bike.motion()[9] == pytest.approx(18.0)


def test_fused_speed_follows_the_turning_wheel_when_the_gnss_is_stuck(kernel_cls: Any) -> None:
    """The receiver stuck at 0 with a valid fix must not pull the fused speed to 0 (the
    kernel used to drop the wheel as implausible and believe the GNSS alone)."""
    k = kernel(kernel_cls)
    bike = Bike(k)
    bike.ride(10.0, wheel=21.0, gnss=21.0)
    bike.ride(20.0, wheel=21.0, gnss=0.0)
    assert (kp.A_WHEEL_IMPLAUSIBLE, -1) in [(a[0], a[1]) for a in k.alarms()]
    assert seen(k)[kp.S_FUSED_SPEED] == pytest.approx(21.0, abs=0.5)


# --- Noise frames with real ids ------------------------------------------------------

@pytest.mark.parametrize("can_fill", [0, 1500])
def test_noise_frames_with_real_ids_move_no_speed_and_raise_no_over_speed(kernel_cls: Any, can_fill: int) -> None:
    """10 % of the bus replaced by frames with Bafang ids and random payloads, through the
    agent's decoders in sim time: the fused speed stays within the truth, no over-speed
    alarm, and the refused values are counted for the CAN source."""
    rec = ride.record("commute+can-noise", 180.0, seed=1, can_fill=can_fill)
    assert any(f["what"] == "can-noise" for f in rec.faults)
    k, slots = ride.new_kernel(kernel_cls)
    out = ride.replay(k, slots, rec.calls)
    top_truth = max(s["speed_kmh"] for s in rec.truth)
    fused = [row[3] for o in out if o[0] == kp.OUT_WINDOW and o[1] == kp.WIN_LIVE for row in o[4]
             if row[0] == kp.S_FUSED_SPEED]
    assert len(fused) > 150 and max(fused) <= top_truth + 5.0
    assert not [o for o in out if o[0] == kp.OUT_ALARM and o[2] == kp.A_OVER_SPEED]
    refused = {sid: (a, b) for sid, a, b in k.refusals(0)}
    assert sum(refused[SPEED]) > 0
