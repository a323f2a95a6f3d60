"""``ebike-agent decode``: offline decoding of frames and captures, one JSON object per
line and frame (../shared/DESIGN.md section 3), for technicians and tests."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from agent.capture import blocks
from agent.dbc.compile import EXTENDED_FLAG, CompiledDbc, compile_dbc, frame_key
from agent.errors import AgentError, DecodeError, SourceError
from agent.feed import CanTextFeed, dbc_for
from agent.fusion.kernel import Kernel
from agent.protocols import UART_PROTOCOLS, UartProtocol, candump, nmea, protocol
from agent.protocols.slcan import SlcanParser
from agent.protocols.surron import read_surron_log
from agent.signals import BY_NAME, ID_SPACE, limits, refusal
from agent.sources import base

# The binary UART protocols; NMEA is text, a sentence per line.
UART = tuple(name for name in UART_PROTOCOLS if name != "nmea")
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
            # The kernel refuses only on length: fewer bytes than the message, or more than 8.
            raise DecodeError(f"{'truncated' if len(data) < 8 else 'length'}: {e}") from e
        if rows is None:
            return {"signals": {}, "message": None}
        return {**believed(((sid, self.dbc.signal_name(sid), value) for sid, value in rows), self.lo, self.hi),
                "message": self.dbc.msg_names[self.dbc.msg_index[key]]}


def _candump_frames(lines: Iterable[str], given: str = "") -> Iterator[tuple[str, int, bytes | DecodeError]]:
    """(text, key, payload or the reason it is unusable) per non-blank line; a line that
    does not parse is named ``given`` (a FRAME argument) or by its number."""
    for line_no, item in candump.read_candump(lines):
        if isinstance(item, DecodeError):
            yield given or f"line {line_no}", 0, item
        else:
            yield _frame_tuple(item)


def _frame_tuple(item: tuple[Any, ...]) -> tuple[str, int, bytes | DecodeError]:
    """(``ID#DATA`` text, key, payload or why it carries none) of a candump frame tuple."""
    _t, _iface, can_id, flags, data = item
    text = candump.format_candump_line(item).split(" ", 2)[2]
    if flags & candump.ERROR:
        return text, 0, DecodeError("CAN error frame")
    if flags & candump.REMOTE:
        return text, 0, DecodeError("remote frame carries no data")
    if flags & candump.FD:
        return text, 0, DecodeError("CAN FD frames are not decoded yet")
    return text, frame_key(can_id, bool(flags & candump.EXTENDED)), data


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


def _can(decoder: CanDecoder, fmt: str, lines: Iterable[str], given: str = "") -> Iterator[dict[str, Any]]:
    frames = _slcan_frames(lines) if fmt == "slcan" else _candump_frames(lines, given)
    for text, key, data in frames:
        yield _can_object(decoder, text, key, data)


def _can_object(decoder: CanDecoder, text: str, key: int, data: bytes | DecodeError) -> dict[str, Any]:
    if isinstance(data, DecodeError):
        return {"ok": False, "frame": text, "error": data.reason}
    try:
        return {"ok": True, "frame": text, **decoder.decode(key, data)}
    except DecodeError as e:
        return {"ok": False, "frame": text, "error": e.reason}


def _nmea(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        text = line.strip()
        if text and not text.startswith("#"):
            yield _sentence(text)


def _sentence(text: str) -> dict[str, Any]:
    try:
        return {"ok": True, "frame": text, **believed(_catalogue_rows(nmea.decode_sentence(text)), *UART_LIMITS)}
    except DecodeError as e:
        return {"ok": False, "frame": text, "error": e.reason}


def _uart_chunks(fmt: str, source: str) -> Iterator[bytes]:
    """The byte stream of a UART capture."""
    if fmt == "raw":
        yield from blocks(source, STATS_CHUNK)
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


def _framed(proto: UartProtocol, framer: Any, chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """One object per frame ``framer`` finds in the stream, up to its end."""
    for chunk in chunks:
        for frame in framer.feed(chunk):
            yield _uart_frame(proto, frame)
    # The capture ended: the binary framers drop what waits; NMEA's line end completes it.
    flush = getattr(framer, "flush", None)
    for frame in flush() if flush is not None else framer.feed(b"\n"):
        yield _uart_frame(proto, frame)


def uart_decode(proto: UartProtocol, chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """One object per frame the framer finds; then one per reason bytes were dropped."""
    framer = proto.framer()
    yield from _framed(proto, framer, chunks)
    yield from _dropped(framer.bad, framer.garbage_bytes)


def _dropped(bad: dict[str, int], garbage_bytes: int) -> Iterator[dict[str, Any]]:
    """One object per reason the framer dropped candidates, then the bytes outside any frame."""
    for reason, count in sorted(bad.items()):
        if count:
            yield {"ok": False, "frame": None, "error": f"{count} candidate frames dropped: {reason}"}
    if garbage_bytes:
        yield {"ok": False, "frame": None, "error": f"{garbage_bytes} bytes outside any frame"}


# The framers' reasons for dropping a candidate, as a technician reads them.
FRAMING_FAULTS = {
    "checksum": "checksum: the check bytes do not match the frame",
    "truncated": "truncated: fewer bytes than the frame's length says",
    "length": "length: the length field is not one the protocol allows",
    "trailer": "trailer: the frame does not end with the protocol's end byte",
    "status": "status: not a status byte the protocol knows",
    "address": "unknown id: not a device address the protocol knows",
}


def given_uart_frame(proto: UartProtocol, text: str) -> dict[str, Any]:
    """One FRAME argument as exactly one object: decoded when the protocol's framer takes
    all of its bytes as one frame, else the framer's reason, as the agent would count it."""
    try:
        data = bytes.fromhex(text)
    except ValueError:
        return {"ok": False, "frame": text, "error": "not hex bytes"}
    framer = proto.framer()
    found = framer.feed(data) + framer.flush()
    if len(found) == 1 and len(found[0]) == len(data):
        return _uart_frame(proto, found[0])
    return {"ok": False, "frame": data.hex(" ").upper(), "error": _framing_fault(data, found, framer.bad)}


def _framing_fault(data: bytes, found: list[bytes], dropped: dict[str, int]) -> str:
    """Why ``data`` is not one frame. ``dropped`` counts in stream order, so its first
    reason is that of the first candidate: the frame given, when it starts at byte 0."""
    if len(found) > 1:
        return f"length: {len(found)} frames in one argument, give one each"
    if dropped and not (found and data.startswith(found[0])):
        reason = next(iter(dropped))
        return FRAMING_FAULTS.get(reason, reason)
    if found:
        return f"length: the frame is {len(found[0])} bytes, {len(data)} were given"
    return "no frame: no frame start in these bytes" if data else "no frame: no bytes given"


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
    """Counts for a whole UART or NMEA capture: frames by outcome, the candidates the
    framer dropped by reason, and the bytes outside any frame."""
    t0 = time.perf_counter()
    ok = not_understood = 0
    bad_content: dict[str, int] = {}
    framer = proto.framer()
    for item in _framed(proto, framer, chunks):
        if item["ok"]:
            ok += 1
            not_understood += "understood" in item
        else:
            fault = item["error"].split(":")[0]
            bad_content[fault] = bad_content.get(fault, 0) + 1
    elapsed = time.perf_counter() - t0
    return {"frames": ok + sum(bad_content.values()), "ok": ok, "not_understood": not_understood,
            "bad": bad_content, "dropped": dict(framer.bad), "garbage_bytes": framer.garbage_bytes,
            "frames_per_s": ok / elapsed if elapsed > 0 else 0.0}


STATS_CHUNK = 1 << 20


def can_stats(dbc: CompiledDbc, fmt: str, chunks: Iterable[bytes]) -> dict[str, Any]:
    """Counts for a whole capture through the agent's own hot path (kernel text parsers)."""
    kernel = Kernel(dbc.id_space, 1.0)
    kernel.set_can_tables(*dbc.kernel_tables())
    feed = CanTextFeed(fmt, kernel)
    t0 = time.perf_counter()
    for chunk in chunks:
        feed.feed(chunk, 0.0)
    if feed.tail.strip():
        feed.feed(b"\r" if fmt == "slcan" else b"\n", 0.0)
    elapsed = time.perf_counter() - t0
    c = kernel.counters()
    bad = {"malformed": c["bad_lines"] + feed.overlong, "unknown_id": c["unknown"], "truncated": c["truncated"],
           "error_frame": c["error_frames"], "remote": c["remote_frames"], "can_fd": c["fd_frames"]}
    frames = c["frames"] + sum(bad.values())
    return {"frames": frames, "ok": c["frames"], "bad": bad, "signals": c["samples"],
            "frames_per_s": frames / elapsed if elapsed > 0 else 0.0}


class CanStream:
    """A CAN source's reads as the agent reads them (SLCAN or candump text, packed
    ``struct can_frame`` records: the tap's formats) to decode's per-frame objects, each
    with ``id`` (hex, as candump writes it) and ``data`` (hex) when it framed. A line or
    record cut between two reads waits for the next; ``joined``: the stream is joined
    midway (the tap), so text before the first line end is the end of a cut line."""

    def __init__(self, decoder: CanDecoder, fmt: str, joined: bool = False) -> None:
        if fmt not in ("slcan", "candump", "packed"):
            raise AgentError(f"no CAN frames in the format {fmt!r}")
        self.decoder = decoder
        self.fmt = fmt
        self.slcan = SlcanParser()
        self.tail = b""
        self.cut = joined and fmt == "candump"

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        out = []
        for text, key, data in self._frames(chunk):
            obj = _can_object(self.decoder, text, key, data)
            if not isinstance(data, DecodeError):
                obj.update(id=text.split("#", 1)[0], data=data.hex().upper())
            out.append(obj)
        return out

    def _frames(self, chunk: bytes) -> Iterator[tuple[str, int, bytes | DecodeError]]:
        if self.fmt == "slcan":
            # The agent's own parser: lines that are no data frame are counted there, not shown.
            keys, datas = self.slcan.feed(chunk)
            for key, data in zip(keys, datas, strict=True):
                extended = key & EXTENDED_FLAG
                flags = candump.EXTENDED if extended else 0
                yield _frame_tuple((0.0, "", key & ~EXTENDED_FLAG, flags, data))
            return
        buf = self.tail + chunk
        if self.fmt == "candump":
            if self.cut:
                end = buf.find(b"\n")
                self.cut = end < 0
                buf = buf[end + 1:] if end >= 0 else b""
            *lines, self.tail = buf.split(b"\n")
            yield from _candump_frames(line.decode("ascii", "replace") for line in lines)
            return
        whole = len(buf) - len(buf) % base.PACKED_FRAME.size
        self.tail = buf[whole:]
        for raw_id, dlc, data in base.PACKED_FRAME.iter_unpack(buf[:whole]):
            yield _frame_tuple(_packed_tuple(raw_id, dlc, data))


def _packed_tuple(raw_id: int, dlc: int, data: bytes) -> tuple[Any, ...]:
    """A ``struct can_frame`` record (flags in the id's top bits) as a candump frame tuple."""
    flags = 0
    for bit, flag in ((base.CAN_EFF_FLAG, candump.EXTENDED), (base.CAN_RTR_FLAG, candump.REMOTE),
                      (base.CAN_ERR_FLAG, candump.ERROR)):
        flags |= flag if raw_id & bit else 0
    mask = base.CAN_EFF_MASK if raw_id & base.CAN_EFF_FLAG else base.CAN_SFF_MASK
    return 0.0, "", raw_id & mask, flags, data[:min(dlc, base.CAN_MAX_DLEN)]


class UartStream:
    """A UART source's reads to decode's per-frame objects (NMEA: the sentence as text);
    what the framer drops is said as it happens, as ``uart_decode`` says it at a
    capture's end."""

    def __init__(self, proto: UartProtocol) -> None:
        self.proto = proto
        self.framer = proto.framer()
        self.bad: dict[str, int] = {}
        self.garbage_bytes = 0

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        if self.proto.name == "nmea":
            out = [_sentence(bytes(f).decode("ascii", "replace")) for f in self.framer.feed(chunk)]
        else:
            out = [_uart_frame(self.proto, f) for f in self.framer.feed(chunk)]
        bad, garbage = dict(self.framer.bad), self.framer.garbage_bytes
        out += _dropped({k: n - self.bad.get(k, 0) for k, n in bad.items()}, garbage - self.garbage_bytes)
        self.bad, self.garbage_bytes = bad, garbage
        return out


def stream(fmt: str, proto: str, joined: bool = False) -> CanStream | UartStream:
    """The decoder of one source's reads, by the format and protocol the agent's tap
    names (UART framers find their next frame start by themselves)."""
    if fmt == "bytes":
        return UartStream(protocol(proto))
    return CanStream(CanDecoder(compile_dbc(dbc_for(proto))), fmt, joined)


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
    if not args.file:
        failed = 0
        for obj in given_frames(kind, proto, fmt, args.frames):
            print(json.dumps(obj))
            failed += not obj["ok"]
        return 1 if failed else 0
    if args.stats:
        if kind == "can":
            print(json.dumps(can_stats(compile_dbc(dbc_for(proto)), fmt, blocks(args.file, STATS_CHUNK))))
        else:
            chunks = blocks(args.file, STATS_CHUNK) if kind == "nmea" else _uart_chunks(fmt, args.file)
            print(json.dumps(uart_stats(protocol(proto), chunks)))
        return 0
    if kind == "uart":
        out = uart_decode(protocol(proto), _uart_chunks(fmt, args.file))
    else:
        lines = sys.stdin.read().splitlines() if args.file == "-" else _read_lines(args.file)
        out = _nmea(lines) if kind == "nmea" else _can(CanDecoder(compile_dbc(dbc_for(proto))), fmt, lines)
    for obj in out:
        print(json.dumps(obj))
    return 0


def given_frames(kind: str, proto: str, fmt: str, frames: list[str]) -> Iterator[dict[str, Any]]:
    """Exactly one object per FRAME argument, in order, so a script can pair them up;
    an argument that holds no frame at all says so rather than vanishing."""
    if kind == "uart":
        uart = protocol(proto)
        for text in frames:
            yield given_uart_frame(uart, text)
        return
    decoder = CanDecoder(compile_dbc(dbc_for(proto))) if kind == "can" else None
    for text in frames:
        if not text.strip():
            yield {"ok": False, "frame": text, "error": "no frame: empty argument"}
        elif decoder is None:
            yield _sentence(text.strip())
        else:
            line = f"(0.000000) can0 {text.strip()}" if fmt == "candump" else text
            for obj in _can(decoder, fmt, [line], given=text):
                # Asked about this very frame, an id the DBC has no message for is the
                # answer's fault (in a capture, such frames are only counted).
                if obj["ok"] and obj["message"] is None:
                    obj = {"ok": False, "frame": obj["frame"], "error": "unknown id: no message of the DBC has it"}
                yield obj


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
