"""KT / Kunteng LCD3 <-> S12S controller (PROTOCOLS.md, "KT"), 9600 8N1.

Controller -> display, 12 bytes: B0 41; B1 battery bars (0-5); B2 nominal voltage
(36); B3:B4 wheel revolution period in ms, BE (6000 = standing); B5 error code;
B6 XOR of B1..B5 and B7..B11; B7 flags (bit 0 assist active, bit 4 locked: the
simulator's); B8 power, 4 x motor current in A; B9 motor temperature C; B10 B11 0.

Display -> controller, 13 bytes: B5 = XOR of the other 12 XOR 02, B11 32, B12 0E;
B1 low nibble the assist level. The simulator's lock input (documented in
MANIFEST.md): B4 bit 7 set locks the controller (no assistance), clear unlocks.

MicroPython-safe.
"""

from firmware_sim.encoders.wire import q

START = 0x41
STOPPED_MS = 6000
NOMINAL_V = 36
LOCK_BIT = 0x80
TRAILER = b"\x32\x0e"

SPEED = "Vehicle.Speed"
FAULT = "Vehicle.LEV.Controller.FaultCode"
MOTOR_TEMP = "Vehicle.Powertrain.ElectricMotor.Temperature"
LOCKED = "Vehicle.LEV.Locked"
MOTOR_CURRENT = "Vehicle.LEV.Controller.MotorCurrent"


def _xor(b, lo, hi):
    x = 0
    for i in range(lo, hi):
        x ^= b[i]
    return x


def controller_frame(speed_kmh, circ_mm, soc, error, assisting, locked, motor_i, motor_temp):
    """Controller -> display frame and the values a decoder with ``circ_mm`` reads."""
    v = speed_kmh / 3.6
    period = STOPPED_MS
    if v > 0.0:
        period = q(circ_mm / v, 1, 1, STOPPED_MS)      # mm / (m/s) = ms
    bars = q(soc / 20.0, 1, 0, 5)
    err = q(error, 1, 0, 0xFF)
    flags = (1 if assisting else 0) | (0x10 if locked else 0)
    power = q(motor_i, 4, 0, 0xFF)
    mt = q(motor_temp, 1, 0, 0xFF)
    b = bytearray((START, bars, NOMINAL_V, period >> 8, period & 0xFF, err, 0, flags,
                   power, mt, 0, 0))
    b[6] = _xor(b, 1, 6) ^ _xor(b, 7, 12)
    speed = circ_mm / period * 3.6 if 0 < period < STOPPED_MS else 0.0
    values = {SPEED: speed, FAULT: err, MOTOR_CURRENT: power * 0.25, MOTOR_TEMP: mt, LOCKED: 1 if locked else 0}
    return bytes(b), values


def display_frame(assist, lock=False, light=False):
    """Display -> controller frame (for tests and bench tools)."""
    b = bytearray(13)
    b[0] = 0x16
    b[1] = (assist & 0x0F) | (0x80 if light else 0)
    b[2] = 0x1A
    b[3] = 0xF5
    b[4] = LOCK_BIT if lock else 0
    b[11] = 0x32
    b[12] = 0x0E
    b[5] = _xor(b, 0, 5) ^ _xor(b, 6, 13) ^ 0x02
    return bytes(b)


class DisplayParser:
    """Finds display -> controller frames by their 32 0E trailer and B5 check."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf.extend(data)
        out = []  # type: list
        while True:
            at = bytes(self.buf).find(TRAILER, 11)
            if at < 0:
                if len(self.buf) > 12:
                    self.buf[:len(self.buf) - 12] = b""
                return out
            s = at - 11
            f = bytes(self.buf[s:s + 13])
            if _xor(f, 0, 5) ^ _xor(f, 6, 13) ^ 0x02 == f[5]:
                out.append(f)
                self.buf[:s + 13] = b""
            else:
                self.buf[:s + 1] = b""


def parser():
    return DisplayParser()


def serve(v, req):
    """Apply a display frame: assist level and the lock bit. Nothing is answered."""
    v.assist_level = req[1] & 0x0F
    v.locked = bool(req[4] & LOCK_BIT)


def from_vehicle(v):
    return controller_frame(v.wheel_speed_kmh, v.wheel_circ_mm, v.soc, v.fault_code, v.motor_w > 0.0,
                            v.locked, v.motor_i, v.motor_temp)
