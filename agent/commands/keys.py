"""Ed25519 public keys: the fleet's trusted keys loaded and checked, and a signature
checked with one.

A leaf (it imports agent.errors only), so agent/config.py can check the key files when
it loads them. It is the vehicle side's only import of ``cryptography``, and imports it
on first use: ``ebike-agent --help``, ``status`` and the like read no key and should not
pay for loading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; anything else is a ValueError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 key but {type(key).__name__}")
    return key


def load_trusted(keys: Mapping[str, bytes | str]) -> dict[str, Ed25519PublicKey]:
    """The public keys (PEM) by key id, loaded; a key that is not Ed25519 is a ConfigError."""
    out = {}
    for kid, pem in keys.items():
        try:
            out[kid] = load_public_key(pem)
        except ValueError as e:
            raise ConfigError("<fleet keys>", kid, str(e)) from e
    return out


def signed_by(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``key`` made ``signature`` over ``data``."""
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
