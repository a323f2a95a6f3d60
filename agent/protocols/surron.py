"""Sur-Ron Light Bee BMS on RS-485 (9600 8N1): framer, capture reader, decoder.

``cmd addrL addrH param len data chk``, chk = sum of all previous bytes & FF. What
``len`` counts depends on the command, as the real captures confirm (data/README.md):
46 request: len = bytes wanted, no data (6 bytes); 47 response: len = data bytes
(6 + len); 57 unsolicited: len = data + chk (5 + len). An 8-bit sum is weak, so
the framer also wants a known address (BMS 0116, display 0183; ``addresses=None``
accepts any). Params are decimal numbers, multi-byte values LE.
"""

import binascii

from agent.errors import DecodeError
from agent.protocols import pack
from agent.protocols.framing import Framer

REQUEST = 0x46
RESPONSE = 0x47
UNSOLICITED = 0x57
BMS = 0x0116
DISPLAY = 0x0183
ADDRESSES = (BMS, DISPLAY)

P_VOLTAGE = 9
P_CURRENT = 10
P_SOC = 13
P_SOH = 14
P_REMAINING = 15
P_FULL = 16
P_CYCLES = 23
P_CELLS = 36
P_DISPLAY = 0x48  # 57 to the display: SoC, pack voltage, status
DISPLAY_STATUS = 7  # data offset of the status byte in that frame
BATTERY_MISSING = 0x01  # status bit 0 (81 = stand down + battery missing)
MAX_CELLS = 32

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
SOH = "Vehicle.Powertrain.TractionBattery.StateOfHealth"
REMAINING = "Vehicle.LEV.Battery.RemainingCapacity"
FULL = "Vehicle.LEV.Battery.FullCapacity"
CYCLES = "Vehicle.LEV.Battery.CycleCount"

# param -> (signal, scale) for unsigned little-endian values of any width 1..4
_UNSIGNED = {
    P_SOC: (SOC, 1.0),
    P_SOH: (SOH, 1.0),
    P_REMAINING: (REMAINING, 0.001),
    P_FULL: (FULL, 0.001),
    P_CYCLES: (CYCLES, 1.0),
}

FRAMER_OPTIONS = ("addresses",)
DECODE_OPTIONS = ()


def checksum(body) -> int:
    return sum(body) & 0xFF


def frame_length(cmd: int, size: int) -> int:
    """Whole frame length from the command and its len byte; 0 if impossible."""
    if cmd == REQUEST:
        return 6
    if cmd == RESPONSE:
        return 6 + size
    if cmd == UNSOLICITED and size >= 1:
        return 5 + size
    return 0


class _Spec:
    starts = (bytes((REQUEST,)), bytes((RESPONSE,)), bytes((UNSOLICITED,)))
    head = 5
    max_len = 6 + 255

    def __init__(self, addresses=ADDRESSES) -> None:
        self.addresses = addresses

    def length(self, buf, s: int):
        if self.addresses is not None and (buf[s + 1] | (buf[s + 2] << 8)) not in self.addresses:
            return "address"
        return frame_length(buf[s], buf[s + 4])

    def check(self, buf, s: int, length: int):
        if checksum(buf[s:s + length - 1]) != buf[s + length - 1]:
            return "checksum"
        return None


def framer(addresses=ADDRESSES) -> Framer:
    return Framer(_Spec(addresses))


def request(param: int, size: int, address: int = BMS) -> bytes:
    """Ask ``address`` for ``size`` bytes of ``param``."""
    body = bytes((REQUEST, address & 0xFF, address >> 8, param, size))
    return body + bytes((checksum(body),))


def read_surron_log(lines):
    """Bytes of each hex line of a capture (``HH:MM:SS.mmm:`` lines and blanks skipped).

    Lines are what the sniffer read in one go, not frames: one frame may span two
    lines (the battery_detached capture has one), so feed them to a framer.
    """
    number = 0
    for line in lines:
        number += 1
        if isinstance(line, (bytes, bytearray)):
            line = bytes(line).decode("ascii", "replace")
        text = line.strip()
        if not text or text.endswith(":"):
            continue
        try:
            yield binascii.unhexlify(text)
        except ValueError as e:
            raise DecodeError("line %d is neither a timestamp nor hex: %r" % (number, text[:40])) from e


def _checked(frame) -> bytes:
    f = bytes(frame)
    if len(f) < 6:
        raise DecodeError("Sur-Ron frames are at least 6 bytes, got %d" % len(f))
    expected = frame_length(f[0], f[4])
    if expected == 0:
        raise DecodeError("unknown command %02X" % f[0])
    if expected != len(f):
        raise DecodeError("length byte %d means %d bytes, frame has %d" % (f[4], expected, len(f)))
    if checksum(f[:-1]) != f[-1]:
        raise DecodeError("bad checksum")
    return f


def _unsigned(data: bytes, what: str) -> int:
    if not 1 <= len(data) <= 4:
        raise DecodeError("%s: %d bytes, expected 1 to 4" % (what, len(data)))
    value = 0
    for i in range(len(data) - 1, -1, -1):
        value = (value << 8) | data[i]
    return value


def _exactly(data: bytes, size: int, what: str) -> int:
    if len(data) != size:
        raise DecodeError("%s: %d bytes, expected %d" % (what, len(data), size))
    return _unsigned(data, what)


def _response(param: int, data: bytes) -> dict:
    if param == P_VOLTAGE:
        return {VOLTAGE: _exactly(data, 4, "pack voltage") * 0.001}
    if param == P_CURRENT:
        raw = _exactly(data, 4, "current")
        if raw >= 0x80000000:
            raw -= 0x100000000
        return {CURRENT: raw * 0.001}
    if param in _UNSIGNED:
        name, scale = _UNSIGNED[param]
        return {name: _unsigned(data, name) * scale}
    if param == P_CELLS:
        if len(data) % 2 or len(data) > 2 * MAX_CELLS:
            raise DecodeError("cell voltages: %d bytes" % len(data))
        return pack.cells({}, [(data[2 * i] | (data[2 * i + 1] << 8)) * 0.001 for i in range(len(data) // 2)])
    return {}


def _to_display(data: bytes) -> dict:
    """SoC and pack voltage as the display gets them. Zeros mean "not known": the
    voltage is 0 until first read after power-up, and with the battery detached both
    are 0 (the capture flags that with status 81 only once), so zeros are not sent."""
    if len(data) <= DISPLAY_STATUS:
        raise DecodeError("display frame: %d data bytes, need %d" % (len(data), DISPLAY_STATUS + 1))
    volt = _unsigned(data[1:5], "pack voltage")
    if data[DISPLAY_STATUS] & BATTERY_MISSING or (volt == 0 and data[0] == 0):
        return {}
    out = {SOC: float(data[0])}
    if volt:
        out[VOLTAGE] = volt * 0.001
    return out


def decode(frame) -> dict:
    """Signals of a BMS response or a display update; {} for requests and params
    without a catalogue signal. DecodeError if malformed."""
    f = _checked(frame)
    if f[0] == RESPONSE:
        return _response(f[3], f[5:-1])
    if f[0] == UNSOLICITED and f[3] == P_DISPLAY:
        return _to_display(f[5:-1])
    return {}


def understood(frame) -> bool:
    """Requests, responses of the params above, and the display update."""
    if len(frame) < 6:
        return False
    cmd = frame[0]
    param = frame[3]
    if cmd == RESPONSE:
        return param in (P_VOLTAGE, P_CURRENT, P_CELLS) or param in _UNSIGNED
    return cmd == REQUEST or (cmd == UNSOLICITED and param == P_DISPLAY)
