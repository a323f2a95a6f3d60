"""Daly BMS (PROTOCOLS.md, "Daly"): fixed 13-byte frames ``A5 addr cmd 08 data[8] chk``.

The host asks from address 80 (or 40); the BMS answers from 01. cmd 90: pack voltage
u16 0.1 V, u16 unused, current u16 (raw - 30000) x 0.1 A (+ = charging), SoC u16
0.1 %; big endian, as Daly units send. Other commands are answered with zeros.

MicroPython-safe.
"""

import struct

from firmware_sim.encoders.wire import Hunter, q

START = 0xA5
BMS = 0x01
HOSTS = (0x80, 0x40)
CMD_SOC = 0x90
CURRENT_OFFSET = 30000

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"


def _finish(body):
    return body + bytes((sum(body) & 0xFF,))


def request(cmd=CMD_SOC, host=0x80):
    return _finish(bytes((START, host, cmd, 8)) + bytes(8))


def soc_frame(pack_v, pack_i, soc):
    """cmd 90 answer and its values."""
    volt = q(pack_v, 10, 0, 0xFFFF)
    cur = q(pack_i, 10, -CURRENT_OFFSET, 0xFFFF - CURRENT_OFFSET) + CURRENT_OFFSET
    s = q(soc, 10, 0, 1000)
    frame = _finish(bytes((START, BMS, CMD_SOC, 8)) + struct.pack(">HHHH", volt, 0, cur, s))
    values = {VOLTAGE: volt * 0.1, CURRENT: (cur - CURRENT_OFFSET) * 0.1, SOC: s * 0.1}
    return frame, values


def _size(buf):
    return 13 if buf[1] in HOSTS and buf[3] == 8 else 0


def _ok(frame):
    return sum(frame[:12]) & 0xFF == frame[12]


def parser():
    return Hunter(bytes((START,)), 4, _size, _ok, 13)


def serve(v, req):
    cmd = req[2]
    if cmd == CMD_SOC:
        frame, values = soc_frame(v.pack_v, v.pack_i, v.soc)
        return frame, "90", values
    return _finish(bytes((START, BMS, cmd, 8)) + bytes(8)), "%02X" % cmd, {}
