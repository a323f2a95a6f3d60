"""``ebike-agent buffer stats``: what the outbox holds, from the running agent (with what
is in flight and dropped) or, when it is not running, read-only from the file."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from agent import config
from agent.cli.common import DEFAULT_CONFIG
from agent.control.client import request
from agent.errors import AgentError, StoreError
from agent.store.outbox import read_stats


def _stats(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    stats: dict[str, Any]
    try:
        stats = dict(request(cfg.control_socket)["status"]["outbox"], source="agent")
    except AgentError:
        if not os.path.exists(cfg.outbox.path):
            raise StoreError(f"no agent running and no outbox at {cfg.outbox.path}") from None
        stats = dict(read_stats(cfg.outbox.path), source="file")
    if args.json:
        print(json.dumps(stats))
    else:
        lanes = " ".join(f"{k}={v}" for k, v in stats["depth"].items())
        full = " DISK FULL: dropping by the quota policy" if stats.get("disk_full_now") else ""
        print(f"{stats['records']} records ({lanes}), {stats['bytes']} bytes, "
              f"last seq {stats['last_seq']}, last acked {stats['last_acked']} [{stats['source']}]{full}")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("buffer", help="the durable outbox")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", help="depth per lane, bytes, oldest, last committed/acked sequence")
    stats.add_argument("--config", default=DEFAULT_CONFIG)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_stats)
