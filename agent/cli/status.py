"""``ebike-agent status``: how a running agent is doing, on one 80-column screen a
technician reads top to bottom: are the buses alive (each source's verdict first), what
is wrong with the vehicle (active alarms), is the data getting out (outbox, uplink), and
is the clock right. ``--json`` prints the agent's status (docs/control.md) as it is."""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO, Any

from agent.cli import view
from agent.cli.common import agent_options, control_socket
from agent.control.client import request

INDENT = "  "
# The kernel's build (agent.fusion.kernel.BUILD) in words.
KERNELS = {"c": "compiled (c)", "py": "pure Python", "python": "pure Python"}
LANES = ("live", "history", "event", "alarm")
# A system clock further than this from the GNSS time is shown as a fault.
CLOCK_OK_S = 2.0
# Message names are cut to this in the health table, which keeps it within 80 columns.
MESSAGE_COLUMN = 20


def _now(st: dict[str, Any]) -> float:
    """When the agent made the status (its clock), so ages read as they were then."""
    if st.get("started_at") is not None and st.get("uptime") is not None:
        return float(st["started_at"]) + float(st["uptime"])
    return time.time()


def _header(st: dict[str, Any], now: float) -> list[tuple[str, str]]:
    kernel = KERNELS.get(st.get("kernel", ""), str(st.get("kernel")))
    since = f" (since {view.when(st['started_at'], now)})" if st.get("started_at") is not None else ""
    lines = [(f"{st.get('device_id', '?')}: ebike-agent {st.get('version', '?')}, kernel {kernel}, "
              f"pid {st.get('pid', '?')}", "bold"),
             (f"up {view.age(st.get('uptime'))}{since}", "")]
    motion = st.get("motion")
    if motion:
        lines.append((f"motion: {motion.get('verdict')} ({motion.get('why')})", ""))
    return lines


def _source(s: dict[str, Any], now: float) -> list[tuple[str, str]]:
    state = "open" if s.get("open") else "CLOSED"
    lines = [(f"{s['name']}  {s.get('port', '')}  {s.get('protocol', '')}  {state}", "bold")]
    verdict = s.get("verdict")
    if verdict:
        good = verdict.get("ok")
        text = str(verdict.get("text", ""))
        if text.lower().startswith("ok"):
            text = text[2:].lstrip(": ")
        lines.append((f"{INDENT}{'OK' if good else 'FAULT'}: {text}", "bold green" if good else "bold red"))
    if s.get("heard"):
        guesses = ", ".join(f"{h['protocol']} ({view.number(h['frames'])} frames)" for h in s["heard"])
        lines.append((f"{INDENT}the bytes look like: {guesses}", "yellow"))
    rates = [f"{s['frames_per_s']:.1f} frames/s" if s.get("frames_per_s") is not None else "",
             f"{view.number(s['bytes_per_s'])} bytes/s" if s.get("bytes_per_s") is not None else ""]
    rates = [r for r in rates if r]
    lines.append((f"{INDENT}{', '.join(rates)}{'; ' if rates else ''}last frame "
                   f"{view.when(s.get('last_frame_at'), now)}", ""))
    bad = s.get("bad_frames") or {}
    if bad:
        lines.append((f"{INDENT}bad frames: " + ", ".join(f"{k} {view.number(v)}" for k, v in bad.items()), ""))
    if s.get("last_error") and s["last_error"] not in str((verdict or {}).get("text")):
        lines.append((f"{INDENT}last error: {s['last_error']}", "red"))
    return lines


def _alarms(alarms: list[dict[str, Any]], now: float) -> list[tuple[str, str]]:
    lines = [(f"ACTIVE ALARMS ({len(alarms)})", "bold red" if alarms else "bold")]
    if not alarms:
        return [*lines, (f"{INDENT}none", "green")]
    for a in sorted(alarms, key=lambda a: (-a.get("level", 0), a.get("since") or 0)):
        where = f" on {a['source']}" if a.get("source") else ""
        lines.append((f"{INDENT}level {a.get('level')} {a['name']}{where}: value {_value(a.get('value'))}, "
                      f"since {view.when(a.get('since'), now)}", "red"))
    return lines


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _health_rows(health: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for h in health:
        period = h.get("period_s")
        state = "TIMED OUT" if h.get("timed_out") else "errors" if _health_errors(h) else "ok"
        rows.append([(h.get("message") or f"slot {h.get('slot')}")[:MESSAGE_COLUMN], h.get("can_id") or "-",
                     h.get("source", ""), _count(h.get("frames", 0)), f"{period:.2f} s" if period else "-",
                     view.age(h.get("age_s")), state])
    return rows


def _health_errors(h: dict[str, Any]) -> str:
    """A message's error counts in words; the table has room only for its state."""
    return ", ".join(f"{view.number(n)} {what}" for what, n in (("timeouts", h.get("timeouts")),
                                                                ("checksum errors", h.get("checksum_errors")),
                                                                ("counter errors", h.get("counter_errors"))) if n)


def _health_notes(health: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f"{INDENT}{h.get('message')} ({h.get('source')}): {_health_errors(h)}", "yellow")
            for h in health if _health_errors(h)]


def _count(n: float) -> str:
    return view.number(n) if n < 1e6 else f"{n / 1e6:.1f} M"


def _outbox(ob: dict[str, Any], now: float) -> list[tuple[str, str]]:
    depth = ob.get("depth") or {}
    lanes = ", ".join(f"{lane} {view.number(depth.get(lane, 0))}" for lane in LANES)
    size = _size(ob["bytes"]) if ob.get("bytes") is not None else "? bytes"
    quota = f" of {_size(ob['quota_bytes'])}" if ob.get("quota_bytes") else ""
    lines = [("OUTBOX", "bold"),
             (f"{INDENT}{view.number(ob.get('records', 0))} records waiting ({lanes}), {size}{quota}", "")]
    if ob.get("oldest") is not None and ob.get("records"):
        lines.append((f"{INDENT}oldest waiting: {view.when(ob['oldest'], now)}", ""))
    failed = ob.get("storage_failed")
    if failed:
        since = f", since {view.when(failed['since'], now)}" if failed.get("since") else ""
        lines.append((f"{INDENT}IN MEMORY ONLY (storage failed: {failed['cause']}){since}", "bold red"))
    if ob.get("disk_full_now"):
        lines.append((f"{INDENT}DISK FULL: oldest history dropped to keep new records", "bold red"))
    return lines


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{view.number(n)} bytes"


def _uplink(up: dict[str, Any], now: float) -> list[tuple[str, str]]:
    lines = [("UPLINK", "bold")]
    if up.get("connected"):
        lines.append((f"{INDENT}connected since {view.when(up.get('connected_since'), now)}", "green"))
    else:
        lines.append((f"{INDENT}NOT CONNECTED to the broker", "bold red"))
    ack = f"{INDENT}last ack {view.when(up.get('last_ack_at'), now)}"
    if up.get("ack_rate") is not None:
        ack += f", {up['ack_rate']:.1f} records/s"
    if up.get("drain_s"):
        ack += f"; backlog sent in ~{view.age(up['drain_s'])}"
    lines.append((ack, ""))
    if up.get("last_error"):
        age = up.get("last_error_age_s")
        at = f" {view.when(now - age, now)}" if age is not None else ""
        lines.append((f"{INDENT}last error{at}: {up['last_error']}", "red"))
    lines.append((f"{INDENT}batches sent {view.number(up.get('batches_sent', 0))}, acked "
                  f"{view.number(up.get('batches_acked', 0))}, failed {view.number(up.get('batches_failed', 0))}", ""))
    return lines


def _budget(b: dict[str, Any]) -> list[tuple[str, str]]:
    """The data budget: the month's bytes, the pace at month end, the level and its meaning."""
    used = f"{_size(b['used_mb'] * 1e6)} sent in {b['month']} (payload {_size(b['payload_mb'] * 1e6)})"
    pace = f"pace {_size(b['pace_mb'] * 1e6)} at month end"
    if not b.get("budget_mb"):
        return [("DATA BUDGET", "bold"), (f"{INDENT}{used}, {pace}; no budget set", "")]
    over = b["pace_mb"] > b["budget_mb"]
    return [("DATA BUDGET", "bold"),
            (f"{INDENT}{used} of {_size(b['budget_mb'] * 1e6)}; {pace}", "yellow" if over else ""),
            (f"{INDENT}level {b['level']}: {b['meaning']}", "yellow" if b["level"] else "green")]


def _clock(clock: dict[str, Any], now: float) -> list[tuple[str, str]]:
    sync = {True: "synchronized (NTP)", False: "NOT synchronized", None: "synchronization unknown"}[
        clock.get("synchronized")]
    lines = [("CLOCK", "bold"), (f"{INDENT}{clock.get('source', 'system')} clock, {sync}", "")]
    offset = clock.get("gnss_offset_s")
    if offset is None:
        lines.append((f"{INDENT}no GNSS time to compare with", ""))
    else:
        ahead = "ahead" if offset > 0 else "behind"
        by = f"{offset:+.2f} s" if abs(offset) < 60 else f"{view.age(abs(offset))} {ahead}"
        lines.append((f"{INDENT}GNSS time against the system clock: {by} ({clock.get('gnss_source')}, "
                      f"{view.when(clock.get('gnss_at'), now)})", "" if abs(offset) < CLOCK_OK_S else "bold red"))
    return lines


def render(st: dict[str, Any], out: IO[str] | None = None) -> None:
    """The status as a technician reads it; piped, plain text within view.WIDTH."""
    stream = out or sys.stdout
    now = _now(st)
    lines = [*_header(st, now), ("", ""), ("SOURCES", "bold")]
    for s in st.get("sources", []):
        lines += _source(s, now)
    lines += [("", ""), *_alarms(st.get("alarms", []), now), ("", "")]
    view.lines(lines, stream)
    view.table("HEALTH (messages)", ["message", "CAN id", "source", "frames", "every", "last", "state"],
               _health_rows(st.get("health", [])), stream=stream)
    lines = [*_health_notes(st.get("health", [])), ("", ""), *_outbox(st.get("outbox", {}), now), ("", ""),
             *_uplink(st.get("uplink", {}), now)]
    if st.get("budget"):
        lines += [("", ""), *_budget(st["budget"])]
    if st.get("clock"):
        lines += [("", ""), *_clock(st["clock"], now)]
    view.lines(lines, stream)


def _status(args: argparse.Namespace) -> int:
    path = control_socket(args)
    st = request(path)["status"]
    if args.json:
        view.print_json(st)
    else:
        render(st)
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="status of the running agent: sources, alarms, outbox, uplink, clock")
    agent_options(p)
    p.set_defaults(func=_status)
