"""``ebike-agent``: one module per subcommand, each with ``add_subparser`` (cantools' layout).

The package owns the command line: options, output, exit codes. It may import any
agent package (agent/fleet/ too: ``ingest``, ``keys`` and ``command`` are fleet tools);
none imports it. What subcommands share is in common.py, and how the technicians'
commands look (tables, live views, progress bars, times with ages) in view.py; no
subcommand imports another.

Building the parser imports every subcommand module, so what brings in paho,
cryptography, cbor2 or pyserial (the runtime, the fleet, the command envelope and
signing, the wire format, the serial sources) is imported inside the function that runs
the command, never at a module's top: ``ebike-agent --help`` and ``--version`` load
none of them (tests/test_cli_imports.py). A subcommand module that fails to import
leaves a stand-in that says why when that command is run; the others still work
(cantools' ``_load_subparser``).

Exit codes scripts can rely on: 0 ok; 1 a check failed (CheckFailed: the command has
said what, line by line) or another error; 2 usage (argparse's, and a configuration that
cannot be used); 3 no agent answers on the control socket (AgentUnreachable). Errors
print as ``error: <message>``; ``--debug`` re-raises them with the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from agent import __version__
from agent.errors import AgentError, AgentUnreachable, CheckFailed, ConfigError

# (command, its module under agent.cli), in the order ``--help`` lists them.
_COMMANDS = (("run", "run"), ("status", "status"), ("watch", "watch"), ("frames", "frames"),
             ("alarms", "alarms_cmd"), ("buffer", "buffer"), ("sync", "sync"), ("config", "config_cmd"),
             ("selftest", "selftest"), ("diag", "diag"), ("replay", "replay"), ("plot", "plot"),
             ("decode", "decode"), ("signals", "signals_cmd"), ("ingest", "ingest"), ("keys", "keys"),
             ("command", "command"), ("provision", "provision"))
# A configuration (or DBC) that cannot be used: like argparse's usage errors, the input is at fault.
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3


class _ErrorSubparser:
    """Stands in for a subcommand whose module did not import: it takes any arguments
    and, run, fails with the reason."""

    def __init__(self, command: str, reason: str) -> None:
        self.command = command
        self.reason = reason

    def add_subparser(self, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        # No prefix character can start an option, so every word is one of "args".
        p = sub.add_parser(self.command, help=f"unavailable: {self.reason}", prefix_chars="\0", add_help=False)
        p.add_argument("args", nargs="*")
        p.set_defaults(func=self._fail)

    def _fail(self, args: argparse.Namespace) -> int:
        raise AgentError(f"ebike-agent {self.command} is unavailable: {self.reason}")


def _load_subparser(command: str, module: str, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        importlib.import_module(f"agent.cli.{module}").add_subparser(sub)
    except ImportError as e:
        _ErrorSubparser(command, str(e)).add_subparser(sub)


def _wanted(argv: list[str]) -> tuple[tuple[str, str], ...]:
    """The subcommand modules to load: only the one named, when one is (the agent that
    ``run`` starts then carries none of the technicians' tools: about 2 MB of RSS);
    every one for ``--help``, a typo or no command, so argparse can list them."""
    words = [a for a in argv if not a.startswith("-")]
    chosen = tuple(c for c in _COMMANDS if words and c[0] == words[0])
    return chosen or _COMMANDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebike-agent", description="vehicle-side agent of connected e-bikes")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"ebike-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for command, module in _wanted(argv):
        _load_subparser(command, module, sub)
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
    except CheckFailed:
        if args.debug:
            raise
        return 1
    except AgentUnreachable as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
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
