"""Replay of a ``candump -L`` log (can-utils) as if the bus were live.

The log's first timestamp maps to the moment the source opens; each later line is due
``(t - t_first) / replay_speed`` seconds after that (``replay_speed`` 0: all at once).
Lines are passed through byte for byte (``frame_format = "candump"``); only the
timestamp field is read, cheaply, to pace them. A line without a usable timestamp
keeps the previous line's time and is passed on all the same: the kernel counts it.

How it fits the runtime's selector loop (Python 3.11 has no ``os.timerfd_create``):
``fileno()`` is the read end of a pipe, and ``next_due()`` returns the monotonic time
the next line is due. The runtime shortens its select timeout to that time; when it
calls ``next_due()`` again and the line is due by then, the source writes a byte to the
pipe, so the fd is readable and the normal "fd ready -> read()" path picks it up. (A
runtime may also just call ``read()`` once ``next_due() <= now``.) ``read()`` returns
every line due by now, at most MAX_LINES per call so one read never stalls the loop,
and leaves the pipe readable while more lines are due.

At the end of the log: with ``loop`` the replay starts again (the first line of the
new pass is due when the last line of the old one was); without, the source finishes
(``finished = True``, closed, never reopened).
"""

from __future__ import annotations

import math
import os
import time
from typing import IO, Any

from agent.config import SourceConfig
from agent.errors import SourceError, SourceUnavailableError
from agent.sources.base import Source

MAX_LINES = 5000
MAX_LINE = 4096  # a candump -L CAN FD line is < 300 bytes; longer is damage


def line_time(line: bytes) -> float | None:
    """The ``(<sec>.<usec>)`` timestamp of a candump -L line, or None if it has none."""
    if line[:1] != b"(":
        line = line.lstrip()
        if line[:1] != b"(":
            return None
    end = line.find(b")", 1, 32)
    if end < 0:
        return None
    try:
        t = float(line[1:end])
    except ValueError:
        return None
    return t if math.isfinite(t) else None


class CandumpSource(Source):
    """A ``candump -L`` log replayed in real, scaled or no time; see the module docstring."""

    frame_format = "candump"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.speed = cfg.replay_speed
        self.file: IO[bytes] | None = None
        self._rfd = -1
        self._wfd = -1
        self._armed = False
        self.started = 0.0  # monotonic time the replay (its first pass) began
        self._base = 0.0  # monotonic time the current pass's first timestamp maps to
        self._t0: float | None = None  # first timestamp of the current pass
        self._t_prev: float | None = None  # timestamp of the previous line
        self._pending: bytes | None = None  # the next line, not yet due
        self._pending_due = 0.0
        self._last_due = 0.0
        self._pass_lines = 0
        self._eof = False
        self.lines = 0
        self.passes = 0
        self._pending_pass = 0
        self.bad_timestamps = 0
        self.overlong = 0

    def fileno(self) -> int:
        if self._rfd < 0:
            raise SourceError(f"{self.cfg.port}: replay is not open")
        return self._rfd

    def _open(self) -> None:
        try:
            self.file = open(self.cfg.port, "rb")  # noqa: SIM115 (closed in _close)
        except OSError as e:
            raise SourceUnavailableError(f"cannot open {self.cfg.port}: {e.strerror or e}") from e
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._armed = False
        self.started = self._base = self._last_due = time.monotonic()
        self._t0 = self._t_prev = None
        self._pending = None
        self._pass_lines = 0
        self._eof = False
        self.passes = 1
        self._fetch()
        self._rearm(self.started)

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        self._armed = False
        self._pending = None

    def send_frame(self, can_id: int, data: bytes, extended: bool = True) -> None:
        """A log replay has no bus to transmit on: always SourceError."""
        raise SourceError(f"source {self.name!r} replays the candump log {self.cfg.port}: it cannot transmit "
                          "CAN frames (use an slcan, socketcan or python-can source)")

    def next_due(self) -> float | None:
        """When the next line is due (monotonic); arms the fd if that is now. None when closed."""
        if not self.is_open:
            return None
        due = self._pending_due if self._pending is not None else time.monotonic()  # EOF: read() finishes
        if due <= time.monotonic():
            self._arm()
        return due

    def _read(self) -> bytes:
        """Due lines, all of one pass (so the runtime can re-anchor each pass's timestamps,
        which start over when the log loops: ``read_pass`` says which pass they are)."""
        now = time.monotonic()
        out: list[bytes] = []
        while len(out) < MAX_LINES:
            if self._pending is None and not self._fetch():
                break
            if self._pending_due > now or (out and self._pending_pass != self.read_pass):
                break
            assert self._pending is not None
            self.read_pass = self._pending_pass
            out.append(self._pending)
            self._pending = None
        self.lines += len(out)
        if self._pending is None and not self._eof:
            self._fetch()  # stopped at MAX_LINES: look ahead, so next_due() is exact
        if self._pending is None and self._eof:
            self._finish(f"end of log {self.cfg.port} after {self.lines} lines")
        else:
            self._rearm(now)
        return b"".join(out)

    def _fetch(self) -> bool:
        """Read the next line into ``_pending`` with its due time; False at the end of the log."""
        assert self.file is not None
        try:
            line = self.file.readline(MAX_LINE)
            if not line and self.cfg.loop and self._pass_lines:
                self.file.seek(0)
                self.passes += 1
                self._pass_lines = 0
                self._base = self._last_due
                self._t0 = self._t_prev = None
                line = self.file.readline(MAX_LINE)
            if line and not line.endswith(b"\n"):
                if len(line) >= MAX_LINE:
                    self.overlong += 1
                    while (rest := self.file.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                        pass
                line += b"\n"
        except OSError as e:
            raise SourceUnavailableError(f"{self.cfg.port}: {e.strerror or e}") from e
        if not line:
            self._eof = True
            return False
        self._pass_lines += 1
        t = line_time(line)
        if t is None:
            self.bad_timestamps += 1
            t = self._t_prev
        else:
            self._t_prev = t
            if self._t0 is None:
                self._t0 = t
        if t is None or self._t0 is None or self.speed == 0:
            due = self._base
        else:
            due = self._base + (t - self._t0) / self.speed
        self._pending = line
        self._pending_pass = self.passes
        self._pending_due = self._last_due = due
        return True

    def _rearm(self, now: float) -> None:
        """Keep the fd readable exactly while something is due (a line, or the end of the log)."""
        if self._pending is None or self._pending_due <= now:
            self._arm()
        else:
            self._disarm()

    def _arm(self) -> None:
        if not self._armed and self._wfd >= 0:
            os.write(self._wfd, b"\0")
            self._armed = True

    def _disarm(self) -> None:
        if self._armed:
            try:
                while os.read(self._rfd, 64):
                    pass
            except BlockingIOError:
                pass
            self._armed = False

    def status(self) -> dict[str, Any]:
        return super().status() | {"lines": self.lines, "passes": self.passes,
                                   "bad_timestamps": self.bad_timestamps, "overlong": self.overlong}
