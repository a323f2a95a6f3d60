"""The signal catalogue: one stable integer id, name and unit per signal.

The ids travel on the wire (docs/wire.cddl) and index the fusion kernel's arrays, so
an id once published is never reused or renumbered; new signals take new ids.
Names follow COVESA VSS where VSS has the signal, ``Vehicle.LEV.*`` where it has not.
"""

from __future__ import annotations

from typing import NamedTuple


class Signal(NamedTuple):
    id: int
    name: str
    unit: str
    description: str


MAX_CELLS = 32
MAX_TEMPS = 16
_CELL_BASE = 100
_TEMP_BASE = _CELL_BASE + MAX_CELLS

_FIXED: tuple[tuple[int, str, str, str], ...] = (
    (1, "Vehicle.Speed", "km/h", "vehicle speed from the wheel (controller)"),
    (2, "Vehicle.TraveledDistance", "km", "odometer"),
    (3, "Vehicle.CurrentLocation.Latitude", "deg", "WGS84 latitude, + north"),
    (4, "Vehicle.CurrentLocation.Longitude", "deg", "WGS84 longitude, + east"),
    (5, "Vehicle.CurrentLocation.Altitude", "m", "altitude above mean sea level"),
    (6, "Vehicle.CurrentLocation.Heading", "deg", "course over ground, true north"),
    (7, "Vehicle.LEV.GNSS.Speed", "km/h", "speed over ground from the GNSS receiver"),
    (8, "Vehicle.LEV.GNSS.FixQuality", "enum", "NMEA GGA fix quality, 0 = no fix"),
    (9, "Vehicle.LEV.GNSS.Satellites", "count", "satellites used in the fix"),
    (10, "Vehicle.LEV.GNSS.HDOP", "ratio", "horizontal dilution of precision"),
    (11, "Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V", "pack voltage"),
    (12, "Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A", "pack current, + = charging"),
    (13, "Vehicle.Powertrain.TractionBattery.CurrentPower", "W", "pack power, + = charging"),
    (14, "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current", "%", "state of charge"),
    (15, "Vehicle.Powertrain.TractionBattery.StateOfHealth", "%", "state of health"),
    (16, "Vehicle.Powertrain.TractionBattery.CellVoltage.Min", "V", "lowest cell voltage"),
    (17, "Vehicle.Powertrain.TractionBattery.CellVoltage.Max", "V", "highest cell voltage"),
    (18, "Vehicle.Powertrain.TractionBattery.Temperature.Min", "C", "coolest pack sensor"),
    (19, "Vehicle.Powertrain.TractionBattery.Temperature.Max", "C", "hottest pack sensor"),
    (20, "Vehicle.LEV.Battery.RemainingCapacity", "Ah", "remaining capacity"),
    (21, "Vehicle.LEV.Battery.FullCapacity", "Ah", "full charge capacity"),
    (22, "Vehicle.LEV.Battery.CycleCount", "count", "charge cycles"),
    (23, "Vehicle.LEV.Battery.ProtectionFlags", "bits", "BMS protection bits, JBD order"),
    (24, "Vehicle.LEV.Battery.ChargeEnabled", "bool", "charge FET on"),
    (25, "Vehicle.LEV.Battery.DischargeEnabled", "bool", "discharge FET on"),
    (26, "Vehicle.Powertrain.ElectricMotor.Temperature", "C", "motor temperature"),
    (27, "Vehicle.LEV.Controller.Temperature", "C", "motor controller temperature"),
    (28, "Vehicle.LEV.Controller.Voltage", "V", "DC bus voltage seen by the controller"),
    (29, "Vehicle.LEV.Controller.MotorCurrent", "A", "motor current"),
    (30, "Vehicle.LEV.Controller.FaultCode", "code", "live fault code, 0 = none"),
    (31, "Vehicle.LEV.SpeedLimit", "km/h", "assistance cut-off speed"),
    (32, "Vehicle.LEV.WheelCircumference", "mm", "wheel circumference"),
    (33, "Vehicle.LEV.Pedal.Torque", "raw", "pedal torque sensor, raw units"),
    (34, "Vehicle.LEV.Pedal.Cadence", "rpm", "pedal cadence"),
    (35, "Vehicle.LEV.TripDistance", "km", "trip distance"),
    (36, "Vehicle.LEV.Range", "km", "remaining range"),
    (37, "Vehicle.LEV.WheelSizeCode", "code", "Bafang wheel size code"),
    # Derived by the fusion kernel (agent/fusion/_kernel_py.py uses these ids).
    (38, "Vehicle.LEV.Fused.Speed", "km/h", "wheel and GNSS speed in a Kalman filter"),
    (39, "Vehicle.LEV.Fused.Latitude", "deg", "GNSS latitude, dead-reckoned without a fix"),
    (40, "Vehicle.LEV.Fused.Longitude", "deg", "GNSS longitude, dead-reckoned without a fix"),
    (41, "Vehicle.LEV.Fused.PositionEstimated", "bool", "1 while the position is dead-reckoned"),
    (42, "Vehicle.LEV.Fused.Odometer", "km", "controller odometer carried on by the fused distance"),
    (43, "Vehicle.LEV.Fused.TripDistance", "km", "fused distance since the agent started"),
    (44, "Vehicle.LEV.Energy.Out", "Wh", "energy drawn from the pack"),
    (45, "Vehicle.LEV.Energy.Regenerated", "Wh", "energy into the pack while moving"),
    (46, "Vehicle.LEV.Energy.Charged", "Wh", "energy into the pack while standing (charger)"),
    (47, "Vehicle.LEV.Energy.Consumption", "Wh/km", "running average over recent distance"),
    (48, "Vehicle.LEV.Fused.Range", "km", "usable energy over recent consumption"),
    (49, "Vehicle.LEV.Fused.StateOfCharge", "%", "coulomb count corrected by the BMS and OCV"),
    (50, "Vehicle.LEV.Fused.StateOfHealth", "%", "capacity observed against design capacity"),
    (51, "Vehicle.LEV.Battery.CellVoltage.Spread", "V", "highest minus lowest cell"),
    (52, "Vehicle.LEV.Battery.Temperature.Spread", "C", "hottest minus coolest pack sensor"),
    (53, "Vehicle.LEV.Battery.Temperature.RiseRate", "C/min", "fastest pack sensor rise"),
    (54, "Vehicle.LEV.Locked", "bool", "vehicle locked (controller flag or the agent's lock)"),
)


def _build() -> tuple[Signal, ...]:
    sigs = [Signal(*row) for row in _FIXED]
    sigs += [
        Signal(_CELL_BASE + n - 1, f"Vehicle.LEV.Battery.CellVoltage.{n}", "V", f"cell {n} voltage")
        for n in range(1, MAX_CELLS + 1)
    ]
    sigs += [
        Signal(_TEMP_BASE + n - 1, f"Vehicle.LEV.Battery.Temperature.{n}", "C", f"pack sensor {n}")
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
