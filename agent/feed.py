"""The decode stage: a source's bytes into the fusion kernel, one kernel call per read.

One feed per source, chosen by the source's frame format (``make_feed``):

- ``UartFeed``: a UART protocol's framer and decoder, catalogue samples into the
  kernel; a polled protocol also gets its requests sent;
- ``CanTextFeed``: SLCAN or candump text, parsed by the kernel; the feed keeps the
  unfinished line;
- ``PackedFeed``: SocketCAN / python-can ``struct can_frame`` records.

Each answers ``feed(data, now, src)`` for a read and ``tick(src, now)`` once a turn,
with the kernel's outputs, and tags what it hands the kernel with its source's index.
Also here: the kernel as the configuration sets it up, and the DBC behind a CAN protocol.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from agent.config import CAN_KINDS, Config, SourceConfig
from agent.dbc.compile import CompiledDbc, compile_isolated, profile_path
from agent.errors import ConfigError, DecodeError, SourceUnavailableError
from agent.fusion.kernel import Kernel, KernelApi
from agent.protocols import protocol
from agent.signals import BY_NAME, ID_SPACE, limits
from agent.sources.base import Source
from agent.sources.candump import line_time

log = logging.getLogger(__name__)

MAX_TEXT_LINE = 4096
# After this long without bytes, a framer waiting on a false start's length gives up.
QUIET_LINE = 0.2


class Feed(Protocol):
    """What the runtime's loop asks of every feed."""

    def feed(self, data: bytes, now: float, src: Source | None = None) -> list[Any]:
        """A read's bytes into the kernel; the windows, alarms and changes that closed."""

    def tick(self, src: Source, now: float) -> list[Any]:
        """Once a turn, data or not; what closed."""

    def frames_outside_kernel(self) -> int:
        """Frames this feed decoded itself (the kernel counts those it parses)."""

    def status(self) -> dict[str, Any]:
        """The ``decode`` part of the source's status."""


class UartFeed:
    """A UART protocol stream (NMEA, JBD, Daly, Ninebot, KT, Sur-Ron) into the kernel;
    ``slot`` is the source's health slot in the kernel."""

    def __init__(self, cfg: SourceConfig, kernel: KernelApi, index: int, slot: int) -> None:
        self.proto = protocol(cfg.protocol)
        self.framer = self.proto.framer()
        self.poller = self.proto.poller(cfg.poll_interval, cfg.poll_timeout) if cfg.poll_interval > 0 else None
        self.kernel = kernel
        self.index = index
        self.slot = slot
        self.ok = 0
        self.not_understood = 0
        self.bad: dict[str, int] = {}
        self.checksum_errors = 0
        self.last_data = time.monotonic()

    def feed(self, data: bytes, now: float, src: Source | None = None) -> list[Any]:
        self.last_data = time.monotonic()
        return self._frames(self.framer.feed(data), now)

    def _frames(self, frames: list[bytes], now: float) -> list[Any]:
        ids: list[int] = []
        values: list[float] = []
        good = 0
        for frame in frames:
            if self.poller is not None:
                self.poller.answered(frame)
            if not self.proto.understood(frame):
                self.not_understood += 1
                continue
            try:
                decoded = self.proto.decode(frame)
            except DecodeError as e:
                reason = e.reason.split(":")[0]
                self.bad[reason] = self.bad.get(reason, 0) + 1
                continue
            self.ok += 1
            good += 1
            for name, value in decoded.items():
                ids.append(BY_NAME[name].id)
                values.append(value)
        # The source's health slot: good frames, and the framer's checksum refusals.
        self.kernel.source = self.index
        self.kernel.note_frames(self.slot, [now] * good)
        checksum = self.framer.bad.get("checksum", 0)
        if checksum != self.checksum_errors:
            self.kernel.note_errors(self.slot, checksum - self.checksum_errors, 0)
            self.checksum_errors = checksum
        return self.kernel.feed_values(ids, [now] * len(ids), values)

    def tick(self, src: Source, now: float) -> list[Any]:
        """A quiet line gives up a false start held in the framer; a due poll is sent."""
        mono = time.monotonic()
        closed: list[Any] = []
        flush = getattr(self.framer, "flush", None)
        if flush is not None and self.framer.pending and mono - self.last_data >= QUIET_LINE:
            closed = self._frames(flush(), now)
        if self.poller is not None and src.is_open:
            request = self.poller.due(mono)
            if request is not None:
                try:
                    src.write(request)
                except SourceUnavailableError as e:
                    log.warning("source %s: poll not sent: %s", src.name, e)
        return closed

    def frames_outside_kernel(self) -> int:
        return self.ok

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.proto.name, "frames": self.ok, "not_understood": self.not_understood,
                               "bad_frames": dict(self.framer.bad), "bad_content": dict(self.bad),
                               "garbage_bytes": self.framer.garbage_bytes}
        if self.poller is not None:
            out["poll"] = self.poller.stats()
        return out


class _KernelParsed:
    """A CAN feed: the kernel parses the frames (and counts them), nothing to do per turn."""

    def __init__(self, kernel: KernelApi, index: int) -> None:
        self.kernel = kernel
        self.index = index

    def tick(self, src: Source, now: float) -> list[Any]:
        return []

    def frames_outside_kernel(self) -> int:
        return 0


class CanTextFeed(_KernelParsed):
    """SLCAN or candump text straight into the kernel, one call per read; the kernel
    parses the complete lines and the feed keeps the unfinished one."""

    def __init__(self, fmt: str, kernel: KernelApi, index: int = 0) -> None:
        super().__init__(kernel, index)
        self.fmt = fmt
        self.tail = b""
        self.overlong = 0
        self.t_offset: float | None = None
        self.log_pass = 0
        self.last_line_time: float | None = None

    def feed(self, data: bytes, now: float, src: Source | None = None) -> list[Any]:
        """A looped log's ``src.read_pass`` says which pass the read is of (a read never
        mixes two)."""
        buf = self.tail + data
        self.kernel.source = self.index
        if self.fmt == "slcan":
            consumed, closed = self.kernel.feed_slcan(buf, now)
        else:
            consumed, closed = self.kernel.feed_candump(buf, self._log_time(buf, now, src.read_pass if src else 0))
        self.tail = buf[consumed:]
        if len(self.tail) > MAX_TEXT_LINE:
            self.overlong += 1
            self.tail = b""
        return closed

    def _log_time(self, buf: bytes, now: float, read_pass: int) -> float:
        """The offset from a candump log's timestamps to now."""
        first = line_time(buf)
        if self.t_offset is None:
            # A replayed log keeps its own timing, shifted so its first line is now.
            self.t_offset = now - (first or now)
        elif read_pass != self.log_pass and first is not None and self.last_line_time is not None:
            # The log starts over: its timestamps go back; carry on where the last pass ended.
            self.t_offset += self.last_line_time - first
        self.log_pass = read_pass
        self.last_line_time = line_time(buf[buf.rfind(b"\n", 0, len(buf) - 1) + 1:]) or self.last_line_time
        return self.t_offset

    def status(self) -> dict[str, Any]:
        return {"format": self.fmt, "overlong_lines": self.overlong}


class PackedFeed(_KernelParsed):
    """SocketCAN / python-can ``struct can_frame`` records into the kernel, one call per read."""

    def feed(self, data: bytes, now: float, src: Source | None = None) -> list[Any]:
        self.kernel.source = self.index
        return self.kernel.feed_packed(data, now)

    def status(self) -> dict[str, Any]:
        return {"format": "packed"}


def make_feed(cfg: SourceConfig, src: Source, index: int, kernel: KernelApi) -> Feed:
    """The source's feed; CAN messages count towards the health of the source (the
    kernel's tables are shared), a UART source gets a health slot of its own."""
    if src.frame_format == "bytes":
        return UartFeed(cfg, kernel, index, kernel.health_slot(index))
    kernel.set_can_source(index)
    return PackedFeed(kernel, index) if src.frame_format == "packed" else CanTextFeed(src.frame_format, kernel, index)


def dbc_for(protocol: str) -> str:
    """The DBC behind a CAN protocol name: ``bafang-can`` or ``dbc:<path>``."""
    return profile_path("bafang" if protocol == "bafang-can" else protocol[len("dbc:"):])


def one_dbc(cfg: Config) -> CompiledDbc | None:
    """The kernel holds one set of CAN tables: every CAN source must share its DBC."""
    paths = {dbc_for(s.protocol) for s in cfg.sources if s.kind in CAN_KINDS}
    if len(paths) > 1:
        raise ConfigError(cfg.path, "sources", "all CAN sources must use the same DBC for now")
    return compile_isolated(paths.pop()) if paths else None


def make_kernel(cfg: Config, dbc: CompiledDbc | None) -> Any:
    """The fusion kernel as the configuration sets it up: windows, tunables, alarms,
    reporting policy, CAN tables."""
    kernel = Kernel(dbc.id_space if dbc else ID_SPACE, cfg.windows.live, cfg.windows.history,
                    cfg.windows.ring_samples)
    kernel.set_params(cfg.fusion)
    kernel.set_limits(*limits(kernel.id_space))
    kernel.set_alarms(cfg.alarms)
    for sid, mode, deadband in cfg.reporting:
        kernel.set_policy(sid, mode, deadband)
    for source in cfg.raw_sources:
        kernel.set_source_raw(source, True)
    if dbc is not None:
        kernel.set_can_tables(*dbc.kernel_tables())
    return kernel
