"""``ebike-agent command sign``: issue a signed command (COSE_Sign1) for one device.

Arguments are ``key=value`` words: ``true``/``false`` are booleans, decimal numbers are
numbers, anything else is text. The command and its arguments are checked against the
schema the devices use, so an operator learns of a mistake here and not from a rejection.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Any

from agent.cli.common import broker_address, check_kid, read_key
from agent.commands.catalogue import CATALOGUE, check_arguments
from agent.errors import AgentError, ConfigError

log = logging.getLogger(__name__)

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


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """KEY=VALUE words, or ``--args-json`` for nested ones (set_reporting, set_config)."""
    if args.args_json is None:
        return parse_arguments(args.args)
    if args.args:
        raise ConfigError("command line", "--args-json", "give the arguments as KEY=VALUE words or as JSON, not both")
    try:
        value = json.loads(args.args_json)
    except ValueError as e:
        raise ConfigError("command line", "--args-json", f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError("command line", "--args-json", "must be a JSON object")
    return value


def _signed(args: argparse.Namespace) -> tuple[str, str, int, dict[str, Any], bytes]:
    """(kid, command id, issued-at, arguments, envelope) from the sign/send options."""
    from agent.commands.envelope import MAX_ID  # imports cbor2
    from agent.fleet.signing import new_command_id, sign_command

    if args.ttl <= 0:
        raise ConfigError("command line", "--ttl", "must be positive")
    if not 0 < len(args.device.encode()) <= MAX_ID:
        raise ConfigError("command line", "--device", f"must be 1 to {MAX_ID} UTF-8 bytes")
    if args.id is not None and not 0 < len(args.id.encode()) <= MAX_ID:
        raise ConfigError("command line", "--id", f"must be 1 to {MAX_ID} UTF-8 bytes")
    kid = check_kid(args.kid)
    cmd_args = check_arguments(args.name, _arguments(args))
    private = read_key(args.key, "--key")
    issued = int(time.time())
    command_id = args.id or new_command_id()
    envelope = sign_command(private, kid, args.device, args.name, cmd_args, issued, issued + args.ttl, command_id)
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


FINAL = ("executed", "rejected", "failed", "expired")


def _send(args: argparse.Namespace) -> int:
    from agent.fleet.subscriber import Subscriber, publish_once, wait_until
    from agent.wire import strict_loads

    kid, command_id, issued, _, envelope = _signed(args)
    host, port = args.broker
    topic = f"{args.prefix}{args.device}/cmd"
    results: list[dict[str, Any]] = []
    sub = None
    if args.wait:
        # Subscribed before the command goes out, so no result can come first.
        def on_result(_topic: str, payload: bytes) -> None:
            result = strict_loads(payload, "result", 8)
            if isinstance(result, dict) and result.get("id") == command_id:
                results.append(result)
                print(json.dumps(result), flush=True)

        # The subscriber's "subscribed to" line is a consumer's start-up news; for one
        # command it is noise on every send: this command's own line, at DEBUG, says it.
        logging.getLogger("agent.fleet.subscriber").setLevel(logging.WARNING)
        sub = Subscriber(f"ebike-command-{command_id[:16]}", host, port, topic + "/result", on_result,
                         persistent=False)
        sub.connect()
        wait_until(lambda: sub.subscribed, 10.0, sub.loop)
        log.debug("listening on %s/result for %g s", topic, args.wait)
    publish_once(host, port, topic, envelope, expiry_s=issued + args.ttl - int(time.time()))
    print(json.dumps({"id": command_id, "topic": topic, "expires_at": issued + args.ttl, "kid": kid}), flush=True)
    if sub is None:
        return 0
    try:
        wait_until(lambda: any(r["status"] in FINAL for r in results), args.wait, sub.loop)
    finally:
        sub.close()
    final = [r for r in results if r["status"] in FINAL]
    if not results:
        # An agent that takes commands answers each one at once (accepted, or rejected):
        # silence means nothing listens on the topic.
        raise AgentError(f"no answer from {args.device} within {args.wait:g} s: the agent may have no [commands] "
                         f"section (commands disabled: it does not listen on {topic}), or it is offline (the "
                         f"command waits on the broker until it expires), or --device / --prefix is wrong")
    if not final:
        raise AgentError(f"no final result for {command_id} within {args.wait:g} s "
                         f"(so far: {', '.join(r['status'] for r in results)})")
    if final[0]["status"] != "executed":
        raise AgentError(f"command {command_id} {final[0]['status']}: {final[0]['reason']}")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("command", help="issue signed commands to devices")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sign = actions.add_parser("sign", help="print a signed command (COSE_Sign1) as hex")
    send = actions.add_parser("send", help="sign a command and publish it on <prefix><device>/cmd")
    send.add_argument("--broker", required=True, type=broker_address, help="HOST:PORT")
    send.add_argument("--prefix", default="ebike/v1/", help="topic prefix before the device id")
    send.add_argument("--wait", type=float, default=0, metavar="S",
                      help="print the device's results (cmd/result) until a final one or S seconds; "
                           "exit status 0 only if it executed")
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
    p.add_argument("name", metavar="NAME", choices=sorted(CATALOGUE),
                   help="one of " + ", ".join(sorted(CATALOGUE)))
    p.add_argument("args", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--args-json", metavar="JSON", help='the arguments as one JSON object, e.g. '
                   '\'{"patch": {"outbox": {"commit_interval": 0.5}}}\'')
