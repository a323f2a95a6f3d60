"""``ebike-agent status``: ask a running agent how it is doing."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import config
from agent.cli.common import DEFAULT_CONFIG
from agent.control.client import request


def _line(st: dict[str, Any]) -> str:
    ob, up = st["outbox"], st["uplink"]
    sources = ", ".join(f"{s['name']}:{'up' if s['open'] else 'down'}" for s in st["sources"])
    return (f"{st['device_id']} kernel={st['kernel']} {st['frames_per_s']:.0f} frames/s "
            f"records={st['records_committed']} buffered={ob['records']}{_storage(ob)} "
            f"batches sent/acked={up['batches_sent']}/{up['batches_acked']} "
            f"broker={'up' if up['connected'] else 'down'}{_last_error(up)} sources=[{sources}] "
            f"motion={st['motion']['verdict']} ({st['motion']['why']})")


def _storage(ob: dict[str, Any]) -> str:
    """A failed storage, said where the buffer is: the records are in RAM, not on disk."""
    failed = ob.get("storage_failed")
    if not failed:
        return ""
    return f" IN MEMORY ONLY (storage failed: {failed['cause']})"


def _last_error(up: dict[str, Any]) -> str:
    """The uplink's last error with its time, so a technician can tell a wrong host, a
    wrong password and a dead link apart, and whether it is still happening."""
    if not up.get("last_error"):
        return ""
    return f" (last error {up['last_error_at']}, {up['last_error_age_s']:.0f} s ago: {up['last_error']})"


def _status(args: argparse.Namespace) -> int:
    path = args.socket or config.load(args.config).control_socket
    st = request(path)["status"]
    print(json.dumps(st, indent=1) if args.json else _line(st))
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="status of the running agent")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="find the control socket in this config")
    p.add_argument("--socket", help="the agent's control socket (overrides --config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)
