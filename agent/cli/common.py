"""What several subcommands share, so that no subcommand imports another (cantools'
``subparsers/__utils__.py``). Standard library and agent.errors only: every subcommand
imports this module while the parser is built."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config import Config

DEFAULT_CONFIG = "/etc/ebike-agent/agent.toml"
KID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def agent_options(p: argparse.ArgumentParser, json: bool = True, socket: bool = True) -> None:
    """``--config``, ``--socket`` and ``--json``, worded alike in every command. ``socket``
    False: an action that never asks the agent (``config show``, ``buffer export``)."""
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the agent's configuration (default %(default)s)")
    if socket:
        p.add_argument("--socket", metavar="PATH", help="the agent's control socket (overrides --config)")
    if json:
        p.add_argument("--json", action="store_true", help="one JSON document")


def control_socket(args: argparse.Namespace, cfg: Config | None = None) -> str:
    """The agent's control socket: ``--socket``, else the configuration's: ``cfg`` when
    the command has loaded it already, else ``--config`` loaded here, and only here, so
    that ``--socket`` works with no configuration file at all."""
    if getattr(args, "socket", None):
        return str(args.socket)
    if cfg is None:
        from agent import config

        cfg = config.load(args.config)
    return cfg.control_socket


def until_ctrl_c(follow: Callable[[str, argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a live command (``watch``, ``frames``) on the agent's socket until it ends or
    Ctrl-C, which is how a technician ends it: not an error, exit 0."""
    with contextlib.suppress(KeyboardInterrupt):
        follow(control_socket(args), args)
    sys.stdout.flush()
    return 0


def broker_address(text: str) -> tuple[str, int]:
    """``--broker HOST:PORT`` (an IPv6 host in brackets) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def check_kid(kid: str) -> str:
    """Key ids become file names and CBOR text: keep them short and plain."""
    if not KID_RE.fullmatch(kid):
        raise ConfigError("command line", "--kid",
                          f"{kid!r}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . _ -")
    return kid


def read_key(path: str, option: str) -> bytes:
    """The PEM file an option names; one that cannot be read is that option's fault."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, option, f"cannot read: {e.strerror}") from e
