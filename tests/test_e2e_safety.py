"""The stationary interlock and the range/rate filter end to end, all real: the simulator
on ptys injects a sensor fault (a GNSS receiver that loses its fix, sticks at 0, reports a
negative speed or freezes; a wheel magnet that fell off; noise on a saturated CAN bus),
the agent runs as ``ebike-agent run``, signed commands go through mosquitto to it. The
simulator's manifest (its ``truth`` records at 1 Hz, its ``fault`` records, each frame's
sim time and wall-clock delivery) is the ground truth a ``lock`` is judged by: it must
wait, with a reason naming what each source says, while the vehicle moves, and run once
the vehicle has truly stood still for ``stationary_s``, never while it moves.

The rides (seed 52; ``firmware_sim.scenario.run`` in sim time): the rider leaves the first
stand at t = 2.9 s, cruises at 19-22.5 km/h, brakes from t = 43 and stands still (truth
below 1 km/h) from t = 47.9 to 57.8, then rides on. The fault starts at t = 12 (19.4
km/h) and lasts 0.3 x 180 = 54 s, to t = 66: the lock is sent while the bike cruises with
the fault on, and the stop falls inside the fault. At 5 x real time that stop is 2 s of
the agent's (wall) time, so the hold is 1 s (5 sim seconds), leaving 0.9 s of the stop
after it.
"""

from __future__ import annotations

import bisect
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from devtools.broker import Mosquitto
from tests import test_e2e as e2e
from tests.helpers import log_has, spawn, stop, wait_for
from tests.test_e2e_commands import Fleet, agent_config, agent_status, manifest, parts, start_sim, wait_connected
from tests.test_e2e_sources import consumer, status_cli, stop_and_collect, windows

# The fixtures borrowed from those modules (tests ask for them by name): one consumer for the
# module, each test its own device; the processes and fleet of a test stopped whatever happens.
__all__ = ["consumer", "parts"]

pytestmark = pytest.mark.e2e

SEED = 52
SPEEDUP = 5.0          # sim seconds per real second
DURATION = 180.0       # sim seconds; a fault lasts 0.3 x this
FAULT_AT = 12.0        # sim second the fault starts (the bike cruises at ~19 km/h)
HOLD_S = 1.0           # [commands] stationary_s, agent (wall) seconds
STILL_KMH = 1.0        # [commands] stationary_kmh (the default)
UARTS = {"bms": "jbd"}  # the lock opens the JBD pack's discharge switch
# How long the agent has seen the fault before the lock is sent (wall s): "a second or
# two"; a frozen fix is frozen only after gnss_frozen_s (3 s) of a still position.
SEE_S = {"gnss-frozen": 3.5}
SEE_DEFAULT_S = 2.0
# Wall to sim time, from the frames' deliveries: pacing jitter, in sim seconds.
SLACK_SIM = 0.5


# --- the manifest as ground truth ---------------------------------------------------------------------

class Ride:
    """The manifest read so far: truth, faults, frames, and the sim time at a wall instant."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.truth = [r for r in records if r["type"] == "truth"]
        self.frames = [r for r in records if r["type"] == "frame"]
        pairs = sorted((r["wall"], r["t"]) for r in self.frames)
        self.walls = [w for w, _ in pairs]
        self.times = [t for _, t in pairs]

    def sim_t(self, wall: float) -> float:
        """The sim time at wall-clock ``wall`` (Unix s), interpolated between deliveries."""
        i = bisect.bisect_left(self.walls, wall)
        assert 0 < i < len(self.walls), f"wall time {wall} outside the ride's frames"
        w0, w1, t0, t1 = self.walls[i - 1], self.walls[i], self.times[i - 1], self.times[i]
        return t0 if w1 == w0 else t0 + (t1 - t0) * (wall - w0) / (w1 - w0)

    def wall(self, t: float) -> float:
        """When the first frame of sim time ``t`` or later was delivered (0: none yet)."""
        return min((w for w, s in zip(self.walls, self.times, strict=True) if s >= t), default=0.0)

    def speeds(self, start: float, end: float) -> tuple[float, float]:
        """Lowest and highest true speed of the truth records from sim time ``start`` to ``end``."""
        near = [r["speed_kmh"] for r in self.truth if start <= r["t"] <= end]
        assert near, f"no truth record from t = {start} to {end}"
        return min(near), max(near)

    def stop_at(self, t: float) -> tuple[float, float]:
        """The stop sim time ``t`` falls in, from the 1 Hz truth: the last record at or
        above STILL_KMH before ``t`` and the first one after it (the vehicle stood still
        strictly between the two). Fails if the record on either side of ``t`` moves."""
        before = [r for r in self.truth if r["t"] <= t]
        after = [r for r in self.truth if r["t"] > t]
        assert before and after, f"t = {t} is not inside the truth records"
        assert before[-1]["speed_kmh"] < STILL_KMH and after[0]["speed_kmh"] < STILL_KMH, \
            f"at t = {t:.2f} the truth says {before[-1]['speed_kmh']:.2f} km/h (t = {before[-1]['t']}) and " \
            f"{after[0]['speed_kmh']:.2f} km/h (t = {after[0]['t']})"
        moved = [r["t"] for r in before if r["speed_kmh"] >= STILL_KMH]
        resumed = [r["t"] for r in after if r["speed_kmh"] >= STILL_KMH]
        assert moved, "the vehicle never moved before"
        return moved[-1], resumed[0] if resumed else float("inf")


def ride_past(tmp: Path, wall: float) -> Ride:
    """The manifest once it holds the truth records around wall-clock ``wall`` too (one
    per sim second, 1 / SPEEDUP s of wall time)."""
    wait_for("the manifest past the moment", lambda: any(
        r["type"] == "frame" and r["wall"] > wall + 2.5 / SPEEDUP for r in manifest(tmp)[-50:]), 10)
    return Ride(manifest(tmp))


def fault_record(tmp: Path, scenario: str) -> dict[str, Any]:
    """The manifest's record of the fault ``scenario`` injects, once it has started."""
    what = {"gnss-outage": "gnss-lost"}.get(scenario, scenario)
    return next((r for r in manifest(tmp) if r["type"] == "fault" and r["what"] == what), {})


def wait_motion(tmp: Path, wheel: str, gnss: str, timeout: float) -> dict[str, Any]:
    """Until the agent's stationary decision has the wheel and the GNSS voting so."""
    seen: dict[str, Any] = {}

    def voted() -> bool:
        seen.update(agent_status(tmp).get("motion") or {})
        return (seen.get("wheel") or {}).get("vote") == wheel and (seen.get("gnss") or {}).get("vote") == gnss

    try:
        wait_for(f"the wheel to vote {wheel!r} and the GNSS {gnss!r}", voted, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}; the agent's motion says {seen}") from None
    return seen


KMH = re.compile(r"(wheel|GNSS) (-?\d+\.\d) km/h")


def named_speeds(reason: str) -> dict[str, float]:
    """``{"wheel": 21.4, "GNSS": 0.0}``: the speeds a reason names."""
    return {name: float(value) for name, value in KMH.findall(reason)}


def assert_near_truth(what: str, value: float, ride: Ride, walls: tuple[float, float]) -> None:
    """``value`` is the true speed at some moment between wall-clock ``walls`` (the agent
    saw it a little before: a truth record either side of that time is allowed)."""
    start, end = ride.sim_t(walls[0]) - 1.0, ride.sim_t(walls[1]) + 1.0
    low, high = ride.speeds(start, end)
    assert low - 1.0 <= value <= high + 1.0, \
        f"{what} {value} km/h at t = {start:.1f}-{end:.1f}; the truth was {low:.1f}-{high:.1f}"


# --- the lock through a sensor fault -----------------------------------------------------------------

def ride_with_fault(tmp: Path, broker: Mosquitto, parts: list[Any], fault: str) -> Fleet:
    """Fleet, simulator (``fault`` from FAULT_AT) and agent up; returns once the agent has
    seen the fault for SEE_S."""
    device = f"safety-{fault}"
    fleet = Fleet(tmp, broker, device)
    parts.append(fleet)
    parts.append(start_sim(tmp, fault, DURATION, SPEEDUP, UARTS, seed=SEED, extra=("--fault-at", str(FAULT_AT))))
    config = agent_config(tmp, broker, device, fleet, UARTS, stationary_s=HOLD_S, sim_speed=SPEEDUP)
    parts.append(spawn(["agent", "run", "--config", str(config)], tmp / "agent.log"))
    wait_connected(tmp)
    record = wait_for(f"the {fault} fault to start", lambda: fault_record(tmp, fault), FAULT_AT / SPEEDUP + 20)
    assert record["t"] == FAULT_AT and record["until"] == FAULT_AT + 0.3 * DURATION, record
    started = wait_for("a frame with the fault", lambda: Ride(manifest(tmp)).wall(FAULT_AT), 5)
    time.sleep(max(0.0, started + SEE_S.get(fault, SEE_DEFAULT_S) - time.time()))
    return fleet


def status_while_riding(tmp: Path) -> tuple[dict[str, Any], Ride, tuple[float, float]]:
    """``ebike-agent status --json``'s ``motion``, the manifest, and when it was asked."""
    asked = time.time()
    motion: dict[str, Any] = status_cli(tmp / "control.sock")["motion"]
    answered = time.time()
    ride = ride_past(tmp, answered)
    assert ride.speeds(ride.sim_t(asked) - 1, ride.sim_t(answered) + 1)[0] >= 15.0, \
        "the bike did not ride at 15-25 km/h when the status was asked: pick another seed or --fault-at"
    return motion, ride, (asked, answered)


def lock_through_the_stop(tmp: Path, fleet: Fleet, fault: str) -> tuple[Ride, dict[str, Any], dict[str, Any]]:
    """Send a ``lock`` while the bike rides with the fault on; wait for it to be deferred
    and then executed. Returns the manifest then and both results."""
    lock = fleet.send("lock")
    deferred = fleet.wait(lock, "deferred", 10)
    # The stop ends at t = 57.8: the lock must run in it.
    executed = fleet.wait(lock, "executed", 60 / SPEEDUP + 10)
    assert fleet.statuses(lock) == ["accepted", "deferred", "executed"]
    ran = executed["t"]["executed"] / 1000
    ride = ride_past(tmp, ran)
    assert ride.sim_t(ran) < fault_record(tmp, fault)["until"], "the fault was over when the lock ran: proves nothing"
    at = deferred["t"]["deferred"] / 1000
    assert ride.speeds(ride.sim_t(at) - 1, ride.sim_t(at) + 1)[0] >= 10.0, \
        "the lock was sent while the bike was stopping: the test proves nothing"
    return ride, deferred, executed


def assert_ran_after_a_true_stop(ride: Ride, executed: dict[str, Any]) -> None:
    """The lock was reported executed, and the vehicle's pack switched off (the JBD's
    one E1 answer, served when the write came), inside a stop, at least the hold time
    after the truth last moved."""
    switched = [r["t"] for r in ride.frames if r["bus"] == "jbd" and r["kind"] == "E1"]
    assert len(switched) == 1, f"the pack was switched {len(switched)} times"
    for what, t in (("reported executed", ride.sim_t(executed["t"]["executed"] / 1000)),
                    ("switched off", switched[0])):
        moved, resumed = ride.stop_at(t)
        # The vehicle stood still only after ``moved`` (1 Hz truth); the hold is wall time.
        assert moved + HOLD_S * SPEEDUP - SLACK_SIM <= t < resumed, \
            f"{what} at t = {t:.2f}, {t - moved:.2f} sim s after t = {moved} when the truth last moved " \
            f"(the hold is {HOLD_S * SPEEDUP:g} sim s; it moved again at t = {resumed})"


GNSS_FAULTS = [
    # fault, how the agent's GNSS input votes while it lasts, what a reason says of it
    pytest.param("gnss-outage", "no fix", "GNSS no fix", id="gnss-outage"),
    pytest.param("gnss-stuck", "still", "GNSS 0.0 km/h", id="gnss-stuck"),
    pytest.param("gnss-negative", "refused", "GNSS refused", id="gnss-negative"),
    pytest.param("gnss-frozen", "frozen", "GNSS frozen", id="gnss-frozen"),
]


@pytest.mark.parametrize(("fault", "vote", "says"), GNSS_FAULTS)
def test_lock_waits_for_a_true_stop_through_a_gnss_fault(tmp_path: Path, mosquitto: Mosquitto, consumer: Path,
                                                         parts: list[Any], fault: str, vote: str, says: str) -> None:
    """With the wheel turning at ~20 km/h and the GNSS receiver faulty, the agent's
    stationary decision is "moving" and names both; a ``lock`` is deferred with a reason
    naming the wheel's speed and what is wrong with the GNSS, and runs only once the
    vehicle has truly stood still for the hold time: the faulty GNSS neither blocks that
    stop nor makes one up."""
    fleet = ride_with_fault(tmp_path, mosquitto, parts, fault)
    wait_motion(tmp_path, "moving", vote, 3)
    motion, ride, asked = status_while_riding(tmp_path)
    assert motion["verdict"] == "moving" and motion["still_s"] == 0, motion
    assert motion["wheel"]["vote"] == "moving" and motion["gnss"]["vote"] == vote, motion
    assert_near_truth("status: the wheel", motion["wheel"]["wheel_kmh"], ride, asked)
    assert motion["why"].startswith("wheel ") and says in motion["why"] and " motor " in motion["why"], motion
    if fault == "gnss-stuck":
        assert motion["gnss"]["gnss_kmh"] == 0.0 and motion["why"].endswith(" disagree"), motion

    ride, deferred, executed = lock_through_the_stop(tmp_path, fleet, fault)
    reason = deferred["reason"]
    assert reason.startswith(f"waiting for the vehicle to stand still for {HOLD_S:g} s: wheel "), reason
    assert says in reason, reason
    if fault == "gnss-stuck":
        assert reason.endswith(" disagree"), reason
    at = deferred["t"]["deferred"] / 1000
    speeds = named_speeds(reason)
    assert "wheel" in speeds, reason
    assert_near_truth(f"the deferred reason's wheel ({reason!r})", speeds["wheel"], ride, (at, at))
    assert_ran_after_a_true_stop(ride, executed)


def test_lock_waits_while_the_wheel_reads_zero_and_the_bike_rides(tmp_path: Path, mosquitto: Mosquitto,
                                                                  consumer: Path, parts: list[Any]) -> None:
    """The wheel magnet fell off: the controller reads 0 km/h while the GNSS says ~20 and
    the motor draws current. The sources disagree, so the vehicle is moving and a
    ``lock`` waits, naming both speeds; it runs only when the bike truly stops (then the
    wheel's 0 is true, and the GNSS and the motor agree with it)."""
    fleet = ride_with_fault(tmp_path, mosquitto, parts, "wheel-magnet")
    wait_motion(tmp_path, "still", "moving", 3)
    motion, ride, asked = status_while_riding(tmp_path)
    assert motion["verdict"] == "moving" and motion["still_s"] == 0, motion
    assert motion["wheel"] == {"vote": "still", "wheel_kmh": 0.0}, motion
    assert motion["gnss"]["vote"] == "moving" and motion["why"].endswith(" disagree"), motion
    assert_near_truth("status: the GNSS", motion["gnss"]["gnss_kmh"], ride, asked)
    assert motion["motor"]["vote"] == "moving" and motion["motor"]["motor_a"] >= 1.0, motion
    line = subprocess.run([sys.executable, "-m", "agent", "status", "--socket", str(tmp_path / "control.sock")],
                          capture_output=True, text=True, timeout=15, check=True).stdout
    # Words wrapped at 80 columns are one text again.
    words = " ".join(line.split())
    assert re.search(r"motion: moving \(wheel 0\.0 km/h, GNSS [0-9.]+ km/h, .* disagree\)", words), line

    ride, deferred, executed = lock_through_the_stop(tmp_path, fleet, "wheel-magnet")
    reason = deferred["reason"]
    speeds = named_speeds(reason)
    assert reason.endswith(" disagree") and speeds["wheel"] == 0.0 and " motor " in reason, reason
    at = deferred["t"]["deferred"] / 1000
    assert_near_truth(f"the deferred reason's GNSS ({reason!r})", speeds["GNSS"], ride, (at, at))
    assert_ran_after_a_true_stop(ride, executed)


# --- noise on a saturated CAN bus --------------------------------------------------------------------

NOISE_S = 60
CAN_FILL = 2122  # the most frames per second a 250 kbit/s bus carries (firmware_sim --can-fill)
CAN_SOURCE = 1   # in test_e2e's configuration: gnss, can0


def test_can_noise_on_a_saturated_bus_is_refused(tmp_path: Path, mosquitto: Mosquitto, consumer: Path) -> None:
    """A tenth of the frames on a saturated 250 kbit/s bus carry random data under their
    real ids for a minute. The agent refuses the impossible values (counted per source and
    signal in ``status``, data_quality raised for that source), so the fused speed never
    leaves the true one (never above 150 km/h nor 5 km/h above the truth) and no
    over_speed alarm is raised."""
    device = "safety-can-noise"
    sim = spawn(["firmware_sim", "--slcan", str(tmp_path / "can"), "--nmea", str(tmp_path / "gps"),
                 "--scenario", "can-noise", "--can-noise-share", "0.1", "--can-fill", str(CAN_FILL),
                 "--speed", "1", "--duration", str(NOISE_S), "--seed", str(SEED),
                 "--manifest", str(tmp_path / "manifest.jsonl"), "--wait-open", "60", "--linger", "2"],
                tmp_path / "sim.log")
    agent = None
    alarms_seen: set[tuple[str, str | None]] = set()
    try:
        wait_for("the simulator's ptys", lambda: log_has(tmp_path / "sim.log", "ready"), 20)
        agent = spawn(["agent", "run", "--config", str(e2e.agent_config(tmp_path, mosquitto, device))],
                      tmp_path / "agent.log")

        def ride_over() -> bool:
            alarms_seen.update((a["name"], a["source"]) for a in agent_status(tmp_path).get("alarms", []))
            return sim.poll() is not None

        wait_for("the simulated ride to end", ride_over, NOISE_S + 30, interval=0.5)
        assert sim.returncode == 0, (tmp_path / "sim.log").read_text()
        status = status_cli(tmp_path / "control.sock")
        stop_and_collect(agent, tmp_path / "agent.log", tmp_path / "outbox.sqlite", consumer, device)
    finally:
        for proc in (sim, agent):
            if proc is not None:
                stop(proc)

    ride = Ride(manifest(tmp_path))
    can = [r for r in ride.frames if r["bus"] == "can"]
    noise = sum(r["kind"] == "noise" for r in can)
    assert len(can) > CAN_FILL * NOISE_S * 0.95 and 0.09 < noise / len(can) < 0.11, \
        f"{noise} noise frames of {len(can)}: not the saturated, noisy bus asked for"

    top_truth = max(r["speed_kmh"] for r in ride.truth)
    fused = windows(consumer, device, "Vehicle.LEV.Fused.Speed")
    assert len(fused) >= NOISE_S * 0.9, f"only {len(fused)} live windows of the fused speed"
    top_fused = max(row[4] for row in fused)
    assert top_fused <= 150.0 and top_fused <= top_truth + 5.0, \
        f"the fused speed reached {top_fused:.1f} km/h; the truth never went above {top_truth:.1f}"

    with sqlite3.connect(consumer) as c:
        alarms = [cbor2.loads(b) for (b,) in c.execute("SELECT body FROM records WHERE device=? AND kind='alm'",
                                                       (device,))]
    assert not [a for a in alarms if a["name"] == "over_speed"], alarms
    assert not [a for a in alarms_seen if a[0] == "over_speed"], alarms_seen

    sources = status["sources"]
    assert sources[CAN_SOURCE]["name"] == "can0", sources
    refused = sources[CAN_SOURCE]["refused"]
    assert sum(refused.get("Vehicle.Speed", {}).values()) > 0, refused
    assert sources[0]["refused"] == {}, "the GNSS was blamed for the CAN bus's noise"
    assert ("data_quality", "can0") in alarms_seen, alarms_seen
    assert not [a for a in alarms_seen if a[0] == "data_quality" and a[1] != "can0"], alarms_seen
    # Nothing else the noise could fake: no alarm but data_quality while the bus carried
    # frames (communication_lost follows when the ride has ended).
    ended_ms = max(r["wall"] for r in can) * 1000
    raised = {a["name"] for a in alarms if a["on"] and a["t"] <= ended_ms}
    assert raised <= {"data_quality"}, f"the noise raised {sorted(raised - {'data_quality'})}: {alarms}"
