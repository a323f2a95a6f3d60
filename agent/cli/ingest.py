"""``ebike-agent ingest``: the reference cloud-side consumer (subscribe, decode, store)."""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import Any

from agent.cloud.ingest import Ingest, ack_for
from agent.errors import AgentError
from agent.uplink.mqtt import Subscriber


def broker_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _ingest(args: argparse.Namespace) -> int:
    host, port = args.broker
    store = Ingest(args.db)
    topic = args.prefix + "+/telemetry"
    if args.group:
        topic = f"$share/{args.group}/{topic}"

    def on_message(msg_topic: str, payload: bytes) -> None:
        stored = store.handle(msg_topic, payload)
        if stored and not args.no_ack:
            sub.publish(*ack_for(msg_topic, stored))

    sub = Subscriber(args.client_id, host, port, topic, on_message)
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
    p.add_argument("--client-id", default="ebike-ingest", help="MQTT client id (its session persists)")
    p.add_argument("--duration", type=float, default=0, help="stop after S seconds (0 = until signalled)")
    p.add_argument("--report-every", type=float, default=0, help="print a JSON report every S seconds")
    p.add_argument("--group", help="join the MQTT 5 shared subscription $share/GROUP/... (scale out consumers)")
    p.add_argument("--no-ack", action="store_true", help="do not acknowledge stored records to the devices")
    p.set_defaults(func=_ingest)
