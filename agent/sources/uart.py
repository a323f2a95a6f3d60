"""A serial port through pyserial (the one module that imports it)."""

from __future__ import annotations

import time

import serial

from agent.config import SourceConfig
from agent.errors import SourceUnavailableError
from agent.sources.base import Source

# The config's framing values (agent.config: PARITIES, STOPBITS, bytesize 5-8) in pyserial's terms.
BYTESIZES = {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}
PARITIES = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD,
            "M": serial.PARITY_MARK, "S": serial.PARITY_SPACE}
STOPBITS = {1.0: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2.0: serial.STOPBITS_TWO}


class UartSource(Source):
    """A UART (USB-serial adapter, pty): non-blocking reads of whatever has arrived."""

    frame_format = "bytes"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.port: serial.Serial | None = None

    def fileno(self) -> int:
        assert self.port is not None
        return int(self.port.fileno())

    def _open(self) -> None:
        try:
            self.port = serial.Serial(self.cfg.port, self.cfg.baudrate, bytesize=BYTESIZES[self.cfg.bytesize],
                                      parity=PARITIES[self.cfg.parity], stopbits=STOPBITS[self.cfg.stopbits],
                                      timeout=0, write_timeout=1.0)
        except (serial.SerialException, OSError, ValueError) as e:
            raise SourceUnavailableError(f"cannot open {self.cfg.port}: {e}") from e

    def probe(self) -> None:
        """Open the port as ``_open`` does and close it again, nothing read or written
        (``ebike-agent config check``); SourceUnavailableError says why it would not."""
        self._open()
        assert self.port is not None
        self.port.close()
        self.port = None

    def _read(self) -> bytes:
        assert self.port is not None
        try:
            return bytes(self.port.read(max(self.port.in_waiting, 1)))
        except (serial.SerialException, OSError) as e:
            raise SourceUnavailableError(f"{self.cfg.port} lost: {e}") from e

    def _close(self) -> None:
        if self.port is not None:
            self.port.close()
            self.port = None

    def write(self, data: bytes) -> None:
        """Write all of ``data`` (commands, polls); a lost device is SourceUnavailableError."""
        if self.port is None:
            raise SourceUnavailableError(f"{self.cfg.port} is not open")
        try:
            self.port.write(data)
            self.port.flush()
        except (serial.SerialException, OSError) as e:
            raise SourceUnavailableError(f"{self.cfg.port} lost: {e}") from e

    def read_reply(self, timeout: float) -> bytes:
        """Block up to ``timeout`` s for one reply ending in CR or BEL (adapter handshakes)."""
        if self.port is None:
            raise SourceUnavailableError(f"{self.cfg.port} is not open")
        reply = b""
        deadline = time.monotonic() + timeout
        try:
            # read_until(b"\r") alone would sit out the timeout after a BEL, the refusal.
            while len(reply) < 64 and not reply.endswith((b"\r", b"\x07")):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.port.timeout = left
                reply += bytes(self.port.read(1))
        except (serial.SerialException, OSError) as e:
            raise SourceUnavailableError(f"{self.cfg.port} lost: {e}") from e
        finally:
            if self.port is not None:
                self.port.timeout = 0
        return reply
