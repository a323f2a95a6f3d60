"""The power-loss input: the supply is going, so the agent stops as on SIGTERM (the
outbox committed, the last state published, exit 0) while the hold-up time lasts.

``[power] loss_input`` names it (agent/config.py checks the form):

``file:PATH``
    The stop fires when PATH is created, replaced or touched (its inode or mtime
    changes), say by a UPS HAT's daemon. The main loop stats PATH at most every
    FILE_POLL_S: about a microsecond on tmpfs, ten times a second, and the loss is
    seen within 0.1 s of the 2 s budget. inotify would need ctypes and a watch on
    a directory that may not exist yet; a stat cannot miss the file.
    If PATH is a FIFO when the agent starts, a byte written to it (``echo > PATH``)
    fires the stop instead. The FIFO is opened read-write, so it needs no writer to
    stay open and never reads end-of-file, and its descriptor waits in the loop's
    selector: it costs nothing until the byte comes.
``gpio:CHIP:LINE``
    A GPIO line, through libgpiod's v2 Python bindings (PyPI ``gpiod``, imported
    here and nowhere else, and only for such an input). The stop fires on the
    line's edge into its active level: rising, or falling with ``active_low``.
    The line request's descriptor waits in the loop's selector.

What already says "power lost" when the agent starts (the file there, bytes in the
FIFO, the line active) is logged as a warning and not acted on. An agent that stopped
at once would be restarted at once by systemd. After a brown-out that leaves the
signal set, it would run into systemd's start limit, and the vehicle would be left
without its agent. A real loss takes the agent down with the unit anyway, and the
outbox is crash-safe (SQLite WAL), so what was committed survives either way.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import selectors
import stat
from typing import Any, Protocol

from agent.errors import ConfigError


class PowerConfig(Protocol):
    """What of agent.config's PowerConfig this module reads (config.py imports this module
    for gpiod_problem, so it cannot import config back)."""

    @property
    def kind(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def line(self) -> str: ...
    @property
    def active_low(self) -> bool: ...
    @property
    def bias(self) -> str: ...

log = logging.getLogger(__name__)

FILE_POLL_S = 0.1
CONSUMER = "ebike-agent"  # how `gpioinfo` names the holder of the line
MAX_READS = 64  # a FIFO drained at most this many reads of 4 KiB a turn


class LossInput:
    """No input (``loss_input = ""``): the power is never said to be lost."""

    what = "none"

    def __init__(self) -> None:
        self.said = False

    def fileno(self) -> int | None:
        """The descriptor the loop's selector waits on, for inputs that have one."""
        return None

    def register(self, selector: selectors.BaseSelector) -> None:
        """Wait in ``selector``; the runtime calls ``read()`` when it is ready."""
        fd = self.fileno()
        if fd is not None:
            selector.register(fd, selectors.EVENT_READ, self)

    def read(self) -> None:
        """The descriptor is readable: see what it says."""

    def lost(self, mono: float) -> bool:
        """Once a turn of the main loop: has the power been lost?"""
        return self.said

    def close(self) -> None:
        """Release what the input holds (file descriptor, GPIO line)."""

    def _say(self, why: str) -> None:
        if not self.said:
            self.said = True
            log.warning("power lost (%s): stopping", why)


class FileInput(LossInput):
    """``file:PATH`` (not a FIFO): PATH created, replaced or touched."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.what = f"file {path}"
        self.seen = _identity(path)
        self.next_check = 0.0
        if self.seen is not None:
            log.warning("power-loss file %s is there at the start: taken as left from before; the agent "
                        "stops when it is created again or touched", path)
        elif not os.path.isdir(os.path.dirname(path)):
            log.warning("power-loss file %s: its directory does not exist (yet)", path)

    def lost(self, mono: float) -> bool:
        if not self.said and mono >= self.next_check:
            self.next_check = mono + FILE_POLL_S
            now = _identity(self.path)
            if now is not None and now != self.seen:
                self._say(f"{self.path} appeared")
        return self.said


def _identity(path: str) -> tuple[int, int, int] | None:
    """What tells one file at ``path`` from another, or from itself touched; None: none there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


class FifoInput(LossInput):
    """``file:PATH`` where PATH is a FIFO: a byte written to it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.what = f"FIFO {path}"
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if self._drain():
            log.warning("power-loss FIFO %s held bytes written before this agent started: ignored", path)

    def fileno(self) -> int | None:
        return self.fd

    def read(self) -> None:
        if self._drain():
            self._say(f"a byte on {self.path}")

    def _drain(self) -> bool:
        got = False
        for _ in range(MAX_READS):
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            got = got or bool(data)
        return got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GpioInput(LossInput):
    """``gpio:CHIP:LINE``: the line's edge into its active level."""

    def __init__(self, chip: str, line: str, active_low: bool, bias: str) -> None:
        super().__init__()
        gpiod = _gpiod()
        self.what = f"GPIO line {line} of {chip}{' (active low)' if active_low else ''}"
        settings = gpiod.LineSettings(direction=gpiod.line.Direction.INPUT, edge_detection=gpiod.line.Edge.RISING,
                                      active_low=active_low, bias=getattr(gpiod.line.Bias, _bias_name(bias)))
        self.request, self.offset = _request(gpiod, chip, line, settings)
        if self.request.get_value(self.offset) == gpiod.line.Value.ACTIVE:
            log.warning("power-loss %s is active at the start: taken as left from before; the agent stops "
                        "when it goes inactive and active again", self.what)

    def fileno(self) -> int | None:
        return int(self.request.fd)

    def read(self) -> None:
        if self.request.read_edge_events():
            self._say(f"{self.what} active")

    def close(self) -> None:
        if self.request:
            self.request.release()


def _request(gpiod: Any, chip_path: str, line: str, settings: Any) -> tuple[Any, int]:
    """The line requested for edge events, and its offset; ValueError says what is wrong."""
    try:
        chip = gpiod.Chip(chip_path)
    except OSError as e:
        raise ValueError(f"{chip_path}: {e.strerror}") from e
    with chip:
        try:
            offset = int(chip.line_offset_from_id(int(line) if line.isdigit() else line))
        except (OSError, ValueError) as e:
            raise ValueError(f"{chip_path} has no line {line} (it has {chip.get_info().num_lines}; gpioinfo "
                             "lists their offsets and names)") from e
        try:
            return chip.request_lines(config={offset: settings}, consumer=CONSUMER), offset
        except OSError as e:
            held = " (another program holds it: gpioinfo names it)" if e.errno == errno.EBUSY else ""
            raise ValueError(f"line {line} of {chip_path}: {e.strerror}{held}") from e


def _bias_name(bias: str) -> str:
    """Config's ``pull-up`` as libgpiod's ``Bias.PULL_UP``."""
    return bias.upper().replace("-", "_")


def open_input(power: PowerConfig, config_path: str) -> LossInput:
    """The input ``[power]`` names, opened; one that cannot be opened refuses the start."""
    try:
        if power.kind == "gpio":
            got: LossInput = GpioInput(power.path, power.line, power.active_low, power.bias)
        elif power.kind == "file" and _is_fifo(power.path):
            got = FifoInput(power.path)
        elif power.kind == "file":
            got = FileInput(power.path)
        else:
            return LossInput()
    except OSError as e:
        raise ConfigError(config_path, "power.loss_input", f"cannot open {power.path}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(config_path, "power.loss_input", str(e)) from e
    log.info("power-loss input: %s", got.what)
    return got


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def gpiod_problem() -> str | None:
    """Why a ``gpio:`` input cannot be had on this machine; None: it can."""
    try:
        gpiod = _gpiod()
    except ImportError:
        return ("needs libgpiod's Python bindings, which are not installed: pip install gpiod "
                "(Debian 13 and later: apt install python3-libgpiod)")
    if not hasattr(gpiod, "request_lines"):
        return (f"needs libgpiod's version 2 Python bindings; {getattr(gpiod, '__file__', 'gpiod')} has "
                "version 1's (Debian 12's python3-libgpiod): pip install 'gpiod>=2'")
    return None


def _gpiod() -> Any:
    """libgpiod's bindings, imported here only, when a ``gpio:`` input is configured."""
    return importlib.import_module("gpiod")
