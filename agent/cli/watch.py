"""``ebike-agent watch``: the vehicle as the agent sees it now, refreshed every second
until Ctrl-C: speed from each source beside the fused one (a wheel reading 0 while the
GNSS says 20 shows at a glance), the battery, cells, temperatures, position and fix,
each with where it came from and how old it is, and the active alarms.

On a terminal a rich live view redrawn in place; piped, one plain snapshot per
interval (``--json``: one JSON line each), so ``watch --count 1`` is a script's look."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any, NamedTuple

from agent.cli import view
from agent.cli.common import agent_options, until_ctrl_c
from agent.control.client import request
from agent.errors import AgentUnreachable

BATTERY = "Vehicle.Powertrain.TractionBattery."


class Row(NamedTuple):
    section: str
    label: str
    names: tuple[str, ...]  # catalogue names, shown together (``3.91 / 3.95 V``)
    decimals: int


ROWS = (
    Row("speed", "wheel", ("Vehicle.Speed",), 1),
    Row("", "GNSS", ("Vehicle.LEV.GNSS.Speed",), 1),
    Row("", "fused", ("Vehicle.LEV.Fused.Speed",), 1),
    Row("battery", "charge (BMS)", (BATTERY + "StateOfCharge.Current",), 0),
    Row("", "charge (fused)", ("Vehicle.LEV.Fused.StateOfCharge",), 1),
    Row("", "voltage", (BATTERY + "CurrentVoltage",), 2),
    Row("", "current", (BATTERY + "CurrentCurrent",), 2),
    Row("", "power", (BATTERY + "CurrentPower",), 0),
    Row("cells", "min / max", (BATTERY + "CellVoltage.Min", BATTERY + "CellVoltage.Max"), 3),
    Row("", "spread", ("Vehicle.LEV.Battery.CellVoltage.Spread",), 3),
    Row("temperature", "battery min / max", (BATTERY + "Temperature.Min", BATTERY + "Temperature.Max"), 1),
    Row("", "motor", ("Vehicle.Powertrain.ElectricMotor.Temperature",), 0),
    Row("", "controller", ("Vehicle.LEV.Controller.Temperature",), 0),
    Row("position", "latitude, longitude", ("Vehicle.CurrentLocation.Latitude",
                                            "Vehicle.CurrentLocation.Longitude"), 5),
    Row("", "fix, satellites, HDOP", ("Vehicle.LEV.GNSS.FixQuality", "Vehicle.LEV.GNSS.Satellites",
                                      "Vehicle.LEV.GNSS.HDOP"), 1),
)
# Column widths of a row: section, label, value, source; the age takes the rest.
WIDTHS = (12, 23, 21, 8)


def _cell(row: Row, signals: dict[str, Any], now: float) -> tuple[str, str, str, bool]:
    """(value with unit, sources, age of the oldest part, stale) of one row."""
    parts = [signals.get(name) for name in row.names]
    if not any(parts):
        return "-", "", "never", False
    values, units = [], []
    for p in parts:
        values.append("-" if p is None else f"{p['value']:.{0 if p['unit'] in ('enum', 'count') else row.decimals}f}")
        units.append(None if p is None else p["unit"])
    sep = ", " if len(set(units)) > 1 or units[0] == "deg" else " / "
    unit = units[0] if len(set(units)) == 1 and units[0] not in ("deg", "enum", "count", "ratio", None) else ""
    heard = [p for p in parts if p is not None]
    oldest = min(p["at"] for p in heard)
    sources = "+".join(dict.fromkeys(p["source"] for p in heard))
    return sep.join(values) + (f" {unit}" if unit else ""), sources, view.age(now - oldest), any(
        p["stale"] for p in heard)


def lines(live: dict[str, Any], trouble: str = "") -> list[tuple[str, str]]:
    """The view as (text, rich style) lines, each within view.WIDTH: the same for the
    live terminal view and the plain snapshots."""
    now = float(live.get("t") or time.time())
    motion = live.get("motion") or {}
    out = [(f"{time.strftime('%H:%M:%S', time.localtime(now))}  motion: {motion.get('verdict', '?')}", "bold"),
           (f"  {motion.get('why', '')}"[:view.WIDTH], "")]
    if trouble:
        out.append((trouble[:view.WIDTH], "bold red"))
    head = ("", "", "value", "from")
    out.append(("".join(h.ljust(w) for h, w in zip(head, WIDTHS, strict=True)) + "age", "dim"))
    signals = live.get("signals") or {}
    for row in ROWS:
        value, sources, age, stale = _cell(row, signals, now)
        text = "".join(v[:w - 1].ljust(w) for v, w in zip((row.section, row.label, value, sources), WIDTHS,
                                                          strict=True)) + age + (" STALE" if stale else "")
        out.append((text, "yellow" if stale else "" if value != "-" else "dim"))
    alarms = live.get("alarms") or []
    out.append((f"ACTIVE ALARMS ({len(alarms)})" + ("" if alarms else ": none"), "bold red" if alarms else "green"))
    for a in sorted(alarms, key=lambda a: -a.get("level", 0)):
        where = f" on {a['source']}" if a.get("source") else ""
        out.append((f"  level {a.get('level')} {a['name']}{where}, since {view.when(a.get('since'), now)}"
                    [:view.WIDTH], "red"))
    return out


def plain(live: dict[str, Any], trouble: str = "") -> str:
    return "\n".join(text.rstrip() for text, _style in lines(live, trouble))


def _follow(path: str, args: argparse.Namespace) -> None:
    """Ask, draw, wait; the first request's failure is the command's (exit 3), later
    ones are shown while the agent is away (a restart) and the view goes on."""
    live = request(path, "live")["live"]
    trouble = ""
    footer = (f"every {args.interval:g} s; Ctrl-C to stop", "dim")
    with contextlib.ExitStack() as stack:
        screen = stack.enter_context(view.LiveView()) if view.is_tty() and not args.json else None
        done = 0
        while True:
            if screen is not None:
                screen.show([*lines(live, trouble), footer])
            elif args.json:
                print(json.dumps(live), flush=True)
            else:
                print(plain(live, trouble) + "\n", flush=True)
            done += 1
            if args.count and done >= args.count:
                return
            time.sleep(args.interval)
            try:
                live, trouble = request(path, "live")["live"], ""
            except AgentUnreachable as e:
                trouble = f"agent not answering ({time.strftime('%H:%M:%S')}): {e}"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0.05 to 3600, got {text!r}")
    return value


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("watch", help="live view of the vehicle (speeds, battery, cells, position, alarms)")
    agent_options(p, json=False)
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="S", help="seconds between refreshes (1)")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N refreshes (0: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON line (the agent's live reply) per refresh")
    p.set_defaults(func=lambda args: until_ctrl_c(_follow, args))
