"""Scenario scheduler: steps the vehicle in 10 ms of sim time and emits due frames.

The writer is any object with

* ``frame(bus, t, payload, kind, values)``: one frame on ``bus`` at sim time ``t``
  seconds. ``bus`` is ``"can"`` or ``"nmea"``. For ``"can"`` the payload is the
  tuple ``(can_id, data_bytes)`` (29-bit id, an extended frame); for ``"nmea"`` it
  is the sentence bytes including CR LF. ``kind`` names the message (``"32/01"``,
  ``"GGA"``), ``values`` the physical values as quantised on the wire.
* optionally ``truth(t, state)``: the true vehicle state (a dict) once per sim second.
* optionally ``tick(t)``: called once per step before that step's frames; returning
  ``False`` stops the run (used for pacing, I/O and signals by the CPython glue).

MicroPython-safe.
"""

from firmware_sim.encoders import bafang, nmea
from firmware_sim.vehicle import Vehicle

DT = 0.01
STEPS_PER_S = 100


def _m31_00(v, st):
    st["counter"] = (st["counter"] + 1) & 0xFF
    return bafang.torque_31_00(v.torque, v.cadence, st["counter"])


def _m32_01(v, st):
    return bafang.controller_32_01(v.speed_kmh, v.motor_i, v.ctrl_v, v.ctrl_temp, v.motor_temp)


def _m32_00(v, st):
    return bafang.controller_32_00(v.soc, v.trip_km, v.cadence, v.torque, v.range_km)


def _m32_03(v, st):
    return bafang.controller_32_03(v.speed_limit_kmh, v.wheel_size_code, v.wheel_circ_mm)


def _m34_00(v, st):
    return bafang.battery_34_00(v.full_mah, v.remaining_mah, v.soc)


def _m34_01(v, st):
    return bafang.battery_34_01(v.pack_i, v.pack_v, v.batt_temp)


# (kind, period in steps, offset in steps, encoder). Offsets spread the messages
# over the 10 ms steps as real nodes do instead of bunching them all at t = 0.
COMMUTE_CAN = (
    ("31/00", 2, 0, _m31_00),      # 50 Hz torque sensor
    ("32/01", 25, 3, _m32_01),     # 4 Hz controller status
    ("32/00", 25, 4, _m32_00),     # 4 Hz controller SoC / trip / pedal / range
    ("34/01", 25, 9, _m34_01),     # 4 Hz battery live data
    ("34/00", 100, 11, _m34_00),   # 1 Hz battery capacity
    ("32/03", 100, 13, _m32_03),   # 1 Hz controller settings
)

SCENARIOS = {
    "commute": COMMUTE_CAN,
}


def scenario_names():
    return sorted(SCENARIOS)


def check_scenario(name):
    """The CAN schedule of scenario ``name``; ValueError listing the known ones if unknown."""
    if name not in SCENARIOS:
        known = ", ".join(scenario_names())
        raise ValueError(f"unknown scenario {name!r}; known: {known}")
    return SCENARIOS[name]


def run(writer, scenario="commute", seed=1, duration=120.0, nmea_rate=5, talker="GN"):
    """Ride ``scenario`` for ``duration`` sim seconds, sending frames to ``writer``.

    Steps t = 0, 0.01, ... below ``duration``. NMEA epochs (GGA then RMC) fall on
    multiples of 1/``nmea_rate`` s. Returns the vehicle (its final true state) and
    the sim time reached as ``(vehicle, t)``.
    """
    schedule = check_scenario(scenario)
    rate = int(nmea_rate)
    if rate < 1 or rate > 10:
        raise ValueError("nmea_rate must be 1-10 Hz")
    frame = writer.frame
    truth = getattr(writer, "truth", None)
    tick = getattr(writer, "tick", None)
    vehicle = Vehicle(seed)
    state = {"counter": 0xFF}
    steps = int(duration * STEPS_PER_S + 0.5)
    t = 0.0
    n = 0
    while n < steps:
        t = n / STEPS_PER_S
        if n:
            vehicle.step(DT)
        if tick is not None and tick(t) is False:
            return vehicle, t
        for kind, period, offset, enc in schedule:
            if n % period == offset:
                can_id, data, values = enc(vehicle, state)
                frame("can", t, (can_id, data), kind, values)
        if (n * rate) % STEPS_PER_S < rate:
            # An NMEA epoch starts in this step.
            sentence, values = nmea.gga(t, vehicle.gnss_lat, vehicle.gnss_lon,
                                        vehicle.fix_quality, vehicle.sats, vehicle.hdop,
                                        vehicle.gnss_alt, talker)
            frame("nmea", t, sentence, "GGA", values)
            sentence, values = nmea.rmc(t, vehicle.gnss_lat, vehicle.gnss_lon,
                                        vehicle.gnss_speed_kmh, vehicle.gnss_heading, talker)
            frame("nmea", t, sentence, "RMC", values)
        if truth is not None and n % STEPS_PER_S == 0:
            truth(t, vehicle.truth())
        n += 1
    return vehicle, steps / STEPS_PER_S
