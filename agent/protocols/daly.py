"""Daly BMS over UART (9600): fixed 13-byte frames ``A5 addr cmd 08 data[8] chk``.

chk = sum of the 12 bytes before it & FF. The host asks from address 80 (40 on some
units) and the BMS answers from 01; only answers are decoded. PROTOCOLS.md gives no
byte order: Daly units send big endian, as decoded here. Nor does it give a current
sign: (raw - 30000) x 0.1 A is passed on as is, read as the catalogue's
"+ = charging" (raw above 30000 = charging); not yet checked against a real unit.
"""

from agent.errors import DecodeError
from agent.protocols.framing import Framer

START = 0xA5
FRAME_LEN = 13
DATA_LEN = 8
BMS = 0x01
HOST = 0x80
HOST_ALT = 0x40
CMD_SOC = 0x90
CURRENT_OFFSET = 30000

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"

FRAMER_OPTIONS = ()
DECODE_OPTIONS = ()


class _Spec:
    starts = (bytes((START,)),)
    head = 4
    max_len = FRAME_LEN

    def length(self, buf, s: int) -> int:
        return FRAME_LEN if buf[s + 3] == DATA_LEN else 0

    def check(self, buf, s: int, length: int):
        if sum(buf[s:s + FRAME_LEN - 1]) & 0xFF != buf[s + FRAME_LEN - 1]:
            return "checksum"
        return None


def framer() -> Framer:
    return Framer(_Spec())


def request(cmd: int = CMD_SOC, host: int = HOST) -> bytes:
    """Read request ``A5 host cmd 08 00x8 chk``; ``host`` is 80, or 40 on some units."""
    body = bytes((START, host, cmd, DATA_LEN)) + bytes(DATA_LEN)
    return body + bytes((sum(body) & 0xFF,))


def poll_requests(host: int = HOST) -> tuple:
    return (request(CMD_SOC, host),)


POLL_REQUESTS = poll_requests()
POLL_OPTIONS = ("host",)


def match(req: bytes, frame: bytes) -> bool:
    """The BMS answers from address 01 with the command it was asked."""
    return len(frame) > 2 and len(req) > 2 and frame[1] == BMS and frame[2] == req[2]


def _checked(frame) -> bytes:
    frame = bytes(frame)
    if len(frame) != FRAME_LEN:
        raise DecodeError("Daly frames are %d bytes, got %d" % (FRAME_LEN, len(frame)))
    if frame[0] != START:
        raise DecodeError("bad start byte %02X" % frame[0])
    if frame[3] != DATA_LEN:
        raise DecodeError("bad length")
    if _Spec().check(frame, 0, FRAME_LEN) is not None:
        raise DecodeError("bad checksum")
    return frame


def decode(frame) -> dict:
    """Signals of a cmd 90 answer; {} for requests and other commands."""
    f = _checked(frame)
    if f[1] != BMS or f[2] != CMD_SOC:
        return {}
    volt = (f[4] << 8) | f[5]
    cur = (f[8] << 8) | f[9]
    soc = (f[10] << 8) | f[11]
    return {
        VOLTAGE: volt * 0.1,
        CURRENT: (cur - CURRENT_OFFSET) * 0.1,
        SOC: soc * 0.1,
    }


def understood(frame) -> bool:
    """cmd 90, answers and requests (the host's own, echoed on RS-485) alike."""
    return len(frame) > 2 and frame[2] == CMD_SOC
