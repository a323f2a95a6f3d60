"""Scenario scheduler: steps the vehicle in 10 ms of sim time and emits due frames.

The writer is any object with

* ``frame(bus, t, payload, kind, values)``: one frame on ``bus`` at sim time ``t``
  seconds. ``bus`` is ``"can"``, ``"nmea"``, ``"kt"`` or ``"surron"`` (streamed
  here) or, for answers to polls (see :meth:`Ride.serve`), ``"jbd"``, ``"daly"``,
  ``"ninebot"`` or ``"surron"``. For ``"can"`` the payload is the tuple
  ``(can_id, data_bytes)`` (29-bit id, an extended frame); for the others the frame
  bytes (NMEA: the sentence including CR LF). ``kind`` names the message (``"32/01"``,
  ``"GGA"``), ``values`` the physical values as quantised on the wire. Garbage
  bytes injected by ``noisy-line`` come as kind ``"garbage"`` with no values.
* optionally ``fault(record)``: a scenario's injection (a dict with ``t``, ``scenario``
  and ``what``), when it takes effect.
* optionally ``attach(ride)``: called once with the :class:`Ride` before the first step,
  so the glue can pass host requests to ``ride.serve``.
* optionally ``truth(t, state)``: the true vehicle state (a dict) once per sim second.
* optionally ``tick(t)``: called once per step before that step's frames; returning
  ``False`` stops the run (used for pacing, I/O and signals by the CPython glue).

MicroPython-safe.
"""

from firmware_sim.encoders import bafang, daly, jbd, kt, ninebot, nmea, surron
from firmware_sim.prng import Prng
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


def _m12_00(v, st):
    return bafang.drive_unit_12_00(v.fault_code)


# Streamed UART frames: (bus, kind, period in steps, offset, encoder).
UART_STREAMS = (
    ("kt", "41", 10, 5, kt.from_vehicle),            # 10 Hz controller -> display
    ("surron", "57/72", 50, 17, surron.from_vehicle),  # 2 Hz BMS -> display
)
# Buses whose frames are answers to host requests: bus -> encoder module.
POLLED = {"jbd": jbd, "daly": daly, "ninebot": ninebot, "surron": surron, "kt": kt}
UART_BUSES = ("jbd", "daly", "ninebot", "kt", "surron")
NMEA_SENTENCES = ("GGA", "RMC", "VTG", "GSA")
TALKERS = ("GP", "GN", "GB", "BD")


# Scenarios ----------------------------------------------------------------------
# Each setup(ride) changes the vehicle at t = 0 and/or schedules injections with
# ride.at(t, what, apply, **details). Times are fractions of the ride's duration so
# that short test rides see them too.

def _commute(ride):
    pass


def _charge(ride):
    def go(v):
        v.parked = True
        v.charge_a = 4.0
    ride.at(0.0, "charger", go, current_a=4.0)


def _park(ride):
    def go(v):
        v.parked = True
        v.locked = True
    ride.at(0.0, "parked", go, locked=True)


def _theft(ride):
    _park(ride)

    def move(v):
        v.pushed_kmh = 8.0
    ride.at(0.3 * ride.duration, "moved", move, speed_kmh=8.0, locked=True)


def _overheat(ride):
    def go(v):
        v.extra_heat = 1.5
    ride.at(0.2 * ride.duration, "overheat", go, rate_c_per_s=1.5)


def _thermal_runaway(ride):
    v = ride.vehicle

    def go(v):
        ride.runaway_rate = 3.0
    ride.at(0.2 * ride.duration, "thermal-runaway", go, cell=v.runaway_cell + 1, ntc=2,
            rate_c_per_s=3.0)


def _cell_imbalance(ride):
    v = ride.vehicle

    def go(v):
        ride.imbalance_rate = -2.0
    ride.at(0.2 * ride.duration, "cell-imbalance", go, cell=v.runaway_cell + 1,
            rate_soc_pct_per_s=-2.0, floor_soc_pct=-30.0)


def _overspeed(ride):
    def go(v):
        v.speed_limit_kmh = 45.0
        v.cruise_min_kmh = 28.0
        v.cruise_max_kmh = 32.0
    ride.at(0.0, "derestricted", go, speed_limit_kmh=45.0, cruise_kmh=[28.0, 32.0])


def _gnss_outage(ride):
    def lose(v):
        ride.gnss_fix = False

    def regain(v):
        ride.gnss_fix = True
    t0 = 0.3 * ride.duration
    t1 = 0.6 * ride.duration
    ride.at(t0, "gnss-lost", lose, until=t1)
    ride.at(t1, "gnss-restored", regain)


def _noisy_line(ride):
    def go(v):
        ride.noise_on = True
    ride.at(0.0, "noisy-line", go, rate=ride.noise_rate)


def _bms_fault(ride):
    def trip(v):
        v.protection |= 0x0200         # discharge over-current
        v.discharge_on = False

    def clear(v):
        v.protection &= ~0x0200
        v.discharge_on = True
    t0 = 0.3 * ride.duration
    t1 = 0.6 * ride.duration
    ride.at(t0, "bms-protection", trip, protection=0x0200, discharge_on=False, until=t1)
    ride.at(t1, "bms-recovered", clear, protection=0, discharge_on=True)


CONTROLLER_FAULT = 0x21


def _controller_fault(ride):
    def trip(v):
        v.fault_code = CONTROLLER_FAULT

    def clear(v):
        v.fault_code = 0
    t0 = 0.3 * ride.duration
    t1 = 0.6 * ride.duration
    ride.at(t0, "controller-fault", trip, code=CONTROLLER_FAULT, until=t1)
    ride.at(t1, "controller-recovered", clear, code=0)


SCENARIOS = {
    "commute": _commute,
    "charge": _charge,
    "park": _park,
    "theft": _theft,
    "overheat": _overheat,
    "thermal-runaway": _thermal_runaway,
    "cell-imbalance": _cell_imbalance,
    "overspeed": _overspeed,
    "gnss-outage": _gnss_outage,
    "noisy-line": _noisy_line,
    "bms-fault": _bms_fault,
    "controller-fault": _controller_fault,
}


def scenario_names():
    return sorted(SCENARIOS)


def check_scenario(name):
    """The scenario names of ``name`` (``a+b`` composes); ValueError listing the known ones."""
    names = name.split("+")
    for n in names:
        if n not in SCENARIOS:
            known = ", ".join(scenario_names())
            raise ValueError("unknown scenario %r; known: %s" % (n, known))
    return names


def _hex(b):
    return "".join("%02x" % x for x in b)


def _nop(*args):
    return None


class Ride:
    """A vehicle, its scenario's injections, and the answers to host requests."""

    def __init__(self, scenario="commute", seed=1, duration=120.0, noise_rate=0.02):
        self.names = check_scenario(scenario)
        self.vehicle = Vehicle(seed)
        self.duration = duration
        self.noise_rate = noise_rate
        self.noise = Prng(seed ^ 0x0B17E)
        self.noise_on = False
        self.gnss_fix = True
        self.runaway_rate = 0.0
        self.imbalance_rate = 0.0
        self.t = 0.0
        self.faults = []
        self._events = []  # type: list
        self._fault = _nop
        self._frame = _nop
        self.parsers = {}
        for n in self.names:
            SCENARIOS[n](self)
        # By time, then in the order scheduled (MicroPython's sort is not stable).
        order = list(range(len(self._events)))
        order.sort(key=lambda i: (self._events[i][0], i))
        self._events = [self._events[i] for i in order]
        self.can = list(COMMUTE_CAN)
        if "controller-fault" in self.names:
            self.can.append(("12/00", 100, 15, _m12_00))

    def at(self, t, what, apply, **details):
        """Schedule ``apply(vehicle)`` at sim time ``t``; recorded as a fault record then."""
        self._events.append((t, what, apply, details))

    def _fire(self, t):
        while self._events and self._events[0][0] <= t + 1e-9:
            _t, what, apply, details = self._events.pop(0)
            apply(self.vehicle)
            rec = {"type": "fault", "t": t, "scenario": "+".join(self.names), "what": what}
            for k in details:
                rec[k] = details[k]
            self._record(rec)

    def _record(self, rec):
        self.faults.append(rec)
        self._fault(rec)

    def _advance(self, dt):
        v = self.vehicle
        if self.runaway_rate:
            v.runaway_rise += self.runaway_rate * dt
        if self.imbalance_rate:
            k = v.runaway_cell
            v.cell_soc_off[k] = max(-30.0, v.cell_soc_off[k] + self.imbalance_rate * dt)

    def noisy(self, bus, t, payload, kind):
        """Apply ``noisy-line`` to one UART frame: maybe garbage before it, maybe a bit
        flipped in it. Returns ``(garbage or None, payload)``; both are recorded."""
        if not self.noise_on:
            return None, payload
        r = self.noise
        rate = self.noise_rate
        garbage = None
        if r.random() < rate:
            garbage = bytes(r.next_u32() & 0xFF for _ in range(r.randint(1, 8)))
            self._record({"type": "fault", "t": t, "scenario": "noisy-line", "what": "garbage",
                          "bus": bus, "data": _hex(garbage)})
        if r.random() < rate:
            b = bytearray(payload)
            i = r.randint(0, len(b) - 1)
            bit = r.randint(0, 7)
            b[i] ^= 1 << bit
            payload = bytes(b)
            self._record({"type": "fault", "t": t, "scenario": "noisy-line", "what": "bit-error",
                          "bus": bus, "kind": kind, "byte": i, "bit": bit})
        return garbage, payload

    def emit(self, bus, t, payload, kind, values):
        """Send one UART frame to the writer, through the line noise if any."""
        garbage, payload = self.noisy(bus, t, payload, kind)
        if garbage is not None:
            self._frame(bus, t, garbage, "garbage", {})
        self._frame(bus, t, payload, kind, values)

    def serve(self, bus, data):
        """Feed bytes a host wrote on ``bus``; answer each complete request at once.

        Answers (and writes that change the vehicle: JBD MOS control, the KT display's
        lock bit) take effect at the current sim time ``self.t``. Answers go to the
        writer's ``frame`` like streamed frames. Returns the number of requests found.
        """
        mod = POLLED[bus]
        p = self.parsers.get(bus)
        if p is None:
            p = mod.parser()
            self.parsers[bus] = p
        reqs = p.feed(data)
        for req in reqs:
            got = mod.serve(self.vehicle, req)
            if got is not None:
                self.emit(bus, self.t, got[0], got[1], got[2])
        return len(reqs)

    def set_speed_limit(self, kmh):
        self.vehicle.speed_limit_kmh = kmh

    def can_write(self, can_id, data):
        """A frame a host put on the CAN bus. A write (op 0) to the controller of code
        32/03 sets the assistance cut-off speed (first u16 LE, 0.01 km/h). True if obeyed."""
        target = (can_id >> 19) & 0x1F
        op = (can_id >> 16) & 0x07
        code = (can_id >> 8) & 0xFF
        sub = can_id & 0xFF
        if target == bafang.NODE_CONTROLLER and op == 0 and code == 0x32 and sub == 0x03 \
                and len(data) >= 2:
            self.set_speed_limit((data[0] | (data[1] << 8)) / 100.0)
            return True
        return False


def run(writer, scenario="commute", seed=1, duration=120.0, nmea_rate=5, talker="GN",
        buses=("can", "nmea"), noise_rate=0.02, sentences=("GGA", "RMC")):
    """Ride ``scenario`` for ``duration`` sim seconds, sending frames to ``writer``.

    Steps t = 0, 0.01, ... below ``duration``. Only ``buses`` are emitted (``can``,
    ``nmea``, ``kt``, ``surron``); polled buses answer through ``Ride.serve``. NMEA
    epochs (``sentences`` in order) fall on multiples of 1/``nmea_rate`` s. Returns
    the vehicle (its final true state) and the sim time reached as ``(vehicle, t)``.
    """
    rate = int(nmea_rate)
    if rate < 1 or rate > 10:
        raise ValueError("nmea_rate must be 1-10 Hz")
    if talker not in TALKERS:
        raise ValueError("talker must be one of " + ", ".join(TALKERS))
    for s in sentences:
        if s not in NMEA_SENTENCES:
            raise ValueError("unknown NMEA sentence %r" % s)
    ride = Ride(scenario, seed, duration, noise_rate)
    frame = writer.frame
    ride._frame = frame
    ride._fault = getattr(writer, "fault", None) or _nop
    truth = getattr(writer, "truth", None)
    tick = getattr(writer, "tick", None)
    attach = getattr(writer, "attach", None)
    if attach is not None:
        attach(ride)
    vehicle = ride.vehicle
    state = {"counter": 0xFF}
    want_can = "can" in buses
    want_nmea = "nmea" in buses
    streams = [s for s in UART_STREAMS if s[0] in buses]
    steps = int(duration * STEPS_PER_S + 0.5)
    t = 0.0
    n = 0
    while n < steps:
        t = n / STEPS_PER_S
        ride.t = t
        # Injections due by t act on the step that ends at t, so the state at t shows them.
        ride._fire(t)
        if n:
            ride._advance(DT)
            vehicle.step(DT)
        if tick is not None and tick(t) is False:
            return vehicle, t
        if want_can:
            for kind, period, offset, enc in ride.can:
                if n % period == offset:
                    can_id, data, values = enc(vehicle, state)
                    frame("can", t, (can_id, data), kind, values)
        for bus, kind, period, offset, make in streams:
            if n % period == offset:
                payload, values = make(vehicle)
                ride.emit(bus, t, payload, kind, values)
        if want_nmea and (n * rate) % STEPS_PER_S < rate:
            # An NMEA epoch starts in this step.
            _epoch(ride, t, talker, sentences)
        if truth is not None and n % STEPS_PER_S == 0:
            truth(t, vehicle.truth())
        n += 1
    return vehicle, steps / STEPS_PER_S


def _epoch(ride, t, talker, sentences):
    v = ride.vehicle
    fix = ride.gnss_fix
    for kind in sentences:
        if kind == "GGA":
            if fix:
                out = nmea.gga(t, v.gnss_lat, v.gnss_lon, v.fix_quality, v.sats, v.hdop,
                               v.gnss_alt, talker)
            else:
                out = nmea.gga(t, 0.0, 0.0, 0, 2, 99.9, 0.0, talker)
        elif kind == "RMC":
            out = nmea.rmc(t, v.gnss_lat, v.gnss_lon, v.gnss_speed_kmh, v.gnss_heading, talker, fix)
        elif kind == "VTG":
            out = nmea.vtg(v.gnss_speed_kmh, v.gnss_heading, talker, fix)
        else:
            out = nmea.gsa(v.sats, v.hdop, fix, talker)
        ride.emit("nmea", t, out[0], kind, out[1])
