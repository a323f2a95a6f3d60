"""SLCAN (Lawicel ASCII) USB-CAN adapters: the open handshake and sending frames.

The host transmits ``TIIIIIIIIL<data>`` CR (``send_frame``); the adapter answers
``z``/``Z`` CR, or BEL if it refuses. Received lines go to the kernel's own parser on
the hot path; the strict reader of the format is agent.protocols.slcan.
"""

from __future__ import annotations

import logging

from agent.errors import SourceUnavailableError
from agent.sources.base import check_can_frame
from agent.sources.uart import UartSource

log = logging.getLogger(__name__)

BITRATE_CODES = {10000: b"S0", 20000: b"S1", 50000: b"S2", 100000: b"S3", 125000: b"S4",
                 250000: b"S5", 500000: b"S6", 800000: b"S7", 1000000: b"S8"}
REPLY_TIMEOUT = 1.0


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
