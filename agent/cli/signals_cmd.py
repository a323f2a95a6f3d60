"""``ebike-agent signals``: the signal catalogue, with ids, names, units and what a value
must keep to be believed (range, largest change per second)."""

from __future__ import annotations

import argparse
import json

from agent.signals import SIGNALS


def _signals(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([s._asdict() for s in SIGNALS], indent=1))
    else:
        for s in SIGNALS:
            rate = f"{s.max_rate:g}/s" if s.max_rate else ""
            print(f"{s.id:5d}  {s.name:58s} {s.unit:6s} {s.minimum:>11g} {s.maximum:<11g} {rate:7s} {s.description}")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("signals", help="print the signal catalogue")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_signals)
