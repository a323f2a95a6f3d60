"""The signal catalogue: one stable integer id, name, unit and physical range per signal.

The ids travel on the wire (docs/wire.cddl) and index the fusion kernel's arrays, so
an id once published is never reused or renumbered; new signals take new ids.
Names follow COVESA VSS where VSS has the signal, ``Vehicle.LEV.*`` where it has not.

A decoded value is believed only inside ``[minimum, maximum]`` and, where
``max_rate`` is set, only if it moved at most that much per second from the last value
believed: a frame that framed and whose checksum matched can still carry nonsense (a
bad connector, another node on the bus, a receiver gone wrong). The kernel enforces
both (``Kernel.set_limits``, with ``limits``); ``refusal`` says why one value is
refused, for tools that show frames one by one. The ranges are wide enough for any e-bike, e-scooter or
light e-motorbike (a pack in thermal runaway reaches 600-900 C: its sensors are believed
up to 1000 C); a DBC narrows them for its own frames with its signal minimum and maximum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from agent.fusion.spec import DERIVED_DECIMALS


class Signal(NamedTuple):
    id: int
    name: str
    unit: str
    minimum: float
    maximum: float
    # Largest believable change per second (0: not checked); at least one step of what a
    # sensor reports (1 %, 1 C) within the kernel's rate_min_s, so a reading that ticks by
    # one step between two frames of one read is believed.
    max_rate: float
    description: str


MAX_CELLS = 32
MAX_TEMPS = 16
_CELL_BASE = 100
_TEMP_BASE = _CELL_BASE + MAX_CELLS

_FIXED: tuple[tuple[int, str, str, float, float, float, str], ...] = (
    (1, "Vehicle.Speed", "km/h", 0, 150, 60, "vehicle speed from the wheel (controller)"),
    (2, "Vehicle.TraveledDistance", "km", 0, 1e6, 0.2, "odometer"),
    (3, "Vehicle.CurrentLocation.Latitude", "deg", -90, 90, 0, "WGS84 latitude, + north"),
    (4, "Vehicle.CurrentLocation.Longitude", "deg", -180, 180, 0, "WGS84 longitude, + east"),
    (5, "Vehicle.CurrentLocation.Altitude", "m", -500, 9000, 0, "altitude above mean sea level"),
    (6, "Vehicle.CurrentLocation.Heading", "deg", 0, 359.999, 0, "course over ground, true north"),
    (7, "Vehicle.LEV.GNSS.Speed", "km/h", 0, 150, 60, "speed over ground from the GNSS receiver"),
    (8, "Vehicle.LEV.GNSS.FixQuality", "enum", 0, 8, 0, "NMEA GGA fix quality, 0 = no fix"),
    (9, "Vehicle.LEV.GNSS.Satellites", "count", 0, 99, 0, "satellites used in the fix"),
    (10, "Vehicle.LEV.GNSS.HDOP", "ratio", 0, 99.99, 0, "horizontal dilution of precision"),
    (11, "Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V", 0, 200, 0, "pack voltage"),
    (12, "Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A", -500, 500, 0, "pack current, + = charging"),
    (13, "Vehicle.Powertrain.TractionBattery.CurrentPower", "W", -100000, 100000, 0, "pack power, + = charging"),
    (14, "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current", "%", 0, 100, 20, "state of charge"),
    (15, "Vehicle.Powertrain.TractionBattery.StateOfHealth", "%", 0, 150, 0, "state of health"),
    (16, "Vehicle.Powertrain.TractionBattery.CellVoltage.Min", "V", 0, 5, 0, "lowest cell voltage"),
    (17, "Vehicle.Powertrain.TractionBattery.CellVoltage.Max", "V", 0, 5, 0, "highest cell voltage"),
    (18, "Vehicle.Powertrain.TractionBattery.Temperature.Min", "C", -50, 1000, 20, "coolest pack sensor"),
    (19, "Vehicle.Powertrain.TractionBattery.Temperature.Max", "C", -50, 1000, 20, "hottest pack sensor"),
    (20, "Vehicle.LEV.Battery.RemainingCapacity", "Ah", 0, 1000, 0, "remaining capacity"),
    (21, "Vehicle.LEV.Battery.FullCapacity", "Ah", 0, 1000, 0, "full charge capacity"),
    (22, "Vehicle.LEV.Battery.CycleCount", "count", 0, 100000, 0, "charge cycles"),
    (23, "Vehicle.LEV.Battery.ProtectionFlags", "bits", 0, 4294967295, 0, "BMS protection bits, JBD order"),
    (24, "Vehicle.LEV.Battery.ChargeEnabled", "bool", 0, 1, 0, "charge FET on"),
    (25, "Vehicle.LEV.Battery.DischargeEnabled", "bool", 0, 1, 0, "discharge FET on"),
    (26, "Vehicle.Powertrain.ElectricMotor.Temperature", "C", -50, 400, 20, "motor temperature"),
    (27, "Vehicle.LEV.Controller.Temperature", "C", -50, 400, 20, "motor controller temperature"),
    (28, "Vehicle.LEV.Controller.Voltage", "V", 0, 200, 0, "DC bus voltage seen by the controller"),
    (29, "Vehicle.LEV.Controller.MotorCurrent", "A", -500, 500, 0, "motor current"),
    (30, "Vehicle.LEV.Controller.FaultCode", "code", 0, 4294967295, 0, "live fault code, 0 = none"),
    (31, "Vehicle.LEV.SpeedLimit", "km/h", 0, 150, 0, "assistance cut-off speed"),
    (32, "Vehicle.LEV.WheelCircumference", "mm", 0, 4000, 0, "wheel circumference"),
    (33, "Vehicle.LEV.Pedal.Torque", "raw", 0, 65535, 0, "pedal torque sensor, raw units"),
    (34, "Vehicle.LEV.Pedal.Cadence", "rpm", 0, 250, 0, "pedal cadence"),
    (35, "Vehicle.LEV.TripDistance", "km", 0, 1e6, 0, "trip distance"),
    (36, "Vehicle.LEV.Range", "km", 0, 2000, 0, "remaining range"),
    (37, "Vehicle.LEV.WheelSizeCode", "code", 0, 65535, 0, "Bafang wheel size code"),
    # Derived by the fusion kernel (agent/fusion/spec.py names these ids).
    (38, "Vehicle.LEV.Fused.Speed", "km/h", 0, 150, 0, "wheel and GNSS speed in a Kalman filter"),
    (39, "Vehicle.LEV.Fused.Latitude", "deg", -90, 90, 0, "GNSS latitude, dead-reckoned without a fix"),
    (40, "Vehicle.LEV.Fused.Longitude", "deg", -180, 180, 0, "GNSS longitude, dead-reckoned without a fix"),
    (41, "Vehicle.LEV.Fused.PositionEstimated", "bool", 0, 1, 0, "1 while the position is dead-reckoned"),
    (42, "Vehicle.LEV.Fused.Odometer", "km", 0, 1e6, 0, "controller odometer carried on by the fused distance"),
    (43, "Vehicle.LEV.Fused.TripDistance", "km", 0, 1e6, 0, "fused distance since the agent started"),
    (44, "Vehicle.LEV.Energy.Out", "Wh", 0, 1e9, 0, "energy drawn from the pack"),
    (45, "Vehicle.LEV.Energy.Regenerated", "Wh", 0, 1e9, 0, "energy into the pack while moving"),
    (46, "Vehicle.LEV.Energy.Charged", "Wh", 0, 1e9, 0, "energy into the pack while standing (charger)"),
    (47, "Vehicle.LEV.Energy.Consumption", "Wh/km", 0, 1000, 0, "running average over recent distance"),
    (48, "Vehicle.LEV.Fused.Range", "km", 0, 2000, 0, "usable energy over recent consumption"),
    (49, "Vehicle.LEV.Fused.StateOfCharge", "%", 0, 110, 0, "coulomb count corrected by the BMS and OCV"),
    (50, "Vehicle.LEV.Fused.StateOfHealth", "%", 0, 150, 0, "capacity observed against design capacity"),
    (51, "Vehicle.LEV.Battery.CellVoltage.Spread", "V", 0, 5, 0, "highest minus lowest cell"),
    (52, "Vehicle.LEV.Battery.Temperature.Spread", "C", 0, 300, 0, "hottest minus coolest pack sensor"),
    (53, "Vehicle.LEV.Battery.Temperature.RiseRate", "C/min", -10000, 10000, 0, "fastest pack sensor rise"),
    (54, "Vehicle.LEV.Locked", "bool", 0, 1, 0, "vehicle locked (controller flag or the agent's lock)"),
)


def _build() -> tuple[Signal, ...]:
    sigs = [Signal(*row) for row in _FIXED]
    sigs += [
        Signal(_CELL_BASE + n - 1, f"Vehicle.LEV.Battery.CellVoltage.{n}", "V", 0, 5, 0, f"cell {n} voltage")
        for n in range(1, MAX_CELLS + 1)
    ]
    sigs += [
        Signal(_TEMP_BASE + n - 1, f"Vehicle.LEV.Battery.Temperature.{n}", "C", -50, 1000, 20, f"pack sensor {n}")
        for n in range(1, MAX_TEMPS + 1)
    ]
    return tuple(sigs)


SIGNALS: tuple[Signal, ...] = _build()
BY_NAME: dict[str, Signal] = {s.name: s for s in SIGNALS}
BY_ID: dict[int, Signal] = {s.id: s for s in SIGNALS}
# Size of the kernel's per-signal arrays: every catalogue id is a valid index.
ID_SPACE = max(BY_ID) + 1


def signal_id(name: str) -> int:
    """Catalogue id of ``name``; a KeyError names the unknown signal."""
    return BY_NAME[name].id


def refusal(sid: int, value: float, lo: Sequence[float], hi: Sequence[float]) -> str:
    """Why ``value`` of signal ``sid`` is not believed by its range in ``limits``' arrays
    ('' if it is): the kernel's own test, for tools that show frames one by one (the rate
    needs the value before it)."""
    if lo[sid] <= value <= hi[sid]:
        return ""
    unit = f" {BY_ID[sid].unit}" if sid in BY_ID else ""
    return f"out of range: {value:g}{unit} outside {lo[sid]:g} to {hi[sid]:g}"


def limits(id_space: int, narrow: dict[int, tuple[float, float]] | None = None
           ) -> tuple[list[float], list[float], list[float]]:
    """``(minimum, maximum, max_rate)`` per signal id for ``Kernel.set_limits``: the
    catalogue's (ids outside it, a DBC's own signals, are unbounded: the kernel applies a
    DBC's ranges row by row). ``narrow`` (a DBC's ranges by signal) narrows them for tools
    that show one frame's values."""
    inf = float("inf")
    lo, hi, rate = [-inf] * id_space, [inf] * id_space, [0.0] * id_space
    for sig in SIGNALS:
        lo[sig.id], hi[sig.id], rate[sig.id] = float(sig.minimum), float(sig.maximum), float(sig.max_rate)
    for sid, (a, b) in (narrow or {}).items():
        lo[sid], hi[sid] = max(lo[sid], a), min(hi[sid], b)
        if lo[sid] > hi[sid]:
            name = BY_ID[sid].name if sid in BY_ID else f"signal {sid}"
            raise ValueError(f"{name}: the range [{a:g}, {b:g}] given is outside the physical one")
    return lo, hi, rate


# Decimals of a signal that is neither a CAN signal nor a derived one, by its unit: as
# fine as the sensors behind the catalogue's decoders report (a JBD cell is 1 mV, NMEA
# latitude 1e-4 minute, about 1.7e-6 deg).
UNIT_DECIMALS = {"km/h": 2, "km": 3, "deg": 7, "m": 1, "V": 3, "A": 2, "W": 1, "%": 1, "C": 1, "Ah": 2,
                 "ratio": 2, "rpm": 0}
# Heading is in degrees but no finer than 0.01.
_OWN_DECIMALS = {6: 2}
_DERIVED = dict(DERIVED_DECIMALS)


def raw_decimals(sid: int, can: Mapping[int, int] | None = None) -> int:
    """The decimals a signal's raw samples are sent with (agent/wire.py ``raw_record``):
    its DBC's (``can``, see CompiledDbc.decimals), a derived signal's DERIVED_DECIMALS,
    else its unit's; a device-local signal without a DBC grid, 3."""
    if can and sid in can:
        return can[sid]
    if sid in _DERIVED:
        return _DERIVED[sid]
    if sid in _OWN_DECIMALS:
        return _OWN_DECIMALS[sid]
    sig = BY_ID.get(sid)
    return UNIT_DECIMALS.get(sig.unit, 0) if sig is not None else 3
