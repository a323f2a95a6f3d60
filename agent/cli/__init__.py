"""``ebike-agent``: one module per subcommand, each with ``add_subparser`` (cantools' layout).

Errors print as ``error: <message>`` with a non-zero exit (2 for a configuration that
cannot be used, 1 otherwise); ``--debug`` re-raises them with the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from agent import __version__
from agent.cli import alarms_cmd, buffer, command, config_cmd, decode, ingest, keys, run, signals_cmd, status
from agent.errors import AgentError, ConfigError

_COMMANDS = (run, decode, config_cmd, signals_cmd, alarms_cmd, status, ingest, keys, command, buffer)
# A configuration (or DBC) that cannot be used: like argparse's usage errors, the input is at fault.
EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebike-agent", description="vehicle-side agent of connected e-bikes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"ebike-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.add_subparser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as e:
        if args.debug:
            raise
        # A fault of the file as a whole (key "-") has no key to name.
        print(f"error: {e.path}: {e.reason}" if e.key == "-" else f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (head, less) went away: not an error; keep Python's exit flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
