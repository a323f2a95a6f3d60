"""Whether a signed message may be believed: commands (``Verifier``) and the other
COSE_Sign1 messages of the same shape, the consumer's acks (``SignedMessages``).

Nothing of a command runs before ``Verifier.verify`` returned it: that checks size,
structure, key, signature, target, validity window, freshness (the replay cache) and the
command's argument schema, and otherwise raises ``CommandRejected`` with a reason code
from ``REASONS``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from agent.commands.catalogue import check_arguments
from agent.commands.envelope import MAX_ENVELOPE, REASONS, Command, Signed, open_sign1, parse, sig_structure
from agent.commands.journal import ReplayCache
from agent.commands.keys import load_trusted, signed_by
from agent.errors import CommandRejected

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)


def check_signature(signed: Signed, trusted: Mapping[str, Ed25519PublicKey],
                    revoked: Collection[str]) -> tuple[str, str]:
    """('', '') when a trusted key that is not revoked made the signature; else a reason
    code (unknown_key, revoked_key, bad_signature) and a detail."""
    key = trusted.get(signed.kid)
    if key is None:
        return ("revoked_key" if signed.kid in revoked else "unknown_key"), signed.kid
    if signed.kid in revoked:
        return "revoked_key", signed.kid
    if not signed_by(key, signed.signature, sig_structure(signed.protected, signed.payload)):
        return "bad_signature", f"not signed by {signed.kid}"
    return "", ""


class SignedMessages:
    """Opens COSE_Sign1 messages that are not commands (the consumer's acks): the same
    shape, keys and checks as a command's envelope, with the payload left to the caller."""

    def __init__(self, keys: Mapping[str, bytes | str], revoked: Collection[str]) -> None:
        """``keys``: the public keys (PEM) trusted for these messages, by key id."""
        self.keys = load_trusted(keys)
        self.revoked = frozenset(revoked)

    def open(self, data: bytes, check: bool = True) -> tuple[bytes | None, str, str]:
        """(payload, '', '') if a trusted key that is not revoked signed it; otherwise
        (None, reason, detail), the reason one of malformed, unknown_key, revoked_key,
        bad_signature. ``check=False``: the structure only, for a reader that does not
        require signatures."""
        signed, why = open_sign1(data)
        if signed is None:
            return None, "malformed", why
        if not check:
            return signed.payload, "", ""
        reason, detail = check_signature(signed, self.keys, self.revoked)
        return (None, reason, detail) if reason else (signed.payload, "", "")


class Verifier:
    """Decides whether a command may run; see ``verify`` for the order of the checks."""

    def __init__(self, device_id: str, keys: Mapping[str, bytes | str], revoked: Collection[str],
                 clock_skew: float, replay: ReplayCache) -> None:
        """``keys``: the fleet's trusted public keys (PEM) by key id."""
        self.device_id = device_id
        self.keys = load_trusted(keys)
        self.revoked = frozenset(revoked)
        self.clock_skew = float(clock_skew)
        self.replay = replay
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)

    def verify(self, payload: bytes, now: float) -> Command:
        """The command, or ``CommandRejected``. Checks, in order: size, structure, key id
        known, key not revoked, signature, target device, not expired, not issued in the
        future (both with ``clock_skew``), not seen before, command known, arguments valid;
        then records the id in the replay cache, durably, before returning."""
        try:
            return self._verify(payload, now)
        except CommandRejected as e:
            self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            # The reason and id only: arguments can carry what should not be in logs.
            log.warning("command %s rejected: %s", e.command_id or "(unreadable id)", e.reason)
            raise

    def _verify(self, data: bytes, now: float) -> Command:
        if len(data) > MAX_ENVELOPE:
            raise CommandRejected("too_large", None, f"{len(data)} bytes > {MAX_ENVELOPE}")
        env, command_id, why = parse(data)
        if env is None:
            raise CommandRejected("malformed", command_id, why)
        body = env.body
        cid: str = body["id"]
        reason, detail = check_signature(env.signed, self.keys, self.revoked)
        if reason:
            raise CommandRejected(reason, cid, detail)
        if body["dev"] != self.device_id:
            raise CommandRejected("wrong_device", cid, f"for {body['dev']!r}")
        if now > body["exp"] + self.clock_skew:
            raise CommandRejected("expired", cid, f"expired at {body['exp']}")
        if body["iat"] > now + self.clock_skew:
            raise CommandRejected("not_yet_valid", cid, f"issued at {body['iat']}, in the future")
        if self.replay.seen(cid):
            raise CommandRejected("replayed", cid)
        args = check_arguments(body["cmd"], body["args"], cid)
        cmd = Command(cid, body["dev"], body["cmd"], args, body["iat"], body["exp"], env.signed.kid)
        # Kept as long as the command would pass the expiry check above.
        if not self.replay.remember(cid, body["exp"] + self.clock_skew, now=now, command=cmd):
            raise CommandRejected("replayed", cid)
        return cmd
