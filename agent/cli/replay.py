"""``ebike-agent replay FILE``: a capture through the agent's kernel, offline, with the
capture's own times: the windows, alarms and events the agent would have made of it, so
a problem from the road reproduces on a desk. No agent is used or needed.

Exit codes: 0 replayed; 1 the file cannot be read or is of no known format; 2 usage, or
a --config / --dbc that cannot be used.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

FORMATS_HELP = ("candump -L log, SLCAN text, ebike-sim --manifest JSON Lines, tap chunks (JSON Lines), NMEA, "
                "a Sur-Ron sniffer log, hex lines or a raw UART dump")
# Unknown CAN ids listed in the text summary, most frequent first.
SHOWN_IDS = 8


def _replay(args: argparse.Namespace) -> int:
    from agent import capture
    from agent.fusion.spec import OUT_ALARM, OUT_CHANGE, OUT_SNAPSHOT, OUT_WINDOW, WIN_LIVE

    run = capture.replay_from_args(args, args.speed)
    stats = _SignalStats()
    for out in run.outputs():
        kind = out[0]
        if kind == OUT_WINDOW and out[1] == WIN_LIVE:
            stats.add(out[4])
        if not args.json:
            continue
        if kind == OUT_WINDOW:
            print(json.dumps(_window(run, out)))
        elif kind == OUT_ALARM:
            print(json.dumps({"type": "alarm", **run.alarm(out)}))
        elif kind == OUT_SNAPSHOT:
            print(json.dumps({"type": "event", **run.event(out)}))
        elif kind == OUT_CHANGE:
            _, sid, t, value = out
            print(json.dumps({"type": "change", "t": t, "rel_s": round(run.rel(t), 3), "signal": run.name(sid),
                              "value": value}))
    summary = run.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        _text(summary, stats, args.config)
    return 0


def _window(run: Any, out: tuple[Any, ...]) -> dict[str, Any]:
    _, which, start, length, rows = out
    from agent.capture import WINDOW_SETS

    return {"type": "window", "set": WINDOW_SETS[which], "t": round(start, 3), "rel_s": round(run.rel(start), 3),
            "d": length, "signals": {run.name(sid): {"n": n, "min": lo, "max": hi, "mean": mean, "last": last}
                                     for sid, n, lo, hi, mean, last, _t in rows}}


class _SignalStats:
    """The key signals' range and last value over the live windows."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        for sid, _n, lo, hi, _mean, last, _t in rows:
            s = self.seen.get(sid)
            self.seen[sid] = [lo, hi, last] if s is None else [min(s[0], lo), max(s[1], hi), last]


def _g(v: float) -> str:
    return f"{v:.4g}"


def _text(s: dict[str, Any], stats: _SignalStats, config: str | None) -> None:
    from agent.capture import KEY_SIGNALS, clock_text
    from agent.cli import view

    name = s["file"].rsplit("/", 1)[-1]
    _wrapped(f"replay of {name}: {s['format']}, {view.number(s['frames'])} frames in {view.age(s['duration_s'])}")
    _wrapped(f"offline: no agent used; kernel {s['kernel']}; settings: "
             + (f"from {config}" if config else "the agent's defaults (--config for the vehicle's)"))
    span = f" ({clock_text(s['start'], s['clock'], True)} to {clock_text(s['end'], s['clock'])})" if s["clock"] else ""
    _wrapped(f"times: {s['timing']}{span}")
    for note in s["notes"]:
        _wrapped(f"note: {note}")
    print()
    view.table(None, ("source", "protocol", "format", "frames", "bad frames"),
               [(src["name"], src["protocol"], src["format"], view.number(src["frames"]),
                 ", ".join(f"{view.number(n)} {why}" for why, n in src["bad"].items()) or "none")
                for src in s["sources"]])
    if s["bad_frames"].get("unreadable lines"):
        print(f"unreadable lines in the file: {view.number(s['bad_frames']['unreadable lines'])}")
    if s["unknown_ids"]:
        ids = list(s["unknown_ids"].items())
        more = f", {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
        _wrapped("CAN ids not in the DBC: " + ", ".join(f"{i} x{view.number(n)}" for i, n in ids[:SHOWN_IDS]) + more)
    w = s["windows"]
    print(f"windows: {view.number(w['live'])} live, {view.number(w['history'])} history; "
          f"events: {s['events']}; changes: {view.number(s['changes'])}")
    rows = [(label + (" temperature" if unit == "C" else ""), _g(v[0]), _g(v[1]), _g(v[2]), unit)
            for sid, label, unit, _panel in KEY_SIGNALS if (v := stats.seen.get(sid)) is not None]
    print()
    if rows:
        view.table("signals (live windows):", ("signal", "min", "max", "last", "unit"), rows)
    else:
        print("signals: none of speed, power, battery, SoC, cells or temperatures")
    print()
    alarms = s["alarms"]
    raised = sum(a["raised"] for a in alarms)
    print(f"alarms: {raised} raised, {len(alarms) - raised} cleared" + (":" if alarms else ""))
    if alarms:
        # A capture without times has no clock to show.
        keep = [0, 1, 2, 3, 4, 5] if s["clock"] else [0, 2, 3, 4, 5]
        timeline = [(f"+{a['rel_s']:.1f} s", clock_text(a["t"], s["clock"]),
                 f"L{a['level']} raised" if a["raised"] else "cleared",
                 a["name"] + (f" ({a['source']})" if a["source"] else ""), _g(a["value"]), _g(a["threshold"]))
                for a in alarms]
        view.table(None, [("at", "clock", "event", "alarm", "value", "limit")[k] for k in keep],
                   [[row[k] for k in keep] for row in timeline])


def _wrapped(text: str) -> None:
    import textwrap

    print(textwrap.fill(text, 80, subsequent_indent="  "))


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.capture import add_capture_arguments

    p = sub.add_parser("replay", help="run a capture through the kernel offline: windows, alarms, events",
                       description="Run a capture (" + FORMATS_HELP + ") through the agent's kernel with the "
                                   "capture's own times, offline (no agent is used), and print what the agent "
                                   "would have made of it.",
                       epilog="exit codes: 0 replayed; 1 the file cannot be read or is of no known format; "
                              "2 usage, or a --config or --dbc that cannot be used")
    p.add_argument("file", metavar="FILE", help="the capture")
    add_capture_arguments(p)
    p.add_argument("--speed", type=float, default=0.0, metavar="X",
                   help="replay X times faster than the capture ran (default 0: as fast as it goes)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line per window, alarm, event and change, then the summary")
    p.set_defaults(func=_replay)
