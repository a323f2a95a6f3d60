"""Any adapter python-can drives (PCAN, Kvaser, Vector, IXXAT, gs_usb, virtual, ...).

Optional: ``pip install .[can]``. python-can is imported here and nowhere else, and
this module is imported only when a source of kind ``python-can`` is configured (the
registry in agent.sources), so a missing python-can fails only that source.

``read()`` returns ``packed`` records (16-byte ``struct can_frame``, see base.py), the
same as the SocketCAN source, so the kernel cannot tell the two apart.

Waking the selector: when the bus has a file descriptor (``bus.fileno()``: python-can's
socketcan bus and a few others) the runtime selects on it and ``read()`` drains the
bus with ``recv(0)``. Most vendor drivers have none: they deliver through a DLL
callback or an event handle that a selector cannot wait on. For those a
``can.Notifier`` thread blocks in ``bus.recv()``, queues the messages and writes a
byte to a pipe whose read end is our ``fileno()``; that one thread is the price of
keeping the runtime a single selector loop rather than polling every adapter.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Any

from agent.config import SourceConfig
from agent.errors import SourceError, SourceUnavailableError
from agent.sources.base import (
    CAN_EFF_FLAG,
    CAN_EFF_MASK,
    CAN_ERR_FLAG,
    CAN_RTR_FLAG,
    CAN_SFF_MASK,
    PACKED_FRAME,
    Source,
)

try:
    import can
except ImportError as e:  # re-raised with the fix; the registry turns it into a SourceError
    raise ImportError(f"python-can is not installed, needed by kind python-can: pip install .[can] ({e})") from e

MAX_FRAMES = 1024
MAX_QUEUE = 100_000  # messages the notifier thread may hold while the loop is busy
NOTIFIER_TIMEOUT = 0.1  # how long the thread blocks in recv(), so close() is quick
ERROR_THROTTLE = 0.1


def pack_message(msg: can.Message) -> bytes | None:
    """A python-can Message as a 16-byte ``struct can_frame``; None for a CAN FD frame."""
    if msg.is_fd:
        return None
    if msg.is_extended_id:
        can_id = (msg.arbitration_id & CAN_EFF_MASK) | CAN_EFF_FLAG
    else:
        can_id = msg.arbitration_id & CAN_SFF_MASK
    if msg.is_remote_frame:
        can_id |= CAN_RTR_FLAG
    if msg.is_error_frame:
        can_id |= CAN_ERR_FLAG
    return PACKED_FRAME.pack(can_id, min(msg.dlc, 8), bytes(msg.data[:8]))


def unpack_message(record: bytes) -> can.Message:
    """The python-can Message for one 16-byte ``struct can_frame``."""
    can_id, dlc, data = PACKED_FRAME.unpack(record)
    extended = bool(can_id & CAN_EFF_FLAG)
    remote = bool(can_id & CAN_RTR_FLAG)
    return can.Message(arbitration_id=can_id & (CAN_EFF_MASK if extended else CAN_SFF_MASK),
                       is_extended_id=extended, is_remote_frame=remote,
                       is_error_frame=bool(can_id & CAN_ERR_FLAG),
                       dlc=min(dlc, 8), data=b"" if remote else data[:min(dlc, 8)])


class _PipeListener(can.Listener):
    """Runs in the Notifier's thread: queue the message, make the pipe readable."""

    def __init__(self, source: PythonCanSource) -> None:
        self.source = source

    def on_message_received(self, msg: can.Message) -> None:
        src = self.source
        if len(src.queue) >= MAX_QUEUE:
            src.overflows += 1
            return
        src.queue.append(msg)
        src.wake()

    def on_error(self, exc: Exception) -> None:
        # Handled (so the thread does not die with a traceback): the loop's next read()
        # reports it and closes the bus. Throttled, since the thread calls recv() again.
        self.source.error = exc
        self.source.wake()
        time.sleep(ERROR_THROTTLE)


class PythonCanSource(Source):
    """A python-can bus: ``can.Bus(interface, channel, bitrate)``, read as ``packed`` frames."""

    frame_format = "packed"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        if cfg.interface not in can.VALID_INTERFACES:
            raise SourceError(f"source {cfg.name!r}: python-can has no interface {cfg.interface!r} "
                              f"(it has {', '.join(sorted(can.VALID_INTERFACES))})")
        self.where = f"{cfg.interface}:{cfg.channel}" if cfg.channel else cfg.interface
        self.bus: can.BusABC | None = None
        self.notifier: can.Notifier | None = None
        self.queue: collections.deque[can.Message] = collections.deque()
        self.error: Exception | None = None
        self._fd = -1
        self._rfd = -1
        self._wfd = -1
        self.frames = 0
        self.fd_dropped = 0
        self.overflows = 0

    def fileno(self) -> int:
        fd = self._fd if self._fd >= 0 else self._rfd
        if fd < 0:
            raise SourceError(f"{self.where} is not open")
        return fd

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"interface": self.cfg.interface, "bitrate": self.cfg.bitrate}
        if self.cfg.channel:
            kwargs["channel"] = self.cfg.channel
        try:
            self.bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ImportError, ValueError) as e:
            raise SourceUnavailableError(f"python-can {self.where}: {e}") from e
        self.queue.clear()
        self.error = None
        try:
            self._fd = int(self.bus.fileno())
        except NotImplementedError:
            self._fd = -1
        if self._fd >= 0:
            return
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self.notifier = can.Notifier(self.bus, [_PipeListener(self)], timeout=NOTIFIER_TIMEOUT)

    def _close(self) -> None:
        if self.notifier is not None:
            self.notifier.stop(timeout=5 * NOTIFIER_TIMEOUT + 1)
            self.notifier = None
        if self.bus is not None:
            try:
                self.bus.shutdown()
            except (can.CanError, OSError) as e:
                self.last_error = f"shutdown: {e}"
            self.bus = None
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._rfd = self._wfd = -1

    def wake(self) -> None:
        """Make the pipe readable (from the notifier thread, or to leave it readable)."""
        with contextlib.suppress(OSError):  # full: readable anyway; closed: the source is closing
            os.write(self._wfd, b"\0")

    def _read(self) -> bytes:
        assert self.bus is not None
        out: list[bytes] = []
        if self._fd >= 0:
            try:
                while len(out) < MAX_FRAMES and (msg := self.bus.recv(0)) is not None:
                    self._add(msg, out)
            except (can.CanError, OSError) as e:
                if not out:
                    raise SourceUnavailableError(f"python-can {self.where} lost: {e}") from e
            return b"".join(out)
        # Drain the wake-ups first: a message queued after this gets its own byte.
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        while len(out) < MAX_FRAMES and self.queue:
            self._add(self.queue.popleft(), out)
        if self.queue:
            self.wake()
        elif self.error is not None and not out:
            raise SourceUnavailableError(f"python-can {self.where} lost: {self.error}")
        return b"".join(out)

    def _add(self, msg: can.Message, out: list[bytes]) -> None:
        record = pack_message(msg)
        if record is None:
            self.fd_dropped += 1
        else:
            out.append(record)
            self.frames += 1

    def write(self, data: bytes) -> None:
        """Send one or more 16-byte ``packed`` records on the bus."""
        if self.bus is None:
            raise SourceUnavailableError(f"{self.where} is not open")
        size = PACKED_FRAME.size
        if not data or len(data) % size:
            raise SourceError(f"write wants whole {size}-byte can_frame records, got {len(data)} bytes")
        for off in range(0, len(data), size):
            try:
                self.bus.send(unpack_message(data[off:off + size]), timeout=0.1)
            except can.CanOperationError as e:
                raise SourceError(f"python-can {self.where}: send failed: {e}") from e

    def status(self) -> dict[str, Any]:
        return super().status() | {"frames": self.frames, "fd_dropped": self.fd_dropped,
                                   "overflows": self.overflows, "queued": len(self.queue)}
