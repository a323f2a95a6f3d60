"""``ebike-agent sync``: upload now, and follow the drain until the backlog is out.

The agent is asked to commit what it holds and try the broker at once (``sync``); then
its status is read every POLL_S. The backlog is the records waiting when the sync
began: it is out once every one of them is acknowledged (the oldest record left is
newer than the last of them, or nothing is left). Records the vehicle makes meanwhile
do not hold the command up: a bike that runs never reaches an empty outbox for long.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.cli import view
from agent.cli.common import agent_options, control_socket
from agent.control.client import request
from agent.errors import CheckFailed, ConfigError

POLL_S = 0.5
DEFAULT_TIMEOUT = 60.0


def drained(outbox: dict[str, Any], last_of_backlog: int) -> bool:
    """Whether no record numbered ``last_of_backlog`` or below is waiting any more."""
    first = outbox.get("first_seq")
    return not outbox["records"] or (first is not None and first > last_of_backlog)


def uplink_words(uplink: dict[str, Any], now: float) -> str:
    """Why records are not leaving, as the uplink tells it."""
    if uplink.get("last_error"):
        age = uplink.get("last_error_age_s")
        at = f" ({view.when(now - age, now)})" if age is not None else ""
        link = "connected" if uplink.get("connected") else "not connected to the broker"
        return f"uplink {link}; last error{at}: {uplink['last_error']}"
    if not uplink.get("connected"):
        return "uplink not connected to the broker (no error yet: still connecting?)"
    if uplink.get("ack") == "cloud":
        return "uplink connected, no error, but the cloud does not acknowledge (is its consumer running?)"
    return "uplink connected, no error, but the broker does not acknowledge"


def _sync(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise ConfigError("command line", "--timeout", "must be positive")
    sock = control_socket(args)
    request(sock, "sync")
    started = time.monotonic()
    status = request(sock)["status"]
    backlog, last = status["outbox"]["records"], status["outbox"]["last_seq"]
    acked_before = status["uplink"].get("records_acked", 0)
    with view.progress("sync", backlog) as bar:
        while True:
            outbox, uplink = status["outbox"], status["uplink"]
            acked = min(backlog, uplink.get("records_acked", 0) - acked_before)
            bar.update(acked, note=f"{view.number(outbox['records'])} waiting")
            done = drained(outbox, last)
            if done or time.monotonic() - started >= args.timeout:
                break
            time.sleep(min(POLL_S, max(0.0, args.timeout - (time.monotonic() - started))))
            status = request(sock)["status"]
        if done:
            bar.update(backlog)
    took = time.monotonic() - started
    now = time.time()
    if args.json:
        view.print_json({"drained": done, "seconds": round(took, 1), "backlog": backlog,
                         "acknowledged": backlog if done else acked, "waiting": outbox["records"],
                         "uplink": {"connected": uplink.get("connected"), "last_error": uplink.get("last_error")}})
    elif done:
        n = outbox["records"]
        newer = f"; {view.number(n)} newer record{'s' if n != 1 else ''} waiting" if n else ""
        print(f"sync: done in {view.age(took)}: the backlog of {view.number(backlog)} records is acknowledged{newer}")
    else:
        print(f"sync: {view.number(outbox['records'])} records still waiting after {view.age(took)} "
              f"(backlog at the start: {view.number(backlog)}, acknowledged since: {view.number(acked)})")
        print(f"sync: {uplink_words(uplink, now)}")
    if not done:
        raise CheckFailed(f"sync: backlog not out within {args.timeout:g} s")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sync", help="upload now and follow the drain until the backlog is out",
                       description="Ask the running agent to commit and send at once, then follow its "
                                   "outbox until every record waiting at the start is acknowledged (exit 0), "
                                   "or --timeout passes (exit 1, with the uplink's last error). Records made "
                                   "meanwhile are not waited for. No agent: exit 3.")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"give up after S seconds (default {DEFAULT_TIMEOUT:g})")
    agent_options(p)
    p.set_defaults(func=_sync)
