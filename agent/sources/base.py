"""What every source shares (python-can's interface idea): reconnect with backoff,
non-blocking reads for the runtime's selector, and counters for status.

A subclass opens its device in ``_open`` and reads what is there in ``_read``; a
vanished device (unplugged USB adapter) raises SourceUnavailableError from either,
and the source comes back by itself on a later ``poll_open``. A source that has ended
for good (a replayed log without ``loop``) calls ``_finish``: it is closed after that
read, ``finished`` is set, and it is never reopened.

Sources do not decode. ``read()`` returns bytes in the format the class declares in
``frame_format``, and the runtime hands them to the matching framer or kernel call:

    "bytes"    a raw byte stream for a UART protocol framer (uart)
    "slcan"    SLCAN (Lawicel) text as the adapter sent it (slcan)
    "candump"  complete ``candump -L`` lines, each ending in ``\n`` (candump)
    "packed"   16-byte Linux ``struct can_frame`` records, ``PACKED_FRAME`` below:
               can_id with the EFF/RTR/ERR flags as SocketCAN sets them, dlc, 3 pad
               bytes, 8 data bytes zero-padded (socketcan, python-can)

Sources that carry CAN also transmit: ``send_frame(can_id, data, extended)`` puts one
data frame on the bus (a signed cloud command acting on the vehicle). A ``packed``
source's ``write`` takes the same records it reads, so the base class packs and writes;
SLCAN writes the Lawicel line instead; sources that cannot transmit (a candump log, a
UART) raise SourceError.

A source whose readiness is a time rather than a device (the candump replay) also
answers ``next_due()``: the monotonic time its next data is due, so the runtime can
shorten its select timeout; every other source answers None.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any, ClassVar

from agent.config import SourceConfig
from agent.errors import SourceError, SourceUnavailableError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
FRAME_FORMATS = ("bytes", "slcan", "candump", "packed")

# struct can_frame: can_id (flags in the top 3 bits), dlc, 3 pad bytes, 8 data bytes.
PACKED_FRAME = struct.Struct("=IB3x8s")
CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_EFF_MASK = 0x1FFFFFFF
CAN_SFF_MASK = 0x7FF
CAN_MAX_DLEN = 8


def check_can_frame(can_id: int, data: bytes, extended: bool) -> None:
    """Refuse, before anything reaches the bus, an id that does not fit 29 bits (11 for a
    standard frame) or more than 8 data bytes: the caller's mistake, a ValueError."""
    mask = CAN_EFF_MASK if extended else CAN_SFF_MASK
    if not 0 <= can_id <= mask:
        raise ValueError(f"CAN id {can_id:#x} does not fit {'29' if extended else '11'} bits")
    if len(data) > CAN_MAX_DLEN:
        raise ValueError(f"a CAN frame carries at most {CAN_MAX_DLEN} data bytes, not {len(data)}")


def pack_can_frame(can_id: int, data: bytes, extended: bool = True) -> bytes:
    """One data frame as a 16-byte ``struct can_frame`` record (the ``packed`` format)."""
    check_can_frame(can_id, data, extended)
    return PACKED_FRAME.pack(can_id | CAN_EFF_FLAG if extended else can_id, len(data), bytes(data))


class Source:
    """A device the agent reads bytes from; owns its reconnect schedule and counters."""

    #: What ``read()`` returns: one of FRAME_FORMATS; every concrete source sets it.
    frame_format: ClassVar[str]

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.where = cfg.port
        self.is_open = False
        self.finished = False
        self.backoff = BACKOFF_FIRST
        self.next_attempt = 0.0
        self.opens = 0
        self.open_failures = 0
        self.disconnects = 0
        self.bytes_read = 0
        self.last_error = ""
        self.read_pass = 0  # which pass of a looped replay the last read belongs to; 0 for a device

    def fileno(self) -> int:
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> bytes:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def send_frame(self, can_id: int, data: bytes, extended: bool = True) -> None:
        """Transmit one CAN data frame; ValueError for a frame CAN cannot carry,
        SourceError where this source cannot transmit, SourceUnavailableError if closed."""
        if self.frame_format != "packed":
            raise SourceError(f"source {self.name!r} ({self.cfg.kind}) does not carry CAN frames")
        self.write(pack_can_frame(can_id, data, extended))

    def next_due(self) -> float | None:
        """The monotonic time data is next due, for sources paced by a clock; else None."""
        return None

    def poll_open(self, now: float | None = None) -> bool:
        """Open the device if it is closed and its backoff has run out; True if it opened.
        A finished source is never reopened."""
        now = time.monotonic() if now is None else now
        if self.is_open or self.finished or now < self.next_attempt:
            return False
        try:
            self._open()
        except SourceUnavailableError as e:
            self.open_failures += 1
            self._schedule_retry(now, str(e))
            return False
        self.is_open = True
        self.opens += 1
        self.backoff = BACKOFF_FIRST
        log.info("source %s: opened %s", self.name, self.where)
        return True

    def read(self) -> bytes:
        """Data available now, in ``frame_format`` (b"" if none); a lost device closes the
        source for a retry, a finished one closes it for good (after returning its last data)."""
        if not self.is_open:
            return b""
        try:
            data = self._read()
        except SourceUnavailableError as e:
            self.disconnects += 1
            self.close()
            self._schedule_retry(time.monotonic(), str(e))
            return b""
        self.bytes_read += len(data)
        if self.finished:
            self.close()
        return data

    def _finish(self, reason: str) -> None:
        """Called by a subclass whose input has ended for good: close after this read, no retry."""
        self.finished = True
        self.last_error = reason
        log.info("source %s: %s; finished", self.name, reason)

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self._close()

    def _schedule_retry(self, now: float, reason: str) -> None:
        self.last_error = reason
        self.next_attempt = now + self.backoff
        log.warning("source %s: %s; retrying in %.1f s", self.name, reason, self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.cfg.kind, "port": self.cfg.port, "open": self.is_open,
            "opens": self.opens, "open_failures": self.open_failures, "disconnects": self.disconnects,
            "bytes": self.bytes_read, "last_error": self.last_error, "finished": self.finished,
            "format": getattr(self, "frame_format", ""),
        }
