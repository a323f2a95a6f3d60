"""Broker failures are told in words (issue 14): the real agent against a closed port, a
host name that never resolves (RFC 2606 .invalid), a TLS listener whose certificate
does not chain to the agent's CA or names another host, a broker that refuses the
password, a broker killed while connected and one that stops answering. For each: one
WARNING in the agent's log saying why, ``ebike-agent status`` (one line and --json)
showing that last error with its time, and the same cause repeated on every retry not
logged again. Then the words and the rate limit on their own, and the consumer
(``ebike-agent ingest``) saying the same thing."""

from __future__ import annotations

import calendar
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig
from agent.uplink.mqtt import REPEAT_LOG_INTERVAL, LinkFailures, Uplink, connection_error
from devtools.broker import Mosquitto, free_port
from tests.helpers import REPO, spawn, stop, wait_for
from tests.test_e2e_sources import status_now
from tests.test_tls import make_pki, openssl

DEVICE = "failing-bike-1"
RETRIES = 3  # failed attempts seen before the log is checked for repeats


class Vehicle:
    """The simulator's SLCAN and NMEA ptys and the real agent (``python -m agent run``)
    on them, with the [broker] table a test gives."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "agent.log"
        self.config = tmp / "agent.toml"
        self.sim = spawn(["firmware_sim", "--slcan", str(tmp / "can"), "--nmea", str(tmp / "gps"),
                          "--duration", "600", "--wait-open", "60"], tmp / "sim.log")
        self.agent: subprocess.Popen[bytes] | None = None

    def start(self, broker: str) -> None:
        """``broker``: the [broker] table's lines."""
        self.config.write_text(
            f'device_id = "{DEVICE}"\ncontrol_socket = "control.sock"\n'
            f'[[sources]]\nname = "gnss"\nkind = "uart"\nport = "{self.tmp / "gps"}"\nprotocol = "nmea"\n'
            f'[[sources]]\nname = "can0"\nkind = "slcan"\nport = "{self.tmp / "can"}"\nprotocol = "bafang-can"\n'
            f'[broker]\nack = "broker"\n{broker}\n[outbox]\npath = "outbox.sqlite"\ncommit_interval = 0.2\n')
        wait_for("the simulator's ptys", lambda: (self.tmp / "sim.log").exists()
                 and "ready" in (self.tmp / "sim.log").read_text(), 20)
        self.agent = spawn(["agent", "run", "--config", str(self.config)], self.log)

    def uplink(self) -> dict[str, Any]:
        """The uplink's status straight from the control socket ({} until it answers)."""
        st = status_now(self.tmp / "control.sock")
        return st["uplink"] if st else {}

    def cli_status(self, *flags: str) -> str:
        """What a technician sees: ``ebike-agent status [flags] --config FILE``."""
        out = subprocess.run([sys.executable, "-m", "agent", "status", *flags, "--config", str(self.config)],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def warnings(self, words: str) -> list[str]:
        """The WARNING lines of the agent's log that contain ``words``."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if " WARNING " in line and words in line]

    def close(self) -> None:
        if self.agent is not None:
            assert stop(self.agent) == 0, self.log.read_text()
        stop(self.sim)


@pytest.fixture
def vehicle(tmp_path: Path) -> Iterator[Vehicle]:
    v = Vehicle(tmp_path)
    try:
        yield v
    finally:
        v.close()


def told(vehicle: Vehicle, words: str, timeout: float = 30) -> None:
    """The agent says ``words``: one WARNING in its log, and ``status`` (the --json one
    and the text) shows them as the last error with a time; then, after RETRIES more
    failed attempts, still that one WARNING (retries are not logged one by one)."""
    wait_for(f"a WARNING saying {words!r}", lambda: vehicle.warnings(words), timeout)
    wait_for(f"status to say {words!r}", lambda: words in (vehicle.uplink().get("last_error") or ""), 10)
    failures = len(vehicle.uplink()["reconnect_delays"])
    st = json.loads(vehicle.cli_status("--json"))["uplink"]
    assert words in st["last_error"] and not st["connected"]
    at = calendar.timegm(time.strptime(st["last_error_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(at - time.time()) < 60, st["last_error_at"]
    assert 0 <= st["last_error_age_s"] < 30
    text = " ".join(vehicle.cli_status().split())  # words wrapped at 80 columns are one text again
    assert "NOT CONNECTED to the broker" in text and re.search(r"last error \d\d:\d\d:\d\d, [0-9.]+ s ago: "
                                                              + re.escape(words), text), text
    wait_for(f"{RETRIES} more failed attempts", lambda: len(vehicle.uplink()["reconnect_delays"]) >= failures + RETRIES,
             30, interval=0.2)
    assert words in vehicle.uplink()["last_error"]
    assert len(vehicle.warnings(words)) == 1, vehicle.log.read_text()


@pytest.mark.e2e
def test_a_closed_port_is_connection_refused(vehicle: Vehicle) -> None:
    port = free_port()
    vehicle.start(f'host = "127.0.0.1"\nport = {port}')
    told(vehicle, f"connection refused at 127.0.0.1:{port}")


@pytest.mark.e2e
def test_a_host_name_that_does_not_resolve(vehicle: Vehicle) -> None:
    vehicle.start('host = "broker.ebike-edge.invalid"\nport = 8883')
    told(vehicle, "host name broker.ebike-edge.invalid does not resolve")


@pytest.fixture
def tls_listener(tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    """A TLS listener (server authentication only) with the certificate of tests/test_tls's
    PKI for 127.0.0.1, and beside it ``pki/other.pem``, one for another host name from the
    same CA."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, [])
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=elsewhere",
            "-keyout", str(pki / "other.key"), "-out", str(pki / "other.csr"))
    (pki / "other.ext").write_text("subjectAltName=DNS:broker.elsewhere.invalid\n")
    openssl("x509", "-req", "-in", str(pki / "other.csr"), "-CA", str(pki / "ca.pem"), "-CAkey", str(pki / "ca.key"),
            "-CAcreateserial", "-days", "2", "-extfile", str(pki / "other.ext"), "-out", str(pki / "other.pem"))
    workdir = tmp_path / "broker"
    workdir.mkdir()
    # As root, mosquitto drops to its own user, which cannot read pytest's private tmp dirs.
    broker = Mosquitto(str(workdir), extra_config="user root\n" if os.geteuid() == 0 else "")
    yield broker, pki
    broker.stop()


def serve_tls(broker: Mosquitto, pki: Path, cert: str) -> Mosquitto:
    """Start ``broker`` with the certificate ``pki/<cert>.pem`` on its listener."""
    broker.extra_config += (f"cafile {pki / 'ca.pem'}\ncertfile {pki / f'{cert}.pem'}\n"
                            f"keyfile {pki / f'{cert}.key'}\n")
    return broker.start()


def connects(tmp_path: Path, cfg: BrokerConfig) -> None:
    """An Uplink with ``cfg`` connects without an error: the positive control of a refusal."""
    uplink = Uplink(f"bike-{uuid.uuid4().hex[:6]}", cfg, "ebike/v1/bike/", birth=b"\xa0", death=b"\xa0")
    try:
        uplink.start()
        wait_for("the connection", lambda: (uplink.poll(), uplink.connected)[1], 10)
        assert uplink.last_error == ""
    finally:
        uplink.stop(b"\xa0")


def test_the_right_ca_and_host_are_let_in(tmp_path: Path, tls_listener: tuple[Mosquitto, Path]) -> None:
    broker, pki = tls_listener
    serve_tls(broker, pki, "server")
    connects(tmp_path, BrokerConfig(host=broker.host, port=broker.port, tls_ca=str(pki / "ca.pem")))


@pytest.mark.e2e
def test_tls_with_the_wrong_ca(vehicle: Vehicle, tls_listener: tuple[Mosquitto, Path], tmp_path: Path) -> None:
    broker, pki = tls_listener
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    make_pki(stranger, [])
    serve_tls(broker, pki, "server")
    vehicle.start(f'host = "127.0.0.1"\nport = {broker.port}\ntls_ca = "{stranger / "ca.pem"}"')
    told(vehicle, "TLS: certificate verify failed: ")
    # OpenSSL's own words: the broker sends its CA along, so "self-signed certificate in
    # certificate chain" here; "unable to get local issuer certificate" when it does not.
    assert vehicle.warnings("(is tls_ca the broker's CA?)")


@pytest.mark.e2e
def test_tls_with_a_certificate_for_another_host(vehicle: Vehicle, tls_listener: tuple[Mosquitto, Path]) -> None:
    broker, pki = tls_listener
    serve_tls(broker, pki, "other")
    vehicle.start(f'host = "127.0.0.1"\nport = {broker.port}\ntls_ca = "{pki / "ca.pem"}"')
    told(vehicle, "TLS: host name mismatch: the broker's certificate is not valid for 127.0.0.1")


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(str(workdir), users={"bike": "right horse battery"}).start()
    yield broker
    broker.stop()


def test_the_right_password_is_let_in(tmp_path: Path, password_broker: Mosquitto) -> None:
    connects(tmp_path, BrokerConfig(host=password_broker.host, port=password_broker.port, username="bike",
                                    password="right horse battery"))


@pytest.mark.e2e
def test_a_wrong_password_is_authentication_refused(vehicle: Vehicle, password_broker: Mosquitto) -> None:
    """mosquitto 2.0 answers a wrong password with CONNACK 0x87 Not authorized."""
    vehicle.start(f'host = "127.0.0.1"\nport = {password_broker.port}\nusername = "bike"\npassword = "wrong"')
    told(vehicle, f"authentication refused by 127.0.0.1:{password_broker.port}: Not authorized")




def connected(vehicle: Vehicle) -> None:
    wait_for("the agent to connect", lambda: vehicle.uplink().get("connected"), 30, interval=0.2)


@pytest.mark.e2e
def test_a_broker_killed_while_connected_is_a_lost_connection(vehicle: Vehicle, own_broker: Mosquitto) -> None:
    """SIGKILL: the kernel closes the broker's end; then nothing listens on the port."""
    vehicle.start(f'host = "127.0.0.1"\nport = {own_broker.port}')
    connected(vehicle)
    assert own_broker.proc is not None
    own_broker.proc.kill()
    own_broker.proc.wait(5)
    lost = f"connection lost: closed by 127.0.0.1:{own_broker.port} or the network"
    wait_for("a WARNING saying the connection was lost", lambda: vehicle.warnings(lost), 10)
    told(vehicle, f"connection refused at 127.0.0.1:{own_broker.port}")
    assert len(vehicle.warnings(lost)) == 1
    log = vehicle.log.read_text()
    assert log.index(lost) < log.index("connection refused at")


@pytest.mark.e2e
def test_a_broker_that_stops_answering_is_a_keepalive_expiry(vehicle: Vehicle, own_broker: Mosquitto) -> None:
    """SIGSTOP: the connection stays open but nothing answers, not even the next
    connection's CONNECT (the kernel still accepts it)."""
    vehicle.start(f'host = "127.0.0.1"\nport = {own_broker.port}\nkeepalive = 1')
    connected(vehicle)
    assert own_broker.proc is not None
    own_broker.proc.send_signal(signal.SIGSTOP)
    told(vehicle, f"keepalive expired: no answer from 127.0.0.1:{own_broker.port} in time")


@pytest.mark.e2e
def test_the_consumer_says_the_same(tmp_path: Path, password_broker: Mosquitto) -> None:
    """``ebike-agent ingest`` (the Subscriber) against a closed port fails with the same
    words; against a broker that refuses it, it warns once, not on every retry."""
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "agent", "ingest", "--broker", f"127.0.0.1:{port}", "--db",
                          str(tmp_path / "cloud.sqlite")], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"error: cannot connect to the broker: connection refused at 127.0.0.1:{port}" in out.stderr

    log = tmp_path / "ingest.log"
    ingest = spawn(["agent", "ingest", "--broker", password_broker.address, "--db", str(tmp_path / "cloud.sqlite"),
                    "--duration", "4"], log)
    try:
        assert ingest.wait(30) == 0, log.read_text()
    finally:
        stop(ingest)
    words = f"consumer: authentication refused by {password_broker.address}: Not authorized"
    assert [line for line in log.read_text().splitlines() if words in line and " WARNING " in line] == \
        [line for line in log.read_text().splitlines() if words in line], "not a WARNING"
    assert log.read_text().count(words) == 1, log.read_text()
    refusals = Path(password_broker.log_path).read_text().count("not authorised")
    assert refusals >= 3, f"the consumer tried {refusals} times in 4 s"


@pytest.mark.parametrize(("cause", "words"), [
    (ConnectionRefusedError(111, "Connection refused"), "connection refused at broker.test:8883"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
     "host name broker.test does not resolve (Name or service not known)"),
    (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
     "host name broker.test does not resolve (Temporary failure in name resolution)"),
    (ConnectionResetError(104, "Connection reset by peer"),
     "connection reset: broker.test:8883 or the network dropped it"),
    (TimeoutError("timed out"), "no answer from broker.test:8883: connect timed out"),
    (OSError(101, "Network is unreachable"), "network unreachable: no route to broker.test (is the link up?)"),
    (OSError(113, "No route to host"), "host unreachable: broker.test"),
    (BrokenPipeError(32, "Broken pipe"), "connection to broker.test:8883 lost: Broken pipe"),
    (None, "connection lost: closed by broker.test:8883 or the network"),
    (ReasonCode(PacketTypes.CONNACK, "Bad user name or password"),
     "authentication refused by broker.test:8883: Bad user name or password"),
    (ReasonCode(PacketTypes.CONNACK, "Not authorized"), "authentication refused by broker.test:8883: Not authorized"),
    (ReasonCode(PacketTypes.CONNACK, "Server unavailable"),
     "broker.test:8883 refused the connection: Server unavailable"),
    (ReasonCode(PacketTypes.DISCONNECT, "Keep alive timeout"),
     "keepalive expired: no answer from broker.test:8883 in time (a dead link or a hung broker)"),
    (ReasonCode(PacketTypes.DISCONNECT, "Session taken over"),
     "connection to broker.test:8883 ended: Session taken over"),
])
def test_words_for_each_cause(cause: OSError | ReasonCode | None, words: str) -> None:
    assert connection_error(cause, "broker.test", 8883) == words


def tls_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    """As the ssl module raises it: errno 1 and OpenSSL's verify code and message."""
    e = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    e.verify_code, e.verify_message = code, message
    return e


@pytest.mark.parametrize(("code", "message", "words"), [
    (20, "unable to get local issuer certificate",
     "TLS: certificate verify failed: unable to get local issuer certificate (is tls_ca the broker's CA?)"),
    (10, "certificate has expired", "TLS: certificate verify failed: certificate has expired (is the clock right?)"),
    (62, "Hostname mismatch, certificate is not valid for 'broker.test'.",
     "TLS: host name mismatch: the broker's certificate is not valid for broker.test"),
    (64, "IP address mismatch, certificate is not valid for '10.0.0.1'.",
     "TLS: host name mismatch: the broker's certificate is not valid for broker.test"),
    (26, "unsupported certificate purpose", "TLS: certificate verify failed: unsupported certificate purpose"),
])
def test_words_for_tls_verification(code: int, message: str, words: str) -> None:
    assert connection_error(tls_error(code, message), "broker.test", 8883) == words


def test_words_for_another_tls_failure() -> None:
    e = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    e.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert connection_error(e, "broker.test", 8883) == \
        "TLS: handshake with broker.test:8883 failed: TLSV13_ALERT_CERTIFICATE_REQUIRED"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def link(caplog: pytest.LogCaptureFixture) -> tuple[LinkFailures, Clock, Callable[[], list[str]]]:
    """A LinkFailures on a clock the test moves, and the WARNINGs it logged so far."""
    clock = Clock()
    caplog.set_level(logging.WARNING, logger="agent.uplink.mqtt")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return LinkFailures("broker", "broker.test", 8883, clock), clock, warnings


def test_a_cause_is_logged_once_then_once_a_minute_with_a_count(
        link: tuple[LinkFailures, Clock, Callable[[], list[str]]]) -> None:
    failures, clock, warnings = link
    refused = ConnectionRefusedError(111, "Connection refused")
    for _ in range(13):
        failures.connect_failed(refused)
        clock.now += 4
    assert warnings() == ["broker: connection refused at broker.test:8883"]
    clock.now = 1000 + REPEAT_LOG_INTERVAL
    failures.connect_failed(refused)
    assert warnings()[1:] == ["broker: connection refused at broker.test:8883 (13 more times in the last 60 s)"]
    clock.now += 1
    failures.connect_failed(refused)
    assert len(warnings()) == 2


def test_a_new_cause_is_logged_at_once_after_the_repeats_of_the_old(
        link: tuple[LinkFailures, Clock, Callable[[], list[str]]]) -> None:
    failures, clock, warnings = link
    for _ in range(3):
        failures.connect_failed(ConnectionRefusedError(111, "Connection refused"))
        clock.now += 1
    failures.connect_failed(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert warnings() == ["broker: connection refused at broker.test:8883",
                          "broker: connection refused at broker.test:8883 (2 more times in the last 3 s)",
                          "broker: host name broker.test does not resolve (Temporary failure in name resolution)"]


def test_a_flapping_link_is_not_logged_on_every_flap(
        link: tuple[LinkFailures, Clock, Callable[[], list[str]]]) -> None:
    """Two devices with one client id throw each other off: connect, taken over, again."""
    failures, clock, warnings = link
    taken_over = ReasonCode(PacketTypes.DISCONNECT, "Session taken over")
    for _ in range(10):
        failures.connected()
        assert failures.ended(FromBroker(), taken_over) == "connection to broker.test:8883 ended: Session taken over"
        clock.now += 1
    assert warnings() == ["broker: connection to broker.test:8883 ended: Session taken over"]


class FromBroker:
    """on_disconnect's flags for a DISCONNECT the broker sent."""
    is_disconnect_packet_from_server = True


class Locally:
    """on_disconnect's flags for an end paho found itself (a socket error, keepalive)."""
    is_disconnect_packet_from_server = False


def test_what_an_end_of_connection_tells(link: tuple[LinkFailures, Clock, Callable[[], list[str]]]) -> None:
    failures, _, warnings = link
    unspecified = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
    assert failures.ended(Locally(), ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection")) == ""
    failures.failure = ConnectionResetError(104, "Connection reset by peer")
    assert failures.ended(Locally(), unspecified) == "connection reset: broker.test:8883 or the network dropped it"
    failures.failure = None
    assert failures.ended(Locally(), unspecified) == "connection lost: closed by broker.test:8883 or the network"
    assert failures.ended(FromBroker(), unspecified) == "connection to broker.test:8883 ended: Unspecified error"
    failures.connect_failed(ReasonCode(PacketTypes.CONNACK, "Not authorized"))
    assert failures.ended(Locally(), ReasonCode(PacketTypes.DISCONNECT, "Protocol error")) is None, \
        "the close after a refused CONNACK hid the refusal"
    assert warnings()[-1] == "broker: authentication refused by broker.test:8883: Not authorized"
    assert len(warnings()) == 4
