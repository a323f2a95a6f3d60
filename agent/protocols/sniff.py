"""Which protocol a byte stream speaks, from the bytes alone: what names "1,240 bytes of
something else" in the status verdict, and a swapped cable or a wrong baud rate in
``ebike-agent selftest``.

Each candidate is read by the agent's own reader of it (``reader(name)``): a UART
protocol's framer and decoder (a frame counts only when it frames with a valid checksum
and decodes), the strict SLCAN and candump line parsers. A weak check (KT's one XOR
byte) passes on chance bytes now and then, and a wrong baud rate makes nothing but chance
bytes; so ``identify`` names a protocol only when its frames cover at least 1/MIN_SHARE
of the bytes. One pass per candidate: cheap on the few KB the runtime hands over every
10 s. MicroPython-safe (see the package docstring) but for the SLCAN reader, which needs
CPython's ``re`` and is imported on first use.
"""

from agent.errors import DecodeError
from agent.protocols import UART_PROTOCOLS, protocol

# Valid frames must cover at least 1/MIN_SHARE of the bytes for a protocol to be named.
MIN_SHARE = 4
# The line-based candidates beside the UART protocols.
SLCAN = "slcan"
CANDUMP = "candump"
CANDIDATES = tuple(UART_PROTOCOLS) + (SLCAN, CANDUMP)
# No SLCAN or candump line is longer (a CAN FD candump line is about 170 bytes).
MAX_LINE = 256


class Reader:
    """Valid frames of one candidate in a stream (``reader``)."""

    # Bytes each frame carried beyond what ``feed`` returns (line ends).
    overhead = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The valid frames (or lines) ``data`` completes."""
        raise NotImplementedError


class _Uart(Reader):
    def __init__(self, name: str) -> None:
        self._proto = protocol(name)
        self._framer = self._proto.framer()
        # An NMEA sentence comes from its framer without its CR LF.
        self.overhead = 2 if name == "nmea" else 0

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        for frame in self._framer.feed(data):
            try:
                self._proto.decode(frame)
            except DecodeError:
                continue
            out.append(frame)
        return out


class _Lines(Reader):
    """A line protocol: lines end at any byte of ``ends``; ``valid`` says whether one
    (without its end) is a frame."""

    overhead = 1
    ends = b"\n"

    def __init__(self) -> None:
        self._tail = b""

    def valid(self, line: bytes) -> bool:
        raise NotImplementedError

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._tail + bytes(data)
        for end in self.ends[1:]:
            buf = buf.replace(bytes((end,)), self.ends[:1])
        lines = buf.split(self.ends[:1])
        # A line without its end yet waits; one longer than any frame is cut to a tail
        # that can no longer pass.
        self._tail = lines.pop()[-MAX_LINE:]
        return [line for line in lines if line and self.valid(line)]


class _Slcan(_Lines):
    # A BEL (the adapter refusing a command) ends a line as CR does.
    ends = b"\r\x07"

    def __init__(self) -> None:
        from agent.protocols.slcan import SlcanParser

        super().__init__()
        self._parser = SlcanParser()

    def valid(self, line: bytes) -> bool:
        return bool(self._parser.feed(line + b"\r")[0])


class _Candump(_Lines):
    def valid(self, line: bytes) -> bool:
        from agent.protocols.candump import parse_candump_line

        try:
            return parse_candump_line(line) is not None
        except DecodeError:
            return False


def reader(name: str) -> Reader:
    """A stream reader for candidate ``name`` (one of CANDIDATES)."""
    if name == SLCAN:
        return _Slcan()
    if name == CANDUMP:
        return _Candump()
    return _Uart(name)


def identify(data: bytes) -> list[tuple[str, int]]:
    """The protocols ``data`` looks like, best first (most bytes explained), as
    (name, valid frames); empty when none explains enough of it."""
    data = bytes(data)
    named = []  # type: list[tuple[int, int, str]]
    for name in CANDIDATES:
        r = reader(name)
        frames = r.feed(data)
        covered = 0
        for frame in frames:
            covered += len(frame) + r.overhead
        if frames and covered * MIN_SHARE >= len(data):
            named.append((covered, len(frames), name))
    named.sort(key=lambda x: (-x[0], -x[1], x[2]))
    return [(name, frames) for covered, frames, name in named]
