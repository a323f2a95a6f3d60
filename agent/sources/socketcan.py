"""SocketCAN (Linux): a raw ``AF_CAN``/``CAN_RAW`` socket bound to one interface.

The kernel already delivers ``struct can_frame`` records, 16 bytes each, which is the
``packed`` format the fusion kernel takes: ``read()`` drains up to MAX_FRAMES of them
per wake-up straight into one buffer and returns it, no per-frame Python work. CAN FD
(72-byte frames) is not enabled (no CAN_RAW_FD_FRAMES), so every record is 16 bytes.
Error frames are asked for (CAN_RAW_ERR_FILTER), so bus-off and friends reach the
kernel's counters with the ERR flag set.

A kernel without AF_CAN (the container CI runs in) and an absent interface (a USB
adapter not plugged in) are SourceUnavailableError, with the reason spelled out, so
the base class retries with backoff.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from agent.config import SourceConfig
from agent.errors import SourceError, SourceUnavailableError
from agent.sources.base import PACKED_FRAME, Source

MAX_FRAMES = 1024
FRAME_SIZE = PACKED_FRAME.size  # 16
CAN_ERR_MASK = 0x1FFFFFFF
# Linux <linux/can/raw.h>; socket exposes them only where Python was built with CAN support.
SOL_CAN_RAW = getattr(socket, "SOL_CAN_RAW", 101)
CAN_RAW_ERR_FILTER = getattr(socket, "CAN_RAW_ERR_FILTER", 2)
NO_AF_CAN = "this kernel has no AF_CAN (SocketCAN); load can/can-raw or use slcan or candump"
_LOST = (errno.ENODEV, errno.ENXIO, errno.ENETDOWN)


def open_can_socket(ifname: str) -> socket.socket:
    """A non-blocking CAN_RAW socket bound to ``ifname``; SourceUnavailableError says why not."""
    af_can = getattr(socket, "AF_CAN", None)
    if af_can is None:
        raise SourceUnavailableError(f"{NO_AF_CAN} (this Python was built without it)")
    try:
        sock = socket.socket(af_can, socket.SOCK_RAW, socket.CAN_RAW)
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise SourceUnavailableError(NO_AF_CAN) from e
        raise SourceUnavailableError(f"cannot create a CAN socket: {e.strerror or e}") from e
    try:
        sock.setsockopt(SOL_CAN_RAW, CAN_RAW_ERR_FILTER, struct.pack("=I", CAN_ERR_MASK))
        sock.bind((ifname,))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise SourceUnavailableError(f"no such interface {ifname}") from e
        raise SourceUnavailableError(f"cannot bind to {ifname}: {e.strerror or e}") from e
    return sock


class SocketcanSource(Source):
    """A SocketCAN interface (``can0``, ``vcan0``): ``packed`` frames, non-blocking."""

    frame_format = "packed"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.sock: socket.socket | None = None
        self._buf = bytearray(MAX_FRAMES * FRAME_SIZE)
        self.frames = 0
        self.tx_frames = 0
        self.tx_dropped = 0

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def _open(self) -> None:
        self.sock = open_can_socket(self.cfg.port)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _read(self) -> bytes:
        assert self.sock is not None
        view = memoryview(self._buf)
        off = 0
        try:
            while off < len(self._buf):
                n = self.sock.recv_into(view[off:off + FRAME_SIZE], FRAME_SIZE)
                if n != FRAME_SIZE:  # not a classic frame (FD is off): skip it
                    continue
                off += FRAME_SIZE
        except BlockingIOError:
            pass
        except OSError as e:
            # Frames already drained are kept; a lasting error comes back on the next read.
            if not off:
                what = "lost" if e.errno in _LOST else "failed"
                raise SourceUnavailableError(f"{self.cfg.port} {what}: {e.strerror or e}") from e
        finally:
            view.release()
        self.frames += off // FRAME_SIZE
        return bytes(self._buf[:off])

    def write(self, data: bytes) -> None:
        """Send one or more 16-byte ``packed`` records. A full transmit queue drops the
        frame (SourceError); a vanished interface is SourceUnavailableError."""
        if self.sock is None:
            raise SourceUnavailableError(f"{self.cfg.port} is not open")
        if not data or len(data) % FRAME_SIZE:
            raise SourceError(f"write wants whole {FRAME_SIZE}-byte can_frame records, got {len(data)} bytes")
        for off in range(0, len(data), FRAME_SIZE):
            try:
                self.sock.send(data[off:off + FRAME_SIZE])
            except (BlockingIOError, InterruptedError) as e:
                self.tx_dropped += 1
                raise SourceError(f"{self.cfg.port}: transmit queue full, frame dropped") from e
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.tx_dropped += 1
                    raise SourceError(f"{self.cfg.port}: transmit queue full, frame dropped") from e
                raise SourceUnavailableError(f"{self.cfg.port} lost: {e.strerror or e}") from e
            self.tx_frames += 1

    def status(self) -> dict[str, Any]:
        return super().status() | {"frames": self.frames, "tx_frames": self.tx_frames,
                                   "tx_dropped": self.tx_dropped}
