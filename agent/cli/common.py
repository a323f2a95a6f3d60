"""What several subcommands share, so that no subcommand imports another (cantools'
``subparsers/__utils__.py``). Standard library and agent.errors only: every subcommand
imports this module while the parser is built."""

from __future__ import annotations

import argparse
import re

from agent.errors import ConfigError

DEFAULT_CONFIG = "/etc/ebike-agent/agent.toml"
KID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
