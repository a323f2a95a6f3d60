"""``ebike-agent plot``: a ride as a PNG, stacked panels on one time axis (speed from
each source and fused, power, state of charge, cell spread, temperatures) with the
alarms marked; from a capture (run through the kernel as ``replay`` runs it) or, with
``--last``, from the live windows of the running agent's last 10 minutes (the
``recent`` request), else from those the outbox still holds (what the cloud has not
acknowledged). matplotlib is an optional extra, imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError, StoreError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WIDTH_IN = 14.0
PANEL_IN = 2.0
DPI = 100
# Alarm names written beside their marks; beyond, the marks alone.
LABELLED_ALARMS = 30


@dataclass
class Ride:
    """What a plot shows: per signal id, (time, window mean); the alarms; how to name
    the times (a Capture's ``clock``)."""

    title: str
    clock: str
    start: float | None = None  # the time axis's 0: the capture's first read, the first window
    series: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    alarms: list[dict[str, Any]] = field(default_factory=list)

    def window(self, start: float, length: float, rows: list[tuple[float, ...]]) -> None:
        """A live window's rows ``(signal id, count, min, max, mean, last, ...)``: its mean."""
        for row in rows:
            self.series.setdefault(int(row[0]), []).append((start + length / 2, row[4]))


def duration(text: str) -> float:
    """``--last``: ``10m``, ``90s``, ``2h``, ``1d`` or seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 10m, 90s or 2h, got {text!r}")
    return float(m[1]) * UNITS[m[2] or "s"]


def _plot(args: argparse.Namespace) -> int:
    if bool(args.file) == bool(args.last):
        raise AgentError("give a capture FILE or --last DURATION, not both or neither")
    try:
        import matplotlib
    except ImportError as e:
        raise AgentError("plot needs matplotlib: pip install 'ebike-edge[plot]' (make setup installs it)") from e
    matplotlib.use("Agg")
    ride = _from_capture(args) if args.file else _from_outbox(args)
    width, height = draw(ride, args.out)
    if args.json:
        print(json.dumps({"png": args.out, "width": width, "height": height, "title": ride.title,
                          "signals": {str(sid): len(points) for sid, points in ride.series.items()},
                          "alarms": len(ride.alarms)}))
    else:
        print(f"{args.out}: {width} x {height} px, {len(ride.alarms)} alarm marks: {ride.title}")
    return 0


def _from_capture(args: argparse.Namespace) -> Ride:
    from agent import capture
    from agent.fusion.spec import OUT_WINDOW, WIN_LIVE

    run = capture.replay_from_args(args)
    ride = Ride("", run.cap.clock)
    for out in run.outputs():
        if out[0] == OUT_WINDOW and out[1] == WIN_LIVE:
            ride.window(out[2], out[3], out[4])
    ride.alarms = run.alarms
    ride.start = run.first
    ride.title = f"{os.path.basename(args.file)} ({run.cap.fmt}, {run.summary()['frames']:,} frames)"
    return ride


def _from_outbox(args: argparse.Namespace) -> Ride:
    """The live windows (and alarms) of the last ``--last`` up to the newest: from the
    running agent's memory, else read-only from the outbox."""
    from agent import config, wire
    from agent.cli import view
    from agent.cli.common import DEFAULT_CONFIG
    from agent.store.outbox import LANE_ALARM, LANE_LIVE

    cfg = config.load(args.config or DEFAULT_CONFIG)
    rows, where = _recent_records(cfg.control_socket, cfg.outbox.path)
    newest = max((t for lane, t, _body in rows if lane == LANE_LIVE), default=None)
    if newest is None:
        raise StoreError(f"no live windows in the {where}")
    ride = Ride(f"{cfg.device_id}: the last {view.age(args.last)} to {view.when(newest)} ({where})", "unix")
    for lane, t, body in sorted(rows, key=lambda row: row[1]):
        if t < newest - args.last:
            continue
        try:
            rec = wire.strict_loads(body, "record", 8)
        except ValueError:
            continue  # not a record of this wire format: nothing to draw
        if lane == LANE_LIVE and rec.get("k") == wire.KIND_WINDOW and rec["d"] == round(cfg.windows.live * 1000):
            if ride.start is None:
                ride.start = rec["t"] / 1000
            ride.window(rec["t"] / 1000, rec["d"] / 1000, [wire.window_values(row) for row in rec["s"]])
        elif lane == LANE_ALARM and rec.get("k") == wire.KIND_ALARM:
            ride.alarms.append({"t": rec["t"] / 1000, "name": rec["name"], "raised": rec["on"], "level": rec["lvl"]})
    return ride


def _recent_records(socket: str, path: str) -> tuple[list[tuple[int, float, bytes]], str]:
    """``(lane, time, body)`` of the recent live windows and alarms, and where they came
    from: the running agent (10 min in memory), else the outbox file, read-only, which
    keeps only what the cloud has not acknowledged."""
    import base64

    from agent.control.client import request
    from agent.errors import AgentUnreachable
    from agent.store.outbox import LANE_ALARM, LANE_LIVE, open_read_only, read_records

    try:
        reply = request(socket, "recent", timeout=10.0)
        return [(lane, t, base64.b64decode(body)) for lane, t, body in reply["records"]], "agent's last 10 min"
    except AgentUnreachable:
        print(f"agent: not running (no answer on {socket}): reading the outbox", file=sys.stderr)
    if not os.path.exists(path):
        raise StoreError(f"no agent running and no outbox at {path}")
    db = open_read_only(path)
    try:
        db.execute("BEGIN")  # one moment: the agent may acknowledge (delete) rows meanwhile
        rows = [row[1:] for lane in (LANE_LIVE, LANE_ALARM) for row in read_records(db, path, lane)]
    finally:
        db.close()
    return rows, "outbox (only what the cloud has not acknowledged)"


def draw(ride: Ride, out: str) -> tuple[int, int]:
    """The PNG at ``out``; its width and height in pixels."""
    import matplotlib.pyplot as plt

    from agent.capture import CONTROLLER_I, CONTROLLER_V, KEY_SIGNALS, clock_text
    from agent.fusion.spec import S_POWER

    panels: dict[str, list[tuple[int, str, str]]] = {}
    for sid, label, unit, panel in KEY_SIGNALS:
        if panel:
            panels.setdefault(panel, []).append((sid, label, unit))
    series = dict(ride.series)
    if S_POWER not in series and CONTROLLER_V in series and CONTROLLER_I in series:
        amps = dict(series[CONTROLLER_I])
        series[S_POWER] = [(t, v * amps[t]) for t, v in series[CONTROLLER_V] if t in amps]
        panels["power"] = [(S_POWER, "controller V x I", "W")]
    times = [t for points in series.values() for t, _v in points] + [a["t"] for a in ride.alarms]
    t0 = ride.start if ride.start is not None else min(times, default=0.0)
    scale, unit = (60.0, "min") if max(times, default=0.0) - t0 > 600 else (1.0, "s")

    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(WIDTH_IN, PANEL_IN * len(panels) + 1), dpi=DPI)
    fig.suptitle(ride.title)
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        drawn = False
        for sid, label, _unit in lines:
            points = series.get(sid)
            if points:
                ax.plot([(t - t0) / scale for t, _v in points], [v for _t, v in points], label=label)
                drawn = True
        ax.set_ylabel(f"{panel} ({lines[0][2]})")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(loc="upper left", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        for a in ride.alarms:
            ax.axvline((a["t"] - t0) / scale, color="red" if a["raised"] else "green",
                       linestyle="-" if a["raised"] else ":", linewidth=1)
    for a in [a for a in ride.alarms if a["raised"]][:LABELLED_ALARMS]:
        axes[0].annotate(a["name"], ((a["t"] - t0) / scale, 1), xycoords=("data", "axes fraction"), rotation=90,
                         fontsize=7, color="red", va="top", ha="right")
    start = clock_text(t0, ride.clock, True)
    axes[-1].set_xlabel(f"{unit} from {start}" if start else f"{unit} from the start of the capture")
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as e:
        raise AgentError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    width, height = (round(x * DPI) for x in fig.get_size_inches())
    return width, height


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.capture import add_capture_arguments
    from agent.cli.common import DEFAULT_CONFIG

    p = sub.add_parser("plot", help="a ride as a PNG: speed, power, SoC, cells, temperatures, alarms",
                       description="Plot a capture (run through the kernel as replay runs it) or the live windows "
                                   "of the last DURATION in the outbox (up to its newest; read-only, no agent "
                                   "used) as stacked panels on one time axis, alarms marked.",
                       epilog="exit codes: 0 written; 1 nothing to plot, matplotlib missing, or a file that "
                              "cannot be read or written; 2 usage")
    p.add_argument("file", metavar="FILE", nargs="?", help="a capture (formats as for replay)")
    p.add_argument("--last", metavar="DURATION", type=duration,
                   help="instead of FILE: the outbox's last DURATION of live windows (10m, 90s, 2h)")
    p.add_argument("-o", "--out", required=True, metavar="PNG", help="the image to write")
    add_capture_arguments(p, "with FILE: fusion, alarm and window settings, source names and protocols from this "
                             "configuration; with --last: the agent's configuration, whose outbox is read "
                             f"(default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="say what was drawn as one JSON object")
    p.set_defaults(func=_plot)
