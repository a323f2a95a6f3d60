"""The broker link, through paho-mqtt 2.x (the one module that imports paho).

paho's network thread keeps the connection, keepalive and reconnects; its callbacks
put events on a queue, and tell why a connection failed (in words, to the log and to
``last_error``). The agent's main loop drains that queue, so the outbox
and every counter are touched by one thread only.
"""

from __future__ import annotations

import collections
import errno
import logging
import queue
import random
import socket
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.errors import DecodeError, UplinkError
from agent.uplink.commands import SignedMessages
from agent.uplink.wire import MAX_ACK, batch_digest, decode_ack

log = logging.getLogger(__name__)

AWAITING_FACTOR = 4
PACKET_OVERHEAD = 32  # MQTT 5 PUBLISH fixed header, packet id and property length
RECONNECT_MIN = 1
RECONNECT_MAX = 120
RETRIES_PER_STEP = 4
# A connection failure is logged when its cause changes; the same cause again, at most
# this often (s), with a count of repeats: a broker down all day fills no log.
REPEAT_LOG_INTERVAL = 60.0
# CONNACK reason codes that mean "these credentials are not welcome".
AUTH_REFUSALS = frozenset({"Bad user name or password", "Not authorized", "Bad authentication method", "Banned"})
# OpenSSL verify codes: the certificate is for another name or address.
NAME_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
# ... it does not chain to the CA configured (tls_ca), or is not valid now (the clock?).
CA_MISMATCH = frozenset({2, 18, 19, 20, 21})
NOT_VALID_NOW = frozenset({9, 10})
# Results kept for the next connect while offline (the outbox keeps every one anyway).
MAX_QUEUED_RESULTS = 256
# A refused cloud ack is logged at most this often (s); every one is counted in status.
ACK_WARN_INTERVAL = 10.0
# Digests of batches settled lately, to tell a late or replayed ack from a made-up one.
SETTLED_KEPT = 256
# The first byte of a tagged COSE_Sign1 (CBOR tag 18): a signed ack.
SIGN1_HEAD = b"\xd2"
# How much of a refused ack's detail is logged.
DETAIL_LOGGED = 80


def _client(client_id: str, cfg: BrokerConfig, manual_ack: bool = False) -> _Client:
    if cfg.protocol == "3.1.1":
        log.warning("MQTT 3.1.1 chosen: a broker that refuses a publish still acknowledges it, so such "
                    "data is lost silently; prefer protocol = \"5\" (with ack = \"cloud\" nothing is lost)")
    version = mqtt.MQTTv311 if cfg.protocol == "3.1.1" else mqtt.MQTTv5
    client = _Client(client_id, version, LinkFailures("broker", cfg.host, cfg.port), manual_ack=manual_ack)
    if cfg.tls_ca or cfg.tls_cert:
        client.tls_set(ca_certs=cfg.tls_ca or None, certfile=cfg.tls_cert or None,
                       keyfile=cfg.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
    return client


def _failed(rc: Any) -> bool:
    return bool(rc.is_failure) if isinstance(rc, ReasonCode) else bool(rc)


def connection_error(cause: OSError | ReasonCode | None, host: str, port: int) -> str:
    """Why a connection to the broker failed or ended, in words a technician can act on
    (a wrong host, a wrong password and a dead link read differently). ``cause``: the
    socket or TLS exception, the broker's CONNACK or DISCONNECT reason code, or None when
    the other end closed the connection without a word. The uplink and the Subscriber
    both say it this way."""
    where = f"{host}:{port}"
    if cause is None:
        return f"connection lost: closed by {where} or the network"
    if isinstance(cause, ReasonCode):
        name = cause.getName()
        if cause.packetType == PacketTypes.CONNACK:
            if name in AUTH_REFUSALS:
                return f"authentication refused by {where}: {name}"
            return f"{where} refused the connection: {name}"
        if name == "Keep alive timeout":
            return f"keepalive expired: no answer from {where} in time (a dead link or a hung broker)"
        return f"connection to {where} ended: {name}"
    if isinstance(cause, ssl.SSLCertVerificationError):
        code = getattr(cause, "verify_code", None)
        if code in NAME_MISMATCH:
            return f"TLS: host name mismatch: the broker's certificate is not valid for {host}"
        hint = " (is tls_ca the broker's CA?)" if code in CA_MISMATCH else \
            " (is the clock right?)" if code in NOT_VALID_NOW else ""
        return f"TLS: certificate verify failed: {getattr(cause, 'verify_message', None) or cause}{hint}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: handshake with {where} failed: {cause.reason or cause}"
    if isinstance(cause, socket.gaierror):
        return f"host name {host} does not resolve ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused at {where}"
    if isinstance(cause, ConnectionResetError):
        return f"connection reset: {where} or the network dropped it"
    if isinstance(cause, TimeoutError):
        return f"no answer from {where}: connect timed out"
    if cause.errno == errno.ENETUNREACH:
        return f"network unreachable: no route to {host} (is the link up?)"
    if cause.errno == errno.EHOSTUNREACH:
        return f"host unreachable: {host}"
    return f"connection to {where} lost: {cause.strerror or cause}"


class LinkFailures:
    """One broker link's failures: each logged at WARNING once per change of cause, then
    at most every REPEAT_LOG_INTERVAL s with a count of repeats (a connection that
    fails the same way again after a short success counts as a repeat, so a flapping
    link does not flood the log either). Fed from one thread: paho's callbacks, or the
    caller of a client's own loop."""

    def __init__(self, who: str, host: str, port: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.who = who
        self.host = host
        self.port = port
        self.clock = clock
        self.failure: OSError | None = None  # the socket's or TLS's own error, kept by _Client
        self.refused = False  # the last CONNACK refused: the close that follows tells nothing new
        self.cause = ""
        self.repeats = 0
        self.logged_at = 0.0

    def connect_failed(self, cause: OSError | ReasonCode | None) -> str:
        """A connection attempt failed (an exception, or a refused CONNACK); its words."""
        self.refused = isinstance(cause, ReasonCode)
        return self._report(connection_error(cause, self.host, self.port))

    def connected(self) -> None:
        """The link is up. The last cause is kept: the same failure again is a repeat."""
        self.refused = False

    def ended(self, flags: Any, rc: ReasonCode) -> str | None:
        """A connection ended: its words, "" when it ended cleanly, None when it is the
        close after a refused CONNACK (told already; the link never came up). paho calls
        a lost socket "Unspecified error": the socket's own error says more."""
        if self.refused:
            self.refused = False
            return None
        if not _failed(rc):
            return ""
        cause: OSError | ReasonCode | None = rc
        if not flags.is_disconnect_packet_from_server and rc.getName() == "Unspecified error":
            cause = self.failure
        return self._report(connection_error(cause, self.host, self.port))

    def _report(self, words: str) -> str:
        now = self.clock()
        if words != self.cause:
            self._summary(now)
            self.cause, self.logged_at = words, now
            log.warning("%s: %s", self.who, words)
        else:
            self.repeats += 1
            if now - self.logged_at >= REPEAT_LOG_INTERVAL:
                self._summary(now)
                self.logged_at = now
        return words

    def _summary(self, now: float) -> None:
        if self.repeats:
            log.warning("%s: %s (%d more time%s in the last %.0f s)", self.who, self.cause, self.repeats,
                        "" if self.repeats == 1 else "s", now - self.logged_at)
        self.repeats = 0


class _Client(mqtt.Client):
    """paho's client, keeping for ``link`` the exception paho hands no callback: the one
    that failed a connect (on_connect_fail has no argument) or broke a connection (it
    reaches on_disconnect as "Unspecified error")."""

    def __init__(self, client_id: str, protocol: MQTTProtocolVersion, link: LinkFailures,
                 manual_ack: bool = False) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, manual_ack=manual_ack)
        self.link = link

    def reconnect(self) -> MQTTErrorCode:
        self.link.failure = None
        try:
            return super().reconnect()
        except OSError as e:
            self.link.failure = e
            raise

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except OSError as e:
            self._keep(e)
            raise

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except OSError as e:
            self._keep(e)
            raise

    def _keep(self, e: OSError) -> None:
        if not isinstance(e, BlockingIOError):  # "nothing to read now" is no failure
            self.link.failure = e


class Uplink:
    """Publishes batches at QoS 1 and reports which sequence numbers are safe to delete:
    on PUBACK with ``ack = "broker"``; with ``ack = "cloud"`` only once the consumer's
    ack says it stored them, resending what no ack covered within ``ack_timeout``."""

    def __init__(self, device_id: str, cfg: BrokerConfig, topic_prefix: str, birth: bytes, death: bytes,
                 commands: bool = False, ack_keys: Mapping[str, str] | None = None,
                 revoked: Collection[str] = ()) -> None:
        """With ``commands``, the session persists (the broker keeps commands sent while
        the vehicle is offline, until their MQTT 5 message expiry) and ``cmd`` is
        subscribed; ``take_commands`` hands them over. With ``ack_keys`` (public keys
        by key id, [commands] ack_keys) only acks signed by one of them, not revoked,
        are taken."""
        self.cfg = cfg
        self.topic_telemetry = topic_prefix + "telemetry"
        self.topic_state = topic_prefix + "state"
        self.topic_ack = topic_prefix + "ack"
        self.topic_cmd = topic_prefix + "cmd" if commands else ""
        self.topic_result = topic_prefix + "cmd/result"
        # (envelope, token for ``command_done``): acknowledged to the broker only once the
        # agent has journalled or answered it, so one received just before a power cut is
        # delivered again, not lost.
        self.commands: collections.deque[tuple[bytes, tuple[int, int, int]]] = collections.deque()
        self.session = 0
        # Results made while offline, sent on the next connect (the outbox has them too).
        self.results: collections.deque[bytes] = collections.deque(maxlen=MAX_QUEUED_RESULTS)
        self.commands_received = 0
        self.birth = birth
        self.events: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        # Every batch out, by the digest of its payload (what its ack must carry): in
        # flight (by MQTT message id) until PUBACKed, then awaiting the cloud's ack.
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
        self.max_packet = 0  # the broker's MaximumPacketSize (MQTT 5 CONNACK), 0 = not limited
        self.sent_bytes: collections.deque[tuple[float, int]] = collections.deque()
        self.cloud_acks = 0
        self.resent_unacked = 0
        self.connected = False
        self.connects = 0
        self.batches_sent = 0
        self.batches_acked = 0
        self.batches_failed = 0
        self.records_acked = 0
        self.last_error = ""
        self.client = _client(device_id, cfg, manual_ack=commands)
        self.client.will_set(self.topic_state, death, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_connect_fail = self._on_connect_fail
        # Reconnect backoff with jitter, so a fleet does not come back in lockstep after a
        # broker restart: each wait is drawn from [cap/2, cap] (at least RECONNECT_MIN); the
        # cap doubles every RETRIES_PER_STEP failures from RECONNECT_MIN to RECONNECT_MAX.
        # A short outage (a broker restart, a tunnel) is thus noticed within about a
        # second of its end; a long one still backs off to two minutes.
        self.jitter = random.Random()
        self.backoff_cap = float(RECONNECT_MIN)
        self.failures = 0
        self.reconnect_delays: collections.deque[float] = collections.deque(maxlen=16)

    def start(self) -> None:
        """Connect in the background; failures are retried by paho with backoff."""
        props = None
        if self.topic_cmd and self.cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry
        try:
            self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive,
                                      clean_start=not self.topic_cmd, properties=props)
        except (OSError, ValueError) as e:
            raise UplinkError(f"cannot connect to {self.cfg.host}:{self.cfg.port}: {e}") from e
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        self.session += 1  # message ids of the last connection mean nothing on this one
        if not _failed(rc):
            self.backoff_cap = float(RECONNECT_MIN)
            self.failures = 0
            self.max_packet = int(getattr(props, "MaximumPacketSize", 0) or 0)
            if self.cfg.ack == "cloud":
                client.subscribe(self.topic_ack, qos=1)
            if self.topic_cmd:
                client.subscribe(self.topic_cmd, qos=1)
            client.publish(self.topic_state, self.birth, qos=1, retain=True)
            self.client.link.connected()
            self.events.put(("connect", rc, None))
        else:
            # Logged and kept here, once per cause: the main loop has nothing to undo for a
            # link that never came up.
            self.last_error = self.client.link.connect_failed(rc)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        # What was in flight goes back to the outbox (poll) and is sent again in its turn;
        # paho would also send it again, first, on reconnect: ahead of the newest live data
        # and twice. paho has no public way to drop it.
        with client._out_message_mutex:
            client._out_messages.clear()
            client._inflight_messages = 0
        self.next_reconnect_delay()
        words = self.client.link.ended(flags, rc)
        if words is None:
            return
        if words:
            self.last_error = words
        self.events.put(("disconnect", words or rc, None))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """A connect that failed before any MQTT (socket, name, TLS): paho passes no
        cause, so the one _Client kept is told."""
        self.last_error = self.client.link.connect_failed(self.client.link.failure)
        self.next_reconnect_delay()

    def next_reconnect_delay(self) -> float:
        """Set paho's next wait (it runs right after these callbacks) to a jittered share
        of the cap, which doubles every RETRIES_PER_STEP failures."""
        delay = max(float(RECONNECT_MIN), self.jitter.uniform(self.backoff_cap / 2, self.backoff_cap))
        self.failures += 1
        if self.failures % RETRIES_PER_STEP == 0:
            self.backoff_cap = min(float(RECONNECT_MAX), self.backoff_cap * 2)
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        self.reconnect_delays.append(delay)
        return delay

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Properties | None) -> None:
        self.events.put(("publish", mid, rc))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topic_cmd:
            self.events.put(("cmd", bytes(msg.payload), (self.session, msg.mid, msg.qos)))
            return
        if msg.topic == self.topic_ack:
            self.events.put(("ack", bytes(msg.payload), None))
        client.ack(msg.mid, msg.qos)

    def can_send(self) -> bool:
        """Room in the in-flight window; batches awaiting the cloud's ack count too, so a
        consumer that is down does not make the agent send its whole backlog blind."""
        return (self.connected and len(self.inflight) < self.cfg.max_inflight
                and len(self.awaiting_seqs) < AWAITING_FACTOR * self.cfg.max_inflight * self.cfg.max_batch_records
                and self._under_bandwidth_cap())

    def batch_bytes(self) -> int:
        """Largest batch payload to build: the configured bound, and what the broker takes
        (its maximum packet size less room for the fixed header and topic)."""
        if self.max_packet:
            return max(1, min(self.cfg.max_batch_bytes, self.max_packet - len(self.topic_telemetry) - PACKET_OVERHEAD))
        return self.cfg.max_batch_bytes

    def _under_bandwidth_cap(self) -> bool:
        """Bytes published in the last second stay under ``max_bytes_per_s`` (0 = no cap)."""
        if not self.cfg.max_bytes_per_s:
            return True
        now = time.monotonic()
        while self.sent_bytes and self.sent_bytes[0][0] <= now - 1.0:
            self.sent_bytes.popleft()
        return sum(n for _, n in self.sent_bytes) < self.cfg.max_bytes_per_s

    def publish(self, seqs: list[int], payload: bytes) -> bool:
        """Queue one batch; False if paho would not take it (the rows stay leased-free).
        Nothing is handed to paho while it is not connected: it would keep the message
        and send it first on the next connect, ahead of the newest live data."""
        if not self.client.is_connected():
            self.last_error = "not connected"
            return False
        info = self.client.publish(self.topic_telemetry, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.last_error = mqtt.error_string(info.rc)
            return False
        digest = batch_digest(payload)
        self.inflight[info.mid] = digest
        self.batches[digest] = seqs
        self.batches_sent += 1
        if self.cfg.max_bytes_per_s:
            self.sent_bytes.append((time.monotonic(), len(payload)))
        return True

    def poll(self) -> tuple[list[int], list[int]]:
        """Drain paho's events: sequence numbers acknowledged, and ones to send again."""
        acked: list[int] = []
        failed: list[int] = []
        while True:
            try:
                what, a, b = self.events.get_nowait()
            except queue.Empty:
                self._expire(failed)
                return acked, failed
            if what == "ack":
                self._cloud_ack(a, acked, failed)
            elif what == "cmd":
                self.commands_received += 1
                self.commands.append((a, b))
            elif what == "connect":  # only a connection that came up (_on_connect)
                self.connected = True
                self.connects += 1
                self._flush_results()
            elif what == "disconnect":  # its cause is logged and kept by _on_disconnect
                self.connected = False
                for digest in self.inflight.values():
                    failed.extend(self._settle(digest))
                self.inflight.clear()
            elif a in self.inflight:
                digest = self.inflight.pop(a)
                seqs = self.batches.get(digest)  # None: the cloud acked it before the broker did
                if _failed(b):
                    self.batches_failed += 1
                    self.last_error = f"broker refused a batch: {b}"
                    log.warning("broker refused a batch of %d records: %s", len(seqs or ()), b)
                    failed.extend(self._settle(digest))
                else:
                    self.batches_acked += 1
                    if seqs is not None and self.cfg.ack == "broker":
                        self._settle(digest)
                        self.records_acked += len(seqs)
                        acked.extend(seqs)
                    elif seqs is not None:
                        self.awaiting.append((time.monotonic() + self.cfg.ack_timeout, digest, seqs))
                        self.awaiting_seqs.update(seqs)

    def take_commands(self, most: int) -> list[tuple[bytes, tuple[int, int, int]]]:
        """Up to ``most`` of the command envelopes received (after ``poll``), oldest
        first, each with its token for ``command_done``; the rest wait for the next call,
        so a burst does not stall the loop."""
        return [self.commands.popleft() for _ in range(min(most, len(self.commands)))]

    def command_done(self, token: tuple[int, int, int]) -> None:
        """Acknowledge a command to the broker: it is journalled or answered. On a later
        connection its id means nothing; the broker sends it again and the replay cache
        answers that."""
        session, mid, qos = token
        if session == self.session:
            self.client.ack(mid, qos)

    def publish_result(self, payload: bytes) -> None:
        """A command result on ``cmd/result``: at once when connected, else on the next
        connect (the newest few hundred; the outbox keeps every one as a record too)."""
        self.results.append(payload)
        if self.connected and self.client.is_connected():
            self._flush_results()

    def _flush_results(self) -> None:
        while self.results:
            if self.client.publish(self.topic_result, self.results[0], qos=1).rc != mqtt.MQTT_ERR_SUCCESS:
                return
            self.results.popleft()

    def _cloud_ack(self, payload: bytes, acked: list[int], failed: list[int]) -> None:
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

    def _expire(self, failed: list[int]) -> None:
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

    def stop(self, death: bytes, timeout: float = 2.0) -> None:
        """Say goodbye on ``state`` (the will is for unclean ends) and disconnect."""
        if self.connected:
            info = self.client.publish(self.topic_state, death, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                log.warning("offline state not delivered: %s", e)
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def last_error(self) -> str:
        """The latest error, in words. Every assignment (from either thread) is stamped with
        its time, so ``status`` can say when it happened."""
        return self._last_error[0]

    @last_error.setter
    def last_error(self, words: str) -> None:
        self._last_error = (words, time.time(), time.monotonic())

    def status(self) -> dict[str, Any]:
        words, at, since = self._last_error
        return {
            "connected": self.connected, "connects": self.connects, "in_flight": len(self.inflight),
            "batches_sent": self.batches_sent, "batches_acked": self.batches_acked,
            "batches_failed": self.batches_failed, "records_acked": self.records_acked, "ack": self.cfg.ack,
            "awaiting_cloud_ack": len(self.awaiting_seqs), "cloud_acks": self.cloud_acks,
            "acks_refused": self.acks_refused, "acks_refused_by": dict(self.acks_refused_by),
            "last_ack_refused": self.last_ack_refused, "signed_acks": self.signed_acks,
            "resent_unacked": self.resent_unacked,
            "commands_received": self.commands_received, "commands_queued": len(self.commands),
            "reconnect_delays": [round(d, 3) for d in self.reconnect_delays],
            "last_error": words,
            "last_error_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if words else None,
            "last_error_age_s": round(time.monotonic() - since, 1) if words else None,
        }


class Subscriber:
    """The cloud side's consumer link: a persistent session, so nothing published
    while the consumer restarts is lost, and QoS 1 deliveries."""

    def __init__(self, client_id: str, host: str, port: int, topic: str,
                 on_message: Callable[[str, bytes], None], persistent: bool = True) -> None:
        """``persistent=False`` for a one-off listener (``command send --wait``): the
        broker keeps nothing for it."""
        self.topic = topic
        self.host = host
        self.port = port
        self.persistent = persistent
        self.connected = False
        self.subscribed = False
        self.link = LinkFailures("consumer", host, port)
        self.client = _Client(client_id, mqtt.MQTTv5, self.link)
        self.client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, msg: on_message(msg.topic, bytes(msg.payload))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        if not _failed(rc):
            client.subscribe(self.topic, qos=1)
            self.connected = True
            self.link.connected()
        else:
            self.link.connect_failed(rc)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        self.link.ended(flags, rc)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[Any],
                      props: Properties | None) -> None:
        if any(_failed(rc) for rc in rcs):
            log.error("consumer: broker refused the subscription to %s: %s", self.topic, rcs)
        else:
            self.subscribed = True
            log.info("consumer: subscribed to %s", self.topic)

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600 if self.persistent else 0
        try:
            self.client.connect(self.host, self.port, 30, clean_start=not self.persistent, properties=props)
        except OSError as e:
            raise UplinkError(f"cannot connect to the broker: {connection_error(e, self.host, self.port)}") from e

    def loop(self, timeout: float) -> None:
        """Run the network loop for ``timeout`` s at most, in the caller's thread. A lost
        connection is retried at once; one that never came up (refused, a refused CONNACK)
        after a pause, so a broker that turns the consumer away is not hammered."""
        rc = self.client.loop(timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            if not self.connected:
                time.sleep(min(timeout, 1.0))
            self.connected = False
            try:
                self.client.reconnect()
            except OSError as e:
                self.link.connect_failed(e)

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1 publish from the consumer (its acks to devices)."""
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()


def wait_until(done: Callable[[], bool], timeout: float, loop: Callable[[float], None]) -> bool:
    """Run ``loop`` (a client's network loop) until ``done`` or ``timeout`` s; ``done()``."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        loop(min(0.1, max(0.0, deadline - time.monotonic())))
    return done()


def publish_once(host: str, port: int, topic: str, payload: bytes, expiry_s: int, timeout: float = 10.0) -> None:
    """Connect (MQTT 5), publish at QoS 1 with a message expiry, wait for the PUBACK,
    disconnect: how operators send a command, so a vehicle offline past its expiry never
    gets a stale one."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        client.connect(host, port, 30)
    except OSError as e:
        raise UplinkError(f"cannot connect to the broker: {connection_error(e, host, port)}") from e
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = expiry_s
        info = client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise UplinkError(f"no PUBACK from {host}:{port} within {timeout} s")
    except (RuntimeError, ValueError) as e:
        raise UplinkError(f"publish to {host}:{port} failed: {e}") from e
    finally:
        client.disconnect()
        client.loop_stop()
