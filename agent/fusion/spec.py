"""The fusion kernel's codes and tables: what its outputs, alarms, tunables and signal ids
mean, for the kernel and for everyone who reads what it hands back (the runtime, the
configuration, the CLI, the tests).

Pure and MicroPython-safe, and not compiled: the kernel modules import these names, and
those their ``.pxd`` declares ``cdef int`` become C globals set once at import. Imports
nothing of the agent.
"""

from array import array

# What a kernel call hands back: tuples whose first item is one of these.
# * ``(OUT_WINDOW, set, start, length, rows)``: a closed window of set ``WIN_LIVE`` or
#   ``WIN_HISTORY``, one row per signal sampled in it:
#   ``(signal_id, count, min, max, mean, last, last_time)``;
# * ``(OUT_CHANGE, signal_id, time, value)``: a signal reported on change moved beyond
#   its deadband;
# * ``(OUT_ALARM, time, code, instance, level, raised, value, threshold)``: an alarm
#   raised (1) or cleared (0) with the value that did it and the threshold it crossed;
# * ``(OUT_SNAPSHOT, time, code, instance, start, end, ids, times, values)``: every
#   sample of the ring buffer from ``capture_before_s`` before a level >= 2 alarm to
#   ``capture_after_s`` after it;
# * ``(OUT_RAW, start, length, lost, ids, times, values)``: at the close of the live
#   window ``start`` .. ``start + length``, every sample of the signals reported raw
#   (``REPORT_RAW``) taken since the previous one, in the order they came; ``lost``
#   counts the samples (of any signal) the ring overwrote before they could be read,
#   so the raw series of that span may miss up to that many (never silently).
OUT_WINDOW = 0
OUT_CHANGE = 1
OUT_ALARM = 2
OUT_SNAPSHOT = 3
OUT_RAW = 4
WIN_LIVE = 0
WIN_HISTORY = 1
# Reporting policy bits of a signal's live reports: a row in each live window, a change
# record when it moves beyond its deadband, every sample (OUT_RAW); any combination.
REPORT_WINDOW = 1
REPORT_CHANGE = 2
REPORT_RAW = 4
REPORT_ALL = 7
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

# Tunables: (name, default, unit, why). ``Kernel.set_params`` takes the values in this
# order; agent/config.py reads overrides from the [fusion] table.

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
# What the fusion step has learnt or counted that a restart of the agent must not lose
# (the vehicle did not restart): trip, energy counters, the consumption average and the
# measured state of health. ``persistent`` and ``restore`` take them in this order.
PERSISTENT = ("trip_km", "energy_out_wh", "energy_regen_wh", "energy_charged_wh", "consumption_wh",
              "consumption_km", "soh_pct")

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
# Metres per degree of latitude (and of longitude at the equator).
M_PER_DEG = 111320.0
INF = float("inf")


def _filled(code, value, n):
    try:
        return array(code, [value]) * n
    except TypeError:  # MicroPython's array cannot be repeated
        return array(code, [value] * n)


def _zeros(code, n):
    return _filled(code, 0, n)


def _check_source(source):
    if source < 0 or source >= MAX_SOURCES:
        raise ValueError("source index must be 0-%d" % (MAX_SOURCES - 1))
