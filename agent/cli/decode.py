"""``ebike-agent decode``: offline decoding of frames and captures, one JSON object per
line and frame (../shared/DESIGN.md section 3), for technicians and tests."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from agent.dbc.compile import CompiledDbc, compile_dbc, frame_key
from agent.errors import AgentError, DecodeError, SourceError
from agent.fusion.kernel import Kernel
from agent.protocols import UartProtocol, candump, nmea, protocol
from agent.protocols.surron import read_surron_log
from agent.runtime import CanTextHandler, dbc_for
from agent.signals import BY_NAME, ID_SPACE, limits, refusal
from agent.sources.slcan import SlcanParser

UART = ("jbd", "daly", "ninebot", "kt-lcd3", "surron")
PROTOCOLS = ("bafang-can", *UART, "nmea", "dbc:<path>")
CAN_FORMATS = ("candump", "slcan")
UART_FORMATS = ("hex", "raw", "surron-log")
FORMATS = (*CAN_FORMATS, *UART_FORMATS, "nmea")


def believed(rows: Iterable[tuple[int, str, float]], lo: list[float], hi: list[float]) -> dict[str, Any]:
    """``signals`` the agent would believe of (id, name, value) rows, and the others under
    ``refused`` with the reason, by the same ranges the agent's kernel applies."""
    good: dict[str, float] = {}
    refused: dict[str, str] = {}
    for sid, name, value in rows:
        why = refusal(sid, value, lo, hi)
        if why:
            refused[name] = why
        else:
            good[name] = value
    return {"signals": good, "refused": refused} if refused else {"signals": good}


UART_LIMITS = limits(ID_SPACE, {})[:2]


def _catalogue_rows(signals: dict[str, float]) -> list[tuple[int, str, float]]:
    return [(BY_NAME[name].id, name, value) for name, value in signals.items()]


class CanDecoder:
    """One CAN frame at a time through the same compiled tables and kernel as the agent."""

    def __init__(self, dbc: CompiledDbc) -> None:
        self.dbc = dbc
        self.kernel = Kernel(dbc.id_space, 1.0)
        self.kernel.set_can_tables(*dbc.kernel_tables())
        self.lo, self.hi, _rate = limits(dbc.id_space, dbc.ranges())

    def decode(self, key: int, data: bytes) -> dict[str, Any]:
        try:
            rows = self.kernel.decode_frame(key, data)
        except ValueError as e:
            raise DecodeError(str(e)) from e
        if rows is None:
            return {"signals": {}, "message": None}
        return {**believed(((sid, self.dbc.signal_name(sid), value) for sid, value in rows), self.lo, self.hi),
                "message": self.dbc.msg_names[self.dbc.msg_index[key]]}


def _candump_frames(lines: Iterable[str]) -> Iterator[tuple[str, int, bytes | DecodeError]]:
    """(text, key, payload or the reason it is unusable) per non-blank line."""
    for line_no, item in candump.read_candump(lines):
        if isinstance(item, DecodeError):
            yield f"line {line_no}", 0, item
            continue
        _t, _iface, can_id, flags, data = item
        text = candump.format_candump_line(item).split(" ", 2)[2]
        if flags & candump.ERROR:
            yield text, 0, DecodeError("CAN error frame")
        elif flags & candump.REMOTE:
            yield text, 0, DecodeError("remote frame carries no data")
        elif flags & candump.FD:
            yield text, 0, DecodeError("CAN FD frames are not decoded yet")
        else:
            yield text, frame_key(can_id, bool(flags & candump.EXTENDED)), data


def _slcan_frames(lines: Iterable[str]) -> Iterator[tuple[str, int, bytes | DecodeError]]:
    for line in lines:
        text = line.strip()
        if not text:
            continue
        parser = SlcanParser()
        keys, datas = parser.feed(text.encode("ascii", "replace") + b"\r")
        if keys:
            yield text, keys[0], datas[0]
        else:
            yield text, 0, DecodeError("not an SLCAN data frame")


def _can(dbc: CompiledDbc, fmt: str, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    decoder = CanDecoder(dbc)
    frames = _slcan_frames(lines) if fmt == "slcan" else _candump_frames(lines)
    for text, key, data in frames:
        if isinstance(data, DecodeError):
            yield {"ok": False, "frame": text, "error": data.reason}
            continue
        try:
            yield {"ok": True, "frame": text, **decoder.decode(key, data)}
        except DecodeError as e:
            yield {"ok": False, "frame": text, "error": e.reason}


def _nmea(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            yield {"ok": True, "frame": text, **believed(_catalogue_rows(nmea.decode_sentence(text)), *UART_LIMITS)}
        except DecodeError as e:
            yield {"ok": False, "frame": text, "error": e.reason}


def _uart_chunks(fmt: str, source: str | None, frames: list[str]) -> Iterator[bytes]:
    """The byte stream of a UART capture (or of FRAME arguments, one hex frame each)."""
    if source is None:
        for text in frames:
            yield _hex(text)
    elif fmt == "raw":
        yield from _chunks(source)
    else:
        lines = _read_lines(source) if source != "-" else sys.stdin.read().splitlines()
        if fmt == "surron-log":
            yield from read_surron_log(lines)
        else:
            for text in lines:
                if text.strip() and not text.lstrip().startswith("#"):
                    yield _hex(text)


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise AgentError(f"not hex bytes: {text.strip()[:40]!r}") from e


def uart_decode(proto: UartProtocol, chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """One object per frame the framer finds; then one per reason bytes were dropped."""
    framer = proto.framer()
    for chunk in chunks:
        for frame in framer.feed(chunk):
            yield _uart_frame(proto, frame)
    for frame in framer.flush():
        yield _uart_frame(proto, frame)
    for reason, count in sorted(framer.bad.items()):
        yield {"ok": False, "frame": None, "error": f"{count} candidate frames dropped: {reason}"}
    if framer.garbage_bytes:
        yield {"ok": False, "frame": None, "error": f"{framer.garbage_bytes} bytes outside any frame"}


def _uart_frame(proto: UartProtocol, frame: bytes) -> dict[str, Any]:
    text = bytes(frame).hex(" ").upper()
    try:
        signals = proto.decode(frame)
    except DecodeError as e:
        return {"ok": False, "frame": text, "error": e.reason}
    out: dict[str, Any] = {"ok": True, "frame": text, **believed(_catalogue_rows(signals), *UART_LIMITS)}
    if not proto.understood(frame):
        out["understood"] = False
    return out


def uart_stats(proto: UartProtocol, chunks: Iterable[bytes]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ok = not_understood = 0
    bad_content: dict[str, int] = {}
    for item in uart_decode(proto, chunks):
        if item["ok"]:
            ok += 1
            not_understood += "understood" in item
        elif item["frame"] is not None:
            bad_content[item["error"].split(":")[0]] = bad_content.get(item["error"].split(":")[0], 0) + 1
    elapsed = time.perf_counter() - t0
    return {"frames": ok + sum(bad_content.values()), "ok": ok, "not_understood": not_understood,
            "bad": bad_content, "frames_per_s": ok / elapsed if elapsed > 0 else 0.0}


def _compact_frames(frames: list[str]) -> list[str]:
    """``ID#DATA`` arguments as candump lines, so one parser serves both."""
    return [f"(0.000000) can0 {f}" for f in frames]


STATS_CHUNK = 1 << 20


def can_stats(dbc: CompiledDbc, fmt: str, chunks: Iterable[bytes]) -> dict[str, Any]:
    """Counts for a whole capture through the agent's own hot path (kernel text parsers)."""
    kernel = Kernel(dbc.id_space, 1.0)
    kernel.set_can_tables(*dbc.kernel_tables())
    handler = CanTextHandler(fmt)
    t0 = time.perf_counter()
    for chunk in chunks:
        handler.feed(chunk, 0.0, kernel)
    if handler.tail.strip():
        handler.feed(b"\r" if fmt == "slcan" else b"\n", 0.0, kernel)
    elapsed = time.perf_counter() - t0
    c = kernel.counters()
    bad = {"malformed": c["bad_lines"] + handler.overlong, "unknown_id": c["unknown"], "truncated": c["truncated"],
           "error_frame": c["error_frames"], "remote": c["remote_frames"], "can_fd": c["fd_frames"]}
    frames = c["frames"] + sum(bad.values())
    return {"frames": frames, "ok": c["frames"], "bad": bad, "signals": c["samples"],
            "frames_per_s": frames / elapsed if elapsed > 0 else 0.0}


def _chunks(path: str) -> Iterator[bytes]:
    try:
        with (open(0, "rb", closefd=False) if path == "-" else open(path, "rb")) as f:
            while chunk := f.read(STATS_CHUNK):
                yield chunk
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().splitlines()
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e


def _decode(args: argparse.Namespace) -> int:
    proto = args.protocol
    if proto not in PROTOCOLS and not proto.startswith("dbc:"):
        raise AgentError(f"unknown protocol {proto!r} (known: {', '.join(PROTOCOLS)})")
    if bool(args.frames) == bool(args.file):
        raise AgentError("give frames or --file, not both or neither")
    if args.stats and not args.file:
        raise AgentError("--stats needs --file")
    kind = "uart" if proto in UART else "nmea" if proto == "nmea" else "can"
    allowed = {"uart": UART_FORMATS, "nmea": ("nmea",), "can": CAN_FORMATS}[kind]
    fmt = args.format or allowed[0]
    if fmt not in allowed:
        raise AgentError(f"format {fmt} does not carry protocol {proto} (use {', '.join(allowed)})")
    if kind == "uart":
        uart = protocol(proto)
        chunks = _uart_chunks(fmt, args.file, args.frames)
        if args.stats:
            print(json.dumps(uart_stats(uart, chunks)))
            return 0
        for obj in uart_decode(uart, chunks):
            print(json.dumps(obj))
        return 0
    if args.stats:
        if kind == "nmea":
            raise AgentError("--stats reads CAN and binary UART captures")
        print(json.dumps(can_stats(compile_dbc(dbc_for(proto)), fmt, _chunks(args.file))))
        return 0
    if args.file:
        lines = sys.stdin.read().splitlines() if args.file == "-" else _read_lines(args.file)
    else:
        lines = _compact_frames(args.frames) if fmt == "candump" else args.frames
    out = _nmea(lines) if kind == "nmea" else _can(compile_dbc(dbc_for(proto)), fmt, lines)
    for obj in out:
        print(json.dumps(obj))
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("decode", help="decode frames or a capture to JSON lines")
    p.add_argument("--protocol", required=True, help=f"one of {', '.join(PROTOCOLS)}")
    p.add_argument("--format", choices=FORMATS,
                   help="capture format (default: candump for CAN, hex for binary UART protocols, nmea)")
    p.add_argument("--file", help="capture file, - for stdin")
    p.add_argument("--stats", action="store_true", help="print only counts and frames/s for the whole --file")
    p.add_argument("frames", nargs="*", metavar="FRAME",
                   help="ID#DATA for CAN, hex bytes for binary UART protocols, a sentence for NMEA")
    p.set_defaults(func=_decode)
