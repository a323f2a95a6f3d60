"""The broker link, through paho-mqtt 2.x (the one module that imports paho).

paho's network thread keeps the connection, keepalive and reconnects; its callbacks
put events on a queue, and tell why a connection failed (in words, to the log and to
``last_error``). The agent's main loop drains that queue, so the outbox
and every counter are touched by one thread only.

``Uplink`` is the link; what it keeps beside it, the ack window and the reconnect
backoff, is in window.py. ``LinkClient``, ``LinkFailures``, ``connection_error`` and the
property helpers are the link's common part: the fleet's consumer and operator tools
(agent/fleet/subscriber.py) build on them, so both ends name a failure alike and only
this module touches paho.
"""

from __future__ import annotations

import collections
import errno
import logging
import queue
import socket
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.errors import UplinkError
from agent.uplink.budget import Budget
from agent.uplink.window import RECONNECT_MAX, RECONNECT_MIN, AckWindow, Backoff

log = logging.getLogger(__name__)

AWAITING_FACTOR = 4
PACKET_OVERHEAD = 32  # MQTT 5 PUBLISH fixed header, packet id and property length
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


def _client(client_id: str, cfg: BrokerConfig, manual_ack: bool = False) -> LinkClient:
    if cfg.protocol == "3.1.1":
        log.warning("MQTT 3.1.1 chosen: a broker that refuses a publish still acknowledges it, so such "
                    "data is lost silently; prefer protocol = \"5\" (with ack = \"cloud\" nothing is lost)")
    client = LinkClient(client_id, LinkFailures("broker", cfg.host, cfg.port), cfg.protocol, manual_ack=manual_ack)
    if cfg.tls_ca or cfg.tls_cert:
        client.tls_set(ca_certs=cfg.tls_ca or None, certfile=cfg.tls_cert or None,
                       keyfile=cfg.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    return client


def is_failure(rc: Any) -> bool:
    """Whether paho's answer (a reason code, or the error code of a call) is a failure."""
    return bool(rc.is_failure) if isinstance(rc, ReasonCode) else bool(rc)


def session_properties(expiry_s: int) -> Properties:
    """MQTT 5 CONNECT properties: the broker keeps the session ``expiry_s`` after it ends."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    return props


def expiry_properties(expiry_s: int) -> Properties:
    """MQTT 5 PUBLISH properties: the broker drops the message once ``expiry_s`` have passed."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = expiry_s
    return props


def connection_error(cause: OSError | ReasonCode | None, host: str, port: int) -> str:
    """Why a connection to the broker failed or ended, in words a technician can act on
    (a wrong host, a wrong password and a dead link read differently). ``cause``: the
    socket or TLS exception, the broker's CONNACK or DISCONNECT reason code, or None when
    the other end closed the connection without a word. The uplink and the fleet's
    consumer (agent/fleet/subscriber.py) both say it this way."""
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
        self.failure: OSError | None = None  # the socket's or TLS's own error, kept by LinkClient
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
        if not is_failure(rc):
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


class LinkClient(mqtt.Client):
    """paho's client (callbacks of API version 2, reconnects backing off from
    RECONNECT_MIN to RECONNECT_MAX s), keeping for ``link`` the exception paho hands no
    callback: the one that failed a connect (on_connect_fail has no argument) or broke a
    connection (it reaches on_disconnect as "Unspecified error"). ``protocol``: "5" or
    "3.1.1", as [broker] protocol says it."""

    def __init__(self, client_id: str, link: LinkFailures, protocol: str = "5", manual_ack: bool = False) -> None:
        version = mqtt.MQTTv311 if protocol == "3.1.1" else mqtt.MQTTv5
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, manual_ack=manual_ack)
        self.link = link
        self.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)

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
    ack says it stored them, resending what no ack covered within ``ack_timeout`` (the
    books are its ``window``; the waits between reconnects, its ``backoff``)."""

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
        self.window = AckWindow(cfg.ack == "broker", cfg.ack_timeout, ack_keys, revoked)
        self.backoff = Backoff()
        self.max_packet = 0  # the broker's MaximumPacketSize (MQTT 5 CONNACK), 0 = not limited
        self.sent_bytes: collections.deque[tuple[float, int]] = collections.deque()
        self.budget: Budget | None = None  # counts what is sent, when set
        self.connected = False
        self.connected_since: float | None = None
        self.last_ack_at: float | None = None
        self.connects = 0
        self.last_error = ""
        self.client = _client(device_id, cfg, manual_ack=commands)
        self.client.will_set(self.topic_state, death, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_connect_fail = self._on_connect_fail

    def start(self) -> None:
        """Connect in the background; failures are retried by paho with backoff."""
        props = None
        if self.topic_cmd and self.cfg.protocol == "5":
            props = session_properties(self.cfg.session_expiry)
        try:
            self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive,
                                      clean_start=not self.topic_cmd, properties=props)
        except (OSError, ValueError) as e:
            raise UplinkError(f"cannot connect to {self.cfg.host}:{self.cfg.port}: {e}") from e
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        self.session += 1  # message ids of the last connection mean nothing on this one
        if not is_failure(rc):
            self.backoff.reset()
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
        cause, so the one LinkClient kept is told."""
        self.last_error = self.client.link.connect_failed(self.client.link.failure)
        self.next_reconnect_delay()

    def retry_soon(self) -> None:
        """A technician's ``sync``: the waits between attempts start again from the
        shortest (the wait under way ends first: paho cannot cut it short)."""
        self.backoff.reset()
        self.client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MIN)

    def next_reconnect_delay(self) -> float:
        """Set paho's next wait (it runs right after these callbacks) to the backoff's next."""
        delay = self.backoff.next()
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
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
        window, cfg = self.window, self.cfg
        return (self.connected and len(window.inflight) < cfg.max_inflight
                and len(window.awaiting_seqs) < AWAITING_FACTOR * cfg.max_inflight * cfg.max_batch_records
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

    def publish(self, seqs: list[int], payload: bytes, record_bytes: int = 0) -> bool:
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
        self.window.sent(info.mid, payload, seqs)
        self._count(self.topic_telemetry, payload, record_bytes)
        if self.cfg.max_bytes_per_s:
            self.sent_bytes.append((time.monotonic(), len(payload)))
        return True

    def _count(self, topic: str, payload: bytes, record_bytes: int = 0) -> None:
        """A publish paho took, counted against the data budget (``record_bytes``: the
        record bodies of a batch)."""
        if self.budget is not None:
            self.budget.published(len(topic.encode()), len(payload), time.time(), record_bytes)

    def poll(self) -> tuple[list[int], list[int]]:
        """Drain paho's events: sequence numbers acknowledged, and ones to send again."""
        acked: list[int] = []
        failed: list[int] = []
        while True:
            try:
                what, a, b = self.events.get_nowait()
            except queue.Empty:
                self.window.expire(failed)
                if acked:
                    self.last_ack_at = time.time()
                return acked, failed
            if what == "ack":
                self.window.cloud_ack(a, acked, failed)
            elif what == "cmd":
                self.commands_received += 1
                self.commands.append((a, b))
            elif what == "connect":  # only a connection that came up (_on_connect)
                self.connected = True
                self.connected_since = time.time()
                self.connects += 1
                if self.budget is not None:
                    self.budget.connected(time.time())
                self._flush_results()
            elif what == "disconnect":  # its cause is logged and kept by _on_disconnect
                self.connected = False
                self.connected_since = None
                self.window.lost(failed)
            elif a in self.window.inflight:  # a batch's PUBACK
                refusal = str(b) if is_failure(b) else ""
                if refusal:
                    self.last_error = f"broker refused a batch: {refusal}"
                self.window.published(a, refusal, acked, failed)

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
            self._count(self.topic_result, self.results.popleft())

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
        w = self.window
        return {
            "connected": self.connected, "connected_since": self.connected_since, "last_ack_at": self.last_ack_at,
            "connects": self.connects, "in_flight": len(w.inflight),
            "batches_sent": w.batches_sent, "batches_acked": w.batches_acked,
            "batches_failed": w.batches_failed, "records_acked": w.records_acked, "ack": self.cfg.ack,
            "awaiting_cloud_ack": len(w.awaiting_seqs), "cloud_acks": w.cloud_acks,
            "acks_refused": w.acks_refused, "acks_refused_by": dict(w.acks_refused_by),
            "last_ack_refused": w.last_ack_refused, "signed_acks": w.signed_acks,
            "resent_unacked": w.resent_unacked,
            "commands_received": self.commands_received, "commands_queued": len(self.commands),
            "reconnect_delays": [round(d, 3) for d in self.backoff.delays],
            "last_error": words,
            "last_error_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if words else None,
            "last_error_age_s": round(time.monotonic() - since, 1) if words else None,
        }
