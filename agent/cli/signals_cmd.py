"""``ebike-agent signals``: the signal catalogue, with ids, names and units."""

from __future__ import annotations

import argparse
import json

from agent.signals import SIGNALS


def _signals(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([s._asdict() for s in SIGNALS], indent=1))
    else:
        for s in SIGNALS:
            print(f"{s.id:5d}  {s.name:58s} {s.unit:6s} {s.description}")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("signals", help="print the signal catalogue")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_signals)
