"""Helpers shared by the UART encoders: quantising and a small request hunter.

MicroPython-safe.
"""

import math
import struct


def q(x, scale, lo, hi):
    """Round ``x * scale`` half up to an integer, clamped to [lo, hi]."""
    n = int(math.floor(x * scale + 0.5))
    if n < lo:
        return lo
    if n > hi:
        return hi
    return n


CELL_MIN = "Vehicle.Powertrain.TractionBattery.CellVoltage.Min"
CELL_MAX = "Vehicle.Powertrain.TractionBattery.CellVoltage.Max"


def cell_block(volts, order):
    """Cells as one u16 of mV each, byte order ``order`` (">" or "<"), and what a perfect
    decoder reads back: each cell and the pack's lowest and highest."""
    data = b""
    values = {}
    got = []
    for k, v in enumerate(volts):
        mv = q(v, 1000, 0, 0xFFFF)
        data += struct.pack(order + "H", mv)
        values["Vehicle.LEV.Battery.CellVoltage.%d" % (k + 1)] = mv * 0.001
        got.append(mv * 0.001)
    if got:
        values[CELL_MIN] = min(got)
        values[CELL_MAX] = max(got)
    return data, values


class Hunter:
    """Finds requests in a byte stream: ``start`` bytes, then ``size(buf)`` decides the
    length once ``head`` bytes are in (0 = not a request here), ``ok(frame)`` checks it.

    Garbage before a start, or a request that fails its check, costs one byte of
    resynchronisation; what follows is still found. The simulator's own parser for
    what a host sends; the agent's framers are not used here on purpose.
    """

    def __init__(self, start, head, size, ok, max_len=64):
        self.start = start
        self.head = head
        self.size = size
        self.ok = ok
        self.max_len = max_len
        self.buf = bytearray()
        self.bad = 0

    def feed(self, data):
        """Append ``data``; return the complete, checked requests (bytes) found."""
        self.buf.extend(data)
        out = []
        buf = self.buf
        n0 = len(self.start)
        while True:
            at = bytes(buf).find(self.start)
            if at < 0:
                keep = n0 - 1
                if len(buf) > keep:
                    buf[:len(buf) - keep] = b""
                break
            if at:
                buf[:at] = b""
            if len(buf) < self.head:
                break
            n = self.size(buf)
            if n <= 0 or n > self.max_len:
                self.bad += 1
                buf[:1] = b""
                continue
            if len(buf) < n:
                break
            frame = bytes(buf[:n])
            if self.ok(frame):
                out.append(frame)
                buf[:n] = b""
            else:
                self.bad += 1
                buf[:1] = b""
        return out
