"""The fleet's MQTT ends: the consumer's subscriber, and the operator's one-shot publish.

Both run in the caller's thread (no paho thread, no queue) and are built on the
vehicle's link helpers (agent/uplink/mqtt.py), so a failure reads the same words on
either side of the broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.errors import UplinkError
from agent.uplink.mqtt import (
    LinkClient,
    LinkFailures,
    connection_error,
    expiry_properties,
    is_failure,
    session_properties,
)

log = logging.getLogger(__name__)

# How long the broker keeps a persistent consumer's session (and what arrives for it).
SESSION_EXPIRY_S = 3600


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
        self.wanted = True
        self.link = LinkFailures("consumer", host, port)
        self.client = LinkClient(client_id, self.link)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, msg: on_message(msg.topic, bytes(msg.payload))

    # paho's callbacks (API version 2); the client and properties they pass are unused.
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not is_failure(rc):
            if self.wanted:
                self.client.subscribe(self.topic, qos=1)
            self.connected = True
            self.link.connected()
        else:
            self.link.connect_failed(rc)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.link.ended(flags, rc)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: list[Any], props: Any) -> None:
        if any(is_failure(rc) for rc in rcs):
            log.error("consumer: broker refused the subscription to %s: %s", self.topic, rcs)
        else:
            self.subscribed = True
            log.info("consumer: subscribed to %s", self.topic)

    def leave(self) -> None:
        """Stop taking messages (unsubscribe; a shared subscription's other members take
        them): for a consumer that cannot store them now."""
        if self.wanted:
            self.wanted = self.subscribed = False
            self.client.unsubscribe(self.topic)
            log.warning("consumer: left %s until it can store again", self.topic)

    def join(self) -> None:
        """Take messages again after ``leave``."""
        if not self.wanted:
            self.wanted = True
            self.client.subscribe(self.topic, qos=1)

    def connect(self) -> None:
        props = session_properties(SESSION_EXPIRY_S if self.persistent else 0)
        try:
            self.client.connect(self.host, self.port, 30, clean_start=not self.persistent, properties=props)
        except OSError as e:
            raise UplinkError(f"cannot connect to the broker: {connection_error(e, self.host, self.port)}") from e

    def loop(self, timeout: float) -> None:
        """Run the network loop for ``timeout`` s at most, in the caller's thread. A lost
        connection is retried at once; one that never came up (refused, a refused CONNACK)
        after a pause, so a broker that turns the consumer away is not hammered."""
        if is_failure(self.client.loop(timeout)):
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
    client = LinkClient("", LinkFailures("operator", host, port))
    try:
        client.connect(host, port, 30)
    except OSError as e:
        raise UplinkError(f"cannot connect to the broker: {connection_error(e, host, port)}") from e
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, properties=expiry_properties(expiry_s))
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise UplinkError(f"no PUBACK from {host}:{port} within {timeout} s")
    except (RuntimeError, ValueError) as e:
        raise UplinkError(f"publish to {host}:{port} failed: {e}") from e
    finally:
        client.disconnect()
        client.loop_stop()
