"""Physics sanity of the vehicle model over a ride (issue 4, "Physics sanity").

Energy is integrated here from the model's state each step, independently of the
model's own bookkeeping; GNSS fixes are checked against the route polyline.
"""

from __future__ import annotations

import math

from firmware_sim import scenario
from firmware_sim.vehicle import ROUTE, Vehicle, ocv_cell

DT = 0.01


def _ride(seconds: float, seed: int = 12):
    v = Vehicle(seed)
    chem = terminal = mech = losses = 0.0
    mah0 = v.remaining_mah
    socs = [v.soc]
    temps = []
    for n in range(int(seconds / DT)):
        v.step(DT)
        i = -v.pack_i                                   # discharge current, A
        ocv = v.cells * ocv_cell(v.soc)
        chem += ocv * i * DT
        terminal += v.pack_v * i * DT
        mech += v.motor_w * DT
        losses += (v.motor_w * (1.0 / v.motor_eff - 1.0) + v.idle_w + i * i * v.r_int) * DT
        if n % 100 == 0:
            socs.append(v.soc)
            temps.append((v.motor_temp, v.ctrl_temp, v.batt_temp, *v.ntc_temps()))
    return v, chem, terminal, mech, losses, mah0, socs, temps


def test_energy_balance_soc_and_temperatures():
    v, chem, terminal, mech, losses, mah0, socs, temps = _ride(900.0)
    assert mech > 5000.0                                # the motor did real work (> 1.4 Wh)
    # Pack energy out (chemical, OCV x current) = motor energy + losses, within 5 %.
    assert abs(chem - (mech + losses)) / chem < 0.05
    # What the terminals delivered is what the controller, motor and idle load took.
    assert abs(terminal - (mech / v.motor_eff + v.idle_w * 900.0)) / terminal < 0.05
    # Coulomb counting agrees with the pack's remaining capacity (mAh).
    used_mah = (mah0 - v.remaining_mah)
    wh_per_mah = chem / 3600.0 / used_mah
    assert 0.030 < wh_per_mah < 0.042                   # 10 cells at 3.0-4.2 V
    # SoC falls while discharging and never rises.
    assert all(b <= a for a, b in zip(socs, socs[1:], strict=False))
    assert socs[-1] < socs[0] - 1.0
    # Temperatures stay physical: above ambient - 1 C, below 80 C, no jumps.
    for row in temps:
        assert all(v.ambient - 1.0 < x < 80.0 for x in row)
    for a, b in zip(temps, temps[1:], strict=False):
        assert all(abs(x - y) < 1.0 for x, y in zip(a, b, strict=True))


def _dist_to_route_m(lat: float, lon: float) -> float:
    k = math.cos(math.radians(29.68)) * 111320.0
    best = 1e9
    n = len(ROUTE)
    for i in range(n):
        a, b = ROUTE[i], ROUTE[(i + 1) % n]
        ax, ay = a[1] * k, a[0] * 111320.0
        bx, by = b[1] * k, b[0] * 111320.0
        px, py = lon * k, lat * 111320.0
        dx, dy = bx - ax, by - ay
        f = max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
        best = min(best, math.hypot(px - ax - f * dx, py - ay - f * dy))
    return best


def test_gnss_track_stays_on_the_route():
    class W:
        def __init__(self) -> None:
            self.fixes: list[tuple[float, float]] = []

        def frame(self, bus, t, payload, kind, values):
            if kind == "GGA":
                self.fixes.append((values["Vehicle.CurrentLocation.Latitude"],
                                   values["Vehicle.CurrentLocation.Longitude"]))

    w = W()
    scenario.run(w, "commute", 5, 300.0, nmea_rate=1, buses=("nmea",))
    assert len(w.fixes) == 300
    dists = [_dist_to_route_m(lat, lon) for lat, lon in w.fixes]
    assert max(dists) < 15.0                          # metre-level receiver noise only
    assert sum(dists) / len(dists) < 5.0
    first, last = w.fixes[0], w.fixes[-1]
    assert math.hypot(first[0] - last[0], first[1] - last[1]) * 111320.0 > 300.0   # it went somewhere


def test_capacity_fades_with_equivalent_full_cycles() -> None:
    """Discharging the pack adds equivalent full cycles (one per design capacity drawn)
    and the full capacity fades with them: 1 % of the design capacity per 20 cycles."""
    v = Vehicle(seed=5)
    c0, full0 = v.cycles, v.full_mah
    assert full0 == v.design_mah * (100.0 - c0 / 20.0) / 100.0
    drawn = 0.0
    for _ in range(20000):
        v.step(0.05)
        drawn += max(0.0, -v.pack_i) * 0.05 / 3.6
    assert drawn > 100.0, "the ride drew too little to see anything"
    assert math.isclose(v.cycles - c0, drawn / v.design_mah, rel_tol=0.02)
    assert math.isclose(v.full_mah, v.design_mah * (100.0 - v.cycles / 20.0) / 100.0, rel_tol=1e-12)
    assert v.full_mah < full0 and 0.0 <= v.soc <= 100.0
