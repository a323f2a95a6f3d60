"""Scenario scheduler: steps the vehicle in 10 ms of sim time and emits due frames.

The writer is any object with

* ``frame(bus, t, payload, kind, values)``: one frame on ``bus`` at sim time ``t``
  seconds. ``bus`` is ``"can"``, ``"nmea"``, ``"kt"`` or ``"surron"`` (streamed
  here) or, for answers to polls (see :meth:`Ride.serve`), ``"jbd"``, ``"daly"``,
  ``"ninebot"`` or ``"surron"``. For ``"can"`` the payload is the tuple
  ``(can_id, data_bytes)`` (29-bit id, an extended frame); for the others the frame
  bytes (NMEA: the sentence including CR LF). ``kind`` names the message (``"32/01"``,
  ``"GGA"``), ``values`` the physical values as quantised on the wire. Garbage
  bytes injected by ``noisy-line`` come as kind ``"garbage"`` with no values (on
  ``"can"`` too: then the payload is bytes for the SLCAN serial line). A CAN frame
  whose SLCAN line ``noisy-line`` corrupts comes as ``(can_id, data_bytes, edit)``;
  :func:`edit_line` applies ``edit`` to the line (the values are those encoded).
  A frame ``can-noise`` replaced on the bus comes as kind ``"noise"``: its real id,
  random data of the same length, no values.
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
    return bafang.controller_32_01(v.wheel_speed_kmh, v.motor_i, v.ctrl_v, v.ctrl_temp, v.motor_temp)


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
# that short test rides see them too; ride.start(f) is where a fault starts (f x
# duration, or fault_at when given), ride.until(f) where it ends (0.3 x duration later).

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
    ride.at(ride.start(0.3), "moved", move, speed_kmh=8.0, locked=True)


def _overheat(ride):
    def go(v):
        v.extra_heat = 1.5
    ride.at(ride.start(0.2), "overheat", go, rate_c_per_s=1.5)


def _thermal_runaway(ride):
    v = ride.vehicle

    def go(v):
        ride.runaway_rate = 3.0
    ride.at(ride.start(0.2), "thermal-runaway", go, cell=v.runaway_cell + 1, ntc=2,
            rate_c_per_s=3.0)


def _cell_imbalance(ride):
    v = ride.vehicle

    def go(v):
        ride.imbalance_rate = -2.0
    ride.at(ride.start(0.2), "cell-imbalance", go, cell=v.runaway_cell + 1,
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
    ride.episode("gnss-lost", lose, "gnss-restored", regain)


def _receiver_fault(ride, name, **details):
    """The GNSS receiver keeps its fix but reports wrongly (``name``, see :meth:`Ride.gnss`)
    from start(0.3) to until(0.3); what it reported just before is held for it."""
    def go(v):
        ride.gnss_held = ride.gnss()
        ride.gnss_fault = name

    def clear(v):
        ride.gnss_fault = None
    ride.episode(name, go, name + "-cleared", clear, details)


def _gnss_stuck(ride):
    _receiver_fault(ride, "gnss-stuck", speed_kmh=0.0)


def _gnss_negative(ride):
    _receiver_fault(ride, "gnss-negative")


def _gnss_frozen(ride):
    _receiver_fault(ride, "gnss-frozen")


def _wheel_magnet(ride):
    def unplug(v):
        v.wheel_sensor = False

    def replug(v):
        v.wheel_sensor = True
    ride.episode("wheel-magnet", unplug, "wheel-magnet-cleared", replug, {"speed_kmh": 0.0})


def _can_noise(ride):
    """Noise frames on the CAN bus from t = 0 (or fault_at) to the end of the ride: a
    share of the frames go out with random data under their real ids."""
    def go(v):
        ride.bus_noise_on = True
    ride.at(ride.start(0.0), "can-noise", go, share=ride.can_noise_share)


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
    ride.episode("bms-protection", trip, "bms-recovered", clear, {"protection": 0x0200, "discharge_on": False},
                 {"protection": 0, "discharge_on": True})


def _unplug(ride):
    # The CPython glue closes the bus's pty and removes its link at "unplug", makes a
    # new pty at the same path at "replug"; the vehicle itself rides on unchanged.
    ride.episode("unplug", _nop, "replug", _nop, {"bus": ride.unplug_bus}, {"bus": ride.unplug_bus})


CONTROLLER_FAULT = 0x21


def _controller_fault(ride):
    def trip(v):
        v.fault_code = CONTROLLER_FAULT

    def clear(v):
        v.fault_code = 0
    ride.episode("controller-fault", trip, "controller-recovered", clear, {"code": CONTROLLER_FAULT}, {"code": 0})


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
    "unplug": _unplug,
    "gnss-stuck": _gnss_stuck,
    "gnss-negative": _gnss_negative,
    "gnss-frozen": _gnss_frozen,
    "wheel-magnet": _wheel_magnet,
    "can-noise": _can_noise,
}
# Buses a scenario can unplug (each has its own port).
PORT_BUSES = ("can", "nmea", "jbd", "daly", "ninebot", "kt", "surron")


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


_HEX_CHARS = tuple(b"0123456789ABCDEFabcdef")
_FRAME_STARTS = tuple(b"tTrR")
_LINE_ENDS = (0x0D, 0x07)


def _breaks_line(c):
    """Whether byte ``c`` in an SLCAN frame line makes it invalid without ending it."""
    return c not in _HEX_CHARS and c not in _LINE_ENDS


def edit_line(line, edit):
    """Apply a ``noisy-line`` edit to an SLCAN frame line (bytes, CR included):
    ``("bit-error", i, bit)`` flips a bit of byte ``i``; ``("stray-byte", i, value)``
    inserts ``value`` before byte ``i``. Either way the line stays one line (no CR or
    BEL appears) and is no longer valid SLCAN, so a decoder drops it."""
    what, i, x = edit
    if what == "bit-error":
        return line[:i] + bytes((line[i] ^ (1 << x),)) + line[i + 1:]
    return line[:i] + bytes((x,)) + line[i:]


class Ride:
    """A vehicle, its scenario's injections, and the answers to host requests."""

    def __init__(self, scenario="commute", seed=1, duration=120.0, noise_rate=0.02,
                 fault_at=None, unplug_bus="can", wheel_circ_mm=2200, can_noise_share=0.1):
        self.names = check_scenario(scenario)
        if unplug_bus not in PORT_BUSES:
            raise ValueError("unplug_bus must be one of " + ", ".join(PORT_BUSES))
        self.vehicle = Vehicle(seed, wheel_circ_mm=wheel_circ_mm)
        self.duration = duration
        self.noise_rate = noise_rate
        self.fault_at = fault_at
        self.unplug_bus = unplug_bus
        self.noise = Prng(seed ^ 0x0B17E)
        # Its own stream, so noise on the SLCAN line leaves the UART noise unchanged.
        self.can_noise = Prng(seed ^ 0x0CA11)
        # And one for noise frames on the bus, so can-noise leaves every other stream unchanged.
        self.bus_noise = Prng(seed ^ 0x0CAB5)
        self.can_noise_share = can_noise_share
        self.noise_on = False
        self.bus_noise_on = False
        self.gnss_fix = True
        self.gnss_fault = None          # a receiver fault's name while it lasts
        self.gnss_held = ()  # type: tuple  # what the receiver reported when it started
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

    def start(self, fraction):
        """Sim time a scenario's fault starts: ``fault_at`` if given, else ``fraction``
        of the duration."""
        if self.fault_at is not None:
            return self.fault_at
        return fraction * self.duration

    def until(self, fraction, length=0.3):
        """Sim time a fault that starts at ``start(fraction)`` ends: ``length`` of the
        duration later."""
        if self.fault_at is None:
            return (fraction + length) * self.duration
        return self.fault_at + length * self.duration

    def at(self, t, what, apply, **details):
        """Schedule ``apply(vehicle)`` at sim time ``t``; recorded as a fault record then."""
        self._events.append((t, what, apply, details))

    def episode(self, what, apply, end, end_apply, details=None, end_details=None):
        """A fault from ``start(0.3)`` to ``until(0.3)``: ``what`` (its record says
        ``until`` when it ends), then ``end``."""
        t1 = self.until(0.3)
        on = {}
        for k in details or {}:
            on[k] = details[k]
        on["until"] = t1
        self.at(self.start(0.3), what, apply, **on)
        self.at(t1, end, end_apply, **(end_details or {}))

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

    def gnss(self):
        """What the receiver reports, ``(lat, lon, alt, speed km/h, course)``: the vehicle's
        GNSS reading, or what the receiver fault makes of it (``gnss-frozen`` repeats the
        held reading, ``gnss-stuck`` reports speed 0 on the held course, ``gnss-negative``
        the speed's negative)."""
        v = self.vehicle
        fault = self.gnss_fault
        if fault == "gnss-frozen":
            return self.gnss_held
        speed = v.gnss_speed_kmh
        course = v.gnss_heading
        if fault == "gnss-stuck":
            speed = 0.0
            course = self.gnss_held[4]
        elif fault == "gnss-negative":
            speed = -speed
        return v.gnss_lat, v.gnss_lon, v.gnss_alt, speed, course

    def noisy_bus(self, kind, data, values):
        """Apply ``can-noise`` to one CAN frame about to go on the bus: returns the
        ``(kind, data, values)`` to send, for a share of frames ``("noise", random bytes
        of the same length, {})``: well framed under its real id, only its content is garbage."""
        if not self.bus_noise_on:
            return kind, data, values
        r = self.bus_noise
        if r.random() >= self.can_noise_share:
            return kind, data, values
        return "noise", bytes(r.next_u32() & 0xFF for _ in range(len(data))), {}

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

    def noisy_can(self, t, kind, can_id, data):
        """Apply ``noisy-line`` to the SLCAN serial line of one CAN frame: maybe a garbage
        line before it, maybe its line corrupted. Returns ``(garbage or None, edit or
        None)`` (see :func:`edit_line`); both are recorded. The CAN bus itself is clean:
        the noise is on the adapter's serial line, and no corrupted line or garbage can
        pass for a valid frame."""
        if not self.noise_on:
            return None, None
        r = self.can_noise
        rate = self.noise_rate
        garbage = None
        edit = None
        if r.random() < rate:
            g = bytearray()
            start = True                # at the start of a line
            for _ in range(r.randint(1, 8)):
                c = r.next_u32() & 0xFF
                if start and c in _FRAME_STARTS:
                    c ^= 0x80           # no garbage line may pass for a frame
                g.append(c)
                start = c in _LINE_ENDS
            g.append(0x0D)              # ends as a line, so the next frame stays whole
            garbage = bytes(g)
            self._record({"type": "fault", "t": t, "scenario": "noisy-line", "what": "garbage",
                          "bus": "can", "data": _hex(garbage)})
        if r.random() < rate:
            n = 10 + 2 * len(data)      # T, 8 id digits, DLC, data digits (before CR)
            rec = {"type": "fault", "t": t, "scenario": "noisy-line", "bus": "can", "kind": kind}
            if r.random() < 0.5:
                i = r.randint(0, n - 1)
                c = bafang.slcan_frame(can_id, data)[i]
                bit = r.randint(0, 7)
                while not _breaks_line(c ^ (1 << bit)):
                    bit = (bit + 1) & 7  # a flip to another hex digit would go unseen
                edit = ("bit-error", i, bit)
                rec["what"] = "bit-error"
                rec["byte"] = i
                rec["bit"] = bit
            else:
                i = r.randint(1, n)
                c = r.next_u32() & 0xFF
                if not _breaks_line(c):
                    c ^= 0x80
                edit = ("stray-byte", i, c)
                rec["what"] = "stray-byte"
                rec["byte"] = i
                rec["value"] = c
            self._record(rec)
        return garbage, edit

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
        buses=("can", "nmea"), noise_rate=0.02, sentences=("GGA", "RMC"), fault_at=None,
        unplug_bus="can", wheel_circ_mm=2200, can_noise_share=0.1):
    """Ride ``scenario`` for ``duration`` sim seconds, sending frames to ``writer``.

    Steps t = 0, 0.01, ... below ``duration``. Only ``buses`` are emitted (``can``,
    ``nmea``, ``kt``, ``surron``); polled buses answer through ``Ride.serve``. NMEA
    epochs (``sentences`` in order) fall on multiples of 1/``nmea_rate`` s. Returns
    the vehicle (its final true state) and the sim time reached as ``(vehicle, t)``.
    ``fault_at`` (sim seconds) moves the start of the scenario's fault (see
    :meth:`Ride.start`); ``unplug_bus`` is the bus the ``unplug`` scenario pulls;
    ``can_noise_share`` the share of CAN frames ``can-noise`` replaces.
    """
    rate = int(nmea_rate)
    if rate < 1 or rate > 10:
        raise ValueError("nmea_rate must be 1-10 Hz")
    if talker not in TALKERS:
        raise ValueError("talker must be one of " + ", ".join(TALKERS))
    for s in sentences:
        if s not in NMEA_SENTENCES:
            raise ValueError("unknown NMEA sentence %r" % s)
    ride = Ride(scenario, seed, duration, noise_rate, fault_at, unplug_bus, wheel_circ_mm,
                can_noise_share)
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
                    sent, data, values = ride.noisy_bus(kind, data, values)
                    garbage, edit = ride.noisy_can(t, sent, can_id, data)
                    if garbage is not None:
                        frame("can", t, garbage, "garbage", {})
                    if edit is None:
                        frame("can", t, (can_id, data), sent, values)
                    else:
                        frame("can", t, (can_id, data, edit), sent, values)
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
    lat, lon, alt, speed, course = ride.gnss()
    for kind in sentences:
        if kind == "GGA":
            if fix:
                out = nmea.gga(t, lat, lon, v.fix_quality, v.sats, v.hdop, alt, talker)
            else:
                out = nmea.gga(t, 0.0, 0.0, 0, 2, 99.9, 0.0, talker)
        elif kind == "RMC":
            out = nmea.rmc(t, lat, lon, speed, course, talker, fix)
        elif kind == "VTG":
            out = nmea.vtg(speed, course, talker, fix)
        else:
            out = nmea.gsa(v.sats, v.hdop, fix, talker)
        ride.emit("nmea", t, out[0], kind, out[1])
