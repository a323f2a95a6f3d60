"""Ninebot / Xiaomi M365-family scooter bus (115200, one-wire half duplex, LE).

``55 AA L D T C data ck0 ck1``; L = len(data) + 2; checksum = (sum of L..data) XOR
FFFF, low byte first. Registers are u16 words, so an answer to a read of register C
carries consecutive registers from C: the decoder maps each field by its byte address
(register x 2) and decodes whichever fields fall inside the returned span.
PROTOCOLS.md gives no current sign: the BMS value is passed on as is, read as the
catalogue's "+ = charging" (unverified against a real pack).
"""

from agent.errors import DecodeError
from agent.protocols.framing import Framer
from agent.protocols.pack import TEMP_MAX, TEMP_MIN

START = b"\x55\xaa"
ESC_IN = 0x20
ESC_OUT = 0x23
BMS_IN = 0x22
BMS_OUT = 0x25
READ = 0x01
WRITE = 0x03
REPLY_OFFSET = ESC_OUT - ESC_IN  # a device answers from its address + 3

REG_BMS_STATUS = 0x31
REG_ESC_RANGE = 0x25

REMAINING = "Vehicle.LEV.Battery.RemainingCapacity"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
TEMP1 = "Vehicle.LEV.Battery.Temperature.1"
TEMP2 = "Vehicle.LEV.Battery.Temperature.2"
RANGE = "Vehicle.LEV.Range"

# (byte address = register * 2 (+1 for a high byte), size, signed, scale, offset, signal)
_BMS_FIELDS = (
    (0x31 * 2, 2, False, 0.001, 0, REMAINING),
    (0x32 * 2, 2, False, 1.0, 0, SOC),
    (0x33 * 2, 2, True, 0.01, 0, CURRENT),
    (0x34 * 2, 2, False, 0.01, 0, VOLTAGE),
    (0x35 * 2, 1, False, 1.0, -20, TEMP1),
    (0x35 * 2 + 1, 1, False, 1.0, -20, TEMP2),
)
_ESC_FIELDS = ((REG_ESC_RANGE * 2, 2, False, 0.01, 0, RANGE),)
_FIELDS = {BMS_OUT: _BMS_FIELDS, ESC_OUT: _ESC_FIELDS}

FRAMER_OPTIONS = ()
DECODE_OPTIONS = ()


def checksum(body) -> int:
    return (sum(body) & 0xFFFF) ^ 0xFFFF


class _Spec:
    starts = (START,)
    head = 3
    max_len = 255 + 6

    def length(self, buf, s: int) -> int:
        size = buf[s + 2]
        return size + 6 if size >= 2 else 0

    def check(self, buf, s: int, length: int):
        end = s + length - 2
        if checksum(buf[s + 2:end]) != buf[end] | (buf[end + 1] << 8):
            return "checksum"
        return None


def framer() -> Framer:
    return Framer(_Spec())


def _frame(device: int, kind: int, reg: int, data: bytes) -> bytes:
    body = bytes((len(data) + 2, device, kind, reg)) + bytes(data)
    c = checksum(body)
    return START + body + bytes((c & 0xFF, c >> 8))


def request(device: int, reg: int, n: int) -> bytes:
    """Read ``n`` bytes from register ``reg`` of ``device`` (22 BMS, 20 ESC)."""
    return _frame(device, READ, reg, bytes((n,)))


POLL_REQUESTS = (request(BMS_IN, REG_BMS_STATUS, 10), request(ESC_IN, REG_ESC_RANGE, 2))


def match(req: bytes, frame: bytes) -> bool:
    """The addressed device answers from its address + 3, echoing the register."""
    return len(frame) > 5 and len(req) > 5 and frame[3] == req[3] + REPLY_OFFSET and frame[5] == req[5]


def _checked(frame) -> bytes:
    f = bytes(frame)
    if len(f) < 8 or f[:2] != START:
        raise DecodeError("not a Ninebot frame: %r" % f[:8])
    if f[2] < 2 or len(f) != f[2] + 6:
        raise DecodeError("length field says %d, frame has %d bytes" % (f[2], len(f)))
    if _Spec().check(f, 0, len(f)) is not None:
        raise DecodeError("bad checksum")
    return f


def _fields(f: bytes):
    """The field table whose span this read answer overlaps, else None."""
    table = _FIELDS.get(f[3])
    if table is None or f[4] != READ:
        return None
    base = f[5] * 2
    size = len(f) - 8
    for addr, width, _signed, _scale, _offset, _name in table:
        if base <= addr and addr + width <= base + size:
            return table
    return None


def decode(frame) -> dict:
    """Signals of a BMS or ESC read answer; {} for requests, writes, other registers."""
    f = _checked(frame)
    table = _fields(f)
    if table is None:
        return {}
    data = f[6:-2]
    base = f[5] * 2
    out = {}
    temps = []
    for addr, width, signed, scale, offset, name in table:
        at = addr - base
        if at < 0 or at + width > len(data):
            continue
        raw = data[at] if width == 1 else data[at] | (data[at + 1] << 8)
        if signed and raw >= 0x8000:
            raw -= 0x10000
        value = raw * scale + offset
        out[name] = value
        if name in (TEMP1, TEMP2):
            temps.append(value)
    if temps:
        out[TEMP_MIN] = min(temps)
        out[TEMP_MAX] = max(temps)
    return out


def understood(frame) -> bool:
    """Read answers that carry a known field, and read requests (one-wire echoes)."""
    if len(frame) < 8:
        return False
    if frame[3] in (ESC_IN, BMS_IN):
        return frame[4] == READ
    return _fields(bytes(frame)) is not None
