"""can-utils ``candump -L`` log lines, parsed strictly so damaged captures show up.

A frame is the tuple ``(t, iface, can_id, flags, data)``: ``t`` float seconds,
``can_id`` the bare id (the error-class bits for error frames), ``flags`` a bit set
of the constants below, ``data`` bytes. Two details ride in ``flags`` so that
``format_candump_line`` can restore the line: the CAN FD flags digit (BRS, ESI, ...)
in bits 4-7, and the DLC a remote frame asks for in bits 8-11.
Written for MicroPython too (see DESIGN): tuples and ints, no dataclasses.
"""

from binascii import hexlify, unhexlify

from agent.errors import DecodeError

EXTENDED = 1
REMOTE = 2
ERROR = 4
FD = 8
FD_FLAGS_SHIFT = 4
FD_BRS = 1 << FD_FLAGS_SHIFT
FD_ESI = 2 << FD_FLAGS_SHIFT
RTR_DLC_SHIFT = 8

SFF_MASK = 0x7FF
EFF_MASK = 0x1FFFFFFF
ERR_FLAG = 0x20000000
# Linux error classes occupy bits 0-9 of an error frame's id (CAN_ERR_MASK use).
ERR_CLASS_MASK = 0x3FF

FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)

_HEX = "0123456789abcdefABCDEF"
_DIGITS = "0123456789"


def _is_hex(s: str) -> bool:
    for c in s:
        if c not in _HEX:
            return False
    return True


def _is_digits(s: str) -> bool:
    for c in s:
        if c not in _DIGITS:
            return False
    return True


def _timestamp(field: str) -> float:
    inner = field[1:-1]
    dot = inner.find(".")
    if (len(field) < 5 or field[0] != "(" or field[-1] != ")" or dot < 1
            or dot == len(inner) - 1 or not _is_digits(inner[:dot])
            or not _is_digits(inner[dot + 1:])):
        raise DecodeError("bad timestamp %r, want (<sec>.<usec>)" % field)
    return float(inner)


def _can_id(text: str) -> tuple:
    """(bare id, flags) from the 3- or 8-digit id of a frame field."""
    if not text or not _is_hex(text):
        raise DecodeError("id %r is not hex" % text)
    raw = int(text, 16)
    if len(text) == 3:
        if raw > SFF_MASK:
            raise DecodeError("11-bit id %s above 7FF" % text)
        return raw, 0
    if len(text) != 8:
        raise DecodeError("id %r must have 3 or 8 hex digits" % text)
    if raw & ERR_FLAG and not raw & ~(ERR_FLAG | ERR_CLASS_MASK):
        return raw & ERR_CLASS_MASK, ERROR
    if raw > EFF_MASK:
        raise DecodeError("id wider than 29 bits: %s" % text)
    return raw, EXTENDED


def _payload(text: str, fd: bool) -> bytes:
    pieces = text.split(".")
    for p in pieces:
        if len(p) % 2:
            raise DecodeError("odd number of hex digits in data %r" % text)
        if not _is_hex(p):
            raise DecodeError("data %r is not hex" % text)
    data = unhexlify("".join(pieces))
    if fd:
        if len(data) not in FD_LENGTHS:
            raise DecodeError("%d bytes is not a valid CAN FD length" % len(data))
    elif len(data) > 8:
        raise DecodeError("classic CAN data longer than 8 bytes: %d" % len(data))
    return data


def _frame(text: str) -> tuple:
    """(can_id, flags, data) from ``<id>#...``."""
    hash_at = text.find("#")
    if hash_at < 0:
        raise DecodeError("no '#' in frame %r" % text)
    can_id, flags = _can_id(text[:hash_at])
    rest = text[hash_at + 1:]
    if rest[:1] == "#":
        if flags & ERROR:
            raise DecodeError("error frame %r cannot be CAN FD" % text)
        if len(rest) < 2 or rest[1] not in _HEX:
            raise DecodeError("CAN FD frame %r lacks its flags digit" % text)
        flags |= FD | int(rest[1], 16) << FD_FLAGS_SHIFT
        return can_id, flags, _payload(rest[2:], True)
    if rest[:1] in ("R", "r"):
        if flags & ERROR:
            raise DecodeError("error frame %r cannot be remote" % text)
        dlc = rest[1:]
        if len(dlc) > 1 or (dlc and dlc not in "012345678"):
            raise DecodeError("bad remote frame DLC %r (0-8)" % dlc)
        flags |= REMOTE | int(dlc or "0") << RTR_DLC_SHIFT
        return can_id, flags, b""
    return can_id, flags, _payload(rest, False)


def parse_candump_line(line):
    """``(t, iface, can_id, flags, data)`` from one log line; None for a blank line."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("ascii")
        except UnicodeError as e:
            raise DecodeError("non-ASCII bytes in line") from e
    fields = line.split()
    if not fields:
        return None
    if len(fields) < 3:
        raise DecodeError("want '(<sec>.<usec>) <iface> <id>#<data>', got %d fields" % len(fields))
    if len(fields) > 4:
        raise DecodeError("unexpected fields after the frame: %r" % " ".join(fields[4:]))
    if len(fields) == 4 and fields[3] not in ("R", "T"):
        raise DecodeError("direction field must be R or T, got %r" % fields[3])
    t = _timestamp(fields[0])
    can_id, flags, data = _frame(fields[2])
    return (t, fields[1], can_id, flags, data)


def format_candump_line(frame: tuple) -> str:
    """The ``candump -L`` line for a frame tuple, without a direction field."""
    t, iface, can_id, flags, data = frame
    if flags & ERROR:
        ident = "%08X" % (ERR_FLAG | can_id)
    elif flags & EXTENDED:
        ident = "%08X" % can_id
    else:
        ident = "%03X" % can_id
    if flags & REMOTE:
        dlc = flags >> RTR_DLC_SHIFT & 0xF
        body = "R%d" % dlc if dlc else "R"
    elif flags & FD:
        body = "#%X" % (flags >> FD_FLAGS_SHIFT & 0xF) + hexlify(data).decode().upper()
    else:
        body = hexlify(data).decode().upper()
    return "(%.6f) %s %s#%s" % (t, iface, ident, body)


def read_candump(lines):
    """Yield ``(line_no, frame or DecodeError)`` per non-blank line, 1-based.

    Damaged lines come back as the error rather than stopping the read, so a
    caller can report them and go on.
    """
    line_no = 0
    for line in lines:
        line_no += 1
        try:
            frame = parse_candump_line(line)
        except DecodeError as e:
            yield line_no, e
            continue
        if frame is not None:
            yield line_no, frame
