"""Signed cloud commands: the COSE_Sign1 envelope, its verifier, the replay cache, results.

A command is a COSE_Sign1 (RFC 9052, tag 18) signed with EdDSA over Ed25519; its
payload is a CBOR map (docs/wire.cddl, ``command-payload``). Nothing of a command runs
before ``Verifier.verify`` returned it: that checks size, structure, key, signature,
target, validity window, freshness (the replay cache) and the command's argument schema,
and otherwise raises ``CommandRejected`` with a reason code from ``REASONS``.

COSE_Sign1 is built and checked here directly, on ``cryptography`` (Ed25519) and the
strict CBOR of agent/uplink/wire.py:
pycose 1.1.0 and cwt 3.3.0 both fail to decode any COSE message under cbor2 6, which
decodes tagged arrays as tuples (pycose issue #141; cwt pins cbor2 < 6). Only one
algorithm and one shape are accepted, which keeps the parser small enough to fuzz.
This module is the only one that imports ``cryptography``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sqlite3
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.config import REPORT_MODES
from agent.errors import CommandRejected, ConfigError, StoreError
from agent.signals import BY_NAME
from agent.uplink import wire

log = logging.getLogger(__name__)

VERSION = 1
MAX_ENVELOPE = 4096          # bytes; checked before any parsing
MAX_ID = 64                  # UTF-8 bytes of a command id, a key id, a device id, a command name
COSE_SIGN1_TAG = 18
HDR_ALG = 1
HDR_KID = 4
ALG_EDDSA = -8
_SIGNATURE_LEN = 64
_MAX_DEPTH = 8
LEGAL_SPEED_KMH = 25.0

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


# ---------------------------------------------------------------------------------------
# Argument schemas: each normalises the arguments or raises ValueError saying why.

def _no_arguments(args: Mapping[str, Any]) -> dict[str, Any]:
    if args:
        raise ValueError(f"takes no arguments, got {sorted(args)}")
    return {}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _set_speed_limit(args: Mapping[str, Any]) -> dict[str, Any]:
    extra = set(args) - {"kmh", "allow_above_legal"}
    if extra:
        raise ValueError(f"unknown arguments {sorted(extra)}")
    kmh: Any = args.get("kmh")
    if not _number(kmh) or not 5 <= kmh <= 45:
        raise ValueError("kmh must be a number from 5 to 45")
    above = args.get("allow_above_legal", False)
    if not isinstance(above, bool):
        raise ValueError("allow_above_legal must be true or false")
    if kmh > LEGAL_SPEED_KMH and not above:
        raise ValueError(f"kmh above {LEGAL_SPEED_KMH:g} needs allow_above_legal = true")
    return {"kmh": float(kmh), "allow_above_legal": above}


MAX_REPORTING = 64
# A patch must not move what the command state itself hangs on: the device's identity
# (topics, the verifier's target) and the outbox (the replay cache and the journal).
FROZEN_CONFIG_KEYS = (("device_id",), ("outbox", "path"))


def _set_reporting(args: Mapping[str, Any]) -> dict[str, Any]:
    """``{"signals": {"<signal>": {"mode": ..., "deadband": ...}}}``: the [reporting]
    table of the configuration, for some signals."""
    extra = set(args) - {"signals"}
    if extra:
        raise ValueError(f"unknown arguments {sorted(extra)}")
    signals = args.get("signals")
    if not isinstance(signals, Mapping) or not 0 < len(signals) <= MAX_REPORTING:
        raise ValueError(f"signals must be a map of 1 to {MAX_REPORTING} signals")
    out = {}
    for name, policy in signals.items():
        if name not in BY_NAME:
            raise ValueError(f"unknown signal {name!r}")
        if not isinstance(policy, Mapping) or set(policy) - {"mode", "deadband"} or "mode" not in policy:
            raise ValueError(f"{name}: a policy is {{mode, deadband}}")
        if policy["mode"] not in REPORT_MODES:
            raise ValueError(f"{name}: mode must be one of {', '.join(REPORT_MODES)}")
        deadband = policy.get("deadband", 0.0)
        if not _number(deadband) or deadband < 0:
            raise ValueError(f"{name}: deadband must be a number >= 0")
        out[name] = {"mode": policy["mode"], "deadband": float(deadband)}
    return {"signals": out}


def _set_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """``{"patch": {...}}``: tables merge key by key into the configuration file, any
    other value (arrays too) replaces. Checked in full against the schema when it runs."""
    extra = set(args) - {"patch"}
    if extra:
        raise ValueError(f"unknown arguments {sorted(extra)}")
    patch = args.get("patch")
    if not isinstance(patch, Mapping) or not patch:
        raise ValueError("patch must be a non-empty map")
    for keys in FROZEN_CONFIG_KEYS:
        node: Any = patch
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            raise ValueError(f"{'.'.join(keys)} cannot be changed remotely")
    return {"patch": dict(patch)}


SCHEMAS = {
    "ping": _no_arguments,
    "lock": _no_arguments,
    "unlock": _no_arguments,
    "set_speed_limit": _set_speed_limit,
    "snapshot": _no_arguments,
    "diagnostics": _no_arguments,
    "restart_agent": _no_arguments,
    "set_reporting": _set_reporting,
    "set_config": _set_config,
}


def check_arguments(name: str, args: Mapping[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """The command's arguments, normalised; for the verifier and for the signing tool alike."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise CommandRejected("unknown_command", command_id, f"{name!r} is not a known command")
    try:
        return schema(args)
    except ValueError as e:
        raise CommandRejected("bad_arguments", command_id, f"{name}: {e}") from e


# ---------------------------------------------------------------------------------------
# Keys and signing (the fleet side: ebike-agent keys / command).

def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return private, _public_pem(key.public_key())


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def default_kid(public_pem: bytes) -> str:
    """A key id derived from the key itself, so two fleets' keys cannot collide by name."""
    raw = load_public_key(public_pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519-" + hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; anything else is a ValueError."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 key but {type(key).__name__}")
    return key


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


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 section 4.4: what is signed; no external AAD."""
    return wire.dumps(["Signature1", protected, b"", payload])


class Signer:
    """An Ed25519 private key and its key id, loaded once, that makes COSE_Sign1
    messages of the one shape this module accepts: commands, and the consumer's acks
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
        signature = self.key.sign(_sig_structure(self.protected, payload))
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


# ---------------------------------------------------------------------------------------
# Parsing: structure only; nothing here is trusted until the signature checked out.

@dataclass(frozen=True)
class _Envelope:
    protected: bytes
    payload: bytes
    signature: bytes
    kid: str
    body: dict[Any, Any]


def _loads(data: bytes, what: str) -> Any:
    return wire.strict_loads(data, what, _MAX_DEPTH)


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


def _parse(data: bytes) -> tuple[_Envelope | None, str | None, str]:
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
    if not why and (not isinstance(unprotected, Mapping) or unprotected):
        why = "the unprotected header must be an empty map"
    if why:
        return None, command_id, why
    kid, why = _header_kid(protected)
    if kid is None:
        return None, command_id, why
    if kid != body["kid"]:
        return None, command_id, "kid in the header and the payload differ"
    if len(signature) != _SIGNATURE_LEN:
        return None, command_id, f"an Ed25519 signature has 64 bytes, not {len(signature)}"
    return _Envelope(protected, payload, signature, kid, dict(body)), command_id, ""


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


# ---------------------------------------------------------------------------------------

OPEN_STATES = ("accepted", "deferred", "running")


class ReplayCache:
    """Ids of accepted commands, and the journal of what became of each, in tables of
    the outbox's SQLite file.

    An id is committed (synchronous=FULL, so it is on disk), with its journal entry,
    before its command may run, and kept until the command could no longer pass the
    verifier's validity check; a restart or a power cut therefore cannot make a command
    run twice. A command is marked ``running`` durably before it acts: one that finds
    itself ``running`` after a restart was cut off, and is not run again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS command_ids (id TEXT PRIMARY KEY, expires REAL NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS command_ids_expires ON command_ids (expires)")
            self.db.execute("CREATE TABLE IF NOT EXISTS command_journal (id TEXT PRIMARY KEY, body BLOB NOT NULL, "
                            "state TEXT NOT NULL, reason TEXT NOT NULL, times BLOB NOT NULL, expires REAL NOT NULL)")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the replay cache in {path}: {e}") from e

    def seen(self, command_id: str) -> bool:
        try:
            return self.db.execute("SELECT 1 FROM command_ids WHERE id=?", (command_id,)).fetchone() is not None
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: lookup failed: {e}") from e

    def remember(self, command_id: str, expires: float, now: float | None = None,
                 command: Command | None = None) -> bool:
        """Record the id durably, and with ``command`` its journal entry (``accepted``);
        False if the id was already there. With ``now``, ids and entries that expired
        before it are pruned in the same transaction (one fsync for all)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if now is not None:
                    self.db.execute("DELETE FROM command_ids WHERE expires < ?", (now,))
                    self.db.execute("DELETE FROM command_journal WHERE expires < ? AND state NOT IN (?, ?, ?)",
                                    (now, *OPEN_STATES))
                cur = self.db.execute("INSERT OR IGNORE INTO command_ids (id, expires) VALUES (?, ?)",
                                      (command_id, expires))
                if command is not None and cur.rowcount == 1:
                    t = now or 0.0
                    self.db.execute("INSERT OR REPLACE INTO command_journal VALUES (?, ?, ?, ?, ?, ?)",
                                    (command_id, _command_body(command), "accepted", "",
                                     wire.dumps({"received": t, "accepted": t}), expires))
            except sqlite3.Error:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: cannot record {command_id!r}: {e}") from e
        return cur.rowcount == 1

    def set_state(self, command_id: str, state: str, reason: str, t: float) -> dict[str, float]:
        """Move a journal entry on, durably (a commit with fsync); its times so far."""
        if state not in OPEN_STATES + STATUSES:
            raise ValueError(f"unknown command state {state!r}")
        try:
            row = self.db.execute("SELECT times FROM command_journal WHERE id=?", (command_id,)).fetchone()
            if row is None:
                raise StoreError(f"replay cache {self.path}: no journal entry for {command_id!r}")
            times = dict(wire.strict_loads(row[0], "journal times", 2))
            if state in STATUSES:  # "running" is not reported: no result says it
                times[state] = t
            self.db.execute("UPDATE command_journal SET state=?, reason=?, times=? WHERE id=?",
                            (state, reason, wire.dumps(times), command_id))
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: cannot update {command_id!r}: {e}") from e
        return times

    def open_entries(self) -> list[tuple[Command, str]]:
        """(command, state) of the entries not yet finished (accepted, deferred, or
        running when the agent stopped), oldest first."""
        try:
            rows = self.db.execute("SELECT body, state FROM command_journal WHERE state IN (?, ?, ?) ORDER BY rowid",
                                   OPEN_STATES).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: cannot read the journal: {e}") from e
        return [(_command_from(body), state) for body, state in rows]

    def state_of(self, command_id: str) -> str | None:
        row = self.db.execute("SELECT state FROM command_journal WHERE id=?", (command_id,)).fetchone()
        return None if row is None else str(row[0])

    def prune(self, now: float) -> int:
        """Forget ids whose commands expired before ``now``; how many were forgotten."""
        try:
            cur = self.db.execute("DELETE FROM command_ids WHERE expires < ?", (now,))
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: prune failed: {e}") from e
        return int(cur.rowcount)

    def __len__(self) -> int:
        (n,) = self.db.execute("SELECT count(*) FROM command_ids").fetchone()
        return int(n)

    def close(self) -> None:
        self.db.close()


def _command_body(cmd: Command) -> bytes:
    return wire.dumps([cmd.id, cmd.device, cmd.name, cmd.args, cmd.issued_at, cmd.expires_at, cmd.kid])


def _command_from(body: bytes) -> Command:
    cid, device, name, args, iat, exp, kid = wire.strict_loads(body, "journal entry", _MAX_DEPTH + 4)
    return Command(cid, device, name, dict(args), iat, exp, kid)


def _trusted(keys: Mapping[str, bytes | str]) -> dict[str, Ed25519PublicKey]:
    """The public keys (PEM) by key id, loaded; a key that is not Ed25519 is a ConfigError."""
    out = {}
    for kid, pem in keys.items():
        try:
            out[kid] = load_public_key(pem)
        except ValueError as e:
            raise ConfigError("<fleet keys>", kid, str(e)) from e
    return out


def _check_signature(kid: str, protected: bytes, payload: bytes, signature: bytes,
                     keys: Mapping[str, Ed25519PublicKey], revoked: Collection[str]) -> tuple[str, str]:
    """('', '') when a trusted key that is not revoked made ``signature``; else a reason
    code (unknown_key, revoked_key, bad_signature) and a detail."""
    key = keys.get(kid)
    if key is None:
        return ("revoked_key" if kid in revoked else "unknown_key"), kid
    if kid in revoked:
        return "revoked_key", kid
    try:
        key.verify(signature, _sig_structure(protected, payload))
    except InvalidSignature:
        return "bad_signature", f"not signed by {kid}"
    return "", ""


class SignedMessages:
    """Opens COSE_Sign1 messages that are not commands (the consumer's acks): the same
    shape, keys and checks as a command's envelope, with the payload left to the caller."""

    def __init__(self, keys: Mapping[str, bytes | str], revoked: Collection[str]) -> None:
        """``keys``: the public keys (PEM) trusted for these messages, by key id."""
        self.keys = _trusted(keys)
        self.revoked = frozenset(revoked)

    def open(self, data: bytes, check: bool = True) -> tuple[bytes | None, str, str]:
        """(payload, '', '') if a trusted key that is not revoked signed it; otherwise
        (None, reason, detail), the reason one of malformed, unknown_key, revoked_key,
        bad_signature. ``check=False``: the structure only, for a reader that does not
        require signatures."""
        parts, why = _sign1(data)
        if parts is None:
            return None, "malformed", why
        protected, unprotected, payload, signature = parts
        if not isinstance(unprotected, Mapping) or unprotected:
            return None, "malformed", "the unprotected header must be an empty map"
        kid, why = _header_kid(protected)
        if kid is None:
            return None, "malformed", why
        if len(signature) != _SIGNATURE_LEN:
            return None, "malformed", f"an Ed25519 signature has 64 bytes, not {len(signature)}"
        if not check:
            return payload, "", ""
        reason, detail = _check_signature(kid, protected, payload, signature, self.keys, self.revoked)
        return (None, reason, detail) if reason else (payload, "", "")


class Verifier:
    """Decides whether a command may run; see ``verify`` for the order of the checks."""

    def __init__(self, device_id: str, keys: Mapping[str, bytes | str], revoked: Collection[str],
                 clock_skew: float, replay: ReplayCache) -> None:
        """``keys``: the fleet's trusted public keys (PEM) by key id."""
        self.device_id = device_id
        self.keys = _trusted(keys)
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
        env, command_id, why = _parse(data)
        if env is None:
            raise CommandRejected("malformed", command_id, why)
        body = env.body
        cid: str = body["id"]
        reason, detail = _check_signature(env.kid, env.protected, env.payload, env.signature, self.keys,
                                          self.revoked)
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
        cmd = Command(cid, body["dev"], body["cmd"], args, body["iat"], body["exp"], env.kid)
        # Kept as long as the command would pass the expiry check above.
        if not self.replay.remember(cid, body["exp"] + self.clock_skew, now=now, command=cmd):
            raise CommandRejected("replayed", cid)
        return cmd


# ---------------------------------------------------------------------------------------

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
