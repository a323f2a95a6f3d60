"""The fusion kernel, pure Python: the one source of truth for both builds.

setup.py compiles this very file with Cython (types come from ``_kernel.pxd``), so the
compiled and the pure kernel cannot drift apart. It must also run under MicroPython:
no dataclasses, enum or typing here, only ``array``, ``math`` and plain classes.

Python calls the kernel once per read of a port, with every frame of that read, in
the form the port delivers it: SLCAN text, candump text, packed ``struct can_frame``
records, already-split frames or decoded samples. The kernel parses, decodes through
the compiled DBC tables and updates preallocated arrays; every ``tick`` seconds of
sample time it runs the fusion step (derived signals, alarms, source health, event
capture). Each call hands back only what Python must act on, as tuples whose first
item says what they are:

* ``(OUT_WINDOW, set, start, length, rows)``: a closed window of set ``WIN_LIVE`` or
  ``WIN_HISTORY``, one row per signal sampled in it:
  ``(signal_id, count, min, max, mean, last, last_time)``;
* ``(OUT_CHANGE, signal_id, time, value)``: a signal reported on change moved beyond
  its deadband;
* ``(OUT_ALARM, time, code, instance, level, raised, value, threshold)``: an alarm
  raised (1) or cleared (0) with the value that did it and the threshold it crossed;
* ``(OUT_SNAPSHOT, time, code, instance, start, end, ids, times, values)``: every
  sample of the ring buffer from ``capture_before_s`` before a level >= 2 alarm to
  ``capture_after_s`` after it.

A decoded value is believed only inside its signal's range and rate (``set_limits``):
one outside is not sampled, fused or reported, only counted per source, signal and
reason (``refusals``); a source that keeps sending such values raises ``data_quality``.
``motion`` is the fail-safe stationary decision that guards commands acting on the
vehicle: every fresh source able to see motion must agree that it is still.
"""

import math
from array import array

EFF_FLAG = 0x80000000
RTR_FLAG = 0x40000000
ERR_FLAG = 0x20000000
EFF_MASK = 0x1FFFFFFF
# Linux CAN error classes are bits 0-9 of an error frame's id.
ERR_CLASS_MASK = 0x3FF
PACKED_SIZE = 16
_CR = 13
_LF = 10
_BEL = 7
_HASH_EMPTY = -1
_M8 = 0x00FF00FF00FF00FF
_M16 = 0x0000FFFF0000FFFF
_M32 = 0x00000000FFFFFFFF

OUT_WINDOW = 0
OUT_CHANGE = 1
OUT_ALARM = 2
OUT_SNAPSHOT = 3
WIN_LIVE = 0
WIN_HISTORY = 1
# Reporting policy bits of a signal's live reports.
REPORT_WINDOW = 1
REPORT_CHANGE = 2
# Source of a sample the fusion step derived.
SRC_FUSION = -1
MAX_SOURCES = 16
MAX_UART_SLOTS = 64
MAX_TICKS_PER_CALL = 100
# Seconds of per-sensor temperature kept (one entry a second) for the rate of rise.
TEMP_HISTORY = 32

# Catalogue ids the fusion step reads and writes (agent/signals.py is the authority;
# tests/test_fusion.py checks these against it).
S_SPEED = 1
S_ODOMETER = 2
S_LAT = 3
S_LON = 4
S_HEADING = 6
S_GNSS_SPEED = 7
S_FIX = 8
S_HDOP = 10
S_PACK_V = 11
S_PACK_I = 12
S_POWER = 13
S_SOC = 14
S_SOH = 15
S_CELL_MIN = 16
S_CELL_MAX = 17
S_TEMP_MIN = 18
S_TEMP_MAX = 19
S_FULL_AH = 21
S_PROTECTION = 23
S_MOTOR_TEMP = 26
S_CTRL_TEMP = 27
S_MOTOR_I = 29
S_FAULT = 30
S_CADENCE = 34
S_FUSED_SPEED = 38
S_FUSED_LAT = 39
S_FUSED_LON = 40
S_POS_ESTIMATED = 41
S_FUSED_ODOMETER = 42
S_FUSED_TRIP = 43
S_ENERGY_OUT = 44
S_ENERGY_REGEN = 45
S_ENERGY_CHARGED = 46
S_CONSUMPTION = 47
S_FUSED_RANGE = 48
S_FUSED_SOC = 49
S_FUSED_SOH = 50
S_CELL_SPREAD = 51
S_TEMP_SPREAD = 52
S_TEMP_RISE = 53
S_LOCKED = 54
S_CELL0 = 100
N_CELLS = 32
S_TEMP0 = 132
N_TEMPS = 16
# The highest catalogue id the fusion step touches: the kernel's id space must cover it.
FUSION_ID_SPACE = S_TEMP0 + N_TEMPS

# Decimals the derived signals are rounded to when the fusion step writes them: as
# fine as anyone can use, and on a decimal grid, so the wire format sends them as small
# integers (agent/uplink/wire.py) rather than as floats.
DERIVED_DECIMALS = ((S_FUSED_SPEED, 2), (S_FUSED_LAT, 7), (S_FUSED_LON, 7), (S_POS_ESTIMATED, 0),
                    (S_FUSED_ODOMETER, 3), (S_FUSED_TRIP, 3), (S_POWER, 1), (S_ENERGY_OUT, 2),
                    (S_ENERGY_REGEN, 2), (S_ENERGY_CHARGED, 2), (S_CONSUMPTION, 2), (S_FUSED_RANGE, 2),
                    (S_FUSED_SOC, 2), (S_FUSED_SOH, 2), (S_CELL_SPREAD, 3), (S_TEMP_SPREAD, 2),
                    (S_TEMP_RISE, 2))
# Beyond this a value is left as it is (its steps would not fit a double's mantissa).
_QUANTISE_LIMIT = 4.0e15

# Tunables: (name, default, unit, why). ``Kernel.set_params`` takes the values in this
# order; agent/config.py reads overrides from the [fusion] table.
# What the fusion step has learnt or counted that a restart of the agent must not lose
# (the vehicle did not restart): trip, energy counters, the consumption average and the
# measured state of health. ``persistent`` and ``restore`` take them in this order.
PERSISTENT = ("trip_km", "energy_out_wh", "energy_regen_wh", "energy_charged_wh", "consumption_wh",
              "consumption_km", "soh_pct")

PARAMS = (
    ("tick", 0.1, "s", "period of the fusion step in sample time"),
    ("cells", 10.0, "count", "cells in series: per-cell thresholds and OCV scale with it"),
    ("design_capacity_ah", 14.0, "Ah", "new-pack capacity, the 100 % of state of health"),
    ("nominal_cell_v", 3.6, "V", "energy per Ah for the range estimate"),
    ("reserve_pct", 5.0, "%", "state of charge the range estimate keeps back"),
    ("stale_periods", 10.0, "periods", "a signal is stale after this many of its learned periods"),
    ("stale_min_s", 1.0, "s", "and never sooner than this (reads batch frames)"),
    ("health_periods", 10.0, "periods", "a message times out after this many learned periods"),
    ("health_min_s", 1.0, "s", "and never sooner than this"),
    ("capture_before_s", 10.0, "s", "event snapshot: history kept before the alarm"),
    ("capture_after_s", 5.0, "s", "event snapshot: time recorded after the alarm"),
    ("speed_process_var", 20.0, "(km/h)^2/s", "how fast the true speed may wander (Kalman Q)"),
    ("wheel_speed_var", 0.25, "(km/h)^2", "wheel speed noise (Kalman R)"),
    ("gnss_speed_var", 0.5, "(km/h)^2", "GNSS speed noise at HDOP 1 (Kalman R)"),
    ("soc_bms_tau_s", 600.0, "s", "time constant pulling the coulomb count to the BMS's SoC"),
    ("rest_current_a", 0.5, "A", "below this the pack rests (OCV is meaningful)"),
    ("rest_time_s", 30.0, "s", "rest needed before the OCV corrects the SoC"),
    ("soc_ocv_tau_s", 60.0, "s", "time constant pulling the SoC to the OCV at rest"),
    ("soh_min_swing_pct", 50.0, "%", "SoC swing a capacity observation needs"),
    ("consumption_km", 2.0, "km", "distance constant of the Wh/km running average"),
    ("moving_kmh", 2.0, "km/h", "above this the vehicle moves (regen, theft, interlock)"),
    ("wheel_check_min_kmh", 8.0, "km/h", "wheel and GNSS speed are compared above this"),
    ("temp_rise_window_s", 5.0, "s", "span the rate of temperature rise is measured over"),
    ("full_soc_pct", 99.0, "%", "charging at or above this SoC is over-charge"),
    ("rate_min_s", 0.05, "s", "a value's change is judged over at least this (the frames of one read share a "
                              "time)"),
    ("motor_active_a", 1.0, "A", "motor current above this is motion (stationary decision)"),
    ("pedal_active_rpm", 5.0, "rpm", "cadence above this is motion (stationary decision)"),
    ("gnss_frozen_s", 3.0, "s", "a GNSS fix whose position has not moved this long while its speed says "
                                "moving is frozen"),
    ("quality_tau_s", 2.0, "s", "time constant of a source's rate of refused values (data_quality)"),
    ("rate_scale", 1.0, "x", "every signal's max_rate times this: 1 on a vehicle, N behind a simulator running N "
                             "times faster than real time (ebike-sim --speed N)"),
)
(P_TICK, P_CELLS, P_DESIGN_AH, P_NOMINAL_V, P_RESERVE, P_STALE_PERIODS, P_STALE_MIN,
 P_HEALTH_PERIODS, P_HEALTH_MIN, P_CAPTURE_BEFORE, P_CAPTURE_AFTER, P_SPEED_Q, P_WHEEL_R,
 P_GNSS_R, P_SOC_BMS_TAU, P_REST_A, P_REST_TIME, P_SOC_OCV_TAU, P_SOH_SWING,
 P_CONSUMPTION_KM, P_MOVING, P_WHEEL_CHECK_MIN, P_RISE_WINDOW, P_FULL_SOC, P_RATE_MIN,
 P_MOTOR_ACTIVE, P_PEDAL_ACTIVE, P_GNSS_FROZEN, P_QUALITY_TAU, P_RATE_SCALE) = range(30)

# Why a decoded value was refused (``refusals``).
REFUSED_RANGE = 0
REFUSED_RATE = 1
REFUSAL_NAMES = ("range", "rate")
# What one input of the stationary decision (``motion``) says.
VOTE_ABSENT = 0      # never heard: the vehicle has no such sensor, or it never spoke
VOTE_STILL = 1
VOTE_MOVING = 2
VOTE_STALE = 3
VOTE_NO_FIX = 4      # GNSS without a valid fix
VOTE_REFUSED = 5     # its newest value was refused (out of range or rate)
VOTE_FROZEN = 6      # GNSS whose position stands still while its speed says moving
VOTE_NAMES = ("absent", "still", "moving", "stale", "no fix", "refused", "frozen")
MOTION_UNKNOWN = -1
MOTION_MOVING = 0
MOTION_STILL = 1

# Open-circuit cell voltage against SoC (%): a typical NMC 18650/21700 curve, used at
# rest to correct the coulomb count. ``Kernel.set_ocv`` installs another pack's curve.
OCV_CURVE = ((0.0, 3.00), (5.0, 3.30), (10.0, 3.45), (20.0, 3.56), (30.0, 3.63),
             (40.0, 3.69), (50.0, 3.75), (60.0, 3.82), (70.0, 3.90), (80.0, 3.98),
             (90.0, 4.07), (100.0, 4.18))

# Alarm codes (stable: they travel on the wire). GB/T 32960's general alarm flags that
# apply to an e-bike come first, in that standard's order.
A_TEMP_DIFFERENCE = 1
A_BATTERY_HIGH_TEMP = 2
A_PACK_OVER_VOLTAGE = 3
A_PACK_UNDER_VOLTAGE = 4
A_SOC_LOW = 5
A_CELL_OVER_VOLTAGE = 6
A_CELL_UNDER_VOLTAGE = 7
A_SOC_HIGH = 8
A_SOC_JUMP = 9
A_POOR_CONSISTENCY = 10
A_CONTROLLER_TEMP = 11
A_MOTOR_TEMP = 12
A_OVER_CHARGE = 13
A_TEMP_RISE = 14
A_BMS_PROTECTION = 15
A_CONTROLLER_FAULT = 16
A_OVER_SPEED = 17
A_THEFT = 18
A_GNSS_LOST = 19
A_COMM_LOST = 20
A_WHEEL_IMPLAUSIBLE = 21
A_DATA_QUALITY = 22
A_STORAGE_FAILED = 23
ABOVE = 1
BELOW = -1
# Scale of a threshold: as given, or per cell (times the ``cells`` parameter).
PER_VALUE = 0
PER_CELL = 1
# Special alarms are not a threshold on one catalogue signal: the fusion step computes
# their value (signal id -1 below).
SPECIAL = -1

# (code, name, level, signal, direction, threshold, clear, raise delay s, clear delay s,
#  scale, why). Levels: 1 does not affect riding, 2 limit riding, 3 stop / call for help.
# A threshold is crossed strictly; the alarm clears once the value is back beyond
# ``clear`` (hysteresis); each condition must hold for its delay (debounce).
ALARMS = (
    (A_TEMP_DIFFERENCE, "temperature_difference", 2, S_TEMP_SPREAD, ABOVE, 10.0, 7.0, 5.0, 5.0,
     PER_VALUE, "pack sensors disagree by more than this (C): a local hot spot"),
    (A_BATTERY_HIGH_TEMP, "battery_high_temperature", 2, S_TEMP_MAX, ABOVE, 55.0, 50.0, 5.0, 5.0,
     PER_VALUE, "hottest pack sensor (C)"),
    (A_PACK_OVER_VOLTAGE, "pack_over_voltage", 2, S_PACK_V, ABOVE, 4.25, 4.20, 5.0, 5.0,
     PER_CELL, "pack voltage per series cell (V)"),
    (A_PACK_UNDER_VOLTAGE, "pack_under_voltage", 2, S_PACK_V, BELOW, 3.0, 3.2, 5.0, 5.0,
     PER_CELL, "pack voltage per series cell (V)"),
    (A_SOC_LOW, "soc_low", 1, S_FUSED_SOC, BELOW, 10.0, 15.0, 5.0, 5.0,
     PER_VALUE, "fused state of charge (%)"),
    (A_CELL_OVER_VOLTAGE, "cell_over_voltage", 2, S_CELL_MAX, ABOVE, 4.25, 4.20, 3.0, 5.0,
     PER_VALUE, "highest cell (V)"),
    (A_CELL_UNDER_VOLTAGE, "cell_under_voltage", 2, S_CELL_MIN, BELOW, 2.8, 3.0, 3.0, 5.0,
     PER_VALUE, "lowest cell (V)"),
    (A_SOC_HIGH, "soc_high", 1, S_FUSED_SOC, ABOVE, 100.5, 99.0, 5.0, 5.0,
     PER_VALUE, "fused state of charge past full (%): the count and the pack disagree"),
    (A_SOC_JUMP, "soc_jump", 1, SPECIAL, ABOVE, 5.0, 1.0, 0.0, 10.0,
     PER_VALUE, "step between two BMS SoC readings (points)"),
    (A_POOR_CONSISTENCY, "poor_cell_consistency", 2, S_CELL_SPREAD, ABOVE, 0.15, 0.10, 5.0, 5.0,
     PER_VALUE, "highest minus lowest cell (V)"),
    (A_CONTROLLER_TEMP, "controller_temperature", 2, S_CTRL_TEMP, ABOVE, 75.0, 70.0, 3.0, 5.0,
     PER_VALUE, "motor controller temperature (C)"),
    (A_MOTOR_TEMP, "motor_temperature", 2, S_MOTOR_TEMP, ABOVE, 110.0, 100.0, 3.0, 5.0,
     PER_VALUE, "motor temperature (C)"),
    (A_OVER_CHARGE, "over_charge", 2, SPECIAL, ABOVE, 0.5, 0.2, 5.0, 5.0,
     PER_VALUE, "charging current (A) into a full pack (SoC >= full_soc_pct or a cell over-voltage)"),
    (A_TEMP_RISE, "temperature_rise", 3, S_TEMP_RISE, ABOVE, 30.0, 10.0, 1.0, 10.0,
     PER_VALUE, "fastest pack sensor rise (C/min): thermal-runaway precursor"),
    (A_BMS_PROTECTION, "bms_protection", 2, S_PROTECTION, ABOVE, 0.5, 0.5, 0.0, 2.0,
     PER_VALUE, "any BMS protection bit set (the value is the bits)"),
    (A_CONTROLLER_FAULT, "controller_fault", 2, S_FAULT, ABOVE, 0.5, 0.5, 1.0, 2.0,
     PER_VALUE, "controller fault code not 0 (the value is the code)"),
    (A_OVER_SPEED, "over_speed", 1, S_FUSED_SPEED, ABOVE, 27.5, 25.5, 10.0, 5.0,
     PER_VALUE, "fused speed (km/h) above the legal 25 km/h plus the 10 % EN 15194 allows"),
    (A_THEFT, "theft", 3, SPECIAL, ABOVE, 3.0, 1.0, 3.0, 10.0,
     PER_VALUE, "speed while locked (km/h)"),
    (A_GNSS_LOST, "gnss_lost", 1, SPECIAL, BELOW, 0.5, 0.5, 5.0, 3.0,
     PER_VALUE, "1 with a fresh GNSS fix, 0 without (after a fix was seen)"),
    (A_COMM_LOST, "communication_lost", 2, SPECIAL, ABOVE, 0.5, 0.5, 0.0, 1.0,
     PER_VALUE, "per source: every message it sent timed out (instance = source)"),
    (A_WHEEL_IMPLAUSIBLE, "wheel_speed_implausible", 2, SPECIAL, ABOVE, 0.35, 0.2, 5.0, 10.0,
     PER_VALUE, "|wheel - GNSS| / max(wheel, GNSS) while moving with a GNSS fix; fused speed follows the "
                "faster of the two meanwhile"),
    (A_DATA_QUALITY, "data_quality", 1, SPECIAL, ABOVE, 0.5, 0.2, 5.0, 10.0,
     PER_VALUE, "per source: values refused (out of range, or changing faster than possible) per second, "
                "averaged over quality_tau_s (instance = source)"),
    (A_STORAGE_FAILED, "storage_failed", 1, SPECIAL, ABOVE, 0.5, 0.5, 0.0, 0.0,
     PER_VALUE, "1 while the outbox cannot be written (set by the agent, which runs from memory meanwhile)"),
)
ALARM_NAMES = dict((row[0], row[1]) for row in ALARMS)
MAX_ALARM_CODE = A_STORAGE_FAILED
# Alarms with one instance per source; their states follow the rows', a block each.
PER_SOURCE = (A_COMM_LOST, A_DATA_QUALITY)
NO_READING = -1000.0
DEG = math.pi / 180.0
M_PER_DEG = 111320.0
INF = float("inf")


def _filled(code, value, n):
    try:
        return array(code, [value]) * n
    except TypeError:  # MicroPython's array cannot be repeated
        return array(code, [value] * n)


def _zeros(code, n):
    return _filled(code, 0, n)


def _hex_table():
    table = array("b", [-1] * 256)
    for i in range(10):
        table[48 + i] = i  # 0-9
    for i in range(6):
        table[65 + i] = 10 + i  # A-F
        table[97 + i] = 10 + i  # a-f
    return table


def _hash(key, mask):
    return (key ^ (key >> 15) ^ (key >> 27)) & mask


def _bswap64(x):
    """The frame read big-endian, from the frame read little-endian (zero-padded to 8)."""
    x = ((x & _M8) << 8) | ((x >> 8) & _M8)
    x = ((x & _M16) << 16) | ((x >> 16) & _M16)
    return ((x & _M32) << 32) | (x >> 32)


def _skip_blanks(buf, p, end):
    while p < end and (buf[p] == 32 or buf[p] == 9):
        p += 1
    return p


def _token_end(buf, p, end):
    while p < end and buf[p] != 32 and buf[p] != 9:
        p += 1
    return p


def _le(buf, off, size):
    v = 0
    for i in range(size):
        b = buf[off + i]  # widened to 64 bits before the shift (typed in the .pxd)
        v |= b << (8 * i)
    return v




def _learn(p, dt):
    """Running estimate of a period from one more interval; a gap counts as at most four
    periods, so an outage does not teach it that the signal is slow."""
    if p == 0.0:
        return dt
    if dt > 4.0 * p:
        dt = 4.0 * p
    return p + 0.125 * (dt - p)


def _gain(dt, tau):
    return dt / tau if dt < tau else 1.0


def _quantise(x, scale):
    """``x`` rounded half away from zero to whole 1/``scale`` steps, computed as k / scale:
    the very double a reading of that resolution decodes to."""
    k = x * scale
    if k >= _QUANTISE_LIMIT or k <= -_QUANTISE_LIMIT or k != k:
        return x
    if k >= 0.0:
        return float(int(k + 0.5)) / scale
    return -float(int(-k + 0.5)) / scale


def _check_source(source):
    if source < 0 or source >= MAX_SOURCES:
        raise ValueError("source index must be 0-%d" % (MAX_SOURCES - 1))

class Kernel:
    """Vehicle state, windows, fused signals, alarms and event capture, fed in batches."""

    def __init__(self, id_space, window, history=60.0, ring=1 << 17):
        if window <= 0 or history <= 0:
            raise ValueError("windows must be > 0 s")
        if id_space < FUSION_ID_SPACE:
            raise ValueError("id space must cover the catalogue ids the fusion uses")
        ratio = history / window
        if abs(ratio - round(ratio)) > 1e-9 * ratio:
            raise ValueError("the history window must be a whole number of live windows")
        if ring < 16 or ring & (ring - 1):
            raise ValueError("ring size must be a power of two >= 16")
        n = id_space
        self.id_space = n
        self.window = float(window)
        self.history = float(history)
        self.win_len = array("d", [float(window), float(history)])
        self.win_index = array("q", [-1, -1])
        self.seen = _zeros("b", n)
        # Per-window aggregates of both sets: set k of signal s lives at k * id_space + s.
        self.w_min = _zeros("d", 2 * n)
        self.w_max = _zeros("d", 2 * n)
        self.w_sum = _zeros("d", 2 * n)
        self.w_count = _zeros("i", 2 * n)
        self.touched = _zeros("i", 2 * n)
        self.n_touched = _zeros("i", 2)
        # The last value, its time and source are never reset when a window closes:
        # they are the signal's latest state.
        self.w_last = _zeros("d", n)
        self.w_last_time = _zeros("d", n)
        self.sig_src = _zeros("b", n)
        self.sig_period = _zeros("d", n)
        self.policy = array("b", [REPORT_WINDOW] * n)
        self.q_scale = _zeros("d", n)
        for sid, decimals in DERIVED_DECIMALS:
            self.q_scale[sid] = 10.0 ** decimals
        self.deadband = _zeros("d", n)
        self.reported = _zeros("b", n)
        self.reported_value = _zeros("d", n)
        # What is believed of each signal (set_limits) and what was refused: the time of
        # its newest refusal, counts per (source, reason, signal) and per source.
        self.lim_lo = _filled("d", -INF, n)
        self.lim_hi = _filled("d", INF, n)
        self.lim_rate = _zeros("d", n)
        self.bad_t = _filled("d", -INF, n)
        self.ref_count = _zeros("i", 2 * MAX_SOURCES * n)
        self.src_refused = _zeros("q", MAX_SOURCES)
        self.q_prev = _zeros("q", MAX_SOURCES)
        self.q_rate = _zeros("d", MAX_SOURCES)
        self.refused = 0
        self.source = 0
        self.started = 0
        self.tick_index = 0
        self.next_tick = 0.0
        self.next_event = -1.0e300
        self.live_start = 0.0
        self.src_seen = _zeros("i", MAX_SOURCES)
        self.src_live = _zeros("i", MAX_SOURCES)
        self.ring_mask = ring - 1
        self.r_sid = _zeros("i", ring)
        self.r_t = _zeros("d", ring)
        self.r_v = _zeros("d", ring)
        self.r_head = 0
        self.frames = 0
        self.samples = 0
        self.unknown = 0
        self.truncated = 0
        self.no_value = 0
        self.late = 0
        self.bad_lines = 0
        self.remote_frames = 0
        self.error_frames = 0
        self.fd_frames = 0
        self.adapter_errors = 0
        self.ticks = 0
        self.snapshots = 0
        self.snapshots_truncated = 0
        self.hexval = _hex_table()
        self.closed = []
        self.params = array("d", [p[1] for p in PARAMS])
        self.tick = self.params[P_TICK]
        self.set_ocv(OCV_CURVE)
        self.set_alarms(ALARMS)
        self._reset_fusion()
        self.n_slots = 0
        self.set_can_tables({}, _zeros("i", 0), _zeros("i", 0), _zeros("i", 0),
                            _zeros("b", 0), _zeros("i", 0), _zeros("i", 0), _zeros("b", 0),
                            _zeros("d", 0), _zeros("d", 0), _zeros("i", 0), _zeros("q", 0),
                            _zeros("i", 0), _zeros("q", 0), _zeros("d", 0), _zeros("d", 0))

    def _reset_fusion(self):
        self.f_last = -1.0
        self.kf_x = 0.0
        self.kf_p = -1.0
        self.kf_wheel_t = -1.0
        self.kf_gnss_t = -1.0
        self.pos_ok = 0
        self.pos_lat = 0.0
        self.pos_lon = 0.0
        self.heading = 0.0
        self.gnss_seen = 0
        self.gnss_lat = 0.0
        self.gnss_lon = 0.0
        self.gnss_moved_t = -1.0
        self.trip_km = 0.0
        self.odo_t = -1.0
        self.odo_base = -1.0
        self.odo_base_trip = 0.0
        self.e_out = 0.0
        self.e_regen = 0.0
        self.e_charged = 0.0
        self.cons_wh = 0.0
        self.cons_km = 0.0
        self.soc = -1.0
        self.rest_since = -1.0
        self.ah = 0.0
        self.soh = -1.0
        self.soh_anchor_soc = -1.0
        self.soh_anchor_ah = 0.0
        self.soc_bms_t = -1.0
        self.soc_bms_prev = -1.0
        self.soc_bms_src = 0
        self.temp_hist = _zeros("d", N_TEMPS * TEMP_HISTORY)
        self.temp_hist_t = _zeros("d", TEMP_HISTORY)
        self.temp_hist_n = 0
        self.temp_hist_next = -1.0
        self.ext_n = 0
        self.ext_lo = 0.0
        self.ext_hi = 0.0

    def set_params(self, values):
        """Tunables in ``PARAMS`` order (see there for units and defaults)."""
        if len(values) != len(PARAMS):
            raise ValueError("expected %d parameters, got %d" % (len(PARAMS), len(values)))
        for i in range(len(PARAMS)):
            if not values[i] > 0.0:
                raise ValueError("parameter %s must be > 0" % PARAMS[i][0])
        if values[P_RISE_WINDOW] >= TEMP_HISTORY - 1 or values[P_RISE_WINDOW] < 1.0:
            raise ValueError("temp_rise_window_s must be 1-%d s" % (TEMP_HISTORY - 2))
        self.params = array("d", [float(v) for v in values])
        self.tick = self.params[P_TICK]
        self.set_alarms(self.alarm_rows)

    def set_ocv(self, curve):
        """The pack's open-circuit cell voltage curve, ``((soc %, volts), ...)`` rising."""
        if len(curve) < 2:
            raise ValueError("an OCV curve needs at least two points")
        for i in range(1, len(curve)):
            if not (curve[i][0] > curve[i - 1][0] and curve[i][1] > curve[i - 1][1]):
                raise ValueError("OCV curve must rise in both SoC and voltage")
        self.ocv_soc = array("d", [p[0] for p in curve])
        self.ocv_v = array("d", [p[1] for p in curve])

    def set_alarms(self, rows):
        """Install the alarm table (``ALARMS``' shape); per-cell thresholds are scaled by
        the ``cells`` parameter here, so a table can be given once for any pack."""
        n = len(rows)
        for r in rows:
            if r[0] < 1 or r[0] > MAX_ALARM_CODE or r[2] < 1 or r[2] > 3:
                raise ValueError("alarm %r: code or level out of range" % (r[1],))
            if r[3] != SPECIAL and (r[3] < 0 or r[3] >= self.id_space):
                raise ValueError("alarm %r: signal outside the id space" % (r[1],))
            if r[4] != ABOVE and r[4] != BELOW:
                raise ValueError("alarm %r: direction must be ABOVE or BELOW" % (r[1],))
            if r[7] < 0.0 or r[8] < 0.0:
                raise ValueError("alarm %r: delays must be >= 0" % (r[1],))
            if (r[4] == ABOVE and r[6] > r[5]) or (r[4] == BELOW and r[6] < r[5]):
                raise ValueError("alarm %r: the clear threshold must lie on the safe side" % (r[1],))
        self.alarm_rows = rows
        self.n_alarms = n
        scale = self.params[P_CELLS]
        self.a_code = array("i", [r[0] for r in rows])
        self.a_level = array("i", [r[2] for r in rows])
        self.a_sid = array("i", [r[3] for r in rows])
        self.a_dir = array("i", [r[4] for r in rows])
        self.a_thr = array("d", [r[5] * (scale if r[9] == PER_CELL else 1.0) for r in rows])
        self.a_clr = array("d", [r[6] * (scale if r[9] == PER_CELL else 1.0) for r in rows])
        self.a_on = array("d", [r[7] for r in rows])
        self.a_off = array("d", [r[8] for r in rows])
        # State: rows first, then a block of one instance per source for each alarm of
        # PER_SOURCE (``a_block``: the row's block, -1 for the others).
        self.a_block = array("i", [PER_SOURCE.index(r[0]) if r[0] in PER_SOURCE else -1 for r in rows])
        size = n + len(PER_SOURCE) * MAX_SOURCES
        self.a_active = _zeros("b", size)
        self.a_since = _filled("d", -1.0, size)
        self.a_raised_t = _zeros("d", size)
        self.a_value = _zeros("d", size)
        self.spec_value = _zeros("d", MAX_ALARM_CODE + 1)
        self.spec_ok = _zeros("b", MAX_ALARM_CODE + 1)
        self.a_row = array("i", [-1] * (MAX_ALARM_CODE + 1))
        for a in range(n):
            if self.a_row[rows[a][0]] >= 0:
                raise ValueError("alarm code %d given twice" % rows[a][0])
            self.a_row[rows[a][0]] = a
        self.cap_pending = 0
        self.cap_t = 0.0
        self.cap_code = 0
        self.cap_instance = -1

    def set_policy(self, sid, mode, deadband):
        """How signal ``sid`` is reported live: ``REPORT_WINDOW`` (a row in every live
        window it was sampled in), ``REPORT_CHANGE`` (a change record as soon as it moves
        more than ``deadband`` from the last one reported) or both; history windows
        always carry every signal."""
        if sid < 0 or sid >= self.id_space:
            raise ValueError("signal id out of the kernel's id space")
        if mode < 1 or mode > 3 or deadband < 0.0:
            raise ValueError("mode must be 1-3 and the deadband >= 0")
        self.policy[sid] = mode
        self.deadband[sid] = deadband
        self.reported[sid] = 0

    def set_can_tables(self, msg_index, msg_len, msg_first, msg_count, big_endian, shift,
                       length, signed, factor, offset, sig_id, no_value, mux_row, mux_value, row_min, row_max):
        """Install the flat tables of a compiled DBC (see agent/dbc/compile.py).

        ``msg_index`` maps a message key (id | 0x80000000 for 29-bit ids) to its row;
        the kernel turns it into an open-addressing table it can probe without Python.
        A signal with ``mux_row[s] >= 0`` is present only when the multiplexer signal in
        that row has the raw value ``mux_value[s]``. ``row_min``/``row_max``: the DBC's
        own range of each row, which narrows its signal's limits for that row's values.
        """
        n = len(sig_id)
        for i in range(n):
            if sig_id[i] < 0 or sig_id[i] >= self.id_space:
                raise ValueError("signal id out of the kernel's id space")
            if length[i] < 1 or length[i] > 64 or shift[i] < 0 or shift[i] + length[i] > 64:
                raise ValueError("signal bits outside a 64-bit frame")
            if mux_row[i] >= n or (mux_row[i] >= 0 and mux_row[mux_row[i]] >= 0):
                raise ValueError("multiplexer row out of range or itself multiplexed")
        size = 16
        while size < 2 * len(msg_index):
            size *= 2
        h_keys = array("q", [_HASH_EMPTY] * size)
        h_vals = array("i", [0] * size)
        for key in msg_index:
            if key < 0 or key > 0xFFFFFFFF:
                raise ValueError("message key out of range")
            h = _hash(key, size - 1)
            while h_keys[h] != _HASH_EMPTY:
                h = (h + 1) & (size - 1)
            h_keys[h] = key
            h_vals[h] = msg_index[key]
        self.h_keys = h_keys
        self.h_vals = h_vals
        self.h_mask = size - 1
        self.msg_len = msg_len
        self.msg_first = msg_first
        self.msg_count = msg_count
        self.sig_big_endian = big_endian
        self.sig_shift = shift
        self.sig_length = length
        self.sig_signed = signed
        self.sig_factor = factor
        self.sig_offset = offset
        self.sig_id = sig_id
        self.sig_mask = array("Q", [(1 << length[i]) - 1 for i in range(n)])
        self.sig_has_na = array("b", [1 if no_value[i] >= 0 else 0 for i in range(n)])
        self.sig_na = array("Q", [no_value[i] if no_value[i] >= 0 else 0 for i in range(n)])
        self.sig_mux_row = mux_row
        self.sig_mux_value = array("Q", [mux_value[i] if mux_value[i] >= 0 else 0 for i in range(n)])
        self.sig_min = array("d", [float(v) for v in row_min])
        self.sig_max = array("d", [float(v) for v in row_max])
        if len(self.sig_min) != n or len(self.sig_max) != n:
            raise ValueError("a range is needed for every signal row")
        self._row_limits()
        # Health slots: one per CAN message (its row), then those UART sources ask for.
        self.n_msgs = len(msg_len)
        self.n_slots = self.n_msgs
        size = self.n_msgs + MAX_UART_SLOTS
        self.m_src = _zeros("b", size)
        self.m_seen = _zeros("b", size)
        self.m_t = _zeros("d", size)
        self.m_period = _zeros("d", size)
        self.m_frames = _zeros("q", size)
        self.m_timeouts = _zeros("i", size)
        self.m_out = _zeros("b", size)
        self.m_checksum = _zeros("i", size)
        self.m_counter = _zeros("i", size)

    def set_limits(self, lo, hi, rate):
        """What is believed of each signal id: a value in ``[lo, hi]`` that moved at most
        ``rate`` per second (0: any) from the last one believed. The agent gives the
        catalogue's ranges, narrowed by a DBC's own (agent/signals.py)."""
        n = self.id_space
        if len(lo) != n or len(hi) != n or len(rate) != n:
            raise ValueError("limits must cover the kernel's id space (%d ids)" % n)
        for i in range(n):
            if not lo[i] <= hi[i] or not rate[i] >= 0.0:
                raise ValueError("signal %d: the range must not be empty and the rate >= 0" % i)
        self.lim_lo = array("d", [float(v) for v in lo])
        self.lim_hi = array("d", [float(v) for v in hi])
        self.lim_rate = array("d", [float(v) for v in rate])
        self._row_limits()

    def _row_limits(self):
        """Each CAN table row's range: its signal's limits, narrowed by the DBC's range of
        the row. The decode loop tests the raw bits against ``row_raw_lo``-``row_raw_hi``
        (no float, no "no value" test): the raw values of a believable value, for an
        unsigned row whose "no value" lies outside them; an empty span (1 to 0) sends
        every value of any other row to _row_slow. ``row_rated``: the signal has a rate."""
        n = len(self.sig_id)
        self.row_lo = _zeros("d", n)
        self.row_hi = _zeros("d", n)
        self.row_raw_lo = _filled("Q", 1, n)
        self.row_raw_hi = _zeros("Q", n)
        self.row_rated = _zeros("b", n)
        for s in range(n):
            sid = self.sig_id[s]
            lo = self.lim_lo[sid] if self.lim_lo[sid] > self.sig_min[s] else self.sig_min[s]
            hi = self.lim_hi[sid] if self.lim_hi[sid] < self.sig_max[s] else self.sig_max[s]
            if lo > hi:
                raise ValueError("signal row %d (id %d): its DBC range holds no believable value" % (s, sid))
            self.row_lo[s] = lo
            self.row_hi[s] = hi
            self.row_rated[s] = 1 if self.lim_rate[sid] > 0.0 else 0
            if not self.sig_signed[s]:
                span = self._raw_span(s, lo, hi)
                if span[0] <= span[1] and not (self.sig_has_na[s] and span[0] <= self.sig_na[s] <= span[1]):
                    self.row_raw_lo[s] = span[0]
                    self.row_raw_hi[s] = span[1]
        return 0

    def _raw_span(self, s, lo, hi):
        """The raw values of unsigned row ``s`` whose value (as _value computes it) lies
        in ``[lo, hi]``: one span, the value being monotonic in the raw; (1, 0) if none."""
        f = self.sig_factor[s]
        o = self.sig_offset[s]
        top = self.sig_mask[s]
        if f == 0.0:
            return (0, top) if lo <= o <= hi else (1, 0)
        a = (lo - o) / f
        b = (hi - o) / f
        if f < 0.0:
            a, b = b, a
        r_lo = 0 if not a > 0.0 else (top if a >= top else int(a))
        r_hi = top if not b < top else (0 if b <= 0.0 else int(b))
        # Float rounding: settle both ends on exactly what _value gives.
        while r_lo <= r_hi and not lo <= float(r_lo) * f + o <= hi:
            r_lo += 1
        while r_lo > 0 and lo <= float(r_lo - 1) * f + o <= hi:
            r_lo -= 1
        while r_hi >= r_lo and not lo <= float(r_hi) * f + o <= hi:
            r_hi -= 1
        while r_hi < top and lo <= float(r_hi + 1) * f + o <= hi:
            r_hi += 1
        return (r_lo, r_hi) if r_lo <= r_hi else (1, 0)

    def set_can_source(self, source):
        """The source whose health the CAN messages count towards."""
        _check_source(source)
        for m in range(self.n_msgs):
            self.m_src[m] = source

    def health_slot(self, source):
        """A new health slot for messages of a UART source (CAN messages have theirs)."""
        _check_source(source)
        if self.n_slots >= self.n_msgs + MAX_UART_SLOTS:
            raise ValueError("no health slot left")
        slot = self.n_slots
        self.n_slots += 1
        self.m_src[slot] = source
        return slot

    def note_frames(self, slot, times):
        """Good frames of a UART health slot, one call per read."""
        if slot < self.n_msgs or slot >= self.n_slots:
            raise ValueError("not a UART health slot")
        for i in range(len(times)):
            self._heard(slot, times[i])

    def note_errors(self, slot, checksum, counter):
        """Frames of a health slot refused for a bad checksum or rolling counter."""
        if slot < 0 or slot >= self.n_slots:
            raise ValueError("no such health slot")
        self.m_checksum[slot] += checksum
        self.m_counter[slot] += counter

    def _heard(self, slot, t):
        if self.m_seen[slot]:
            dt = t - self.m_t[slot]
            if dt > 0.0:
                self.m_period[slot] = _learn(self.m_period[slot], dt)
                self.m_t[slot] = t
        else:
            self.m_seen[slot] = 1
            self.m_t[slot] = t
        self.m_frames[slot] += 1
        self.m_out[slot] = 0

    def feed_values(self, ids, times, values):
        """Record already-decoded samples (NMEA, UART protocols, the agent's own)."""
        n = len(ids)
        for i in range(n):
            sid = ids[i]
            if sid < 0 or sid >= self.id_space:
                self.unknown += 1
                continue
            t = times[i]
            self._advance(t)
            if self._accept(sid, t, values[i], self.lim_lo[sid], self.lim_hi[sid]):
                self._sample(sid, t, values[i])
        return self._take_closed()

    def close_due(self, now):
        """Run what is due by ``now`` (fusion steps, window ends), so a quiet bus still
        reports and a silent source is noticed."""
        if self.started and now >= self.next_event:
            self._due(now)
        return self._take_closed()

    def flush(self):
        """Close the open windows whatever the time and hand over a pending capture, at
        shutdown."""
        for k in range(2):
            if self.n_touched[k] > 0:
                self._close(k, self.win_index[k] + 1)
        if self.cap_pending:
            self._capture()
        return self._take_closed()

    def snapshot(self, now):
        """The ring buffer's last ``capture_before_s`` seconds up to ``now``, on request."""
        self.snapshots += 1
        return self._ring_slice(now, 0, -1, now - self.params[P_CAPTURE_BEFORE], now)

    def latest(self):
        """``(signal_id, value, time)`` of every signal seen so far."""
        out = []
        for sid in range(self.id_space):
            if self.seen[sid]:
                out.append((sid, self.w_last[sid], self.w_last_time[sid]))
        return out

    def persistent(self):
        """The values of ``PERSISTENT``, to be kept across a restart."""
        return [self.trip_km, self.e_out, self.e_regen, self.e_charged, self.cons_wh, self.cons_km, self.soh]

    def restore(self, values):
        """Take back what ``persistent`` gave before a restart; ValueError if it cannot be
        that (the agent then starts from zero, and says so)."""
        if len(values) != len(PERSISTENT):
            raise ValueError("expected %d values" % len(PERSISTENT))
        for k in range(len(values)):
            v = values[k]
            if not v == v or v > 1e15 or v < -1e15:
                raise ValueError("%s is not a finite number" % PERSISTENT[k])
            if k < 4 and v < 0.0:
                raise ValueError("%s cannot be negative" % PERSISTENT[k])
        if not (values[6] == -1.0 or 0.0 < values[6] <= 150.0):
            raise ValueError("soh_pct must be -1 (not measured) or 0-150")
        self.trip_km = values[0]
        self.e_out = values[1]
        self.e_regen = values[2]
        self.e_charged = values[3]
        self.cons_wh = values[4]
        self.cons_km = values[5]
        self.soh = values[6]

    def state(self, now):
        """``(signal_id, value, time, source, stale)`` of every signal seen so far; source
        is the index the agent gave the feeding port, ``SRC_FUSION`` for derived ones."""
        out = []
        for sid in range(self.id_space):
            if self.seen[sid]:
                out.append((sid, self.w_last[sid], self.w_last_time[sid], self.sig_src[sid],
                            not self._fresh(sid, now)))
        return out

    def set_condition(self, code, value):
        """The value of a special alarm that the agent, not the fusion, observes
        (``storage_failed``); judged with the next fusion step like any other."""
        if code != A_STORAGE_FAILED:
            raise ValueError("alarm %d is not set from outside the kernel" % code)
        self.spec_ok[code] = 1
        self.spec_value[code] = value

    def alarms(self):
        """Active alarms: ``(code, instance, level, raised_at, value)``."""
        out = []
        for a in range(self.n_alarms):
            if self.a_block[a] >= 0:
                for s in range(MAX_SOURCES):
                    st = self.n_alarms + self.a_block[a] * MAX_SOURCES + s
                    if self.a_active[st]:
                        out.append((self.a_code[a], s, self.a_level[a], self.a_raised_t[st], self.a_value[st]))
            elif self.a_active[a]:
                out.append((self.a_code[a], -1, self.a_level[a], self.a_raised_t[a], self.a_value[a]))
        return out

    def health(self, now):
        """Per message slot: ``(slot, source, frames, learned period, timeouts, timed out,
        checksum errors, counter errors, seconds since heard)``; unseen slots left out."""
        out = []
        for m in range(self.n_slots):
            if self.m_seen[m]:
                out.append((m, self.m_src[m], self.m_frames[m], self.m_period[m], self.m_timeouts[m],
                            self.m_out[m], self.m_checksum[m], self.m_counter[m], now - self.m_t[m]))
        return out

    def counters(self):
        """Counters for status and health reporting."""
        return {"frames": self.frames, "samples": self.samples, "refused": self.refused, "unknown": self.unknown,
                "truncated": self.truncated, "no_value": self.no_value, "late": self.late,
                "bad_lines": self.bad_lines, "remote_frames": self.remote_frames,
                "error_frames": self.error_frames, "fd_frames": self.fd_frames,
                "adapter_errors": self.adapter_errors, "ticks": self.ticks,
                "snapshots": self.snapshots, "snapshots_truncated": self.snapshots_truncated}

    def refusals(self, source):
        """Values of ``source`` refused so far: ``(signal_id, out of range, too fast)``
        for each signal with any."""
        _check_source(source)
        n = self.id_space
        out = []
        for sid in range(n):
            by_range = self.ref_count[(2 * source + REFUSED_RANGE) * n + sid]
            by_rate = self.ref_count[(2 * source + REFUSED_RATE) * n + sid]
            if by_range or by_rate:
                out.append((sid, by_range, by_rate))
        return out

    def motion(self, now, still_kmh):
        """The stationary decision, fail-safe: ``(verdict, wheel vote, wheel km/h, GNSS
        vote, GNSS km/h, motor vote, motor A, pedal vote, cadence rpm, top km/h)``.

        Each input votes ``VOTE_STILL`` or ``VOTE_MOVING`` only while it is fresh and
        believed (GNSS also needs a valid fix and a position that moves with its speed);
        otherwise it abstains and says why. The vehicle is ``MOTION_STILL`` only when a
        speed source (wheel or GNSS) votes still and no input votes moving: when inputs
        disagree it is moving, and with no speed source it is ``MOTION_UNKNOWN``. ``top``
        is the highest speed any voting speed source or the fused speed gives (-1: none).
        """
        wheel = self._vote(S_SPEED, now, still_kmh)
        gnss = self._vote(S_GNSS_SPEED, now, still_kmh)
        fix = self._gnss_fix(now)
        if gnss == VOTE_STILL or gnss == VOTE_MOVING:
            if not fix:
                gnss = VOTE_NO_FIX
            elif self._gnss_frozen(now):
                gnss = VOTE_FROZEN
        elif gnss != VOTE_ABSENT and not fix and self._fresh(S_FIX, now) and self.w_last[S_FIX] < 1.0:
            gnss = VOTE_NO_FIX  # a receiver that says so, not one that went quiet
        motor = self._vote(S_MOTOR_I, now, self.params[P_MOTOR_ACTIVE])
        pedal = self._vote(S_CADENCE, now, self.params[P_PEDAL_ACTIVE])
        if wheel == VOTE_MOVING or gnss == VOTE_MOVING or motor == VOTE_MOVING or pedal == VOTE_MOVING:
            verdict = MOTION_MOVING
        elif wheel == VOTE_STILL or gnss == VOTE_STILL:
            verdict = MOTION_STILL
        else:
            verdict = MOTION_UNKNOWN
        top = -1.0
        if (wheel == VOTE_STILL or wheel == VOTE_MOVING) and self.w_last[S_SPEED] > top:
            top = self.w_last[S_SPEED]
        if (gnss == VOTE_STILL or gnss == VOTE_MOVING) and self.w_last[S_GNSS_SPEED] > top:
            top = self.w_last[S_GNSS_SPEED]
        if self._fresh(S_FUSED_SPEED, now) and self.w_last[S_FUSED_SPEED] > top:
            top = self.w_last[S_FUSED_SPEED]
        return (verdict, wheel, self.w_last[S_SPEED], gnss, self.w_last[S_GNSS_SPEED], motor,
                self.w_last[S_MOTOR_I], pedal, self.w_last[S_CADENCE], top)

    def _vote(self, sid, t, limit):
        """What signal ``sid`` says of motion: moving at or above ``limit`` (either sign)."""
        if not self.seen[sid]:
            return VOTE_ABSENT if self.bad_t[sid] == -INF else VOTE_REFUSED
        if self.bad_t[sid] > self.w_last_time[sid]:
            return VOTE_REFUSED
        if not self._fresh(sid, t):
            return VOTE_STALE
        v = self.w_last[sid]
        return VOTE_MOVING if v >= limit or v <= -limit else VOTE_STILL

    # Range and rate -------------------------------------------------------------------

    def _accept(self, sid, t, value, lo, hi):
        """Whether a decoded value is believed: inside ``[lo, hi]`` (its signal's range, or
        a CAN row's) and, where the signal has a rate, no further from the last value
        believed than that allows."""
        if not lo <= value <= hi:  # a NaN fails too
            self._refuse(sid, t, REFUSED_RANGE)
            return False
        return self.lim_rate[sid] == 0.0 or self._rate_ok(sid, t, value)

    def _rate_ok(self, sid, t, value):
        """The rate half of _accept (the decode loop tests a row's raw span itself), against
        the last value believed from the same source: two sources of one signal may
        disagree by more than it can change (a controller and a display both reporting the
        motor's temperature, each with its own sensor)."""
        if not self.seen[sid] or self.sig_src[sid] != self.source:
            return True
        dt = t - self.w_last_time[sid]
        if dt < self.params[P_RATE_MIN]:
            dt = self.params[P_RATE_MIN]
        if abs(value - self.w_last[sid]) > self.lim_rate[sid] * self.params[P_RATE_SCALE] * dt:
            self._refuse(sid, t, REFUSED_RATE)
            return False
        return True

    def _refuse(self, sid, t, reason):
        self.refused += 1
        if t > self.bad_t[sid]:
            self.bad_t[sid] = t
        s = self.source
        if 0 <= s < MAX_SOURCES:
            self.ref_count[(2 * s + reason) * self.id_space + sid] += 1
            self.src_refused[s] += 1
        return 0

    # Time ---------------------------------------------------------------------------

    def _advance(self, t):
        if t >= self.next_event:
            if self.started:
                self._due(t)
            else:
                self._start(t)
        elif t < self.live_start:
            self.late += 1

    def _start(self, t):
        self.started = 1
        for k in range(2):
            self.win_index[k] = int(t // self.win_len[k])
        self.live_start = self.win_index[WIN_LIVE] * self.window
        self._skip_to(t)
        self._next_event()

    def _skip_to(self, t):
        # The first step after t (t // tick can round down across a step, as 1.0 // 0.1 does).
        self.tick_index = int(t // self.tick)
        self.next_tick = (self.tick_index + 1) * self.tick
        if self.next_tick <= t:
            self.tick_index += 1
            self.next_tick = (self.tick_index + 1) * self.tick

    def _due(self, t):
        n = 0
        while self.next_tick <= t and n < MAX_TICKS_PER_CALL:
            self._close_until(self.next_tick)
            self._step(self.next_tick)
            self.tick_index += 1
            self.next_tick = (self.tick_index + 1) * self.tick
            n += 1
        if self.next_tick <= t:
            # A long silence: the steps nobody could use are skipped, the phase kept.
            self._skip_to(t)
        self._close_until(t)
        self._next_event()

    def _close_until(self, t):
        for k in range(2):
            w = int(t // self.win_len[k])
            if w > self.win_index[k]:
                self._close(k, w)
        self.live_start = self.win_index[WIN_LIVE] * self.window

    def _next_event(self):
        e = self.next_tick
        for k in range(2):
            end = (self.win_index[k] + 1) * self.win_len[k]
            if end < e:
                e = end
        self.next_event = e

    # Samples and windows --------------------------------------------------------------

    def _sample(self, sid, t, value):
        self.samples += 1
        if self.seen[sid]:
            dt = t - self.w_last_time[sid]
            if dt > 0.0:
                self.sig_period[sid] = _learn(self.sig_period[sid], dt)
        else:
            self.seen[sid] = 1
        self.sig_src[sid] = self.source
        if self.w_count[sid] == 0:
            self.touched[self.n_touched[WIN_LIVE]] = sid
            self.n_touched[WIN_LIVE] += 1
            self.w_min[sid] = value
            self.w_max[sid] = value
            self.w_sum[sid] = value
        else:
            if value < self.w_min[sid]:
                self.w_min[sid] = value
            if value > self.w_max[sid]:
                self.w_max[sid] = value
            self.w_sum[sid] += value
        self.w_count[sid] += 1
        self.w_last[sid] = value
        self.w_last_time[sid] = t
        r = self.r_head & self.ring_mask
        self.r_sid[r] = sid
        self.r_t[r] = t
        self.r_v[r] = value
        self.r_head += 1
        if self.policy[sid] & REPORT_CHANGE and (
                not self.reported[sid] or abs(value - self.reported_value[sid]) > self.deadband[sid]):
            self.reported[sid] = 1
            self.reported_value[sid] = value
            self.closed.append((OUT_CHANGE, sid, t, value))

    def _close(self, k, next_index):
        c = self.n_touched[k]
        if c > 0:
            base = k * self.id_space
            rows = []
            for j in range(c):
                i = self.touched[base + j]
                sid = i - base
                n = self.w_count[i]
                if k == WIN_HISTORY or self.policy[sid] & REPORT_WINDOW:
                    rows.append((sid, n, self.w_min[i], self.w_max[i], self.w_sum[i] / n,
                                 self.w_last[sid], self.w_last_time[sid]))
                if k == WIN_LIVE:
                    self._merge(sid)
                self.w_count[i] = 0
            self.n_touched[k] = 0
            if len(rows) > 0:
                self.closed.append((OUT_WINDOW, k, self.win_index[k] * self.win_len[k], self.win_len[k], rows))
        self.win_index[k] = next_index

    def _merge(self, sid):
        """Fold a closing live window's aggregate of ``sid`` into the open history window:
        samples are aggregated once, history costs nothing per sample."""
        h = self.id_space + sid
        if self.w_count[h] == 0:
            self.touched[self.id_space + self.n_touched[WIN_HISTORY]] = h
            self.n_touched[WIN_HISTORY] += 1
            self.w_min[h] = self.w_min[sid]
            self.w_max[h] = self.w_max[sid]
            self.w_sum[h] = self.w_sum[sid]
        else:
            if self.w_min[sid] < self.w_min[h]:
                self.w_min[h] = self.w_min[sid]
            if self.w_max[sid] > self.w_max[h]:
                self.w_max[h] = self.w_max[sid]
            self.w_sum[h] += self.w_sum[sid]
        self.w_count[h] += self.w_count[sid]

    def _take_closed(self):
        out = self.closed
        self.closed = []
        return out

    def _fresh(self, sid, t):
        if not self.seen[sid]:
            return False
        limit = self.params[P_STALE_PERIODS] * self.sig_period[sid]
        if limit < self.params[P_STALE_MIN]:
            limit = self.params[P_STALE_MIN]
        return t - self.w_last_time[sid] <= limit

    def _put(self, sid, t, value):
        """A derived sample: it goes where a decoded one goes, stamped as the fusion's."""
        src = self.source
        self.source = SRC_FUSION
        if self.q_scale[sid] > 0.0:
            value = _quantise(value, self.q_scale[sid])
        self._sample(sid, t, value)
        self.source = src

    def _message(self, key):
        h = _hash(key, self.h_mask)
        while self.h_keys[h] != _HASH_EMPTY:
            if self.h_keys[h] == key:
                return self.h_vals[h]
            h = (h + 1) & self.h_mask
        return -1

    def feed_frames(self, keys, datas, times):
        """Decode a batch of already-split CAN frames (key = id | 0x80000000 for 29-bit ids)."""
        n = len(keys)
        for i in range(n):
            data = datas[i]
            size = len(data)
            self._advance(times[i])
            self._frame(keys[i], _le(data, 0, size) if size <= 8 else 0, size, times[i])
        return self._take_closed()

    def feed_packed(self, buf, t):
        """Decode Linux ``struct can_frame`` records (16 bytes each, little-endian id), as a
        SocketCAN read delivers them, all stamped ``t``."""
        self._advance(t)
        n = len(buf) // PACKED_SIZE
        if len(buf) % PACKED_SIZE:
            self.bad_lines += 1
        for i in range(n):
            off = i * PACKED_SIZE
            raw_id = buf[off] | (buf[off + 1] << 8) | (buf[off + 2] << 16) | (buf[off + 3] << 24)
            dlc = buf[off + 4]
            if raw_id & ERR_FLAG:
                self.error_frames += 1
            elif raw_id & RTR_FLAG:
                self.remote_frames += 1
            elif dlc > 8:
                self.bad_lines += 1
            else:
                le = 0
                for k in range(dlc):
                    b = buf[off + 8 + k]
                    le |= b << (8 * k)
                self._frame((raw_id & EFF_MASK) | EFF_FLAG if raw_id & EFF_FLAG else raw_id & 0x7FF, le, dlc, t)
        return self._take_closed()

    def feed_slcan(self, buf, t):
        """Decode the complete SLCAN lines in ``buf`` (each ends in CR; a lone BEL is the
        adapter refusing a command). Returns ``(consumed, closed)``: the caller keeps
        ``buf[consumed:]``, an unfinished line, for the next read."""
        self._advance(t)
        n = len(buf)
        start = 0
        for i in range(n):
            c = buf[i]
            if c == _CR or c == _BEL:
                if c == _BEL:
                    self.adapter_errors += 1
                if i > start:
                    self._slcan_line(buf, start, i, t)
                start = i + 1
        return start, self._take_closed()

    def _slcan_line(self, buf, start, end, t):
        c = buf[start]
        if c == 116 or c == 84:  # t T: data frame
            id_len = 3 if c == 116 else 8
        elif c == 114 or c == 82:  # r R: remote frame
            if end - start >= (5 if c == 114 else 10) and self._hex_run(buf, start + 1, end):
                self.remote_frames += 1
            else:
                self.bad_lines += 1
            return 0
        elif c == 122 or c == 90:  # z Z: the adapter acknowledging a transmission
            return 0
        else:
            self.bad_lines += 1
            return 0
        head = start + 1 + id_len
        if end - start < 2 + id_len or not self._hex_run(buf, start + 1, end):
            self.bad_lines += 1
            return 0
        can_id = self._hex_number(buf, start + 1, head)
        dlc = self.hexval[buf[head]]
        size = end - head - 1
        if dlc > 8 or (size != 2 * dlc and size != 2 * dlc + 4):
            self.bad_lines += 1
            return 0
        if id_len == 3:
            if can_id > 0x7FF:
                self.bad_lines += 1
                return 0
            key = can_id
        else:
            if can_id > EFF_MASK:
                self.bad_lines += 1
                return 0
            key = can_id | EFF_FLAG
        le = 0
        for k in range(dlc):
            b = self.hexval[buf[head + 1 + 2 * k]] * 16 + self.hexval[buf[head + 2 + 2 * k]]
            le |= b << (8 * k)
        self._frame(key, le, dlc, t)
        return 0

    def feed_candump(self, buf, t_offset):
        """Decode the complete ``candump -L`` lines in ``buf``, each stamped with its own
        time plus ``t_offset``. Returns ``(consumed, closed)`` as ``feed_slcan`` does."""
        n = len(buf)
        start = 0
        for i in range(n):
            if buf[i] == _LF:
                end = i
                if end > start and buf[end - 1] == _CR:
                    end -= 1
                if end > start:
                    self._candump_line(buf, start, end, t_offset)
                start = i + 1
        return start, self._take_closed()

    def _candump_line(self, buf, start, end, t_offset):
        # (<sec>.<usec>) <iface> <id>#<data>[ R|T], fields split by runs of blanks
        a0 = _skip_blanks(buf, start, end)
        b0 = _token_end(buf, a0, end)
        a1 = _skip_blanks(buf, b0, end)
        b1 = _token_end(buf, a1, end)
        p = _skip_blanks(buf, b1, end)
        tail = _token_end(buf, p, end)
        a3 = _skip_blanks(buf, tail, end)
        b3 = _token_end(buf, a3, end)
        if (b1 == a1 or tail == p or _skip_blanks(buf, b3, end) < end
                or (b3 > a3 and (b3 - a3 != 1 or (buf[a3] != 82 and buf[a3] != 84)))):
            self.bad_lines += 1
            return 0
        if b0 - a0 < 5 or buf[a0] != 40 or buf[b0 - 1] != 41:  # ( )
            self.bad_lines += 1
            return 0
        q = a0 + 1
        sec = 0.0
        digits = 0
        while q < b0 - 1 and 48 <= buf[q] <= 57:
            sec = sec * 10.0 + (buf[q] - 48)
            q += 1
            digits += 1
        if digits == 0 or buf[q] != 46:  # .
            self.bad_lines += 1
            return 0
        q += 1
        frac = 0.0
        div = 1.0
        digits = 0
        while q < b0 - 1 and 48 <= buf[q] <= 57:
            frac = frac * 10.0 + (buf[q] - 48)
            div *= 10.0
            q += 1
            digits += 1
        if digits == 0 or q != b0 - 1:
            self.bad_lines += 1
            return 0
        sec += frac / div
        id_start = p
        while p < tail and buf[p] != 35:  # #
            if self.hexval[buf[p]] < 0:
                self.bad_lines += 1
                return 0
            p += 1
        id_len = p - id_start
        if p >= tail or (id_len != 3 and id_len != 8):
            self.bad_lines += 1
            return 0
        can_id = self._hex_number(buf, id_start, p)
        p += 1
        if id_len == 8 and can_id & ERR_FLAG and not can_id & ~(ERR_FLAG | ERR_CLASS_MASK):
            if self._hex_pairs(buf, p, tail):
                self.error_frames += 1
            else:
                self.bad_lines += 1
            return 0
        if (id_len == 3 and can_id > 0x7FF) or (id_len == 8 and can_id > EFF_MASK):
            self.bad_lines += 1
            return 0
        if p < tail and buf[p] == 35:  # ## CAN FD: counted, not decoded
            self.fd_frames += 1
            return 0
        if p < tail and (buf[p] == 82 or buf[p] == 114):  # R remote, optional dlc digit
            if tail - p == 1 or (tail - p == 2 and 48 <= buf[p + 1] <= 56):
                self.remote_frames += 1
            else:
                self.bad_lines += 1
            return 0
        size = 0
        le = 0
        while p < tail:
            if buf[p] == 46:  # . separator
                p += 1
                continue
            if p + 1 >= tail or size >= 8:
                self.bad_lines += 1
                return 0
            hi = self.hexval[buf[p]]
            lo = self.hexval[buf[p + 1]]
            if hi < 0 or lo < 0:
                self.bad_lines += 1
                return 0
            b = hi * 16 + lo
            le |= b << (8 * size)
            size += 1
            p += 2
        t = sec + t_offset
        self._advance(t)
        self._frame(can_id | EFF_FLAG if id_len == 8 else can_id, le, size, t)
        return 0

    def _hex_run(self, buf, start, end):
        for p in range(start, end):
            if self.hexval[buf[p]] < 0:
                return False
        return True

    def _hex_pairs(self, buf, start, end):
        size = 0
        p = start
        while p < end:
            if buf[p] == 46:
                p += 1
                continue
            if p + 1 >= end or self.hexval[buf[p]] < 0 or self.hexval[buf[p + 1]] < 0:
                return False
            size += 1
            p += 2
        return size <= 8

    def _hex_number(self, buf, start, end):
        v = 0
        for p in range(start, end):
            v = v * 16 + self.hexval[buf[p]]
        return v

    def _frame(self, key, le, size, t):
        m = self._message(key)
        if m < 0:
            self.unknown += 1
        elif size < self.msg_len[m] or size > 8:
            self.truncated += 1
        else:
            self.frames += 1
            self._heard(m, t)
            self._decode(m, le, t, None)

    def decode_frame(self, key, data):
        """Signals of one frame as ``[(signal_id, value)]``, None if the DBC lacks the
        message, for tools that show frames one by one; the state is not touched."""
        m = self._message(key)
        if m < 0:
            return None
        if len(data) < self.msg_len[m] or len(data) > 8:
            raise ValueError("frame has %d bytes, the message needs %d to 8" % (len(data), self.msg_len[m]))
        out = []  # type: list
        self._decode(m, _le(data, 0, len(data)), 0.0, out)
        return out

    def _decode(self, m, le, t, out):
        be = _bswap64(le)
        first = self.msg_first[m]
        for s in range(first, first + self.msg_count[m]):
            mux = self.sig_mux_row[s]
            if mux >= 0 and self._raw(mux, le, be) != self.sig_mux_value[s]:
                continue
            # _raw() written out: this is the hottest line of the agent.
            raw = ((be if self.sig_big_endian[s] else le) >> self.sig_shift[s]) & self.sig_mask[s]
            if out is not None:
                if self.sig_has_na[s] and raw == self.sig_na[s]:
                    self.no_value += 1
                else:
                    out.append((self.sig_id[s], self._value(s, raw)))
            elif self.row_raw_lo[s] <= raw <= self.row_raw_hi[s]:
                # A believable raw value of an unsigned row (see _row_limits): _value
                # written out, and the rate where the signal has one.
                value = float(raw) * self.sig_factor[s] + self.sig_offset[s]
                if self.row_rated[s] == 0 or self._rate_ok(self.sig_id[s], t, value):
                    self._sample(self.sig_id[s], t, value)
            else:
                self._row_slow(s, raw, t)

    def _value(self, s, raw):
        """The physical value of raw bits of row ``s``."""
        if self.sig_signed[s] and (raw >> (self.sig_length[s] - 1)) & 1:
            return -float((~raw & self.sig_mask[s]) + 1) * self.sig_factor[s] + self.sig_offset[s]
        return float(raw) * self.sig_factor[s] + self.sig_offset[s]

    def _row_slow(self, s, raw, t):
        """A raw value the decode loop's one test did not pass: "no value", a signed or
        rated row, or a value out of the row's range."""
        if self.sig_has_na[s] and raw == self.sig_na[s]:
            self.no_value += 1
            return 0
        value = self._value(s, raw)
        if self._accept(self.sig_id[s], t, value, self.row_lo[s], self.row_hi[s]):
            self._sample(self.sig_id[s], t, value)
        return 0

    def _raw(self, s, le, be):
        if self.sig_big_endian[s]:
            return (be >> self.sig_shift[s]) & self.sig_mask[s]
        return (le >> self.sig_shift[s]) & self.sig_mask[s]

    # The fusion step ------------------------------------------------------------------

    def _step(self, t):
        self.ticks += 1
        dt = t - self.f_last if self.f_last >= 0.0 else 0.0
        if dt > 5.0 * self.tick:
            dt = 0.0  # nothing is integrated across a gap in the data
        self.f_last = t
        self._health(t)
        self._quality()
        self._gnss_track(t)
        moving = self._speed(t, dt)
        self._position(t, dt, moving)
        self._battery(t, dt, moving)
        self._pack(t)
        self._specials(t)
        self._alarms(t)
        if self.cap_pending and t >= self.cap_t + self.params[P_CAPTURE_AFTER]:
            self._capture()

    def _gnss_fix(self, t):
        """A fresh position, and no fresh "no fix" (GGA quality 0, RMC status V) since it."""
        if not self._fresh(S_LAT, t) or not self._fresh(S_LON, t):
            return False
        return not (self._fresh(S_FIX, t) and self.w_last[S_FIX] < 1.0
                    and self.w_last_time[S_FIX] >= self.w_last_time[S_LAT])

    def _gnss_track(self, t):
        """When the GNSS position last moved, to tell a frozen receiver (the same fix
        over and over) from a moving one."""
        if not self._gnss_fix(t):
            self.gnss_moved_t = -1.0
        elif self.gnss_moved_t < 0.0 or self.w_last[S_LAT] != self.gnss_lat or self.w_last[S_LON] != self.gnss_lon:
            self.gnss_lat = self.w_last[S_LAT]
            self.gnss_lon = self.w_last[S_LON]
            self.gnss_moved_t = t
        return 0

    def _gnss_frozen(self, t):
        """The GNSS speed says moving while its position has not moved for gnss_frozen_s."""
        return (self.gnss_moved_t >= 0.0 and t - self.gnss_moved_t >= self.params[P_GNSS_FROZEN]
                and self.w_last[S_GNSS_SPEED] > self.params[P_MOVING])

    def _active(self, code):
        a = self.a_row[code]
        return a >= 0 and self.a_active[a] == 1

    def _speed(self, t, dt):
        """Wheel and GNSS speed in a one-state Kalman filter (GNSS with a fix that is not
        frozen). While the two are judged implausible, only the faster one is used: a
        sensor that fails reads 0 or freezes far more often than it invents speed (a
        stuck receiver, an unplugged magnet), and a speed below the true one is the
        unsafe error. Returns -1 without any speed, else whether moving."""
        wheel = self._fresh(S_SPEED, t)
        gnss = self._fresh(S_GNSS_SPEED, t) and self._gnss_fix(t) and not self._gnss_frozen(t)
        if wheel and gnss and self._active(A_WHEEL_IMPLAUSIBLE):
            if self.w_last[S_SPEED] >= self.w_last[S_GNSS_SPEED]:
                gnss = False
            else:
                wheel = False
        if not wheel and not gnss:
            self.kf_p = -1.0
            return -1
        if self.kf_p < 0.0:
            self.kf_x = self.w_last[S_SPEED] if wheel else self.w_last[S_GNSS_SPEED]
            self.kf_p = self.params[P_WHEEL_R] if wheel else self.params[P_GNSS_R]
        else:
            self.kf_p += self.params[P_SPEED_Q] * dt
        if wheel and self.w_last_time[S_SPEED] > self.kf_wheel_t:
            self.kf_wheel_t = self.w_last_time[S_SPEED]
            self._kf_update(self.w_last[S_SPEED], self.params[P_WHEEL_R])
        if gnss and self.w_last_time[S_GNSS_SPEED] > self.kf_gnss_t:
            self.kf_gnss_t = self.w_last_time[S_GNSS_SPEED]
            hdop = self.w_last[S_HDOP] if self._fresh(S_HDOP, t) else 1.0
            if hdop < 1.0:
                hdop = 1.0
            self._kf_update(self.w_last[S_GNSS_SPEED], self.params[P_GNSS_R] * hdop * hdop)
        if self.kf_x < 0.0:
            self.kf_x = 0.0
        self._put(S_FUSED_SPEED, t, self.kf_x)
        return 1 if self.kf_x > self.params[P_MOVING] else 0

    def _kf_update(self, z, r):
        k = self.kf_p / (self.kf_p + r)
        self.kf_x += k * (z - self.kf_x)
        self.kf_p *= 1.0 - k

    def _position(self, t, dt, moving):
        """GNSS position while there is a fix; without one, dead reckoning from the fused
        speed and the last course over ground, flagged as estimated."""
        if self._gnss_fix(t):
            self.gnss_seen = 1
            self.pos_ok = 1
            self.pos_lat = self.w_last[S_LAT]
            self.pos_lon = self.w_last[S_LON]
            if moving == 1 and self._fresh(S_HEADING, t):
                self.heading = self.w_last[S_HEADING]
            estimated = 0.0
        elif self.pos_ok and moving >= 0:
            d = self.kf_x / 3.6 * dt
            h = self.heading * DEG
            self.pos_lat += d * math.cos(h) / M_PER_DEG
            self.pos_lon += d * math.sin(h) / (M_PER_DEG * math.cos(self.pos_lat * DEG))
            estimated = 1.0
        else:
            return 0
        self._put(S_FUSED_LAT, t, self.pos_lat)
        self._put(S_FUSED_LON, t, self.pos_lon)
        self._put(S_POS_ESTIMATED, t, estimated)
        return 0

    def _battery(self, t, dt, moving):
        dd = 0.0
        if moving >= 0:
            dd = self.kf_x / 3600.0 * dt
            self.trip_km += dd
            self._put(S_FUSED_TRIP, t, self.trip_km)
        if self.seen[S_ODOMETER] and self.w_last_time[S_ODOMETER] > self.odo_t:
            self.odo_t = self.w_last_time[S_ODOMETER]
            self.odo_base = self.w_last[S_ODOMETER]
            self.odo_base_trip = self.trip_km
        if self.odo_base >= 0.0:
            self._put(S_FUSED_ODOMETER, t, self.odo_base + self.trip_km - self.odo_base_trip)
        if not self._fresh(S_PACK_I, t):
            self.rest_since = -1.0
            return 0
        i = self.w_last[S_PACK_I]
        if abs(i) < self.params[P_REST_A]:
            if self.rest_since < 0.0:
                self.rest_since = t
        else:
            self.rest_since = -1.0
        self.ah += i * dt / 3600.0
        cap = self._capacity()
        self._soc(t, dt, i, cap)
        if not self._fresh(S_PACK_V, t):
            return 0
        p = self.w_last[S_PACK_V] * i
        self._put(S_POWER, t, p)
        wh = p * dt / 3600.0
        if wh < 0.0:
            self.e_out -= wh
        elif moving == 1:
            self.e_regen += wh
        else:
            self.e_charged += wh
        self._put(S_ENERGY_OUT, t, self.e_out)
        self._put(S_ENERGY_REGEN, t, self.e_regen)
        self._put(S_ENERGY_CHARGED, t, self.e_charged)
        if wh < 0.0 or moving == 1:
            decay = math.exp(-dd / self.params[P_CONSUMPTION_KM])
            self.cons_wh = self.cons_wh * decay - wh
            self.cons_km = self.cons_km * decay + dd
        if self.cons_km >= 0.1 * self.params[P_CONSUMPTION_KM]:
            wh_km = self.cons_wh / self.cons_km
            self._put(S_CONSUMPTION, t, wh_km)
            if self.soc >= 0.0:
                usable = self.soc - self.params[P_RESERVE]
                if usable < 0.0:
                    usable = 0.0
                wh_left = usable / 100.0 * cap * self.params[P_NOMINAL_V] * self.params[P_CELLS]
                self._put(S_FUSED_RANGE, t, wh_left / (wh_km if wh_km > 1.0 else 1.0))
        return 0

    def _capacity(self):
        if self.seen[S_FULL_AH] and self.w_last[S_FULL_AH] > 0.0:
            return self.w_last[S_FULL_AH]
        if self.soh > 0.0:
            return self.params[P_DESIGN_AH] * self.soh / 100.0
        return self.params[P_DESIGN_AH]

    def _soc(self, t, dt, i, cap):
        """Coulomb counting, pulled towards the BMS's own SoC and, after a rest, towards
        the SoC the open-circuit voltage says; the BMS readings also measure capacity."""
        bms = self._fresh(S_SOC, t)
        rested = self.rest_since >= 0.0 and t - self.rest_since >= self.params[P_REST_TIME] \
            and self._fresh(S_PACK_V, t)
        if bms and self.w_last_time[S_SOC] > self.soc_bms_t:
            self._soc_reading(t, self.w_last[S_SOC], self.sig_src[S_SOC])
        if self.soc < 0.0:
            if bms:
                self.soc = self.w_last[S_SOC]
            elif rested:
                self.soc = self._ocv_soc(self.w_last[S_PACK_V] / self.params[P_CELLS])
            else:
                return 0
        else:
            self.soc += 100.0 * i * dt / 3600.0 / cap
            if bms:
                self.soc += (self.w_last[S_SOC] - self.soc) * _gain(dt, self.params[P_SOC_BMS_TAU])
            if rested:
                ocv = self._ocv_soc(self.w_last[S_PACK_V] / self.params[P_CELLS])
                self.soc += (ocv - self.soc) * _gain(dt, self.params[P_SOC_OCV_TAU])
        if self.soc < 0.0:
            self.soc = 0.0
        elif self.soc > 110.0:
            self.soc = 110.0
        self._put(S_FUSED_SOC, t, self.soc)
        if self.soh > 0.0:
            self._put(S_FUSED_SOH, t, self.soh)
        elif self.seen[S_FULL_AH] and self.w_last[S_FULL_AH] > 0.0:
            self._put(S_FUSED_SOH, t, 100.0 * self.w_last[S_FULL_AH] / self.params[P_DESIGN_AH])
        return 0

    def _soc_reading(self, t, reading, src):
        """A new BMS SoC reading: a jump from the last one of the same source is an alarm
        value; a swing of ``soh_min_swing_pct`` since the anchor measures the capacity."""
        self.soc_bms_t = self.w_last_time[S_SOC]
        if src == self.soc_bms_src and self.soc_bms_prev >= 0.0:
            self.spec_value[A_SOC_JUMP] = abs(reading - self.soc_bms_prev)
            self.spec_ok[A_SOC_JUMP] = 1
        self.soc_bms_src = src
        self.soc_bms_prev = reading
        if self.soh_anchor_soc < 0.0:
            self.soh_anchor_soc = reading
            self.soh_anchor_ah = self.ah
        elif abs(reading - self.soh_anchor_soc) >= self.params[P_SOH_SWING]:
            capacity = abs(self.ah - self.soh_anchor_ah) / (abs(reading - self.soh_anchor_soc) / 100.0)
            observed = 100.0 * capacity / self.params[P_DESIGN_AH]
            self.soh = observed if self.soh < 0.0 else self.soh + 0.3 * (observed - self.soh)
            self.soh_anchor_soc = reading
            self.soh_anchor_ah = self.ah

    def _ocv_soc(self, cell_v):
        n = len(self.ocv_v)
        if cell_v <= self.ocv_v[0]:
            return self.ocv_soc[0]
        for k in range(1, n):
            if cell_v <= self.ocv_v[k]:
                f = (cell_v - self.ocv_v[k - 1]) / (self.ocv_v[k] - self.ocv_v[k - 1])
                return self.ocv_soc[k - 1] + f * (self.ocv_soc[k] - self.ocv_soc[k - 1])
        return self.ocv_soc[n - 1]

    def _pack(self, t):
        """Cell voltage and pack temperature extremes (where the BMS does not report them),
        spreads and the fastest rise."""
        if self._extremes(S_CELL0, N_CELLS, t) > 0:
            self._fill_in(S_CELL_MIN, t, self.ext_lo)
            self._fill_in(S_CELL_MAX, t, self.ext_hi)
            if self.ext_n > 1:
                self._put(S_CELL_SPREAD, t, self.ext_hi - self.ext_lo)
        if self._extremes(S_TEMP0, N_TEMPS, t) > 0:
            self._fill_in(S_TEMP_MIN, t, self.ext_lo)
            self._fill_in(S_TEMP_MAX, t, self.ext_hi)
            if self.ext_n > 1:
                self._put(S_TEMP_SPREAD, t, self.ext_hi - self.ext_lo)
        self._temp_rise(t)
        return 0

    def _extremes(self, first, count, t):
        """Lowest and highest of the fresh signals ``first`` .. ``first + count - 1`` into
        ``ext_lo`` and ``ext_hi``; how many were fresh."""
        n = 0
        for k in range(count):
            if self._fresh(first + k, t):
                v = self.w_last[first + k]
                if n == 0 or v < self.ext_lo:
                    self.ext_lo = v
                if n == 0 or v > self.ext_hi:
                    self.ext_hi = v
                n += 1
        self.ext_n = n
        return n

    def _fill_in(self, sid, t, value):
        """A pack extreme the BMS did not report itself (a fresh one of its own wins)."""
        if self.sig_src[sid] == SRC_FUSION or not self._fresh(sid, t):
            self._put(sid, t, value)
        return 0

    def _temp_rise(self, t):
        """The fastest pack sensor's rise (C/min) from the reading kept about
        ``temp_rise_window_s`` ago (one is kept a second) to its reading now."""
        span = int(self.params[P_RISE_WINDOW] + 0.5)
        fastest = 0.0
        n = 0
        if self.temp_hist_n > span:
            back = (self.temp_hist_n - 1 - span) % TEMP_HISTORY
            elapsed = t - self.temp_hist_t[back]
            for k in range(N_TEMPS):
                then = self.temp_hist[back * N_TEMPS + k]
                if then != NO_READING and elapsed > 0.0 and self._fresh(S_TEMP0 + k, t):
                    rate = (self.w_last[S_TEMP0 + k] - then) * 60.0 / elapsed
                    if n == 0 or rate > fastest:
                        fastest = rate
                    n += 1
        if t >= self.temp_hist_next:
            row = self.temp_hist_n % TEMP_HISTORY
            self.temp_hist_t[row] = t
            for k in range(N_TEMPS):
                fresh = self._fresh(S_TEMP0 + k, t)
                self.temp_hist[row * N_TEMPS + k] = self.w_last[S_TEMP0 + k] if fresh else NO_READING
            self.temp_hist_n += 1
            self.temp_hist_next = t + 1.0
        if n > 0:
            self._put(S_TEMP_RISE, t, fastest)
        return 0

    # Alarms and health ----------------------------------------------------------------

    def _health(self, t):
        """Time out messages not heard for ``health_periods`` learned periods; a source
        is lost when every message it has sent is timed out."""
        for s in range(MAX_SOURCES):
            self.src_seen[s] = 0
            self.src_live[s] = 0
        for m in range(self.n_slots):
            if not self.m_seen[m]:
                continue
            limit = self.params[P_HEALTH_PERIODS] * self.m_period[m]
            if limit < self.params[P_HEALTH_MIN]:
                limit = self.params[P_HEALTH_MIN]
            if not self.m_out[m] and t - self.m_t[m] > limit:
                self.m_out[m] = 1
                self.m_timeouts[m] += 1
            s = self.m_src[m]
            self.src_seen[s] += 1
            if not self.m_out[m]:
                self.src_live[s] += 1

    def _quality(self):
        """Each source's rate of refused values, decaying with quality_tau_s (nothing to do
        on a bus that never sent an unbelievable value)."""
        if self.refused == 0:
            return 0
        tau = self.params[P_QUALITY_TAU]
        decay = math.exp(-self.tick / tau)
        for s in range(MAX_SOURCES):
            new = self.src_refused[s] - self.q_prev[s]
            self.q_prev[s] = self.src_refused[s]
            self.q_rate[s] = self.q_rate[s] * decay + new / tau
        return 0

    def _specials(self, t):
        """Values of the alarms that are not a threshold on one signal."""
        gnss = self._gnss_fix(t)
        speed = -1.0
        if self._fresh(S_FUSED_SPEED, t):
            speed = self.w_last[S_FUSED_SPEED]
        elif gnss and self._fresh(S_GNSS_SPEED, t):
            speed = self.w_last[S_GNSS_SPEED]
        locked = self.seen[S_LOCKED] and self.w_last[S_LOCKED] >= 0.5
        self.spec_ok[A_THEFT] = 1 if speed >= 0.0 else 0
        self.spec_value[A_THEFT] = speed if locked else 0.0
        self.spec_ok[A_GNSS_LOST] = self.gnss_seen
        self.spec_value[A_GNSS_LOST] = 1.0 if gnss else 0.0
        self.spec_ok[A_WHEEL_IMPLAUSIBLE] = 0
        if self.seen[S_SPEED] and gnss and self._fresh(S_GNSS_SPEED, t):
            g = self.w_last[S_GNSS_SPEED]
            w = self.w_last[S_SPEED] if self._fresh(S_SPEED, t) else 0.0
            top = w if w > g else g
            if top > self.params[P_WHEEL_CHECK_MIN]:
                self.spec_ok[A_WHEEL_IMPLAUSIBLE] = 1
                self.spec_value[A_WHEEL_IMPLAUSIBLE] = abs(w - g) / top
        self.spec_ok[A_OVER_CHARGE] = 0
        if self._fresh(S_PACK_I, t):
            full = self._fresh(S_SOC, t) and self.w_last[S_SOC] >= self.params[P_FULL_SOC]
            a = self.a_row[A_CELL_OVER_VOLTAGE]
            if a >= 0 and self._fresh(S_CELL_MAX, t) and self.w_last[S_CELL_MAX] > self.a_thr[a]:
                full = True
            self.spec_ok[A_OVER_CHARGE] = 1
            self.spec_value[A_OVER_CHARGE] = self.w_last[S_PACK_I] if full else 0.0

    def _alarms(self, t):
        for a in range(self.n_alarms):
            code = self.a_code[a]
            sid = self.a_sid[a]
            if self.a_block[a] >= 0:
                st = self.n_alarms + self.a_block[a] * MAX_SOURCES
                for s in range(MAX_SOURCES):
                    if code == A_COMM_LOST and self.src_seen[s] > 0:
                        self._debounce(a, st + s, s, t, 1.0 if self.src_live[s] == 0 else 0.0)
                    elif code == A_DATA_QUALITY and self.src_refused[s] > 0:
                        self._debounce(a, st + s, s, t, self.q_rate[s])
            elif sid == SPECIAL:
                if self.spec_ok[code]:
                    self._debounce(a, a, -1, t, self.spec_value[code])
                else:
                    self.a_since[a] = -1.0
            elif self._fresh(sid, t):
                self._debounce(a, a, -1, t, self.w_last[sid])
            else:
                self.a_since[a] = -1.0

    def _debounce(self, a, st, instance, t, value):
        """Raise once the value has been beyond the threshold for the raise delay; clear
        once it has been back beyond the clear threshold for the clear delay."""
        up = self.a_dir[a] == ABOVE
        self.a_value[st] = value
        if self.a_active[st]:
            cross = value < self.a_clr[a] if up else value > self.a_clr[a]
            delay = self.a_off[a]
        else:
            cross = value > self.a_thr[a] if up else value < self.a_thr[a]
            delay = self.a_on[a]
        if not cross:
            self.a_since[st] = -1.0
            return 0
        if self.a_since[st] < 0.0:
            self.a_since[st] = t
        if t - self.a_since[st] < delay:
            return 0
        self.a_since[st] = -1.0
        level = self.a_level[a]
        if self.a_active[st]:
            self.a_active[st] = 0
            self.closed.append((OUT_ALARM, t, self.a_code[a], instance, level, 0, value, self.a_clr[a]))
            return 0
        self.a_active[st] = 1
        self.a_raised_t[st] = t
        self.closed.append((OUT_ALARM, t, self.a_code[a], instance, level, 1, value, self.a_thr[a]))
        if level >= 2 and not self.cap_pending:
            self.cap_pending = 1
            self.cap_t = t
            self.cap_code = self.a_code[a]
            self.cap_instance = instance
        return 0

    # Event capture --------------------------------------------------------------------

    def _capture(self):
        self.cap_pending = 0
        self.snapshots += 1
        t = self.cap_t
        self.closed.append(self._ring_slice(t, self.cap_code, self.cap_instance,
                                            t - self.params[P_CAPTURE_BEFORE], t + self.params[P_CAPTURE_AFTER]))

    def _ring_slice(self, t, code, instance, lo, hi):
        """Samples of the ring from ``lo`` to ``hi`` in arrival order (the ring is walked
        back from the newest until a sample is a second older than ``lo``)."""
        ids = []
        times = []
        values = []
        size = self.ring_mask + 1
        stop = self.r_head - size if self.r_head > size else 0
        j = self.r_head - 1
        while j >= stop:
            r = j & self.ring_mask
            rt = self.r_t[r]
            if rt < lo - 1.0:
                break
            if lo <= rt <= hi:
                ids.append(self.r_sid[r])
                times.append(rt)
                values.append(self.r_v[r])
            j -= 1
        if j < stop and self.r_head > size:
            # The ring had already dropped the start of the span: too small for this load.
            self.snapshots_truncated += 1
        ids.reverse()
        times.reverse()
        values.reverse()
        return (OUT_SNAPSHOT, t, code, instance, lo, hi, ids, times, values)
