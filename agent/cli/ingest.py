"""``ebike-agent ingest``: the reference cloud-side consumer (subscribe, decode, store),
agent/fleet/ behind a command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from agent.cli.common import broker_address, check_kid, read_key
from agent.errors import AgentError, ConfigError, StoreUnavailable

if TYPE_CHECKING:
    from agent.fleet.ingest import Ingest
    from agent.fleet.signing import Signer

log = logging.getLogger(__name__)


def default_client_id() -> str:
    """``ebike-ingest-<host>-<pid>``: unique per process, so any number of consumers can
    run side by side (a broker drops the older of two connections with one client id,
    and two consumers sharing one kept knocking each other off). The host name is cut
    to letters, digits and dashes, which every broker takes, and to 32 of them."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"ebike-ingest-{host}-{os.getpid()}"


def _signer(args: argparse.Namespace) -> Signer | None:
    """The key that signs the acks (``--ack-key`` with ``--ack-kid``), or None."""
    if not args.ack_key and not args.ack_kid:
        return None
    if not args.ack_key or not args.ack_kid:
        raise ConfigError("command line", "--ack-key", "--ack-key and --ack-kid go together")
    from agent.fleet.signing import Signer

    kid = check_kid(args.ack_kid)
    private = read_key(args.ack_key, "--ack-key")
    try:
        return Signer(private, kid)
    except ConfigError as e:
        raise ConfigError(args.ack_key, "--ack-key", e.reason) from e


# A flush stores what arrived in one transaction: once this many batches wait, or the
# first of them waited this long (a transaction per message was most of the cost).
FLUSH_BATCHES = 500
FLUSH_AFTER_S = 0.02


def _report(args: argparse.Namespace) -> int:
    """``ingest report``: every device as the database sees it, whichever consumer stored what."""
    from agent.fleet.ingest import Ingest, is_postgres

    if not is_postgres(args.db) and not os.path.exists(args.db):
        raise ConfigError("command line", "--db", f"{args.db}: no such SQLite database (nothing was stored there)")
    store = Ingest(args.db)
    try:
        devices = store.fleet()
    finally:
        store.close()
    if args.json:
        print(json.dumps({"devices": devices}, indent=1))
        return 0
    header = ("DEVICE", "LAST SEEN (UTC)", "RECORDS", "LAST SEQ", "UNANNOUNCED GAPS", "DUPLICATES", "ACTIVE ALARMS")
    rows = [(d, v["last_seen"], str(v["records"]), str(v["last"]),
             f"{v['unannounced']} in {len(v['gaps'])}" if v["gaps"] else "0", str(v["duplicates"]),
             ", ".join(f"{a['name']}#{a['instance']}" for a in v["active_alarms"]) or "-")
            for d, v in sorted(devices.items())]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"{len(devices)} devices, {sum(v['records'] for v in devices.values())} records, "
          f"{sum(v['unannounced'] for v in devices.values())} missing without an announcement")
    return 0


def _report_of(store: Ingest) -> dict[str, Any]:
    """The consumer's report; its own counters alone while the database is away."""
    try:
        return store.report()
    except StoreUnavailable as e:
        return {**store.counters(), "database": str(e)}


def _ingest(args: argparse.Namespace) -> int:
    if args.action == "report":
        return _report(args)
    from agent.fleet.ingest import Ingest, ack_for
    from agent.fleet.subscriber import Subscriber

    if args.init and args.broker is None:
        Ingest(args.db, init=True).close()
        print("ingest: the database's schema is up to date")
        return 0
    if args.broker is None:
        raise ConfigError("command line", "--broker", "required to consume (HOST:PORT)")
    host, port = args.broker
    signer = _signer(args)
    store = Ingest(args.db, init=args.init)
    topic = args.prefix + "+/telemetry"
    if args.group:
        topic = f"$share/{args.group}/{topic}"
    arrived = {"first": 0.0}

    def on_message(msg_topic: str, payload: bytes) -> None:
        if not store.pending:
            arrived["first"] = time.monotonic()
        store.accept(msg_topic, payload)

    def flush() -> None:
        # Acks only for what the transaction that just committed holds. While the
        # database is away the consumer leaves the group, so that members which can
        # store take its share, and joins again once it answers.
        deferred = store.deferred
        for msg_topic, seqs, payload in store.flush():
            if not args.no_ack:
                sub.publish(*ack_for(msg_topic, seqs, payload, signer))
        if store.deferred > deferred:
            sub.leave()

    # A chosen id keeps its session (what arrives during a restart waits for it); a
    # per-process one could never be resumed, so its session ends with the process and
    # the broker keeps nothing for it (a device sends again what no ack covered).
    client_id = args.client_id or default_client_id()
    log.info("consumer: client id %s%s", client_id, ", acks signed by " + signer.kid if signer else "")
    sub = Subscriber(client_id, host, port, topic, on_message, persistent=bool(args.client_id))
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sub.connect()
    deadline = time.monotonic() + args.duration if args.duration else None
    next_report = time.monotonic() + args.report_every
    try:
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            wait = FLUSH_AFTER_S - (time.monotonic() - arrived["first"]) if store.pending else 0.2
            sub.loop(max(0.0, wait))
            if not sub.wanted and store.available():
                sub.join()
            if store.pending and (len(store.pending) >= FLUSH_BATCHES
                                  or time.monotonic() - arrived["first"] >= FLUSH_AFTER_S):
                flush()
            if args.report_every and time.monotonic() >= next_report:
                print(json.dumps(_report_of(store)), flush=True)
                next_report += args.report_every
        flush()
    finally:
        sub.close()
    report = _report_of(store)
    store.close()
    print(json.dumps(report), flush=True)
    if report["bad_batches"]:
        raise AgentError(f"{report['bad_batches']} bad batches received")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ingest", help="cloud-side consumer: store received batches in SQLite or PostgreSQL",
                       description="Consume the fleet's batches and acknowledge what is stored; "
                                   "'ingest report' prints every device as the database sees it.")
    p.add_argument("action", nargs="?", choices=["report"],
                   help="report: per device last seen, records, unannounced gaps, duplicates refused, active alarms")
    p.add_argument("--broker", type=broker_address, help="HOST:PORT (required to consume)")
    p.add_argument("--db", required=True, help="SQLite file, or postgresql://USER@HOST:PORT/DB (psycopg 3)")
    p.add_argument("--init", action="store_true", help="create or migrate the database's schema (PostgreSQL "
                   "needs it once; SQLite makes its own); without --broker, exit after it")
    p.add_argument("--json", action="store_true", help="report: JSON instead of a table")
    p.add_argument("--prefix", default="ebike/v1/", help="topic prefix before the device id")
    p.add_argument("--client-id", help="MQTT client id, whose session then persists (kept an hour while this "
                   "consumer is away); default ebike-ingest-<host>-<pid>, a session that ends with the process")
    p.add_argument("--duration", type=float, default=0, help="stop after S seconds (0 = until signalled)")
    p.add_argument("--report-every", type=float, default=0, help="print a JSON report every S seconds")
    p.add_argument("--group", help="join the MQTT 5 shared subscription $share/GROUP/... (scale out consumers)")
    p.add_argument("--no-ack", action="store_true", help="do not acknowledge stored records to the devices")
    p.add_argument("--ack-key", metavar="PRIV.pem", help="sign each ack (COSE_Sign1) with this Ed25519 private "
                   "key, for devices with [commands] ack_keys (ebike-agent keys generate)")
    p.add_argument("--ack-kid", metavar="KID", help="the --ack-key's key id, as the devices know it")
    p.set_defaults(func=_ingest)
