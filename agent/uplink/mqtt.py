"""The broker link, through paho-mqtt 2.x (the one module that imports paho).

paho's network thread keeps the connection, keepalive and reconnects; its callbacks
only put events on a queue. The agent's main loop drains that queue, so the outbox
and every counter are touched by one thread only.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.errors import DecodeError, UplinkError
from agent.uplink.wire import decode_ack

log = logging.getLogger(__name__)

AWAITING_FACTOR = 4
PACKET_OVERHEAD = 32  # MQTT 5 PUBLISH fixed header, packet id and property length
RECONNECT_MIN = 1
RECONNECT_MAX = 120
RETRIES_PER_STEP = 4
# Results kept for the next connect while offline (the outbox keeps every one anyway).
MAX_QUEUED_RESULTS = 256


def _client(client_id: str, cfg: BrokerConfig, manual_ack: bool = False) -> mqtt.Client:
    if cfg.protocol == "3.1.1":
        log.warning("MQTT 3.1.1 chosen: a broker that refuses a publish still acknowledges it, so such "
                    "data is lost silently; prefer protocol = \"5\" (with ack = \"cloud\" nothing is lost)")
    version = mqtt.MQTTv311 if cfg.protocol == "3.1.1" else mqtt.MQTTv5
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, manual_ack=manual_ack)
    if cfg.tls_ca or cfg.tls_cert:
        client.tls_set(ca_certs=cfg.tls_ca or None, certfile=cfg.tls_cert or None,
                       keyfile=cfg.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
    return client


def _failed(rc: Any) -> bool:
    return bool(rc.is_failure) if isinstance(rc, ReasonCode) else bool(rc)


class Uplink:
    """Publishes batches at QoS 1 and reports which sequence numbers are safe to delete:
    on PUBACK with ``ack = "broker"``; with ``ack = "cloud"`` only once the consumer's
    ack says it stored them, resending what no ack covered within ``ack_timeout``."""

    def __init__(self, device_id: str, cfg: BrokerConfig, topic_prefix: str, birth: bytes, death: bytes,
                 commands: bool = False) -> None:
        """With ``commands``, the session persists (the broker keeps commands sent while
        the vehicle is offline, until their MQTT 5 message expiry) and ``cmd`` is
        subscribed; ``take_commands`` hands them over."""
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
        self.inflight: dict[int, list[int]] = {}
        # PUBACKed batches awaiting the cloud's ack, oldest first: (deadline, seqs).
        self.awaiting: collections.deque[tuple[float, list[int]]] = collections.deque()
        self.awaiting_seqs: set[int] = set()
        self.max_packet = 0  # the broker's MaximumPacketSize (MQTT 5 CONNACK), 0 = not limited
        self.sent_bytes: collections.deque[tuple[float, int]] = collections.deque()
        self.cloud_acks = 0
        self.bad_acks = 0
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
        self.events.put(("connect", rc, None))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        # What was in flight goes back to the outbox (poll) and is sent again in its turn;
        # paho would also send it again, first, on reconnect: ahead of the newest live data
        # and twice. paho has no public way to drop it.
        with client._out_message_mutex:
            client._out_messages.clear()
            client._inflight_messages = 0
        self.next_reconnect_delay()
        self.events.put(("disconnect", rc, None))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
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
        self.inflight[info.mid] = seqs
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
                self._cloud_ack(a, acked)
            elif what == "cmd":
                self.commands_received += 1
                self.commands.append((a, b))
            elif what == "connect":
                self.connected = not _failed(a)
                self.connects += int(self.connected)
                if self.connected:
                    self._flush_results()
                if not self.connected:
                    self.last_error = f"connect refused: {a}"
                    log.warning("broker refused the connection: %s", a)
            elif what == "disconnect":
                self.connected = False
                self.last_error = f"disconnected: {a}"
                for seqs in self.inflight.values():
                    failed.extend(seqs)
                self.inflight.clear()
            elif a in self.inflight:
                seqs = self.inflight.pop(a)
                if _failed(b):
                    self.batches_failed += 1
                    self.last_error = f"broker refused a batch: {b}"
                    log.warning("broker refused batch %s..%s: %s", seqs[0], seqs[-1], b)
                    failed.extend(seqs)
                else:
                    self.batches_acked += 1
                    if self.cfg.ack == "broker":
                        self.records_acked += len(seqs)
                        acked.extend(seqs)
                    else:
                        self.awaiting.append((time.monotonic() + self.cfg.ack_timeout, seqs))
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

    def _cloud_ack(self, payload: bytes, acked: list[int]) -> None:
        """Seqs the consumer stored; only ones this agent has out are taken, so a forged
        or huge range costs nothing."""
        try:
            ranges = decode_ack(payload)
        except DecodeError as e:
            self.bad_acks += 1
            self.last_error = f"bad ack: {e}"
            return
        self.cloud_acks += 1
        pending = self.awaiting_seqs | {s for seqs in self.inflight.values() for s in seqs}
        done = [s for s in pending if any(first <= s <= last for first, last in ranges)]
        self.awaiting_seqs.difference_update(done)
        self.records_acked += len(done)
        acked.extend(done)

    def _expire(self, failed: list[int]) -> None:
        """Batches the cloud never acknowledged in time are given back to be sent again."""
        now = time.monotonic()
        while self.awaiting:
            deadline, seqs = self.awaiting[0]
            late = [s for s in seqs if s in self.awaiting_seqs]
            if late and deadline > now:
                return
            self.awaiting.popleft()
            if late:
                self.awaiting_seqs.difference_update(late)
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

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected, "connects": self.connects, "in_flight": len(self.inflight),
            "batches_sent": self.batches_sent, "batches_acked": self.batches_acked,
            "batches_failed": self.batches_failed, "records_acked": self.records_acked, "ack": self.cfg.ack,
            "awaiting_cloud_ack": len(self.awaiting_seqs), "cloud_acks": self.cloud_acks,
            "bad_acks": self.bad_acks, "resent_unacked": self.resent_unacked,
            "commands_received": self.commands_received, "commands_queued": len(self.commands),
            "reconnect_delays": [round(d, 3) for d in self.reconnect_delays],
            "last_error": self.last_error,
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
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, msg: on_message(msg.topic, bytes(msg.payload))

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        if not _failed(rc):
            client.subscribe(self.topic, qos=1)
            self.connected = True

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
            raise UplinkError(f"cannot connect to {self.host}:{self.port}: {e}") from e

    def loop(self, timeout: float) -> None:
        """Run the network loop for ``timeout`` s at most, in the caller's thread."""
        rc = self.client.loop(timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.connected = False
            try:
                self.client.reconnect()
            except OSError as e:
                log.warning("consumer: reconnect to %s:%s failed: %s", self.host, self.port, e)
                time.sleep(min(timeout, 1.0))

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
        raise UplinkError(f"cannot connect to {host}:{port}: {e}") from e
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
