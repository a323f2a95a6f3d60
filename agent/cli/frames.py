"""``ebike-agent frames``: the frames each source reads, live, like ``candump``: raw
bytes beside what they decode to, so a technician sees a node talk (or not), a
message the profile does not know (``unknown``), and the values it carries.

The bytes come from the running agent's tap (the reads it decoded itself, polled every
POLL_S); they are decoded here by the code ``ebike-agent decode`` uses, so a frame
reads the same in both."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from agent.cli import view
from agent.cli.common import agent_options, until_ctrl_c
from agent.control.client import follow_tap
from agent.signals import BY_NAME

POLL_S = 0.2
# Silence this long is said (on stderr), so an empty screen is not mistaken for a hang.
QUIET_S = 5.0
# Raw UART bytes shown before the rest is cut (``DD 03 00 1B .. 77 [34]``).
UART_BYTES = 8
# Units that only say what kind of number a value is: not printed after it.
NO_UNIT = ("", "enum", "count", "bool", "raw", "code", "bits", "ratio")
INDENT = " " * 14


def _short(name: str, message: str | None) -> str:
    """A signal's name without what every name shares: ``Controller.MotorCurrent``;
    a DBC signal without the catalogue, without its message's name."""
    if message and name.startswith(message + "."):
        return name[len(message) + 1:]
    name = name.removeprefix("Vehicle.")
    for family in ("LEV.", "Powertrain."):
        name = name.removeprefix(family)
    return name


def _number(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def _values(obj: dict[str, Any], message: str | None = None) -> list[str]:
    out = []
    for name, value in obj.get("signals", {}).items():
        sig = BY_NAME.get(name)
        unit = sig.unit if sig is not None and sig.unit not in NO_UNIT else ""
        out.append(f"{_short(name, message)}={_number(value)}" + (f" {unit}" if unit else ""))
    out += [f"{_short(name, message)} REFUSED ({why})" for name, why in obj.get("refused", {}).items()]
    return out


def _fit(head: str, items: list[str]) -> str:
    """``head`` (cut to view.WIDTH) then the items, as many on a line as fit, the others
    on indented lines below; an item too long for any line is cut over several."""
    lines = [head if len(head) <= view.WIDTH else head[:view.WIDTH - 2] + ".."]
    for item in items:
        if len(lines[-1]) + 2 + len(item) <= view.WIDTH:
            lines[-1] += "  " + item
            continue
        while item:
            room = view.WIDTH - len(INDENT)
            lines.append(INDENT + item[:room])
            item = item[room:]
    return "\n".join(line.rstrip() for line in lines)


def _uart_bytes(hexes: str) -> str:
    parts = hexes.split()
    if len(parts) <= UART_BYTES:
        return hexes
    return " ".join(parts[:UART_BYTES - 1]) + f" .. {parts[-1]} [{len(parts)}]"


def line(t: float, source: str, protocol: str, obj: dict[str, Any]) -> str:
    """One frame (a decode object of decode.CanStream / UartStream) as text within
    view.WIDTH: local time, source, the raw frame (for CAN candump's id, [length] and
    bytes; binary UART bytes and NMEA sentences cut to fit), then what it decodes to."""
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    head = f"{stamp}  {source:<6} "
    if obj.get("frame") is None:  # what a framer dropped, said as it happened
        return _fit(head + f"-- {obj.get('error')}", [])
    bad = [] if obj["ok"] else [f"BAD {obj['error']}"]
    if "id" in obj:
        data = bytes.fromhex(obj["data"])
        head += f"{obj['id']:>8}  [{len(data)}]  {data.hex(' ').upper():<23}"
        message = obj.get("message")
        name = [] if not obj["ok"] else [message or "unknown"]
        return _fit(head, [*bad, *name, *_values(obj, message)])
    raw = obj["frame"] if protocol == "nmea" else _uart_bytes(obj["frame"])
    note = [] if obj.get("understood", True) else ["(not understood)"]
    return _fit(head + raw, [*bad, *note, *_values(obj)])


def _can_id(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        value = -1
    if not 0 <= value <= 0x1FFFFFFF:
        raise argparse.ArgumentTypeError(f"expected a CAN id in hex (7E0, 0x02F83201), got {text!r}")
    return value


def _wanted(obj: dict[str, Any], ids: list[int] | None) -> bool:
    return not ids or ("id" in obj and int(obj["id"], 16) in ids)


def _follow(path: str, args: argparse.Namespace) -> None:
    from agent.cli.decode import CanStream, UartStream, stream

    streams: dict[str, CanStream | UartStream] = {}
    shown = 0
    heard = time.monotonic()
    for chunks, lost in follow_tap(path, args.source, interval=POLL_S):
        if chunks:
            heard = time.monotonic()
        elif time.monotonic() - heard > QUIET_S:
            print(f"frames: the agent read nothing in {QUIET_S:g} s ('ebike-agent status' says why)",
                  file=sys.stderr, flush=True)
            heard = time.monotonic()
        if lost:
            print("frames: the agent dropped reads before they were shown (this terminal is slower than the "
                  "buses): some frames are missing here", file=sys.stderr, flush=True)
        for chunk in chunks:
            name = chunk["source"]
            if name not in streams:
                streams[name] = stream(chunk["format"], chunk["protocol"], joined=True)
            for obj in streams[name].feed(chunk["data"]):
                if not _wanted(obj, args.id):
                    continue
                if args.json:
                    print(json.dumps({"t": chunk["t"], "source": name, "protocol": chunk["protocol"], **obj}))
                else:
                    print(line(chunk["t"], name, chunk["protocol"], obj))
                shown += 1
                if args.count and shown >= args.count:
                    return
        sys.stdout.flush()


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("frames", help="live frames of the sources, raw and decoded, like candump")
    p.add_argument("--source", action="append", metavar="S", help="only this source (repeat for more)")
    p.add_argument("--id", action="append", type=_can_id, metavar="ID",
                   help="only CAN frames with this id, hex (2F83201 or 0x02F83201; repeat for more)")
    agent_options(p, json=False)
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N frames (0: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON line per frame (decode's objects)")
    p.set_defaults(func=lambda args: until_ctrl_c(_follow, args))
