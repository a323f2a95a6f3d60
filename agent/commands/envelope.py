"""The COSE_Sign1 envelope of a command and the ``cmd/result`` message, as bytes.

A command is a COSE_Sign1 (RFC 9052, tag 18) signed with EdDSA over Ed25519; its
payload is a CBOR map (docs/wire.cddl, ``command-payload``). This module reads the
structure only: nothing it returns is trusted until agent/commands/verifier.py checked
the signature.

COSE_Sign1 is read here directly, on the strict CBOR of agent/wire.py: pycose
1.1.0 and cwt 3.3.0 both fail to decode any COSE message under cbor2 6, which decodes
tagged arrays as tuples (pycose issue #141; cwt pins cbor2 < 6). Only one algorithm and
one shape are accepted, which keeps the parser small enough to fuzz.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import wire

VERSION = 1
MAX_ENVELOPE = 4096          # bytes; checked before any parsing
MAX_ID = 64                  # UTF-8 bytes of a command id, a key id, a device id, a command name
COSE_SIGN1_TAG = 18
HDR_ALG = 1
HDR_KID = 4
ALG_EDDSA = -8
SIGNATURE_LEN = 64
MAX_DEPTH = 8

REASONS = ("too_large", "malformed", "unknown_key", "revoked_key", "bad_signature", "wrong_device",
           "expired", "not_yet_valid", "replayed", "unknown_command", "bad_arguments")
STATUSES = ("accepted", "deferred", "executed", "rejected", "failed", "expired")
TIME_KEYS = ("received",) + STATUSES

_PAYLOAD_KEYS = frozenset({"v", "id", "dev", "cmd", "args", "iat", "exp", "kid"})


@dataclass(frozen=True)
class Command:
    """A verified command: safe to hand to the executor."""

    id: str
    device: str
    name: str
    args: dict[str, Any]
    issued_at: int
    expires_at: int
    kid: str


@dataclass(frozen=True)
class Signed:
    """The parts of a COSE_Sign1 of the accepted shape; the signature is not checked yet."""

    protected: bytes
    payload: bytes
    signature: bytes
    kid: str


@dataclass(frozen=True)
class Envelope:
    """A command's COSE_Sign1 whose payload is a well-formed command payload."""

    signed: Signed
    body: dict[Any, Any]


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 section 4.4: what is signed; no external AAD."""
    return wire.dumps(["Signature1", protected, b"", payload])


def open_sign1(data: bytes) -> tuple[Signed | None, str]:
    """The parts of a COSE_Sign1 of the one accepted shape, or (None, why not)."""
    parts, why = _sign1(data)
    if parts is None:
        return None, why
    protected, unprotected, payload, signature = parts
    kid, why = _outer(protected, unprotected, signature)
    if kid is None:
        return None, why
    return Signed(protected, payload, signature, kid), ""


def parse(data: bytes) -> tuple[Envelope | None, str | None, str]:
    """The envelope, or (None, command id if readable, why it is malformed)."""
    parts, why = _sign1(data)
    if parts is None:
        return None, None, why
    protected, unprotected, payload, signature = parts
    # The payload first, so that later rejections can name the command.
    try:
        body = _loads(payload, "payload")
    except ValueError as e:
        return None, None, str(e)
    if not isinstance(body, Mapping):
        return None, None, "payload must be a map"
    command_id = body.get("id") if _text(body.get("id")) else None
    why = _check_body(body)
    if why:
        return None, command_id, why
    kid, why = _outer(protected, unprotected, signature)
    if kid is None:
        return None, command_id, why
    if kid != body["kid"]:
        return None, command_id, "kid in the header and the payload differ"
    return Envelope(Signed(protected, payload, signature, kid), dict(body)), command_id, ""


def result_message(command_id: str | None, status: str, reason: str, times: Mapping[str, float],
                   data: Mapping[str, Any] | None = None) -> bytes:
    """The ``cmd/result`` payload (docs/wire.cddl, ``command-result``): times are Unix
    seconds by event (``received`` or a status), sent as milliseconds; ``data`` what a
    command hands back (the diagnostics bundle)."""
    if status not in STATUSES:
        raise ValueError(f"unknown command status {status!r}")
    unknown = set(times) - set(TIME_KEYS)
    if unknown:
        raise ValueError(f"unknown result times {sorted(unknown)}")
    if any(not 0 <= v < 2**53 for v in times.values()):
        raise ValueError("result times are Unix seconds, not negative")
    msg: dict[str, Any] = {
        "v": VERSION, "id": command_id, "status": status, "reason": reason,
        "t": {k: int(round(v * 1000)) for k, v in times.items()},
    }
    if data is not None:
        msg["data"] = dict(data)
    return wire.dumps(msg)


def _loads(data: bytes, what: str) -> Any:
    return wire.strict_loads(data, what, MAX_DEPTH)


def _text(v: Any, limit: int = MAX_ID) -> bool:
    """Non-empty text of at most ``limit`` UTF-8 bytes (the CDDL's ``tstr .size``)."""
    return isinstance(v, str) and 0 < len(v.encode("utf-8", "surrogatepass")) <= limit


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _sign1(data: bytes) -> tuple[tuple[bytes, Any, bytes, bytes] | None, str]:
    """(protected, unprotected, payload, signature) of a tagged COSE_Sign1, or (None, why not)."""
    try:
        outer = _loads(data, "envelope")
    except ValueError as e:
        return None, str(e)
    if not isinstance(outer, tuple) or len(outer) != 2 or outer[0] != COSE_SIGN1_TAG:
        return None, "not a COSE_Sign1 (tag 18)"
    msg = outer[1]
    if not isinstance(msg, list | tuple) or len(msg) != 4:
        return None, "COSE_Sign1 must be [protected, unprotected, payload, signature]"
    protected, unprotected, payload, signature = msg
    if not (isinstance(protected, bytes) and isinstance(payload, bytes) and isinstance(signature, bytes)):
        return None, "protected header, payload and signature must be byte strings"
    return (protected, unprotected, payload, signature), ""


def _outer(protected: bytes, unprotected: Any, signature: bytes) -> tuple[str | None, str]:
    """The key id when the headers and the signature have the accepted shape, or (None, why not)."""
    if not isinstance(unprotected, Mapping) or unprotected:
        return None, "the unprotected header must be an empty map"
    kid, why = _header_kid(protected)
    if kid is not None and len(signature) != SIGNATURE_LEN:
        return None, f"an Ed25519 signature has 64 bytes, not {len(signature)}"
    return kid, why


def _header_kid(protected: bytes) -> tuple[str | None, str]:
    """The key id of a protected header that is exactly {alg: EdDSA, kid}, or (None, why not)."""
    try:
        header = _loads(protected, "protected header")
    except ValueError as e:
        return None, str(e)
    if not isinstance(header, Mapping) or set(header) != {HDR_ALG, HDR_KID}:
        return None, "protected header must be exactly {1: alg, 4: kid}"
    if header[HDR_ALG] != ALG_EDDSA or isinstance(header[HDR_ALG], bool):
        return None, f"algorithm {header[HDR_ALG]!r} is not EdDSA (-8)"
    raw_kid = header[HDR_KID]
    if not isinstance(raw_kid, bytes):
        return None, "kid must be a byte string"
    try:
        return raw_kid.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "kid is not UTF-8"


def _check_body(body: Mapping[Any, Any]) -> str:
    """Why the payload map is off docs/wire.cddl's command-payload, or ''."""
    if set(body) != _PAYLOAD_KEYS:
        return f"payload keys must be {sorted(_PAYLOAD_KEYS)}"
    if body["v"] != VERSION or isinstance(body["v"], bool):
        return f"unsupported command version {body['v']!r}"
    if not _text(body["id"]):
        return f"command id must be text of 1 to {MAX_ID} characters"
    for key in ("dev", "cmd", "kid"):
        if not _text(body[key]):
            return f"{key} must be text of 1 to {MAX_ID} characters"
    if not isinstance(body["args"], Mapping) or not all(isinstance(k, str) for k in body["args"]):
        return "args must be a map with text keys"
    if not _int(body["iat"]) or not _int(body["exp"]):
        return "iat and exp must be unsigned integers (Unix seconds)"
    if body["exp"] <= body["iat"]:
        return "exp must be after iat"
    return ""
