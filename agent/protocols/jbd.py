"""JBD / Xiaoxiang BMS over UART (9600 8N1, big endian): framer, requests, decoder.

Response ``DD reg status len data chkH chkL 77``; chk = 0x10000 - sum(status..data).
Some firmwares put 3 bytes the checksum does not cover before the checksum. The
framer accepts that form only when the plain form fails and the quirk form checks:
both can pass only if the 3 bytes repeat the checksum and trailer, and then the data
bytes are the same either way, so the decode is never in doubt. ``framer(quirk=False)``
turns it off.

The one write the agent makes is MOS control (register E1, ``mos_control_request``):
it opens the charge and/or discharge FET on a signed cloud command. The BMS acknowledges
with ``DD E1 00 00 00 00 77``, which ``understood`` accepts and ``decode`` maps to no
signals, so an acknowledged command is not counted as a frame the agent cannot read.
"""

import struct

from agent.errors import DecodeError
from agent.protocols import pack
from agent.protocols.framing import Framer

START = 0xDD
END = 0x77
READ = 0xA5
WRITE = 0x5A
STATUS_OK = 0x00
STATUS_ERROR = 0x80
QUIRK_BYTES = 3

REG_BASIC = 0x03
REG_CELLS = 0x04
REG_NAME = 0x05
REG_MOS = 0xE1
MOS_CHARGE_OFF = 0x01
MOS_DISCHARGE_OFF = 0x02

MAX_CELLS = 32
MAX_TEMPS = 16

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
REMAINING = "Vehicle.LEV.Battery.RemainingCapacity"
FULL = "Vehicle.LEV.Battery.FullCapacity"
CYCLES = "Vehicle.LEV.Battery.CycleCount"
PROTECTION = "Vehicle.LEV.Battery.ProtectionFlags"
CHARGE_ON = "Vehicle.LEV.Battery.ChargeEnabled"
DISCHARGE_ON = "Vehicle.LEV.Battery.DischargeEnabled"

_BASIC = struct.Struct(">HhHHHHHHHBBBBB")  # 23 bytes, up to the NTC count
FRAMER_OPTIONS = ("quirk",)
DECODE_OPTIONS = ()


def checksum(body) -> int:
    """0x10000 minus the byte sum, as the 16-bit value sent big endian."""
    return (0x10000 - sum(body)) & 0xFFFF


def _plain_fault(buf, s: int, length: int):
    if buf[s + length - 1] != END:
        return "trailer"
    given = (buf[s + length - 3] << 8) | buf[s + length - 2]
    if checksum(buf[s + 2:s + length - 3]) != given:
        return "checksum"
    return None


def _quirk_fault(buf, s: int, length: int):
    """``length`` is the quirk form's: 3 uncovered bytes before chkH chkL 77."""
    if buf[s + length - 1] != END:
        return "trailer"
    given = (buf[s + length - 3] << 8) | buf[s + length - 2]
    if checksum(buf[s + 2:s + length - 3 - QUIRK_BYTES]) != given:
        return "checksum"
    return None


class _Spec:
    starts = (bytes((START,)),)
    head = 4
    max_len = 255 + 7 + QUIRK_BYTES

    def __init__(self, quirk: bool = True) -> None:
        self.quirk = quirk

    def length(self, buf, s: int):
        if buf[s + 2] not in (STATUS_OK, STATUS_ERROR):
            return "status"
        return buf[s + 3] + 7

    def check(self, buf, s: int, length: int):
        plain = buf[s + 3] + 7
        fault = _plain_fault(buf, s, plain)
        if fault is None:
            return None
        if not self.quirk:
            return fault
        if length == plain:
            return plain + QUIRK_BYTES
        if _quirk_fault(buf, s, length) is None:
            return None
        return fault

    def fault(self, buf, s: int, length: int):
        """The plain form's fault, when the line went quiet before a quirk form could
        complete: a frame with a bad checksum is not "truncated"."""
        return _plain_fault(buf, s, length)


class JbdFramer(Framer):
    """A ``Framer`` that also counts the BMS's error replies (status 80)."""

    def __init__(self, quirk: bool = True) -> None:
        super().__init__(_Spec(quirk))
        self.error_replies = 0

    def feed(self, data) -> list:
        out = super().feed(data)
        for frame in out:
            if frame[2] == STATUS_ERROR:
                self.error_replies += 1
        return out


def framer(quirk: bool = True) -> JbdFramer:
    return JbdFramer(quirk)


def request(reg: int) -> bytes:
    """Read request for register ``reg``: ``DD A5 reg 00 chkH chkL 77``."""
    c = checksum((reg, 0))
    return bytes((START, READ, reg, 0, c >> 8, c & 0xFF, END))


def write_request(reg: int, data: bytes) -> bytes:
    """Write request ``DD 5A reg len data chkH chkL 77`` (for configuration, later)."""
    body = bytes((reg, len(data))) + bytes(data)
    c = checksum(body)
    return bytes((START, WRITE)) + body + bytes((c >> 8, c & 0xFF, END))


def mos_control_request(charge_off: bool, discharge_off: bool) -> bytes:
    """MOS control write ``DD 5A E1 02 00 XX chkH chkL 77``: a set bit of XX turns that FET
    off (bit 0 charge, bit 1 discharge), a clear one back on."""
    bits = (MOS_CHARGE_OFF if charge_off else 0) | (MOS_DISCHARGE_OFF if discharge_off else 0)
    return write_request(REG_MOS, bytes((0, bits)))


POLL_REQUESTS = (request(REG_BASIC), request(REG_CELLS))


def match(req: bytes, frame: bytes) -> bool:
    """A response answers a read request of the same register."""
    return len(frame) > 1 and len(req) > 2 and frame[1] == req[2]


def _data(frame) -> bytes:
    """The data bytes of a well-formed response, either form; DecodeError otherwise."""
    frame = bytes(frame)
    if len(frame) < 7 or frame[0] != START:
        raise DecodeError("not a JBD response: %r" % frame[:8])
    plain = frame[3] + 7
    if len(frame) == plain:
        fault = _plain_fault(frame, 0, plain)
    elif len(frame) == plain + QUIRK_BYTES and _plain_fault(frame, 0, plain) is not None:
        fault = _quirk_fault(frame, 0, len(frame))
    else:
        raise DecodeError("length field says %d bytes of data, frame has %d bytes" % (frame[3], len(frame)))
    if frame[2] not in (STATUS_OK, STATUS_ERROR):
        fault = "status"
    if fault is not None:
        raise DecodeError("bad %s" % fault)
    return frame[4:4 + frame[3]]


def _basic(data: bytes) -> dict:
    if len(data) < _BASIC.size:
        raise DecodeError("register 03 needs %d bytes, has %d" % (_BASIC.size, len(data)))
    (volt, cur, remaining, full, cycles, _date, _bal_lo, _bal_hi, prot,
     _sw, rsoc, fet, _cells, ntc) = _BASIC.unpack_from(data, 0)
    if ntc > MAX_TEMPS:
        raise DecodeError("register 03 claims %d NTCs, at most %d" % (ntc, MAX_TEMPS))
    if len(data) < _BASIC.size + 2 * ntc:
        raise DecodeError("register 03 claims %d NTCs but has room for %d" % (ntc, (len(data) - _BASIC.size) // 2))
    out = {
        VOLTAGE: volt * 0.01,
        CURRENT: cur * 0.01,
        REMAINING: remaining * 0.01,
        FULL: full * 0.01,
        CYCLES: float(cycles),
        PROTECTION: float(prot),
        SOC: float(rsoc),
        CHARGE_ON: float(fet & 1),
        DISCHARGE_ON: float((fet >> 1) & 1),
    }
    temps = []
    for i in range(ntc):
        raw = (data[_BASIC.size + 2 * i] << 8) | data[_BASIC.size + 2 * i + 1]
        temps.append((raw - 2731.5) / 10)  # 0.1 K to C, without 0.1 * raw rounding noise
    return pack.temperatures(out, temps)


def _cells(data: bytes) -> dict:
    if len(data) % 2:
        raise DecodeError("register 04 has an odd length %d" % len(data))
    count = len(data) // 2
    if count > MAX_CELLS:
        raise DecodeError("register 04 has %d cells, at most %d" % (count, MAX_CELLS))
    return pack.cells({}, [((data[2 * i] << 8) | data[2 * i + 1]) * 0.001 for i in range(count)])


def decode(frame) -> dict:
    """Catalogue signals of one response; {} for error replies and registers without
    signals (05 hardware name, E1 the MOS-control acknowledgement) or unknown ones.
    DecodeError if malformed."""
    data = _data(frame)
    if frame[2] == STATUS_ERROR:
        return {}
    if frame[1] == REG_BASIC:
        return _basic(data)
    if frame[1] == REG_CELLS:
        return _cells(data)
    return {}


def understood(frame) -> bool:
    """Registers this module knows (03, 04, 05, the E1 write acknowledgement), and error
    replies to them."""
    return len(frame) > 1 and frame[1] in (REG_BASIC, REG_CELLS, REG_NAME, REG_MOS)
