"""Sur-Ron Light Bee BMS on RS-485 (PROTOCOLS.md, "Sur-Ron"), 9600 8N1.

``cmd addrL addrH param len data chk``, chk = sum of all previous bytes & FF. The
display (or the agent) sends 46 requests to the BMS at 0116 (len = bytes wanted);
the BMS answers 47 (len = data bytes) for params 9 voltage u32 mV, 10 current i32 mA
(+ = charging), 13 SoC %, 14 SoH %, 15 remaining mAh, 16 full mAh, 23 cycles, 36
cell voltages (u16 mV each); unsigned params are sent in the width asked (1-4).
It also sends 57 frames to the display at 0183, param 48 (len = data + chk):
SoC, pack voltage u32 mV, two zero bytes, status (bit 7 side stand down), three
zero bytes, as in the captures in data/.

MicroPython-safe.
"""

import struct

from firmware_sim.encoders.wire import Hunter, cell_block, q

REQUEST = 0x46
RESPONSE = 0x47
UNSOLICITED = 0x57
BMS = 0x0116
DISPLAY = 0x0183
P_VOLTAGE = 9
P_CURRENT = 10
P_SOC = 13
P_SOH = 14
P_REMAINING = 15
P_FULL = 16
P_CYCLES = 23
P_CELLS = 36
P_DISPLAY = 0x48
STAND_DOWN = 0x80
PARAMS = (P_VOLTAGE, P_CURRENT, P_SOC, P_SOH, P_REMAINING, P_FULL, P_CYCLES, P_CELLS)

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
SOH = "Vehicle.Powertrain.TractionBattery.StateOfHealth"
REMAINING = "Vehicle.LEV.Battery.RemainingCapacity"
FULL = "Vehicle.LEV.Battery.FullCapacity"
CYCLES = "Vehicle.LEV.Battery.CycleCount"


def _finish(body):
    return body + bytes((sum(body) & 0xFF,))


def request(param, size, address=BMS):
    return _finish(bytes((REQUEST, address & 0xFF, address >> 8, param, size)))


def _response(param, data):
    return _finish(bytes((RESPONSE, BMS & 0xFF, BMS >> 8, param, len(data))) + bytes(data))


def _le(value, width):
    b = bytearray(width)
    for i in range(width):
        b[i] = (value >> (8 * i)) & 0xFF
    return bytes(b)


def response(param, width, pack_v, pack_i, soc, soh, remaining_mah, full_mah, cycles, cells):
    """The 47 answer to a request for ``param`` (``width`` bytes asked); None if unknown."""
    if param == P_VOLTAGE:
        mv = q(pack_v, 1000, 0, 0xFFFFFFFF)
        return _response(param, struct.pack("<I", mv)), {VOLTAGE: mv * 0.001}
    if param == P_CURRENT:
        ma = q(pack_i, 1000, -0x80000000, 0x7FFFFFFF)
        return _response(param, struct.pack("<i", ma)), {CURRENT: ma * 0.001}
    if param == P_CELLS:
        data, values = cell_block(cells, "<")
        return _response(param, data), values
    if width < 1 or width > 4:
        width = 2
    top = (1 << (8 * width)) - 1
    if param == P_SOC:
        n = q(soc, 1, 0, min(100, top))
        return _response(param, _le(n, width)), {SOC: n}
    if param == P_SOH:
        n = q(soh, 1, 0, min(100, top))
        return _response(param, _le(n, width)), {SOH: n}
    if param == P_REMAINING:
        n = q(remaining_mah, 1, 0, top)
        return _response(param, _le(n, width)), {REMAINING: n * 0.001}
    if param == P_FULL:
        n = q(full_mah, 1, 0, top)
        return _response(param, _le(n, width)), {FULL: n * 0.001}
    if param == P_CYCLES:
        n = q(cycles, 1, 0, top)
        return _response(param, _le(n, width)), {CYCLES: n}
    return None


def display_frame(soc, pack_v, stand_down=True):
    """Unsolicited 57 to the display: SoC, pack voltage, status."""
    s = q(soc, 1, 0, 100)
    mv = q(pack_v, 1000, 0, 0xFFFFFFFF)
    data = bytes((s,)) + struct.pack("<I", mv) + bytes((0, 0, STAND_DOWN if stand_down else 0, 0, 0, 0))
    body = bytes((UNSOLICITED, DISPLAY & 0xFF, DISPLAY >> 8, P_DISPLAY, len(data) + 1)) + data
    values = {SOC: s}
    if mv:
        values[VOLTAGE] = mv * 0.001
    return _finish(body), values


def _size(buf):
    return 6 if (buf[1] | (buf[2] << 8)) == BMS else 0


def _ok(f):
    return sum(f[:5]) & 0xFF == f[5]


def parser():
    """Finds 46 requests addressed to the BMS."""
    return Hunter(bytes((REQUEST,)), 5, _size, _ok, 6)


def serve(v, req):
    got = response(req[3], req[4], v.pack_v, v.pack_i, v.soc, v.soh, v.remaining_mah,
                   v.full_mah, v.cycles, v.cell_volts())
    if got is None:
        return None
    return got[0], "47/%d" % req[3], got[1]


def from_vehicle(v):
    return display_frame(v.soc, v.pack_v, v.v < 0.1)
