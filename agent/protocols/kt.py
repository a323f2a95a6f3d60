"""KT / Kunteng LCD3 display <-> S12S controller (9600 8N1): one framer per direction.

The two directions run on separate wires, so the agent taps one of them and asks for
that direction's framer. Controller -> display frames start with 41 (12 bytes, B6 =
XOR of B1..B5 and B7..B11). Display -> controller frames have no fixed first byte:
they are found by their trailer ``32 0E`` (B11, B12) and checked by B5 = XOR of the
other 12 bytes XOR 02.
Best effort (PROTOCOLS.md is unsure): B8 "power" is read as about 4 x current in A,
so ``power_scale`` (default 0.25) turns it into a motor current; B9 is read as the
motor temperature in C with no offset.

``display_frame`` builds the display's frame for the agent to send on the controller's
wire (lock/unlock on a signed cloud command). B1 low nibble is the assist level, bit 7
the light; B4 bit 7 locks the controller (the S12S firmware the simulator models). B0,
B2 and B3 carry the display's settings (P5, wheel size and speed limit, P1): they are a
stock LCD3's here, which a controller configured otherwise would take as new settings.
"""

from agent.errors import DecodeError
from agent.protocols.framing import Framer

CONTROLLER = "controller"
DISPLAY = "display"
CONTROLLER_START = 0x41
CONTROLLER_LEN = 12
DISPLAY_LEN = 13
DISPLAY_TRAILER = b"\x32\x0e"
DISPLAY_XOR = 0x02
DISPLAY_SETTINGS = (0x16, 0x1A, 0xF5)  # B0, B2, B3 of a stock LCD3
ASSIST_MASK = 0x0F
LIGHT_BIT = 0x80
LOCK_BIT = 0x80  # in B4
STOPPED_PERIOD_MS = 6000
DEFAULT_CIRCUMFERENCE_MM = 2200
DEFAULT_POWER_SCALE = 0.25

SPEED = "Vehicle.Speed"
FAULT = "Vehicle.LEV.Controller.FaultCode"
MOTOR_TEMP = "Vehicle.Powertrain.ElectricMotor.Temperature"
MOTOR_CURRENT = "Vehicle.LEV.Controller.MotorCurrent"
LOCKED = "Vehicle.LEV.Locked"
# B7 flag bit of a locked controller (the S12S firmware the simulator models sets it
# while its display has locked it; bit 0 is assist active).
FLAG_LOCKED = 0x10

FRAMER_OPTIONS = ("direction",)
DECODE_OPTIONS = ("circumference_mm", "power_scale")


def _xor(buf, start: int, end: int) -> int:
    x = 0
    for i in range(start, end):
        x ^= buf[i]
    return x


def controller_check(buf, s: int = 0) -> int:
    """The B6 value a controller frame at ``s`` must carry."""
    return _xor(buf, s + 1, s + 6) ^ _xor(buf, s + 7, s + CONTROLLER_LEN)


def display_check(buf, s: int = 0) -> int:
    """The B5 value a display frame at ``s`` must carry."""
    return _xor(buf, s, s + 5) ^ _xor(buf, s + 6, s + DISPLAY_LEN) ^ DISPLAY_XOR


def display_frame(assist: int, locked: bool, light: bool = False) -> bytes:
    """A display -> controller frame asking for assist level ``assist`` (0-15), the
    light on or off, and the controller locked (no assistance) or unlocked."""
    if not 0 <= assist <= ASSIST_MASK:
        raise ValueError("assist level must be 0-%d, not %r" % (ASSIST_MASK, assist))
    b = bytearray(DISPLAY_LEN)
    b[0], b[2], b[3] = DISPLAY_SETTINGS
    b[1] = assist | (LIGHT_BIT if light else 0)
    b[4] = LOCK_BIT if locked else 0
    b[11] = DISPLAY_TRAILER[0]
    b[12] = DISPLAY_TRAILER[1]
    b[5] = display_check(b)
    return bytes(b)


class _ControllerSpec:
    starts = (bytes((CONTROLLER_START,)),)
    head = 1
    max_len = CONTROLLER_LEN

    def length(self, buf, s: int) -> int:
        return CONTROLLER_LEN

    def check(self, buf, s: int, length: int):
        return None if controller_check(buf, s) == buf[s + 6] else "checksum"


class _DisplaySpec:
    head = DISPLAY_LEN
    max_len = DISPLAY_LEN
    hunt_keep = DISPLAY_LEN - 1

    def find(self, buf, pos: int) -> int:
        at = buf.find(DISPLAY_TRAILER, pos + DISPLAY_LEN - 2)
        return at - (DISPLAY_LEN - 2) if at >= 0 else -1

    def length(self, buf, s: int) -> int:
        return DISPLAY_LEN

    def check(self, buf, s: int, length: int):
        return None if display_check(buf, s) == buf[s + 5] else "checksum"


def framer(direction: str = CONTROLLER) -> Framer:
    """The framer for what the tapped wire carries: "controller" (to the display) or
    "display" (to the controller)."""
    if direction == CONTROLLER:
        return Framer(_ControllerSpec())
    if direction == DISPLAY:
        return Framer(_DisplaySpec())
    raise ValueError("direction must be %r or %r, not %r" % (CONTROLLER, DISPLAY, direction))


def _controller(f: bytes, circumference_mm: float, power_scale: float) -> dict:
    if f[0] != CONTROLLER_START:
        raise DecodeError("controller frames start with 41, not %02X" % f[0])
    if controller_check(f) != f[6]:
        raise DecodeError("bad checksum")
    period = (f[3] << 8) | f[4]
    speed = 0.0
    if 0 < period < STOPPED_PERIOD_MS:
        speed = circumference_mm / period * 3.6  # mm per ms is m/s
    return {
        SPEED: speed,
        FAULT: float(f[5]),
        MOTOR_CURRENT: f[8] * power_scale,
        MOTOR_TEMP: float(f[9]),
        LOCKED: 1.0 if f[7] & FLAG_LOCKED else 0.0,
    }


def decode(frame, circumference_mm: float = DEFAULT_CIRCUMFERENCE_MM,
           power_scale: float = DEFAULT_POWER_SCALE) -> dict:
    """Signals of a controller frame (12 bytes); {} for a display frame (13 bytes:
    assist level and lights have no catalogue signal). DecodeError if malformed."""
    f = bytes(frame)
    if len(f) == CONTROLLER_LEN:
        return _controller(f, circumference_mm, power_scale)
    if len(f) == DISPLAY_LEN:
        if f[11:13] != DISPLAY_TRAILER:
            raise DecodeError("display frames end with 32 0E")
        if display_check(f) != f[5]:
            raise DecodeError("bad checksum")
        return {}
    raise DecodeError("KT frames are 12 or 13 bytes, got %d" % len(f))


def understood(frame) -> bool:
    return len(frame) in (CONTROLLER_LEN, DISPLAY_LEN)
