"""``ebike-agent run``: the agent in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse

from agent import config
from agent.runtime import Runtime

DEFAULT_CONFIG = "/etc/ebike-agent/agent.toml"


def _run(args: argparse.Namespace) -> int:
    Runtime(config.load(args.config)).run()
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the agent")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML file (default {DEFAULT_CONFIG})")
    p.set_defaults(func=_run)
