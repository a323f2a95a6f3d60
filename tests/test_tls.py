"""Mutual TLS to a real mosquitto, with certificates the test makes with openssl: the
agent connects with its device certificate and delivers; a client without one is
refused; and a device cannot publish under another device's topics (an ACL keyed on the
certificate's identity; the agent keeps the rows the broker refused, and says so)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.config import BrokerConfig
from agent.runtime import send_batches
from agent.store.outbox import LANE_LIVE, Outbox
from agent.uplink import wire
from agent.uplink.mqtt import Uplink
from devtools.broker import Mosquitto
from tests.helpers import wait_for

ACL = (Path(__file__).resolve().parents[1] / "docs" / "mosquitto" / "acl").read_text()


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
def tls_broker(tmp_path: Path) -> tuple[Mosquitto, Path]:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, ["bike-a"])
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


def rows(n: int) -> list[tuple[int, float, bytes]]:
    return [(LANE_LIVE, float(i), wire.window_record(1.7e9 + i, 1.0, [(1, 1, 1.0, 1.0, 1.0, 1.0, 0.0)]))
            for i in range(n)]


def test_device_certificate_connects_and_delivers(tmp_path: Path, tls_broker: tuple[Mosquitto, Path]) -> None:
    broker, pki = tls_broker
    uplink, outbox = link(tmp_path, broker, pki, "bike-a", "bike-a")
    try:
        uplink.start()
        wait_for("a mutual-TLS connection", lambda: (pump(uplink, outbox, "bike-a"), uplink.connected)[1], 15)
        outbox.append(rows(7))
        wait_for("every row acknowledged", lambda: (pump(uplink, outbox, "bike-a"),
                                                     outbox.stats()["records"] == 0)[1], 15)
        assert uplink.batches_failed == 0
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
        wait_for("a mutual-TLS connection", lambda: (pump(uplink, outbox, "bike-b"), uplink.connected)[1], 15)
        outbox.append(rows(5))
        wait_for("the broker's refusal", lambda: (pump(uplink, outbox, "bike-b"), uplink.batches_failed > 0)[1], 15)
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
            wait_for("a connection without a certificate", lambda: (pump(uplink, outbox, "bike-a"),
                                                                     uplink.connected)[1], 4)
        assert uplink.connects == 0
    finally:
        uplink.client.loop_stop()
        outbox.close()
