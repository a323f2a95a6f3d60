"""``ebike-agent keys generate``: an Ed25519 key pair for signing a fleet's commands.

The private key never leaves the fleet's signing host; the public key goes into every
device's configuration under its key id, which the signer puts into each command.
"""

from __future__ import annotations

import argparse
import json
import os

from agent.cli.common import check_kid
from agent.errors import ConfigError


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window where a key is readable);
    never overwrite a key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as e:
        raise ConfigError(path, "--out", "exists already; keys are never overwritten") from e
    except OSError as e:
        raise ConfigError(path, "--out", f"cannot create: {e.strerror}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _generate(args: argparse.Namespace) -> int:
    from agent.fleet.signing import default_kid, generate_key_pair

    private, public = generate_key_pair()
    kid = check_kid(args.kid) if args.kid else default_kid(public)
    try:
        os.makedirs(args.out, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(args.out, "--out", f"cannot create the directory: {e.strerror}") from e
    private_path = os.path.join(args.out, f"{kid}.key.pem")
    public_path = os.path.join(args.out, f"{kid}.pub.pem")
    _write_new(private_path, private, 0o600)
    _write_new(public_path, public, 0o644)
    if args.json:
        print(json.dumps({"kid": kid, "private": private_path, "public": public_path}))
    else:
        print(kid)
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keys", help="fleet signing keys")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = actions.add_parser("generate", help="write a new Ed25519 key pair, print its key id")
    gen.add_argument("--out", required=True, metavar="DIR",
                     help="directory for KID.key.pem (mode 0600) and KID.pub.pem")
    gen.add_argument("--kid", help="key id (default: derived from the public key)")
    gen.add_argument("--json", action="store_true", help="print kid and paths as JSON")
    gen.set_defaults(func=_generate)
