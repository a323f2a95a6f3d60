"""What the uplink keeps beside the connection, as umqtt layers ``robust`` over ``simple``:
the batches out and what an ack may delete (``AckWindow``), and the wait before each
reconnect (``Backoff``). Neither touches paho: agent/uplink/mqtt.py feeds them its
events, the window from the agent's main loop, the backoff from paho's thread.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Collection, Mapping

from agent.commands.verifier import SignedMessages
from agent.errors import DecodeError
from agent.wire import MAX_ACK, batch_digest, decode_ack

log = logging.getLogger(__name__)

RECONNECT_MIN = 1
RECONNECT_MAX = 120
RETRIES_PER_STEP = 4
# A refused cloud ack is logged at most this often (s); every one is counted in status.
ACK_WARN_INTERVAL = 10.0
# Digests of batches settled lately, to tell a late or replayed ack from a made-up one.
SETTLED_KEPT = 256
# The first byte of a tagged COSE_Sign1 (CBOR tag 18): a signed ack.
SIGN1_HEAD = b"\xd2"
# How much of a refused ack's detail is logged.
DETAIL_LOGGED = 80


class Backoff:
    """Reconnect waits with jitter, so a fleet does not come back in lockstep after a
    broker restart: each wait is drawn from [cap/2, cap] (at least RECONNECT_MIN); the
    cap doubles every RETRIES_PER_STEP failures from RECONNECT_MIN to RECONNECT_MAX.
    A short outage (a broker restart, a tunnel) is thus noticed within about a second
    of its end; a long one still backs off to two minutes."""

    def __init__(self) -> None:
        self.jitter = random.Random()
        self.cap = float(RECONNECT_MIN)
        self.failures = 0
        self.delays: collections.deque[float] = collections.deque(maxlen=16)

    def reset(self) -> None:
        """A connection came up: the next failure waits the least again."""
        self.cap = float(RECONNECT_MIN)
        self.failures = 0

    def next(self) -> float:
        """The wait before the next attempt, in s."""
        delay = max(float(RECONNECT_MIN), self.jitter.uniform(self.cap / 2, self.cap))
        self.failures += 1
        if self.failures % RETRIES_PER_STEP == 0:
            self.cap = min(float(RECONNECT_MAX), self.cap * 2)
        self.delays.append(delay)
        return delay


class AckWindow:
    """Every batch out, by the digest of its payload (what its ack must carry): in
    flight (by MQTT message id) until PUBACKed; then, with ``broker_acks``, deletable,
    else awaiting the cloud's ack for ``ack_timeout`` s and given back to be sent again
    if none comes. Methods add the sequence numbers now deletable to ``acked`` and those
    to send again to ``failed``."""

    def __init__(self, broker_acks: bool, ack_timeout: float, ack_keys: Mapping[str, str] | None = None,
                 revoked: Collection[str] = ()) -> None:
        """With ``ack_keys`` (public keys by key id, [commands] ack_keys) only acks signed
        by one of them, not revoked, are taken."""
        self.broker_acks = broker_acks
        self.ack_timeout = ack_timeout
        self.batches: dict[bytes, list[int]] = {}
        self.inflight: dict[int, bytes] = {}
        # PUBACKed batches awaiting the cloud's ack, oldest first: (deadline, digest, seqs).
        self.awaiting: collections.deque[tuple[float, bytes, list[int]]] = collections.deque()
        self.awaiting_seqs: set[int] = set()
        # Batches no longer out (acked, timed out, lost with a connection), newest last.
        self.settled: dict[bytes, None] = {}
        self.signed = SignedMessages(ack_keys or {}, revoked)
        self.signed_acks = bool(ack_keys)
        self.acks_refused = 0
        self.acks_refused_by: dict[str, int] = {}
        self.acks_unlogged = 0
        self.ack_warned = -ACK_WARN_INTERVAL
        self.last_ack_refused = ""
        self.cloud_acks = 0
        self.resent_unacked = 0
        self.batches_sent = 0
        self.batches_acked = 0
        self.batches_failed = 0
        self.records_acked = 0

    def sent(self, mid: int, payload: bytes, seqs: list[int]) -> None:
        """Batch ``payload`` (of ``seqs``) went out as MQTT message ``mid``."""
        digest = batch_digest(payload)
        self.inflight[mid] = digest
        self.batches[digest] = seqs
        self.batches_sent += 1

    def published(self, mid: int, refusal: str, acked: list[int], failed: list[int]) -> None:
        """The broker's PUBACK of batch message ``mid`` (in ``inflight``), ``refusal`` its
        reason code if it refused the batch."""
        digest = self.inflight.pop(mid)
        seqs = self.batches.get(digest)  # None: the cloud acked it before the broker did
        if refusal:
            self.batches_failed += 1
            log.warning("broker refused a batch of %d records: %s", len(seqs or ()), refusal)
            failed.extend(self._settle(digest))
            return
        self.batches_acked += 1
        if seqs is not None and self.broker_acks:
            self._settle(digest)
            self.records_acked += len(seqs)
            acked.extend(seqs)
        elif seqs is not None:
            self.awaiting.append((time.monotonic() + self.ack_timeout, digest, seqs))
            self.awaiting_seqs.update(seqs)

    def lost(self, failed: list[int]) -> None:
        """The connection went: what was in flight is to be sent again."""
        for digest in self.inflight.values():
            failed.extend(self._settle(digest))
        self.inflight.clear()

    def cloud_ack(self, payload: bytes, acked: list[int], failed: list[int]) -> None:
        """Rows are deleted only on an ack that carries the digest of a batch out (only
        who received that batch can know it) and names only that batch's sequence
        numbers; with ``ack_keys``, only on one signed by such a key, too. The batch is
        then settled: what the ack does not name is sent again at once. Any other ack is
        refused, counted and, now and then, logged. A device that does not require
        signatures reads a signed ack's payload without checking it (a fleet can start
        signing before its devices require it); the digest check still applies."""
        if len(payload) > MAX_ACK:
            self._refuse("malformed", f"{len(payload)} bytes > {MAX_ACK}")
            return
        if payload[:1] == SIGN1_HEAD:
            body, reason, detail = self.signed.open(payload, check=self.signed_acks)
            if body is None:
                self._refuse(reason, detail)
                return
            payload = body
        elif self.signed_acks:
            self._refuse("unsigned", "signed acks are required ([commands] ack_keys)")
            return
        try:
            digest, ranges = decode_ack(payload)
        except DecodeError as e:
            self._refuse("malformed", str(e))
            return
        seqs = self.batches.get(digest)
        if seqs is None:
            self._refuse("late" if digest in self.settled else "unknown_batch", digest.hex())
            return
        # Bounded before any range is walked: a range of 2^64 numbers costs nothing.
        if sum(last - first + 1 for first, last in ranges) > len(seqs):
            self._refuse("wrong_seqs", f"more sequence numbers than batch {digest.hex()} holds")
            return
        named = {s for first, last in ranges for s in range(first, last + 1)}
        if not named.issubset(seqs):
            self._refuse("wrong_seqs", f"sequence numbers outside batch {digest.hex()}")
            return
        self._settle(digest)
        self.cloud_acks += 1
        done = [s for s in seqs if s in named]
        self.records_acked += len(done)
        acked.extend(done)
        failed.extend(s for s in seqs if s not in named)

    def _refuse(self, reason: str, detail: str) -> None:
        """Count a refused ack; warn at most every ACK_WARN_INTERVAL s, so a flood of
        forged acks does not flood the log as well."""
        self.acks_refused += 1
        self.acks_refused_by[reason] = self.acks_refused_by.get(reason, 0) + 1
        self.last_ack_refused = f"{reason}: {detail[:DETAIL_LOGGED]}"
        now = time.monotonic()
        if now - self.ack_warned < ACK_WARN_INTERVAL:
            self.acks_unlogged += 1
            return
        more = f" ({self.acks_unlogged} more refused since the last warning)" if self.acks_unlogged else ""
        log.warning("cloud ack refused, nothing deleted: %s%s", self.last_ack_refused, more)
        self.ack_warned = now
        self.acks_unlogged = 0

    def _settle(self, digest: bytes) -> list[int]:
        """Take a batch off the books (acked, timed out, refused by the broker or lost
        with the connection); its sequence numbers ([] if it was settled already)."""
        seqs = self.batches.pop(digest, [])
        self.awaiting_seqs.difference_update(seqs)
        self.settled[digest] = None
        if len(self.settled) > SETTLED_KEPT:
            del self.settled[next(iter(self.settled))]
        return seqs

    def expire(self, failed: list[int]) -> None:
        """Batches the cloud never acknowledged in time are given back to be sent again."""
        now = time.monotonic()
        while self.awaiting:
            deadline, digest, seqs = self.awaiting[0]
            out = self.batches.get(digest) is seqs  # not settled since (nor sent again alike)
            if out and deadline > now:
                return
            self.awaiting.popleft()
            if out:
                late = self._settle(digest)
                self.resent_unacked += len(late)
                failed.extend(late)
