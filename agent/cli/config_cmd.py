"""``ebike-agent config check FILE``: validate a configuration without starting."""

from __future__ import annotations

import argparse

from agent import config


def _check(args: argparse.Namespace) -> int:
    cfg = config.load(args.file)
    print(f"ok: {args.file}: device {cfg.device_id}, {len(cfg.sources)} sources")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("config", help="configuration tools")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=_check)
