"""Bafang CAN frames (PROTOCOLS.md, "Bafang CAN"): 29-bit ids, little-endian fields.

Each message encoder takes physical values and returns ``(can_id, data, values)``:
``data`` the payload bytes, ``values`` the physical values exactly as quantised on
the wire (what a perfect decoder reads back), keyed by signal-catalogue names.
Out-of-range inputs are clamped to the field's range, never wrapped.

MicroPython-safe.
"""

import math
import struct

from firmware_sim.encoders.wire import q

NODE_TORQUE = 0x01
NODE_CONTROLLER = 0x02
NODE_DISPLAY = 0x03
NODE_BATTERY = 0x04
NODE_BROADCAST = 0x1F
OP_WRITE = 0
OP_WARNING = 7

TEMP_NO_SENSOR = 0xFF


def make_id(source, target, op, code, subcode):
    """29-bit id: source[28:24] target[23:19] op[18:16] code[15:8] subcode[7:0]."""
    return (((source & 0x1F) << 24) | ((target & 0x1F) << 19) | ((op & 0x07) << 16)
            | ((code & 0xFF) << 8) | (subcode & 0xFF))


ID_TORQUE_31_00 = make_id(NODE_TORQUE, NODE_BROADCAST, OP_WRITE, 0x31, 0x00)
ID_CTRL_32_00 = make_id(NODE_CONTROLLER, NODE_BROADCAST, OP_WRITE, 0x32, 0x00)
ID_CTRL_32_01 = make_id(NODE_CONTROLLER, NODE_BROADCAST, OP_WRITE, 0x32, 0x01)
ID_CTRL_32_03 = make_id(NODE_CONTROLLER, NODE_BROADCAST, OP_WRITE, 0x32, 0x03)
ID_BATT_34_00 = make_id(NODE_BATTERY, NODE_BROADCAST, OP_WRITE, 0x34, 0x00)
ID_BATT_34_01 = make_id(NODE_BATTERY, NODE_BROADCAST, OP_WRITE, 0x34, 0x01)


def _temp(c, hi=0xFF):
    """Temperature byte: value + 40 C (range -40..215 C, or -40..214 C when FF is reserved)."""
    return q(c + 40.0, 1, 0, hi)


def controller_32_01(speed_kmh, motor_i, voltage, ctrl_temp, motor_temp):
    """Controller status: speed, motor current, voltage, controller and motor temperature.

    ``motor_temp`` None sends FF (no sensor) and leaves the signal out of ``values``.
    """
    sp = q(speed_kmh, 100, 0, 0xFFFF)
    cur = q(motor_i, 100, 0, 0xFFFF)
    volt = q(voltage, 100, 0, 0xFFFF)
    ct = _temp(ctrl_temp)
    values = {
        "Vehicle.Speed": sp / 100.0,
        "Vehicle.LEV.Controller.MotorCurrent": cur / 100.0,
        "Vehicle.LEV.Controller.Voltage": volt / 100.0,
        "Vehicle.LEV.Controller.Temperature": ct - 40,
    }
    if motor_temp is None:
        mt = TEMP_NO_SENSOR
    else:
        mt = _temp(motor_temp, 0xFE)
        values["Vehicle.Powertrain.ElectricMotor.Temperature"] = mt - 40
    return ID_CTRL_32_01, struct.pack("<HHHBB", sp, cur, volt, ct, mt), values


def controller_32_00(soc, trip_km, cadence, torque_raw, range_km):
    """Controller: SoC, trip distance, cadence, pedal torque (raw), remaining range."""
    s = q(soc, 1, 0, 100)
    trip = q(trip_km, 100, 0, 0xFFFF)
    cad = q(cadence, 1, 0, 0xFF)
    tq = q(torque_raw, 1, 0, 0xFFFF)
    rng = q(range_km, 100, 0, 0xFFFF)
    values = {
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": s,
        "Vehicle.LEV.TripDistance": trip / 100.0,
        "Vehicle.LEV.Pedal.Cadence": cad,
        "Vehicle.LEV.Pedal.Torque": tq,
        "Vehicle.LEV.Range": rng / 100.0,
    }
    return ID_CTRL_32_00, struct.pack("<BHBHH", s, trip, cad, tq, rng), values


def controller_32_03(speed_limit_kmh, wheel_size_code, wheel_circ_mm):
    """Controller settings: assistance cut-off speed, wheel size code, circumference."""
    lim = q(speed_limit_kmh, 100, 0, 0xFFFF)
    code = q(wheel_size_code, 1, 0, 0xFFFF)
    circ = q(wheel_circ_mm, 1, 0, 0xFFFF)
    values = {
        "Vehicle.LEV.SpeedLimit": lim / 100.0,
        "Vehicle.LEV.WheelSizeCode": code,
        "Vehicle.LEV.WheelCircumference": circ,
    }
    return ID_CTRL_32_03, struct.pack("<HHH", lim, code, circ), values


def torque_31_00(torque_raw, cadence, counter):
    """Torque sensor: raw torque, cadence, rolling counter (the counter is not a signal)."""
    tq = q(torque_raw, 1, 0, 0xFFFF)
    cad = q(cadence, 1, 0, 0xFF)
    values = {
        "Vehicle.LEV.Pedal.Torque": tq,
        "Vehicle.LEV.Pedal.Cadence": cad,
    }
    return ID_TORQUE_31_00, struct.pack("<HBB", tq, cad, counter & 0xFF), values


def battery_34_00(full_mah, remaining_mah, soc):
    """Battery capacity: full and remaining (mAh on the wire, Ah in values), SoC."""
    full = q(full_mah, 1, 0, 0xFFFF)
    rem = q(remaining_mah, 1, 0, 0xFFFF)
    s = q(soc, 1, 0, 100)
    values = {
        "Vehicle.LEV.Battery.FullCapacity": full / 1000.0,
        "Vehicle.LEV.Battery.RemainingCapacity": rem / 1000.0,
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": s,
    }
    return ID_BATT_34_00, struct.pack("<HHB", full, rem, s), values


def battery_34_01(current_a, voltage, temp_c):
    """Battery live data: current (+ = charging), voltage, temperature."""
    cur = q(current_a, 100, -0x8000, 0x7FFF)
    volt = q(voltage, 100, 0, 0xFFFF)
    t = _temp(temp_c)
    values = {
        "Vehicle.Powertrain.TractionBattery.CurrentCurrent": cur / 100.0,
        "Vehicle.Powertrain.TractionBattery.CurrentVoltage": volt / 100.0,
        "Vehicle.LEV.Battery.Temperature.1": t - 40,
    }
    return ID_BATT_34_01, struct.pack("<hHB", cur, volt, t), values


_HEX = "0123456789ABCDEF"


def _hex(data):
    out = []
    for b in data:
        out.append(_HEX[b >> 4])
        out.append(_HEX[b & 0x0F])
    return "".join(out)


def slcan_frame(can_id, data, timestamp_ms=None):
    """SLCAN extended data frame: ``T`` + 8 hex id + DLC + hex data [+ 4 hex ms] + CR.

    ``timestamp_ms`` (Lawicel Z1 mode) is written modulo 60000, as adapters do.
    """
    if len(data) > 8:
        raise ValueError("CAN data longer than 8 bytes")
    s = f"T{can_id & 0x1FFFFFFF:08X}{len(data)}{_hex(data)}"
    if timestamp_ms is not None:
        s += f"{int(timestamp_ms) % 60000:04X}"
    return (s + "\r").encode()


def candump_line(t, iface, can_id, data):
    """One ``candump -L`` line (no newline): ``(sec.usec) iface IIIIIIII#hexdata``."""
    us = int(math.floor(t * 1000000.0 + 0.5))
    return f"({us // 1000000}.{us % 1000000:06d}) {iface} {can_id & 0x1FFFFFFF:08X}#{_hex(data)}"


# Op 7 (warning), as the drive unit sends it in the captures (02FF1200#07).
ID_DRIVE_12_00 = make_id(NODE_CONTROLLER, NODE_BROADCAST, OP_WARNING, 0x12, 0x00)


def drive_unit_12_00(fault_code):
    """Drive unit live fault code (0 = none)."""
    code = q(fault_code, 1, 0, 0xFF)
    return ID_DRIVE_12_00, bytes((code,)), {"Vehicle.LEV.Controller.FaultCode": code}


def speed_limit_write(speed_limit_kmh, source=NODE_DISPLAY):
    """A host's write of the controller's cut-off speed (32/03, op 0): (can_id, data)."""
    lim = q(speed_limit_kmh, 100, 0, 0xFFFF)
    return make_id(source, NODE_CONTROLLER, OP_WRITE, 0x32, 0x03), struct.pack("<H", lim)
