"""Captures read back: a recorded bus as the timed reads its source would have handed
the agent, run through the agent's own kernel and feeds, so a problem from the road
reproduces on a desk (``ebike-agent replay`` and ``plot``). Offline: no agent, no port.

A capture's format is told by its first lines (``detect``):

==========  ===============================================  ==========================
format      what                                             times
==========  ===============================================  ==========================
candump     ``candump -L`` log (can-utils, ebike-sim --out)  the log's timestamps
manifest    ebike-sim --manifest JSON Lines, every bus       sim_epoch + the sim time
tap         the control socket's ``tap`` chunks, a line      each read's time
            each (base64 data)
nmea        NMEA 0183 sentences                              GGA/RMC fix times (UTC)
sniff       ``HH:MM:SS.mmm:`` lines, each followed by the    the sniffer's times of day
            hex bytes read then (the Sur-Ron RS-485 dumps)
slcan       SLCAN text as an adapter sends it                none: nominal rate
hex         hex bytes, one read a line                       none: nominal rate
raw         a UART's raw bytes (binary)                      none: nominal rate
==========  ===============================================  ==========================

Without times, reads are taken at a nominal ``rate`` a second (a line, or RAW_READ
bytes, each) and ``Capture.timing`` says so. A UART capture whose protocol neither the
format nor the caller names is identified from its bytes (agent.protocols.sniff). A line
the reader cannot use is counted (``Capture.bad_lines``), never fatal; what the reader
passes on, the feeds and the kernel count as the agent does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import calendar
import collections
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent import config
from agent.config import Config, SourceConfig
from agent.dbc.compile import frame_key
from agent.diagnostics import Diagnostics
from agent.errors import DecodeError, SourceError
from agent.feed import QUIET_LINE, CanTextFeed, UartFeed, make_feed, make_kernel, one_dbc
from agent.fusion.kernel import BUILD
from agent.fusion.spec import (
    ALARM_NAMES,
    OUT_ALARM,
    OUT_CHANGE,
    OUT_SNAPSHOT,
    OUT_WINDOW,
    S_CELL_MAX,
    S_CELL_MIN,
    S_CELL_SPREAD,
    S_CTRL_TEMP,
    S_FUSED_SOC,
    S_FUSED_SPEED,
    S_GNSS_SPEED,
    S_MOTOR_TEMP,
    S_PACK_I,
    S_PACK_V,
    S_POWER,
    S_SOC,
    S_SPEED,
    S_TEMP_MAX,
    S_TEMP_MIN,
    WIN_HISTORY,
    WIN_LIVE,
)
from agent.protocols import UART_PROTOCOLS, candump, nmea, sniff
from agent.protocols.slcan import EXTENDED_FLAG, SlcanParser
from agent.signals import BY_ID, signal_id
from agent.sources import make_source
from agent.sources.candump import MAX_LINE, line_time

FORMATS = ("candump", "manifest", "tap", "nmea", "sniff", "slcan", "hex", "raw")
# What the detector reads of a file, and how many of its lines it judges.
HEAD_BYTES = 1 << 16
HEAD_LINES = 50
# Reads of a capture without times: a line, or this many raw bytes, each 1/rate s apart.
RAW_READ = 64
NOMINAL_HZ = 10.0
# A log's lines within this span make one read: the agent's turn while a bus is busy.
READ_S = 0.01
# The agent's loop turns at least this often (agent.runtime.TICK): a quiet gap in a
# capture still closes windows, runs the fusion step and times out silent sources.
TURN_S = 0.1
# A capture's time of day that goes back by more than this has passed midnight.
HALF_DAY = 43200.0
# The frame format of a stream -> the source kind that delivers it.
KIND_OF = {"candump": "candump", "slcan": "slcan", "packed": "socketcan", "bytes": "uart"}
# ebike-sim's bus names -> the agent's protocol names.
SIM_PROTOCOLS = {"nmea": "nmea", "jbd": "jbd", "daly": "daly", "ninebot": "ninebot", "kt": "kt-lcd3",
                 "surron": "surron"}
DEFAULT_CAN = "bafang-can"

_CANDUMP_LINE = re.compile(rb"\(\s*\d+(?:\.\d*)?\)\s+\S+\s+[0-9A-Fa-f]+#")
_SLCAN_LINE = re.compile(rb"[tTrR][0-9A-Fa-f]{4,}")
_NMEA_LINE = re.compile(rb"[$!][A-Z]{2}")
_SNIFF_TIME = re.compile(rb"(\d\d):(\d\d):(\d\d(?:\.\d+)?):")
_HEX_LINE = re.compile(rb"(?:[0-9A-Fa-f]{2}[ \t]*)+")
_LINE_END = re.compile(rb"[\r\n]+")
_TEXT = frozenset(b"\t\n\r" + bytes(range(0x20, 0x7F)))

# The signals a technician looks at first: (signal id, label, unit, plot panel or ""). The
# replay's text summary lists them, the plot draws each panel's.
KEY_SIGNALS: tuple[tuple[int, str, str, str], ...] = (
    (S_SPEED, "wheel speed", "km/h", "speed"),
    (S_GNSS_SPEED, "GNSS speed", "km/h", "speed"),
    (S_FUSED_SPEED, "fused speed", "km/h", "speed"),
    (S_POWER, "pack power (+ = charging)", "W", "power"),
    (S_PACK_V, "pack voltage", "V", ""),
    (S_PACK_I, "pack current", "A", ""),
    (S_SOC, "BMS SoC", "%", "state of charge"),
    (S_FUSED_SOC, "fused SoC", "%", "state of charge"),
    (S_CELL_SPREAD, "cell spread", "V", "cell spread"),
    (S_CELL_MIN, "lowest cell", "V", ""),
    (S_CELL_MAX, "highest cell", "V", ""),
    (S_TEMP_MAX, "pack hottest", "C", "temperature"),
    (S_TEMP_MIN, "pack coolest", "C", "temperature"),
    (S_MOTOR_TEMP, "motor", "C", "temperature"),
    (S_CTRL_TEMP, "controller", "C", "temperature"),
)
# Without a pack power, the controller's: its voltage times its current.
CONTROLLER_V = signal_id("Vehicle.LEV.Controller.Voltage")
CONTROLLER_I = signal_id("Vehicle.LEV.Controller.MotorCurrent")

WINDOW_SETS = {WIN_LIVE: "live", WIN_HISTORY: "history"}
OUTPUT_NAMES = {OUT_CHANGE: "changes", OUT_ALARM: "alarms", OUT_SNAPSHOT: "events"}
# (time, stream index, bytes): one read of one stream.
Read = tuple[float, int, bytes]


@dataclass(frozen=True)
class Stream:
    """One bus of a capture: its source's name, the frame format its reads are in (a
    source's ``frame_format``) and its UART protocol ("" for CAN: the DBC is the caller's)."""

    name: str
    fmt: str
    protocol: str = ""


@dataclass
class Capture:
    """A capture file, its format and buses; ``reads()`` reads it from the start."""

    path: str
    fmt: str
    streams: list[Stream]
    timing: str
    clock: str  # "unix": Unix times; "day": seconds of day ("utc-day": UTC); "": from the start
    rate: float = NOMINAL_HZ
    bad_lines: int = 0
    notes: list[str] = field(default_factory=list)

    def reads(self) -> Iterator[Read]:
        """Every read, in time order (times never go back)."""
        self.bad_lines = 0
        reader = {"candump": _candump_reads, "manifest": _manifest_reads, "tap": _tap_reads,
                  "nmea": _nmea_reads, "sniff": _sniff_reads}.get(self.fmt, _nominal_reads)
        latest = float("-inf")
        for t, i, data in reader(self):
            latest = max(latest, t)
            yield latest, i, data


def open_capture(path: str, protocol: str = "", rate: float = NOMINAL_HZ, configured: Sequence[str] = ()) -> Capture:
    """The capture at ``path``. ``protocol`` is that of a UART capture whose format does not
    say it; without it, the one UART protocol ``configured`` (a configuration's), else the
    one its bytes speak. SourceError if it cannot be read, or is of no format known here."""
    if rate <= 0:
        raise SourceError(f"--rate must be > 0, not {rate:g}")
    if protocol and protocol not in UART_PROTOCOLS:
        raise SourceError(f"unknown UART protocol {protocol!r} (known: {', '.join(UART_PROTOCOLS)})")
    head = next(blocks(path), b"")
    if not head:
        raise SourceError(f"{path} is empty: nothing to replay")
    fmt = detect(head) or "raw"
    if fmt in ("candump", "slcan", "manifest", "tap") and protocol:
        raise SourceError(f"{path} is a {fmt} capture, which names its buses: --protocol is for a UART "
                          "capture (a CAN capture takes --dbc or --can-protocol)")
    if fmt == "nmea" and protocol not in ("", "nmea"):
        raise SourceError(f"{path} holds NMEA sentences, not {protocol}")
    untimed = f"none in the capture: reads taken at a nominal {rate:g}/s (--rate)"
    if fmt == "candump":
        return Capture(path, fmt, [Stream(_candump_iface(head), "candump")], "the log's timestamps", "unix", rate)
    if fmt == "slcan":
        return Capture(path, fmt, [Stream("can0", "slcan")], untimed, "", rate)
    if fmt == "manifest":
        return _manifest(path, head, rate)
    if fmt == "tap":
        return _tap(path, rate)
    if fmt == "nmea":
        day = _nmea_day(path)
        timing = "the GGA/RMC fix times (UTC)" + (" and the RMC date" if day is not None else ", times of day")
        return Capture(path, fmt, [Stream("gnss", "bytes", "nmea")], timing, "unix" if day is not None else "utc-day",
                       rate)
    cap = Capture(path, fmt, [], *(("the sniffer's times of day", "day") if fmt == "sniff" else (untimed, "")), rate)
    if not protocol and len(configured) == 1:
        protocol = configured[0]
        cap.notes.append(f"protocol {protocol}: the configuration's UART source")
    if not protocol:
        protocol = _guess(cap)
    cap.streams.append(Stream("gnss" if protocol == "nmea" else "uart", "bytes", protocol))
    return cap


def detect(head: bytes) -> str | None:
    """The text format of a capture from its first bytes; None when binary or unknown."""
    if not head or sum(b not in _TEXT for b in head) * 10 > len(head):
        return None  # binary: a tenth of its bytes or more are no text
    lines = [line.strip() for line in _LINE_END.split(head)]
    if len(head) == HEAD_BYTES:
        lines.pop()  # cut short by the head's end
    lines = [line for line in lines if line and not line.startswith(b"#")][:HEAD_LINES]
    if not lines:
        return None
    if lines[0].startswith(b"{"):
        return _json_format(lines[0])
    kinds = collections.Counter(_line_kind(line) for line in lines)
    if kinds["sniff"] and kinds["sniff"] + kinds["hex"] >= len(lines) * 0.8:
        return "sniff"
    kind, n = kinds.most_common(1)[0]
    return kind if kind not in ("", "sniff") and n * 2 >= len(lines) else None


def _line_kind(line: bytes) -> str:
    if _CANDUMP_LINE.match(line):
        return "candump"
    if _NMEA_LINE.match(line):
        return "nmea"
    if _SNIFF_TIME.fullmatch(line):
        return "sniff"
    if _HEX_LINE.fullmatch(line):
        return "hex"
    if _SLCAN_LINE.fullmatch(line):
        return "slcan"
    return ""


def _json_format(line: bytes) -> str | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("type") == "header" and "buses" in obj:
        return "manifest"
    if isinstance(obj, dict) and {"t", "source", "format", "data"} <= obj.keys():
        return "tap"
    return None


def _candump_iface(head: bytes) -> str:
    for line in _LINE_END.split(head):
        if _CANDUMP_LINE.match(line.strip()):
            return line.split()[1].decode("ascii", "replace")
    return "can0"


def _guess(cap: Capture) -> str:
    """The UART protocol the first bytes of ``cap`` speak, by the sniffer; a note says so."""
    sample = bytearray()
    for _t, _i, data in cap.reads():
        sample += data
        if len(sample) >= 4096:
            break
    named = [(name, frames) for name, frames in sniff.identify(bytes(sample)) if name in UART_PROTOCOLS]
    if not named:
        raise SourceError(f"{cap.path}: not a capture format replay knows ({', '.join(FORMATS)}), and its bytes "
                          "are no UART protocol it knows: give --protocol for a raw UART dump")
    name, frames = named[0]
    cap.notes.append(f"protocol {name} recognised in the bytes ({frames} frames in the first "
                     f"{len(sample)} bytes); give --protocol to choose another")
    return name


# Readers --------------------------------------------------------------------------------


def _lines(cap: Capture) -> Iterator[bytes]:
    """The file's lines, ended by CR, LF or both (SLCAN ends its lines with CR alone),
    without their ends; an overlong one is counted and skipped."""
    tail = b""
    skipping = False
    for block in blocks(cap.path):
        lines = _LINE_END.split(tail + block)
        tail = lines.pop()
        for line in lines:
            if skipping:
                skipping = False
            elif line:
                yield line
        if len(tail) > MAX_LINE:
            cap.bad_lines += not skipping
            tail = b""
            skipping = True
    if tail and not skipping:
        yield tail


def blocks(path: str, size: int = HEAD_BYTES) -> Iterator[bytes]:
    """A file's bytes (``-``: standard input's), ``size`` at a time; SourceError naming
    it if it cannot be read."""
    try:
        with open(0, "rb", closefd=False) if path == "-" else open(path, "rb") as f:
            while block := f.read(size):
                yield block
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e


def _timed(items: Iterable[tuple[float | None, int, bytes]]) -> Iterator[Read]:
    """Items without a time take the time before them (the first ones, the first time)."""
    held: list[tuple[int, bytes]] = []
    last: float | None = None
    for t, i, data in items:
        if t is None and last is None:
            held.append((i, data))
            continue
        last = t if t is not None else last
        assert last is not None
        for hi, hdata in held:
            yield last, hi, hdata
        held = []
        yield last, i, data
    for hi, hdata in held:
        yield 0.0, hi, hdata


def _candump_reads(cap: Capture) -> Iterator[Read]:
    """Lines READ_S apart at most make one read, stamped with its last line's time."""
    buf: list[bytes] = []
    start = t_read = 0.0
    for t, _i, line in _timed((line_time(line), 0, line) for line in _lines(cap) if line.strip()):
        if buf and t >= start + READ_S:
            yield t_read, 0, b"".join(buf)
            buf = []
        if not buf:
            start = t
        buf.append(line + b"\n")
        t_read = max(t_read, t)
    if buf:
        yield t_read, 0, b"".join(buf)


class _Day:
    """Times of day into a running count of seconds: past midnight, a day more."""

    def __init__(self, base: float) -> None:
        self.base = base
        self.last: float | None = None

    def time(self, of_day: float) -> float:
        if self.last is not None and of_day < self.last - HALF_DAY:
            self.base += 86400.0
        self.last = of_day
        return self.base + of_day


def _nmea_day(path: str) -> float | None:
    """The Unix time of 00:00 UTC on the capture's first RMC date, if it has one."""
    cap = Capture(path, "nmea", [], "", "")
    for line in _lines(cap):
        fields = line.split(b"*")[0].split(b",")
        if fields[0][3:6] == b"RMC" and len(fields) > 9 and re.fullmatch(rb"\d{6}", fields[9]):
            d = fields[9].decode()
            try:
                return float(calendar.timegm((2000 + int(d[4:]), int(d[2:4]), int(d[:2]), 0, 0, 0)))
            except (ValueError, OverflowError):
                return None
    return None


def _nmea_reads(cap: Capture) -> Iterator[Read]:
    """A sentence a read, at the time of the newest fix (a fix's own sentences carry it)."""
    day = _Day(_nmea_day(cap.path) or 0.0)

    def timed(line: bytes) -> float | None:
        try:
            t = nmea.sentence_time(line.strip())
        except DecodeError:
            return None
        return None if t is None else day.time(t)

    yield from _timed((timed(line), 0, line.strip() + b"\r\n") for line in _lines(cap)
                      if line.strip() and not line.startswith(b"#"))


def _sniff_reads(cap: Capture) -> Iterator[Read]:
    """Each hex line a read, at the time of the ``HH:MM:SS.mmm:`` line before it."""
    day = _Day(0.0)

    def items() -> Iterator[tuple[float | None, int, bytes]]:
        t: float | None = None
        for line in _lines(cap):
            text = line.strip()
            stamp = _SNIFF_TIME.fullmatch(text)
            if stamp:
                t = day.time(int(stamp[1]) * 3600 + int(stamp[2]) * 60 + float(stamp[3]))
            elif text:
                data = _hex(cap, text)
                if data:
                    yield t, 0, data

    yield from _timed(items())


def _hex(cap: Capture, text: bytes) -> bytes:
    try:
        return binascii.unhexlify(re.sub(rb"\s+", b"", text))
    except (binascii.Error, ValueError):
        cap.bad_lines += 1
        return b""


def _nominal_reads(cap: Capture) -> Iterator[Read]:
    """A line (SLCAN, hex) or RAW_READ bytes each 1/rate s."""
    if cap.fmt == "raw":
        chunks: Iterable[bytes] = blocks(cap.path, RAW_READ)
    elif cap.fmt == "slcan":
        chunks = (line + b"\r" for line in _lines(cap))
    else:
        chunks = (data for line in _lines(cap) if line.strip() and not line.startswith(b"#")
                  if (data := _hex(cap, line.strip())))
    for n, data in enumerate(chunks):
        yield n / cap.rate, 0, data


def _json_lines(cap: Capture) -> Iterator[dict[str, Any]]:
    for line in _lines(cap):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            yield obj
        else:
            cap.bad_lines += 1


def _manifest_buses(header: dict[str, Any]) -> list[str]:
    """The buses of the manifest's header that replay reads, in its order."""
    return [bus for bus in header.get("buses", {}) if bus == "can" or bus in SIM_PROTOCOLS]


def _manifest(path: str, head: bytes, rate: float) -> Capture:
    header = json.loads(head.split(b"\n", 1)[0])
    streams = [Stream((header["buses"][bus] or {}).get("iface") or "can0", "slcan") if bus == "can"
               else Stream("gnss" if bus == "nmea" else bus, "bytes", SIM_PROTOCOLS[bus])
               for bus in _manifest_buses(header)]
    if not streams:
        raise SourceError(f"{path}: the simulator's manifest names no bus")
    return Capture(path, "manifest", streams, "the simulator's sim times from sim_epoch", "unix", rate)


def _manifest_reads(cap: Capture) -> Iterator[Read]:
    """The frames the simulator delivered, as their bus carried them: CAN as SLCAN lines
    (one its line noise made invalid stays invalid), NMEA sentences, UART bytes; frames of
    one bus and one sim step make one read."""
    records = _json_lines(cap)
    header = next(records, {})
    epoch = float(header.get("sim_epoch_unix", 0))
    index = {bus: i for i, bus in enumerate(_manifest_buses(header))}
    pending: tuple[float, int] | None = None
    buf: list[bytes] = []
    for rec in records:
        if rec.get("type") != "frame":
            continue
        try:
            i = index[rec["bus"]]
            t = epoch + float(rec["t"])
            data = _manifest_bytes(rec)
        except (KeyError, TypeError, ValueError):
            cap.bad_lines += 1
            continue
        if pending is not None and pending != (t, i):
            yield pending[0], pending[1], b"".join(buf)
            buf = []
        pending = (t, i)
        buf.append(data)
    if pending is not None:
        yield pending[0], pending[1], b"".join(buf)


def _manifest_bytes(rec: dict[str, Any]) -> bytes:
    if rec["bus"] == "can" and "id" in rec:
        can_id = str(rec["id"])
        data = bytes.fromhex(rec["data"])
        line = f"{'T' if len(can_id) > 3 else 't'}{can_id}{len(data)}{data.hex().upper()}".encode()
        # ebike-sim corrupts such a line with a byte no SLCAN line holds: so does this.
        return (line[:1] + b"!" + line[1:] if rec.get("corrupted") else line) + b"\r"
    if "sentence" in rec:
        return str(rec["sentence"]).encode("ascii") + b"\r\n"
    return bytes.fromhex(rec["data"])


def _tap(path: str, rate: float) -> Capture:
    cap = Capture(path, "tap", [], "the times the agent read the bytes", "unix", rate)
    seen: dict[str, Stream] = {}
    for obj in _json_lines(cap):
        name, fmt = str(obj.get("source")), str(obj.get("format"))
        if name not in seen and fmt in KIND_OF:
            seen[name] = Stream(name, fmt, str(obj.get("protocol", "")) if fmt == "bytes" else "")
    cap.streams = list(seen.values())
    if not cap.streams:
        raise SourceError(f"{path}: no tap chunk of a known format")
    return cap


def _tap_reads(cap: Capture) -> Iterator[Read]:
    index = {s.name: i for i, s in enumerate(cap.streams)}
    for obj in _json_lines(cap):
        try:
            yield float(obj["t"]), index[str(obj["source"])], base64.b64decode(obj["data"], validate=True)
        except (KeyError, TypeError, ValueError):
            cap.bad_lines += 1


# The kernel run -------------------------------------------------------------------------


def replay_config(cap: Capture, base: Config | None, can_protocol: str = "") -> Config:
    """The agent's configuration for the capture: a source per bus of it (named as the
    base configuration's source of the same protocol, if any), the base's fusion, alarm,
    window and reporting settings, or the defaults."""
    base_sources = list(base.sources) if base is not None else []
    can = can_protocol or next((s.protocol for s in base_sources if s.kind in config.CAN_KINDS), DEFAULT_CAN)
    sources = []
    for stream in cap.streams:
        protocol = stream.protocol if stream.fmt == "bytes" else can
        match = next((s for s in base_sources if s.protocol == protocol), None)
        if match is not None:
            base_sources.remove(match)
        name = match.name if match is not None else stream.name
        sources.append(SourceConfig(name=name, kind=KIND_OF[stream.fmt], port=cap.path, protocol=protocol))
    if base is None:
        return Config(path=cap.path, device_id="replay", sources=tuple(sources))
    raw_names = {base.sources[i].name for i in base.raw_sources}
    return replace(base, sources=tuple(sources),
                   raw_sources=tuple(i for i, s in enumerate(sources) if s.name in raw_names))


class Replay:
    """A capture through the kernel the agent builds (make_kernel, make_feed): ``outputs``
    yields the kernel's outputs as the agent's recorder gets them; ``summary`` then."""

    def __init__(self, cap: Capture, cfg: Config, speed: float = 0.0) -> None:
        self.cap = cap
        self.cfg = cfg
        self.speed = speed
        self.dbc = one_dbc(cfg)
        self.kernel = make_kernel(cfg, self.dbc)
        # Sources as the agent makes them, never opened: the feeds take their format from them.
        self.sources = [make_source(c) for c in cfg.sources]
        self.feeds = [make_feed(c, s, i, self.kernel) for i, (c, s) in enumerate(zip(cfg.sources, self.sources,
                                                                                           strict=True))]
        for feed in self.feeds:
            if isinstance(feed, CanTextFeed) and cap.fmt == "candump":
                feed.t_offset = 0.0  # the log's own times, not shifted to now as a live replay's
        self.slcan = {i: SlcanParser() for i, s in enumerate(cap.streams) if s.fmt == "slcan"}
        self.last_read = [float("-inf")] * len(self.feeds)
        self.first: float | None = None
        self.last: float | None = None
        self.unknown_ids: collections.Counter[int] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self.alarms: list[dict[str, Any]] = []

    def outputs(self) -> Iterator[Any]:
        """Every kernel output in order: each read fed, then the agent's turn after it
        (and its idle turns in a quiet gap, TURN_S apart); at the end the open windows."""
        turn: float | None = None
        started = time.monotonic()
        for t, i, data in self.cap.reads():
            if self.first is None:
                self.first = t
            if turn is not None:
                while turn + TURN_S < t:
                    turn += TURN_S
                    yield from self._seen(self._turn(turn))
            if self.speed > 0:
                time.sleep(max(0.0, started + (t - self.first) / self.speed - time.monotonic()))
            self._ids(i, data)
            yield from self._seen(self.feeds[i].feed(data, t, self.sources[i]))
            self.last_read[i] = t
            yield from self._seen(self._turn(t))
            turn = self.last = t
        if self.last is not None:
            yield from self._seen(self._turn(self.last + QUIET_LINE))
        yield from self._seen(self.kernel.flush())

    def _turn(self, now: float) -> list[Any]:
        """The agent's turn: a UART framer quiet for QUIET_LINE gives up its false start
        (the feed times quiet on the wall clock: told of the capture's), then what is due."""
        out: list[Any] = []
        for i, (src, feed) in enumerate(zip(self.sources, self.feeds, strict=True)):
            if isinstance(feed, UartFeed) and feed.framer.pending and now - self.last_read[i] >= QUIET_LINE:
                feed.last_data = time.monotonic() - QUIET_LINE
                out += feed.tick(src, now)
        out += self.kernel.close_due(now)
        return out

    def _seen(self, outputs: list[Any]) -> list[Any]:
        for out in outputs:
            self.counts[WINDOW_SETS[out[1]] if out[0] == OUT_WINDOW else OUTPUT_NAMES[out[0]]] += 1
            if out[0] == OUT_ALARM:
                self.alarms.append(self.alarm(out))
        return outputs

    def _ids(self, i: int, data: bytes) -> None:
        """CAN ids the DBC has no message for, counted per id (the kernel counts them all)."""
        if self.dbc is None:
            return
        fmt = self.cap.streams[i].fmt
        keys: list[int] = []
        if fmt == "slcan":
            keys = self.slcan[i].feed(data)[0]
        elif fmt == "candump":
            for line in data.splitlines():
                try:
                    frame = candump.parse_candump_line(line)
                except DecodeError:
                    continue
                if frame is not None and not frame[3] & (candump.ERROR | candump.REMOTE | candump.FD):
                    keys.append(frame_key(frame[2], bool(frame[3] & candump.EXTENDED)))
        self.unknown_ids.update(k for k in keys if k not in self.dbc.msg_index)

    def name(self, sid: int) -> str:
        """A signal's catalogue (or DBC) name."""
        return self.dbc.signal_name(sid) if self.dbc is not None else BY_ID[sid].name

    def source(self, inst: int) -> str | None:
        return self.cfg.sources[inst].name if 0 <= inst < len(self.cfg.sources) else None

    def rel(self, t: float) -> float:
        """Seconds from the capture's first read."""
        return t - (self.first if self.first is not None else t)

    def alarm(self, out: tuple[Any, ...]) -> dict[str, Any]:
        _, t, code, inst, level, raised, value, thr = out
        return {"t": round(t, 3), "rel_s": round(self.rel(t), 3), "name": ALARM_NAMES.get(code, str(code)),
                "source": self.source(inst), "level": level, "raised": bool(raised), "value": value,
                "threshold": thr}

    def event(self, out: tuple[Any, ...]) -> dict[str, Any]:
        _, t, code, inst, start, end, ids, _times, _values = out
        return {"t": round(t, 3), "rel_s": round(self.rel(t), 3), "alarm": ALARM_NAMES.get(code, "request"),
                "source": self.source(inst), "from": round(start, 3), "to": round(end, 3), "samples": len(ids),
                "signals": sorted({self.name(sid) for sid in set(ids)})}

    def summary(self) -> dict[str, Any]:
        """What the run read and raised: duration, frames and bad frames per source (as the
        agent's status counts them), unknown CAN ids, outputs, the alarm timeline."""
        now = self.last if self.last is not None else 0.0
        frames: collections.Counter[int] = collections.Counter()
        for _slot, src, n, *_ in self.kernel.health(now):
            frames[src] += n
        # Bad frames by reason as the agent's status names them.
        diag = Diagnostics(self.cfg, self.sources, list(self.feeds), self.kernel, self.dbc)
        sources: list[dict[str, Any]] = [
            {"name": c.name, "protocol": c.protocol, "format": s.fmt, "frames": frames[i], "bad": diag.bad_frames(i)}
            for i, (c, s) in enumerate(zip(self.cfg.sources, self.cap.streams, strict=True))]
        bad: collections.Counter[str] = collections.Counter()
        for s in sources:
            bad.update(s["bad"])
        if self.cap.bad_lines:
            bad["unreadable lines"] += self.cap.bad_lines
        return {
            "type": "summary", "file": self.cap.path, "format": self.cap.fmt, "timing": self.cap.timing,
            "clock": self.cap.clock, "notes": self.cap.notes, "kernel": BUILD,
            "agent": "not used: an offline replay", "start": self.first, "end": self.last,
            "duration_s": round(self.rel(now), 3), "sources": sources,
            "frames": sum(frames.values()), "bad_frames": dict(bad),
            "unknown_ids": {_id_text(k): n for k, n in self.unknown_ids.most_common()},
            "windows": {name: self.counts[name] for name in WINDOW_SETS.values()},
            "changes": self.counts["changes"], "events": self.counts["events"],
            "alarms": self.alarms,
        }


def clock_text(t: float | None, clock: str, date: bool = False) -> str:
    """A capture time as its ``clock`` shows it: the local time of a Unix time (with the
    date when asked), the capture's own time of day; "" for a capture without times."""
    if t is None or not clock:
        return ""
    if clock == "unix":
        return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(t))
    s = int(t) % 86400
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" + (" UTC" if clock == "utc-day" and date else "")


def _id_text(key: int) -> str:
    return f"0x{key & ~EXTENDED_FLAG:08X}" if key & EXTENDED_FLAG else f"0x{key:03X}"


# The command line -----------------------------------------------------------------------


def add_capture_arguments(p: argparse.ArgumentParser, config_help: str = "") -> None:
    """The options that say how to read a capture, for every command that replays one."""
    p.add_argument("--protocol", default="", choices=tuple(UART_PROTOCOLS),
                   help="the UART protocol of a raw or hex dump (default: recognised from the bytes)")
    can = p.add_mutually_exclusive_group()
    can.add_argument("--dbc", metavar="FILE", help="the DBC of a CAN capture")
    can.add_argument("--can-protocol", choices=("bafang-can",), help="a CAN capture's protocol (default bafang-can)")
    p.add_argument("--config", metavar="FILE",
                   help=config_help or "take fusion, alarm and window settings, source names and protocols from "
                                       "this configuration (default: the agent's defaults)")
    p.add_argument("--rate", type=float, default=NOMINAL_HZ, metavar="HZ",
                   help=f"reads a second assumed for a capture without times (default {NOMINAL_HZ:g})")


def replay_from_args(args: argparse.Namespace, speed: float = 0.0) -> Replay:
    """The replay the options of ``add_capture_arguments`` (and FILE) describe."""
    base = config.load(args.config) if args.config else None
    uart = [s.protocol for s in base.sources if s.kind not in config.CAN_KINDS] if base is not None else []
    cap = open_capture(args.file, args.protocol, args.rate, uart)
    can = f"dbc:{args.dbc}" if args.dbc else args.can_protocol or ""
    return Replay(cap, replay_config(cap, base, can), speed)
