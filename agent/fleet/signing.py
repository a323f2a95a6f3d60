"""Keys and signing on the fleet side: ``ebike-agent keys`` and ``command``, and the
consumer's signed acks.

Makes COSE_Sign1 messages of the one shape the vehicle accepts (agent/commands/envelope.py
reads them, agent/commands/verifier.py checks them); the private-key half of
``cryptography`` is imported here only, never on the vehicle.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from agent.commands.envelope import ALG_EDDSA, COSE_SIGN1_TAG, HDR_ALG, HDR_KID, VERSION, sig_structure
from agent.commands.keys import load_public_key
from agent.errors import ConfigError


def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def default_kid(public_pem: bytes) -> str:
    """A key id derived from the key itself, so two fleets' keys cannot collide by name."""
    raw = load_public_key(public_pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def _load_private_key(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 key but {type(key).__name__}")
    return key


def new_command_id() -> str:
    return uuid.uuid4().hex


class Signer:
    """An Ed25519 private key and its key id, loaded once, that makes COSE_Sign1
    messages of the one shape the vehicle accepts: commands, and the consumer's acks
    (one per batch, so the key is not read again for each)."""

    def __init__(self, private_pem: bytes, kid: str) -> None:
        try:
            self.key = _load_private_key(private_pem)
        except ValueError as e:
            raise ConfigError("<private key>", "key", str(e)) from e
        self.kid = kid
        self.protected = wire.dumps({HDR_ALG: ALG_EDDSA, HDR_KID: kid.encode()})

    def sign(self, payload: bytes) -> bytes:
        """``payload`` in a tagged COSE_Sign1 with an empty unprotected header."""
        signature = self.key.sign(sig_structure(self.protected, payload))
        return wire.tagged(COSE_SIGN1_TAG, [self.protected, {}, payload, signature])


def sign_command(private_pem: bytes, kid: str, device: str, name: str, args: Mapping[str, Any],
                 issued_at: int, expires_at: int, command_id: str | None = None) -> bytes:
    """A COSE_Sign1 command envelope. Checks nothing about the command itself (tests sign
    bad ones on purpose): callers that mean it use ``check_arguments`` first."""
    payload = wire.dumps({
        "v": VERSION, "id": command_id or new_command_id(), "dev": device, "cmd": name,
        "args": dict(args), "iat": int(issued_at), "exp": int(expires_at), "kid": kid,
    })
    return Signer(private_pem, kid).sign(payload)
