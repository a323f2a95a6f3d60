"""Ninebot / Xiaomi scooter bus (PROTOCOLS.md, "Ninebot"): the BMS and the ESC answer reads.

``55 AA L D T C data ck0 ck1``; L = len(data) + 2; checksum = (sum of L..data) XOR
FFFF, low byte first. A read request carries one data byte: how many bytes to read.
BMS registers from 31 (u16 words, LE): remaining mAh, SoC %, current 0.01 A (+ =
charging), voltage 0.01 V, two temperatures u8 (value - 20 C). ESC register 25:
remaining range 0.01 km.

MicroPython-safe.
"""

import struct

from firmware_sim.encoders.wire import Hunter, q

START = b"\x55\xaa"
ESC_IN = 0x20
ESC_OUT = 0x23
BMS_IN = 0x22
BMS_OUT = 0x25
READ = 0x01
WRITE = 0x03
REG_BMS = 0x31
REG_RANGE = 0x25

REMAINING = "Vehicle.LEV.Battery.RemainingCapacity"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
TEMP1 = "Vehicle.LEV.Battery.Temperature.1"
TEMP2 = "Vehicle.LEV.Battery.Temperature.2"
TEMP_MIN = "Vehicle.Powertrain.TractionBattery.Temperature.Min"
TEMP_MAX = "Vehicle.Powertrain.TractionBattery.Temperature.Max"
RANGE = "Vehicle.LEV.Range"


def checksum(body):
    return (sum(body) & 0xFFFF) ^ 0xFFFF


def frame(device, kind, reg, data):
    body = bytes((len(data) + 2, device, kind, reg)) + bytes(data)
    c = checksum(body)
    return START + body + bytes((c & 0xFF, c >> 8))


def request(device, reg, n):
    return frame(device, READ, reg, bytes((n,)))


def bms_block(remaining_mah, soc, pack_i, pack_v, t1, t2, n=10):
    """Answer to a read of ``n`` bytes (2-10) from register 31, and its values."""
    rem = q(remaining_mah, 1, 0, 0xFFFF)
    s = q(soc, 1, 0, 100)
    cur = q(pack_i, 100, -0x8000, 0x7FFF)
    volt = q(pack_v, 100, 0, 0xFFFF)
    a = q(t1 + 20.0, 1, 0, 0xFF)
    b = q(t2 + 20.0, 1, 0, 0xFF)
    data = struct.pack("<HHhHBB", rem, s, cur, volt, a, b)[:n]
    all_values = (
        (2, REMAINING, rem / 1000.0), (4, SOC, s), (6, CURRENT, cur / 100.0),
        (8, VOLTAGE, volt / 100.0), (9, TEMP1, a - 20), (10, TEMP2, b - 20),
    )
    values = {}
    for end, name, value in all_values:
        if end <= len(data):
            values[name] = value
    if len(data) >= 10:
        values[TEMP_MIN] = min(a, b) - 20
        values[TEMP_MAX] = max(a, b) - 20
    return frame(BMS_OUT, READ, REG_BMS, data), values


def esc_range(range_km):
    r = q(range_km, 100, 0, 0xFFFF)
    return frame(ESC_OUT, READ, REG_RANGE, struct.pack("<H", r)), {RANGE: r / 100.0}


def _size(buf):
    n = buf[2]
    return n + 6 if 2 <= n <= 64 else 0


def _ok(f):
    end = len(f) - 2
    return checksum(f[2:end]) == f[end] | (f[end + 1] << 8) and f[3] in (ESC_IN, BMS_IN)


def parser():
    return Hunter(START, 3, _size, _ok, 70)


def serve(v, req):
    """Answer a read to the BMS (register 31) or the ESC (register 25); None otherwise."""
    device, kind, reg = req[3], req[4], req[5]
    if kind != READ or len(req) != 9:
        return None
    n = req[6]
    if device == BMS_IN and reg == REG_BMS and 2 <= n <= 10 and n % 2 == 0:
        t = v.ntc_temps()
        out, values = bms_block(v.remaining_mah, v.soc, v.pack_i, v.pack_v, t[0], t[1], n)
        return out, "25/31", values
    if device == ESC_IN and reg == REG_RANGE and n == 2:
        out, values = esc_range(v.range_km)
        return out, "23/25", values
    return None
