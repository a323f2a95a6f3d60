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
from agent.protocols import candump, nmea
from agent.runtime import CanTextHandler, dbc_for
from agent.sources.slcan import SlcanParser

PROTOCOLS = ("bafang-can", "nmea", "dbc:<path>")
FORMATS = ("candump", "slcan", "nmea")
_DEFAULT_FORMAT = {"nmea": "nmea"}


class CanDecoder:
    """One CAN frame at a time through the same compiled tables and kernel as the agent."""

    def __init__(self, dbc: CompiledDbc) -> None:
        self.dbc = dbc
        self.kernel = Kernel(dbc.id_space, 1.0)
        self.kernel.set_can_tables(*dbc.kernel_tables())

    def decode(self, key: int, data: bytes) -> dict[str, Any]:
        try:
            rows = self.kernel.decode_frame(key, data)
        except ValueError as e:
            raise DecodeError(str(e)) from e
        if rows is None:
            return {"signals": {}, "message": None}
        return {"signals": {self.dbc.signal_name(sid): value for sid, value in rows},
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
            yield {"ok": True, "frame": text, "signals": nmea.decode_sentence(text)}
        except DecodeError as e:
            yield {"ok": False, "frame": text, "error": e.reason}


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
    if proto not in ("bafang-can", "nmea") and not proto.startswith("dbc:"):
        raise AgentError(f"unknown protocol {proto!r} (known: {', '.join(PROTOCOLS)})")
    if bool(args.frames) == bool(args.file):
        raise AgentError("give frames or --file, not both or neither")
    fmt = args.format or _DEFAULT_FORMAT.get(proto, "candump")
    if (proto == "nmea") != (fmt == "nmea"):
        raise AgentError(f"format {fmt} does not carry protocol {proto}")
    if args.stats:
        if proto == "nmea" or fmt not in ("candump", "slcan"):
            raise AgentError("--stats reads CAN captures (candump or slcan format)")
        if not args.file:
            raise AgentError("--stats needs --file")
        print(json.dumps(can_stats(compile_dbc(dbc_for(proto)), fmt, _chunks(args.file))))
        return 0
    if args.file:
        lines = sys.stdin.read().splitlines() if args.file == "-" else _read_lines(args.file)
    else:
        lines = _compact_frames(args.frames) if fmt == "candump" else args.frames
    out = _nmea(lines) if proto == "nmea" else _can(compile_dbc(dbc_for(proto)), fmt, lines)
    for obj in out:
        print(json.dumps(obj))
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("decode", help="decode frames or a capture to JSON lines")
    p.add_argument("--protocol", required=True, help=f"one of {', '.join(PROTOCOLS)}")
    p.add_argument("--format", choices=FORMATS, help="capture format (default: candump for CAN, nmea)")
    p.add_argument("--file", help="capture file, - for stdin")
    p.add_argument("--stats", action="store_true", help="print only counts and frames/s for the whole --file")
    p.add_argument("frames", nargs="*", metavar="FRAME", help="ID#DATA for CAN, a sentence for NMEA")
    p.set_defaults(func=_decode)
