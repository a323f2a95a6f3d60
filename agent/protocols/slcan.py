"""SLCAN (Lawicel ASCII) lines, read strictly: the per-line verdicts of ``ebike-agent
decode`` and the tests' reading of what an adapter (or the simulator) sent.

Frames arrive as ``tIIIL<data>`` / ``TIIIIIIIIL<data>`` (and ``r``/``R`` remote frames),
each ending in CR, optionally followed by 4 hex digits of adapter milliseconds; a BEL
(the adapter refusing a command) ends a line as CR does and is counted in ``errors``.
The agent's hot path is the kernel's own parser (agent.fusion), not this one. CPython
only (``re``); imports nothing of the agent.
"""

from __future__ import annotations

import re

EXTENDED_FLAG = 0x80000000
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
