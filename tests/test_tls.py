"""Mutual TLS to a real mosquitto, with certificates the test makes with openssl: the
agent connects with its device certificate and delivers; a client without one is
refused; and a device cannot publish under another device's topics (an ACL keyed on the
certificate's identity; the agent keeps the rows the broker refused, and says so).

Then docs/mosquitto/acl itself, with plain MQTT 5 clients holding `bike-a`'s, `bike-b`'s
and the `cloud`'s certificates: only the cloud issues commands, and a device reads no
other device's topics. What mosquitto 2.0 (2.0.11 here) does with the file's `acl_file`:
a denied QoS 1 PUBLISH is answered with PUBACK 0x87 Not authorized and dropped; a
SUBSCRIBE is never refused (SUBACK grants the QoS whatever the ACL says) and the read
ACL is applied to each message at delivery instead, so those tests assert what is
delivered, each against a message that is delivered (the positive control)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import wire
from agent.config import BrokerConfig
from agent.store.outbox import LANE_LIVE, Outbox
from agent.uplink.mqtt import Uplink
from agent.uplink.pump import send_batches
from devtools.broker import Mosquitto
from tests.helpers import wait_for

ACL = (Path(__file__).resolve().parents[1] / "docs" / "mosquitto" / "acl").read_text()
SUCCESS, GRANTED_QOS_1, NOT_AUTHORIZED = 0x00, 0x01, 0x87  # MQTT 5 reason codes


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(d: Path, devices: list[str]) -> None:
    """A CA, a server certificate for 127.0.0.1, and one client certificate per device
    (CN = device id, which mosquitto takes as the user name)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=test-ca", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, subject, ext in [("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")] + [
            (dev, f"/CN={dev}", "extendedKeyUsage=clientAuth") for dev in devices]:
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", subject,
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, ["bike-a", "bike-b", "cloud"])
    (pki / "acl").write_text(ACL)
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(str(workdir), extra_config=(
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        f"require_certificate true\nuse_identity_as_username true\nacl_file {pki / 'acl'}\n"
        # As root, mosquitto drops to its own user, which cannot read pytest's private tmp dirs.
        + ("user root\n" if os.geteuid() == 0 else "")))
    broker.start()
    yield broker, pki
    broker.stop()


def link(tmp_path: Path, broker: Mosquitto, pki: Path, topic_device: str, cert: str | None) -> tuple[Uplink, Outbox]:
    cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive=5, ack="broker", tls_ca=str(pki / "ca.pem"),
                       tls_cert=str(pki / f"{cert}.pem") if cert else "",
                       tls_key=str(pki / f"{cert}.key") if cert else "")
    outbox = Outbox(str(tmp_path / f"outbox-{uuid.uuid4().hex[:6]}.sqlite"), 1 << 30)
    uplink = Uplink(cert or "anonymous", cfg, f"ebike/v1/{topic_device}/", birth=b"\xa0", death=b"\xa0")
    return uplink, outbox


def pump(uplink: Uplink, outbox: Outbox, device: str) -> None:
    acked, failed = uplink.poll()
    outbox.ack(acked)
    outbox.release(failed)
    send_batches(outbox, uplink, device, 5)


def pump_until(what: str, uplink: Uplink, outbox: Outbox, device: str, done: Callable[[], bool],
               timeout: float = 15) -> None:
    def check() -> bool:
        pump(uplink, outbox, device)
        return done()
    wait_for(what, check, timeout)


def rows(n: int) -> list[tuple[int, float, bytes]]:
    return [(LANE_LIVE, float(i), wire.window_record(1.7e9 + i, 1.0, [(1, 1, 1.0, 1.0, 1.0, 1.0, 0.0)]))
            for i in range(n)]


def test_device_certificate_connects_and_delivers(tmp_path: Path, tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, pki = tls_broker
    uplink, outbox = link(tmp_path, broker, pki, "bike-a", "bike-a")
    try:
        uplink.start()
        pump_until("a mutual-TLS connection", uplink, outbox, "bike-a", lambda: uplink.connected)
        outbox.append(rows(7))
        pump_until("every row acknowledged", uplink, outbox, "bike-a", lambda: outbox.stats()["records"] == 0)
        assert uplink.window.batches_failed == 0
    finally:
        uplink.client.loop_stop()
        outbox.close()


def test_a_device_cannot_publish_as_another(tmp_path: Path, tls_broker: tuple[Mosquitto, Path]) -> None:
    """bike-a's certificate on bike-b's topic: the broker refuses the batch (MQTT 5 PUBACK
    reason code), the agent keeps the rows and reports the refusal."""
    broker, pki = tls_broker
    uplink, outbox = link(tmp_path, broker, pki, "bike-b", "bike-a")
    try:
        uplink.start()
        pump_until("a mutual-TLS connection", uplink, outbox, "bike-b", lambda: uplink.connected)
        outbox.append(rows(5))
        pump_until("the broker's refusal", uplink, outbox, "bike-b", lambda: uplink.window.batches_failed > 0)
        assert outbox.stats()["records"] == 5, "rows the broker refused were deleted"
        assert "refused" in uplink.last_error
    finally:
        uplink.client.loop_stop()
        outbox.close()


def test_a_client_without_a_certificate_is_refused(tmp_path: Path, tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, pki = tls_broker
    uplink, outbox = link(tmp_path, broker, pki, "bike-a", None)
    try:
        uplink.start()
        with pytest.raises(AssertionError, match="timed out"):
            pump_until("a connection without a certificate", uplink, outbox, "bike-a", lambda: uplink.connected, 4)
        assert uplink.connects == 0
    finally:
        uplink.client.loop_stop()
        outbox.close()


class Peer:
    """A paho MQTT 5 client holding one identity's certificate (CN = the MQTT user name
    the ACL sees), connected over mutual TLS, recording the broker's acknowledgements
    and every message delivered to it."""

    def __init__(self, broker: Mosquitto, pki: Path, identity: str) -> None:
        self.identity = identity
        self.connected = False
        self.acks: dict[int, list[int]] = {}  # mid -> reason codes (PUBACK: one; SUBACK: one per filter)
        self.received: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{identity}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(pki / "ca.pem"), certfile=str(pki / f"{identity}.pem"),
                            keyfile=str(pki / f"{identity}.key"))
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        try:
            wait_for(f"{identity}'s mutual-TLS connection", lambda: self.connected, 10)
        except AssertionError:
            self.close()
            raise

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connected = reason.value == SUCCESS

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.acks[mid] = [reason.value]

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        self.acks[mid] = [r.value for r in reasons]

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload)))

    def _ack(self, mid: int, what: str) -> list[int]:
        wait_for(f"{self.identity}'s {what}", lambda: mid in self.acks, 5)
        return self.acks[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the PUBACK's reason code."""
        return self._ack(self.client.publish(topic, payload, qos=1).mid, f"PUBACK on {topic}")[0]

    def subscribe(self, *topics: str) -> list[int]:
        """One SUBSCRIBE at QoS 1; the SUBACK's reason code for each filter."""
        result, mid = self.client.subscribe([(topic, 1) for topic in topics])
        assert mid is not None, result
        return self._ack(mid, f"SUBACK for {topics}")

    def receives_only(self, expected: tuple[str, bytes]) -> None:
        """Wait for ``expected`` (published after everything that must not arrive, so
        anything wrongly delivered would be here first), then check it came alone."""
        wait_for(f"{self.identity} to receive {expected}", lambda: expected in self.received, 5)
        assert self.received == [expected]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(tls_broker: tuple[Mosquitto, Path]) -> Iterator[Callable[[str], Peer]]:
    """Connect a Peer with the given identity's certificate; all are closed after the test."""
    broker, pki = tls_broker
    peers: list[Peer] = []

    def connect(identity: str) -> Peer:
        peers.append(Peer(broker, pki, identity))
        return peers[-1]
    yield connect
    for p in peers:
        p.close()


@pytest.mark.parametrize("sender", ["bike-b", "bike-a"], ids=["another-device", "the-device-itself"])
def test_only_the_cloud_issues_commands(peer: Callable[[str], Peer], sender: str) -> None:
    """A command on bike-a's cmd topic from a device certificate (another device's, or
    bike-a's own: a device must not command itself either) is refused with PUBACK 0x87
    and never reaches bike-a; the same command from the cloud's certificate, published
    after it, does."""
    bike_a, device, cloud = peer("bike-a"), peer(sender), peer("cloud")
    assert bike_a.subscribe("ebike/v1/bike-a/cmd") == [GRANTED_QOS_1]
    assert device.publish("ebike/v1/bike-a/cmd", f"unlock from {sender}".encode()) == NOT_AUTHORIZED
    assert cloud.publish("ebike/v1/bike-a/cmd", b"unlock from cloud") == SUCCESS
    bike_a.receives_only(("ebike/v1/bike-a/cmd", b"unlock from cloud"))


def test_a_device_reads_no_other_devices_commands_or_config(peer: Callable[[str], Peer]) -> None:
    """bike-a subscribing to bike-b's cmd and config: mosquitto 2.0's acl_file does not
    refuse a SUBSCRIBE (it grants QoS 1 there as for bike-a's own), but delivers nothing
    from them: the cloud's command and config for bike-b reach bike-b only, while the
    cloud's config for bike-a, published last, reaches bike-a."""
    bike_a, bike_b, cloud = peer("bike-a"), peer("bike-b"), peer("cloud")
    assert bike_a.subscribe("ebike/v1/bike-a/cmd", "ebike/v1/bike-a/config") == [GRANTED_QOS_1] * 2
    assert bike_a.subscribe("ebike/v1/bike-b/cmd", "ebike/v1/bike-b/config") == [GRANTED_QOS_1] * 2, \
        "mosquitto now refuses the subscription itself: assert NOT_AUTHORIZED here"
    assert bike_b.subscribe("ebike/v1/bike-b/cmd", "ebike/v1/bike-b/config") == [GRANTED_QOS_1] * 2
    for kind in ("cmd", "config"):
        assert cloud.publish(f"ebike/v1/bike-b/{kind}", f"{kind} for bike-b".encode()) == SUCCESS
    wait_for("bike-b's command and config", lambda: len(bike_b.received) == 2, 5)
    assert cloud.publish("ebike/v1/bike-a/config", b"config for bike-a") == SUCCESS
    bike_a.receives_only(("ebike/v1/bike-a/config", b"config for bike-a"))


def test_a_device_reads_no_other_devices_telemetry(peer: Callable[[str], Peer]) -> None:
    """bike-a subscribing to bike-b's telemetry, by name or by wildcard: granted (see
    above) but nothing delivered; the telemetry bike-b publishes reaches the cloud, and a
    command for bike-a published after it reaches bike-a alone."""
    bike_a, bike_b, cloud = peer("bike-a"), peer("bike-b"), peer("cloud")
    assert bike_a.subscribe("ebike/v1/bike-b/telemetry", "ebike/v1/+/telemetry", "ebike/v1/bike-a/cmd") \
        == [GRANTED_QOS_1] * 3
    assert cloud.subscribe("ebike/v1/+/telemetry") == [GRANTED_QOS_1]
    assert bike_b.publish("ebike/v1/bike-b/telemetry", b"bike-b telemetry") == SUCCESS
    cloud.receives_only(("ebike/v1/bike-b/telemetry", b"bike-b telemetry"))
    assert cloud.publish("ebike/v1/bike-a/cmd", b"lock") == SUCCESS
    bike_a.receives_only(("ebike/v1/bike-a/cmd", b"lock"))
