"""SLCAN (Lawicel ASCII) USB-CAN adapters: the open handshake and the frame parser.

Frames arrive as ``tIIIL<data>`` / ``TIIIIIIIIL<data>`` (and ``r``/``R`` remote frames),
each ending in CR, optionally followed by 4 hex digits of adapter milliseconds. The
host transmits with the same lines (``send_frame``); the adapter answers ``z``/``Z`` CR,
or BEL if it refuses, in the stream the parser reads (and counts BELs in ``errors``).
"""

from __future__ import annotations

import logging
import re

from agent.errors import SourceUnavailableError
from agent.sources.base import check_can_frame
from agent.sources.uart import UartSource

log = logging.getLogger(__name__)

EXTENDED_FLAG = 0x80000000
BITRATE_CODES = {10000: b"S0", 20000: b"S1", 50000: b"S2", 100000: b"S3", 125000: b"S4",
                 250000: b"S5", 500000: b"S6", 800000: b"S7", 1000000: b"S8"}
REPLY_TIMEOUT = 1.0
MAX_LINE = 64
_HEX = re.compile(rb"[0-9A-Fa-f]*")
_LINE_END = re.compile(rb"[\r\x07]")


class SlcanParser:
    """Splits the adapter's byte stream into frames; bad lines are counted, never fatal."""

    def __init__(self) -> None:
        self.tail = b""
        self.skipping = False
        self.frames = 0
        self.remote = 0
        self.bad = 0
        self.errors = 0

    def feed(self, data: bytes) -> tuple[list[int], list[bytes]]:
        """Frames complete in ``tail + data``: keys (id | 0x80000000 if 29-bit) and payloads."""
        keys: list[int] = []
        datas: list[bytes] = []
        buf = self.tail + data
        if self.skipping:
            # Inside an overlong line, dropped and counted already: resume after its CR.
            end = buf.find(b"\r")
            self.tail = b""
            if end < 0:
                return keys, datas
            buf = buf[end + 1:]
            self.skipping = False
        # A BEL (the adapter refusing a command) ends a line just as CR does.
        self.errors += buf.count(b"\x07")
        lines = _LINE_END.split(buf)
        self.tail = lines.pop()
        if len(self.tail) > MAX_LINE:
            self.bad += 1
            self.tail = b""
            self.skipping = True
        for line in lines:
            if not line:
                continue
            kind = line[:1]
            if kind in (b"t", b"T"):
                self._frame(line, kind == b"T", keys, datas)
            elif kind in (b"r", b"R"):
                self.remote += 1
            elif kind not in (b"z", b"Z"):
                self.bad += 1
        return keys, datas

    def _frame(self, line: bytes, extended: bool, keys: list[int], datas: list[bytes]) -> None:
        id_len = 8 if extended else 3
        if not _HEX.fullmatch(line, 1):
            # int() and bytes.fromhex() would take spaces, signs and underscores.
            self.bad += 1
            return
        try:
            can_id = int(line[1:1 + id_len], 16)
            dlc = int(line[1 + id_len:2 + id_len], 16)
            end = 2 + id_len + 2 * dlc
            if dlc > 8 or len(line) not in (end, end + 4):
                raise ValueError("length")
            payload = bytes.fromhex(line[2 + id_len:end].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            self.bad += 1
            return
        if len(line[1:1 + id_len]) != id_len or (extended and can_id > 0x1FFFFFFF) or (not extended and can_id > 0x7FF):
            self.bad += 1
            return
        self.frames += 1
        keys.append(can_id | EXTENDED_FLAG if extended else can_id)
        datas.append(payload)


class SlcanSource(UartSource):
    """A Lawicel adapter: sets the bitrate and opens the channel on every (re)connect."""

    frame_format = "slcan"

    def _open(self) -> None:
        super()._open()
        try:
            self._command(b"C", allow_error=True)
            self._command(BITRATE_CODES[self.cfg.bitrate])
            self._command(b"O")
        except SourceUnavailableError:
            self._close()
            raise

    def _command(self, cmd: bytes, allow_error: bool = False) -> None:
        self.write(cmd + b"\r")
        reply = self.read_reply(REPLY_TIMEOUT)
        if reply.endswith(b"\r") and b"\x07" not in reply:
            return
        if allow_error and b"\x07" in reply:
            return
        what = "refused (BEL)" if b"\x07" in reply else f"no reply within {REPLY_TIMEOUT} s"
        raise SourceUnavailableError(f"SLCAN adapter on {self.cfg.port}: {cmd.decode()} {what}")

    def send_frame(self, can_id: int, data: bytes, extended: bool = True) -> None:
        """Transmit one data frame as ``TIIIIIIIIL<data>`` CR (``tIIIL<data>`` CR standard)."""
        check_can_frame(can_id, data, extended)
        head = f"T{can_id:08X}" if extended else f"t{can_id:03X}"
        self.write(f"{head}{len(data)}{bytes(data).hex().upper()}\r".encode("ascii"))
