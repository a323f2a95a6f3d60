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
from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
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


def _ingest(args: argparse.Namespace) -> int:
    from agent.fleet.ingest import Ingest, ack_for
    from agent.fleet.subscriber import Subscriber

    host, port = args.broker
    signer = _signer(args)
    store = Ingest(args.db)
    topic = args.prefix + "+/telemetry"
    if args.group:
        topic = f"$share/{args.group}/{topic}"

    def on_message(msg_topic: str, payload: bytes) -> None:
        stored = store.handle(msg_topic, payload)
        if stored and not args.no_ack:
            sub.publish(*ack_for(msg_topic, stored, payload, signer))

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
            sub.loop(0.2)
            if args.report_every and time.monotonic() >= next_report:
                print(json.dumps(store.report()), flush=True)
                next_report += args.report_every
    finally:
        sub.close()
    report = store.report()
    store.close()
    print(json.dumps(report), flush=True)
    if report["bad_batches"]:
        raise AgentError(f"{report['bad_batches']} bad batches received")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ingest", help="cloud-side consumer: store received batches in SQLite")
    p.add_argument("--broker", required=True, type=broker_address, help="HOST:PORT")
    p.add_argument("--db", required=True, help="SQLite file to write")
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
