"""``ebike-agent buffer stats|export|purge``: the durable outbox, as a technician sees and
handles it.

- ``stats``: from the running agent (with what is in flight and dropped) or, when it is
  not running, read-only from the file.
- ``export``: the stored records as CSV or a CBOR sequence, read from the file opened
  read-only: the agent may go on running (SQLite's WAL lets a reader in beside its
  writer) and its lock is never taken.
- ``purge``: one lane's records deleted and announced to the cloud as a gap, by the
  running agent, or, when none runs, here under the outbox's lock.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import os
import sqlite3
import time
from collections.abc import Callable
from typing import IO, Any

from agent import config
from agent.cli import checks, view
from agent.cli.common import agent_options, control_socket
from agent.control.client import request
from agent.errors import AgentError, AgentUnreachable, AlreadyRunning, ConfigError, StoreError
from agent.store.outbox import LANES, open_read_only, read_records, read_stats, stored_stats

# A purge of a long lane deletes its rows and writes the gap in one transaction.
PURGE_TIMEOUT = 30.0
PROGRESS_EVERY = 500  # records between two updates of the progress bar
MIB = 1024 * 1024
CSV_COLUMNS = ("seq", "lane", "time", "epoch", "kind", "detail")
LANE_NAMES = {number: name for name, number in LANES.items()}
Writer = Callable[[int, int, float, bytes], None]


def _from_file(cfg: config.Config) -> dict[str, Any]:
    """The outbox's stats read-only from its file; no file is an error (no agent either)."""
    if not os.path.exists(cfg.outbox.path):
        raise StoreError(f"no agent running and no outbox at {cfg.outbox.path}")
    return read_stats(cfg.outbox.path)


def _stats(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    sock = control_socket(args, cfg)
    st = checks.agent_state(sock)
    stats = dict(st["outbox"], source="agent") if st is not None else dict(_from_file(cfg), source="file")
    if args.json:
        view.print_json(stats)
        return 0
    print(checks.agent_line(sock, st, f"its outbox {cfg.outbox.path}" if st else
                            f"read-only from {cfg.outbox.path}"))
    _print_stats(stats, cfg.outbox.quota_mb * MIB)
    return 0


def _print_stats(stats: dict[str, Any], configured_quota: float) -> None:
    now = time.time()
    oldest = stats.get("oldest_by_lane") or {}
    rows = [[lane, view.number(n), view.when(oldest.get(lane), now) if n else "-"]
            for lane, n in stats["depth"].items()]
    rows.append(["total", view.number(stats["records"]), view.when(stats.get("oldest"), now) if stats["records"]
                 else "-"])
    view.table(None, ("lane", "records", "oldest"), rows)
    quota = stats.get("quota_bytes") or configured_quota
    print(f"size: {view.number(stats['bytes'])} bytes of records; quota {quota / MIB:,.0f} MB")
    seqs = f"sequence: last stored {view.number(stats['last_seq'])}"
    if stats.get("last_acked") is not None:
        seqs += f", last acknowledged {view.number(stats['last_acked'])}"
    if stats.get("in_flight") is not None:
        seqs += f"; {view.number(stats['in_flight'])} in flight"
    print(seqs)
    if stats.get("dropped"):
        print(f"dropped before they were sent: {view.number(stats['dropped'])} (announced to the cloud as gaps)")
    failed = stats.get("storage_failed")
    if failed:
        print(f"IN MEMORY ONLY: the file cannot be written ({failed['cause']}), "
              f"since {view.when(failed['since'], now)}")
    if stats.get("disk_full_now"):
        print("DISK FULL: dropping the oldest, lowest-priority records by the quota policy")


def _export(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    path = cfg.outbox.path
    if not os.path.exists(path):
        raise StoreError(f"no outbox at {path} (outbox.path of {args.config}): nothing to export")
    db = open_read_only(path)
    try:
        if args.format == "cbor":
            with open(args.output, "wb") as binary:
                written = _dump(db, path, args.lane, _cbor_writer(binary))
        else:
            with open(args.output, "w", newline="", encoding="utf-8") as text:
                written = _dump(db, path, args.lane, _csv_writer(text))
    except OSError as e:
        raise StoreError(f"cannot write {args.output}: {e.strerror or e}") from e
    finally:
        db.close()
    if args.json:
        view.print_json({"outbox": path, "output": args.output, "format": args.format, "lane": args.lane,
                         "records": written})
    else:
        what = f"{args.lane} records" if args.lane else "records"
        print(f"{view.number(written)} {what} of {path} written to {args.output} ({args.format})")
    return 0


def _dump(db: sqlite3.Connection, path: str, lane: str | None, write: Writer) -> int:
    """Every record (of ``lane``) through ``write``, with a progress bar; how many. One
    read transaction: the count and the rows are of the same moment, whatever the agent
    acknowledges meanwhile."""
    db.execute("BEGIN")
    stats = stored_stats(db, path)
    total = stats["depth"][lane] if lane else stats["records"]
    written = 0
    with view.progress("export", total) as bar:
        for record in read_records(db, path, LANES[lane] if lane else None):
            write(*record)
            written += 1
            if written % PROGRESS_EVERY == 0:
                bar.update(written)
        bar.update(written, total=written)
    return written



# Nesting of a record body: a snapshot's arrays in a map, a result's message inside.
RECORD_DEPTH = 16


def _cbor_writer(out: IO[Any]) -> Writer:
    """Each record one CBOR map ``{seq, lane, t, body}``, one after the other (RFC 8742)."""
    from agent import wire  # imports cbor2

    def write(seq: int, lane: int, t: float, body: bytes) -> None:
        item: dict[str, Any] = {"seq": seq, "lane": LANE_NAMES.get(lane, lane), "t": t}
        try:
            item["body"] = wire.strict_loads(body, "record", RECORD_DEPTH)
        except ValueError as e:
            item.update(body=body, error=str(e))
        out.write(wire.dumps(item))

    return write


def _csv_writer(out: IO[Any]) -> Writer:
    """One row per record: its sequence number, lane, time, kind and its body in words."""
    from agent import wire  # imports cbor2

    rows = csv.writer(out)
    rows.writerow(CSV_COLUMNS)

    def write(seq: int, lane: int, t: float, body: bytes) -> None:
        try:
            kind, detail = describe(wire.strict_loads(body, "record", RECORD_DEPTH))
        except ValueError as e:
            kind, detail = "?", str(e)
        except (KeyError, TypeError, IndexError) as e:
            kind, detail = "?", f"not a record of the wire format: {type(e).__name__} {e}"
        local = datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
        rows.writerow((seq, LANE_NAMES.get(lane, lane), local, f"{t:.3f}", kind, detail))

    return write


def describe(record: Any) -> tuple[str, str]:
    """A record's kind and its content in words (docs/wire.cddl): a window's signals with
    count, min, max, mean and last; changes; an alarm's raise or clear; a snapshot part;
    the sequence numbers a gap announces; a command's result; a raw record's samples per
    signal."""
    from agent import wire
    from agent.fusion.spec import ALARM_NAMES

    if not isinstance(record, dict):
        return "?", repr(record)
    k = record.get("k")
    if k == wire.KIND_WINDOW:
        rows = [wire.window_values(row) for row in record["s"]]
        signals = "; ".join(f"{_signal(sid)} n={n} min={lo:g} max={hi:g} mean={mean:g} last={last:g}"
                            for sid, n, lo, hi, mean, last in rows)
        return "window", f"{_clock(record['t'])} +{record['d'] / 1000:g} s: {signals}"
    if k == wire.KIND_CHANGE:
        return "change", "; ".join(f"{_signal(sid)}={value:g} at {_clock(ms)}" for sid, ms, value in record["c"])
    if k == wire.KIND_ALARM:
        where = f" (source #{record['inst']})" if record["inst"] >= 0 else ""
        return "alarm", (f"{record['name']}{where} {'raised' if record['on'] else 'cleared'}, level "
                         f"{record['lvl']}: value {record['v']:g}, threshold {record['thr']:g}")
    if k == wire.KIND_SNAPSHOT:
        samples = sum(len(values) for _sid, _dt, values in record["s"])
        names = ", ".join(_signal(sid) for sid, _dt, _values in record["s"])
        return "snapshot", (f"{ALARM_NAMES.get(record['code'], 'request')} part {record['part'] + 1} of "
                            f"{record['parts']}, {_clock(record['from'])} to {_clock(record['to'])}: "
                            f"{samples} samples of {names}")
    if k == wire.KIND_GAP:
        runs = record["runs"]
        what = "record" if len(runs) == 1 and runs[0][0] == runs[0][1] else "records"
        listed = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
        return "gap", f"{what} {listed} dropped ({record['why']})"
    if k == wire.KIND_RESULT:
        r = record["r"]
        return "result", f"command {r.get('id')} {r.get('status')}: {r.get('reason')}"
    if k == wire.KIND_UPDATE:
        return "update", f"version {record['failed']} failed ({record['why']}); back on {record['running']}"
    if k == wire.KIND_RAW:
        counts = collections.Counter(sid for sid, _ms, _v in wire.raw_samples(record))
        lost = f", {record['lost']} overwritten unread" if record.get("lost") else ""
        return "raw", (f"{_clock(record['t'])} +{record['d'] / 1000:g} s, {len(record['b'])} B {record['z']}{lost}: "
                       + "; ".join(f"{_signal(sid)} n={n}" for sid, n in sorted(counts.items())))
    return str(k), repr(record)


def _signal(sid: int) -> str:
    from agent.signals import BY_ID

    return BY_ID[sid].name if sid in BY_ID else f"signal #{sid}"


def _clock(ms: int) -> str:
    """A wire time (ms since the epoch) as the local clock to the millisecond."""
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def _purge(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    sock = control_socket(args, cfg)
    if not args.yes:
        st = checks.agent_state(sock)
        stats = st["outbox"] if st is not None else _from_file(cfg)
        count = stats["depth"].get(args.lane, 0)
        kept = "those in flight and the gap records" if args.lane == "alarm" else "those in flight"
        raise ConfigError("command line", "--yes",
                          f"purge would delete up to {view.number(count)} {args.lane} records waiting in "
                          f"{cfg.outbox.path} (all but {kept}), never to reach the cloud: nothing deleted; "
                          f"add --yes to do it")
    try:
        purged = int(request(sock, "purge", timeout=PURGE_TIMEOUT, lane=args.lane)["purged"])
        by = "agent"
    except AgentUnreachable:
        purged = _purge_file(cfg, args.lane, sock)
        by = "file"
    if args.json:
        view.print_json({"lane": args.lane, "purged": purged, "by": by})
    else:
        who = "by the running agent" if by == "agent" else f"from {cfg.outbox.path} (agent not running)"
        print(f"purged {view.number(purged)} {args.lane} records {who}; announced to the cloud as a gap")
    return 0


def _purge_file(cfg: config.Config, lane: str, sock: str) -> int:
    """No agent answers: the purge on the file itself, under the outbox's lock, so an
    agent that is starting (or hung, its socket gone) is never written under."""
    from agent import wire
    from agent.store.lock import OutboxLock
    from agent.store.memory import purge_plan
    from agent.store.outbox import Outbox

    path = cfg.outbox.path
    if not os.path.exists(path):
        raise StoreError(f"no agent running and no outbox at {path}: nothing to purge")
    try:
        lock = OutboxLock(path)
    except AlreadyRunning as e:
        raise AgentError(f"{e}, but no agent answers on {sock}: it may be starting or hung; try again in a few "
                         f"seconds, or stop it first") from e
    try:
        box = Outbox(path, int(cfg.outbox.quota_mb * MIB),
                     gap_body=lambda runs, why: wire.gap_record(runs, why, time.time()))
        try:
            gone = box.purge(*purge_plan(lane))
        finally:
            box.close()
    finally:
        lock.close()
    if gone is None:
        raise StoreError(f"outbox {path}: the disk is too full even to delete: nothing purged")
    return len(gone)


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("buffer", help="the durable outbox: stats, export, purge")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", help="records per lane and the oldest of each, bytes, sequence numbers; "
                                             "from the running agent, else read-only from the file")
    stats.set_defaults(func=_stats)
    export = actions.add_parser(
        "export", help="write the stored records to a file",
        description="Write the outbox's records (sequence number, lane, time, body decoded) to FILE, read "
                    "from the outbox file opened read-only: the agent may keep running, its lock is not taken. "
                    "CSV: one row per record (seq, lane, time, epoch, kind, detail: the body in words). "
                    "CBOR: a CBOR sequence (RFC 8742, no enclosing array), one map {seq, lane, t, body} per "
                    "record, read back with cbor2.CBORDecoder(f).decode() until the end of the file.")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    export.add_argument("--format", choices=("csv", "cbor"), default="csv", help="default csv")
    export.add_argument("--lane", choices=tuple(LANES), help="only this lane's records")
    export.set_defaults(func=_export)
    purge = actions.add_parser(
        "purge", help="delete one lane's waiting records (needs --yes)",
        description="Delete the records of one lane that wait in the outbox (not those in flight), and "
                    "announce their sequence numbers to the cloud as a gap (reason: purged); gap records "
                    "themselves stay. Done by the running agent, or, when none runs, on the file under the "
                    "outbox's lock. Without --yes: says how many records would go, deletes nothing, exit 2.")
    purge.add_argument("--lane", required=True, choices=tuple(LANES))
    purge.add_argument("--yes", action="store_true", help="really delete them")
    purge.set_defaults(func=_purge)
    for action in (stats, export, purge):
        agent_options(action, socket=action is not export)
