"""Signals every BMS protocol reports the same way: one per cell or sensor (numbered
from 1) and the pack-level minimum and maximum. MicroPython-safe."""

CELL = "Vehicle.LEV.Battery.CellVoltage.%d"
CELL_MIN = "Vehicle.Powertrain.TractionBattery.CellVoltage.Min"
CELL_MAX = "Vehicle.Powertrain.TractionBattery.CellVoltage.Max"
TEMP = "Vehicle.LEV.Battery.Temperature.%d"
TEMP_MIN = "Vehicle.Powertrain.TractionBattery.Temperature.Min"
TEMP_MAX = "Vehicle.Powertrain.TractionBattery.Temperature.Max"


def indexed(out: dict, values: list, each: str, lowest: str, highest: str) -> dict:
    """Add ``each % n`` for every value and the set's min and max to ``out``."""
    for i, v in enumerate(values):
        out[each % (i + 1)] = v
    if values:
        out[lowest] = min(values)
        out[highest] = max(values)
    return out


def cells(out: dict, volts: list) -> dict:
    return indexed(out, volts, CELL, CELL_MIN, CELL_MAX)


def temperatures(out: dict, temps: list) -> dict:
    return indexed(out, temps, TEMP, TEMP_MIN, TEMP_MAX)
