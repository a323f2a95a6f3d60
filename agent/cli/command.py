"""``ebike-agent command sign``: issue a signed command (COSE_Sign1) for one device.

Arguments are ``key=value`` words: ``true``/``false`` are booleans, decimal numbers are
numbers, anything else is text. The command and its arguments are checked against the
schema the devices use, so an operator learns of a mistake here and not from a rejection.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from agent.cli.ingest import broker_address
from agent.cli.keys import check_kid
from agent.errors import ConfigError
from agent.uplink import commands
from agent.uplink.mqtt import publish_once

DEFAULT_TTL = 300


def parse_value(text: str) -> bool | int | float | str:
    """``true``/``false``, an integer, a finite decimal number, or the text itself."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    # "nan", "inf" and "infinity" parse as floats but are no argument anyone means.
    return number if math.isfinite(number) else text


def parse_arguments(words: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ConfigError("command line", word, "arguments are key=value")
        if key in out:
            raise ConfigError("command line", key, "given twice")
        out[key] = parse_value(value)
    return out


def _signed(args: argparse.Namespace) -> tuple[str, str, int, dict[str, Any], bytes]:
    """(kid, command id, issued-at, arguments, envelope) from the sign/send options."""
    if args.ttl <= 0:
        raise ConfigError("command line", "--ttl", "must be positive")
    if not 0 < len(args.device.encode()) <= commands.MAX_ID:
        raise ConfigError("command line", "--device", f"must be 1 to {commands.MAX_ID} UTF-8 bytes")
    if args.id is not None and not 0 < len(args.id.encode()) <= commands.MAX_ID:
        raise ConfigError("command line", "--id", f"must be 1 to {commands.MAX_ID} UTF-8 bytes")
    kid = check_kid(args.kid)
    cmd_args = commands.check_arguments(args.name, parse_arguments(args.args))
    try:
        with open(args.key, "rb") as f:
            private = f.read()
    except OSError as e:
        raise ConfigError(args.key, "--key", f"cannot read: {e.strerror}") from e
    issued = int(time.time())
    command_id = args.id or commands.new_command_id()
    envelope = commands.sign_command(private, kid, args.device, args.name, cmd_args, issued, issued + args.ttl,
                                     command_id)
    return kid, command_id, issued, cmd_args, envelope


def _sign(args: argparse.Namespace) -> int:
    kid, command_id, issued, cmd_args, envelope = _signed(args)
    if args.out:
        try:
            with open(args.out, "wb") as f:
                f.write(envelope)
        except OSError as e:
            raise ConfigError(args.out, "--out", f"cannot write: {e.strerror}") from e
    if args.json:
        print(json.dumps({"id": command_id, "device": args.device, "command": args.name, "args": cmd_args,
                          "issued_at": issued, "expires_at": issued + args.ttl, "kid": kid,
                          "envelope": envelope.hex()}))
    elif not args.out:
        print(envelope.hex())
    return 0


def _send(args: argparse.Namespace) -> int:
    kid, command_id, issued, _, envelope = _signed(args)
    host, port = args.broker
    topic = f"{args.prefix}{args.device}/cmd"
    publish_once(host, port, topic, envelope, expiry_s=issued + args.ttl - int(time.time()))
    print(json.dumps({"id": command_id, "topic": topic, "expires_at": issued + args.ttl, "kid": kid}))
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("command", help="issue signed commands to devices")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sign = actions.add_parser("sign", help="print a signed command (COSE_Sign1) as hex")
    send = actions.add_parser("send", help="sign a command and publish it on <prefix><device>/cmd")
    send.add_argument("--broker", required=True, type=broker_address, help="HOST:PORT")
    send.add_argument("--prefix", default="ebike/v1/", help="topic prefix before the device id")
    _command_options(send)
    send.set_defaults(func=_send)
    _command_options(sign)
    sign.add_argument("--out", metavar="FILE", help="write the raw envelope here instead of printing hex")
    sign.add_argument("--json", action="store_true", help="print the command and its envelope as JSON")
    sign.set_defaults(func=_sign)


def _command_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", required=True, metavar="PRIV.pem", help="the fleet's Ed25519 private key")
    p.add_argument("--kid", required=True, help="its key id, as the devices know it")
    p.add_argument("--device", required=True, help="the target device id")
    p.add_argument("--ttl", type=int, default=DEFAULT_TTL, metavar="S",
                   help=f"seconds until the command expires (default {DEFAULT_TTL})")
    p.add_argument("--id", help="command id (default: a random UUID)")
    p.add_argument("name", metavar="NAME", choices=sorted(commands.SCHEMAS),
                   help="one of " + ", ".join(sorted(commands.SCHEMAS)))
    p.add_argument("args", nargs="*", metavar="KEY=VALUE")
