"""``ebike-agent run``: the agent in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from agent import config
from agent.cli.common import DEFAULT_CONFIG
from agent.commands import trial
from agent.errors import AgentError, AlreadyRunning

log = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    from agent.runtime import Runtime  # imports paho, cryptography, cbor2, pyserial

    try:
        runtime = Runtime(config.load(args.config))
    except AgentError as e:
        # A remote configuration that cannot even start is put back here: nothing else
        # would, and the vehicle would be left without its agent.
        if trial.read(args.config) is None or isinstance(e, AlreadyRunning):
            raise
        log.error("the configuration on trial does not start (%s): rolling back to the previous one", e)
        config.roll_back(args.config)
        trial.fail(args.config, f"the agent did not start: {e}")
        _restart()
    runtime.run()
    if runtime.restart:
        _restart()
    return 0


def _restart() -> None:
    """The same command line again, in this process (a supervisor sees no exit)."""
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the agent")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML file (default {DEFAULT_CONFIG})")
    p.set_defaults(func=_run)
