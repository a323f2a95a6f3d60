"""Store-and-forward through a real mosquitto: outbox -> Uplink -> broker -> Ingest.

The promise to the fleet backend: every record arrives, exactly once after the
cloud's de-duplication, even when the broker goes away in the middle; the ``state``
topic says whether the vehicle is online, also when the agent dies without a word.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

import devtools.broker
from agent import wire
from agent.config import BrokerConfig
from agent.fleet.ingest import Ingest, ack_for
from agent.fleet.subscriber import Subscriber
from agent.store.outbox import LANE_LIVE, Outbox
from agent.uplink.mqtt import Uplink
from agent.uplink.pump import send_batches
from devtools.broker import Mosquitto
from tests.helpers import wait_for

SIG = 1


def window(i: int) -> bytes:
    return wire.window_record(1_700_000_000 + i, 1.0, [(SIG, 1, float(i), float(i), float(i), float(i), None)])


class Link:
    """An Uplink and an Outbox driven the way the agent's loop drives them."""

    def __init__(self, tmp_path: Path, broker: Mosquitto, max_batch: int = 5, ack: str = "cloud",
                 ack_timeout: float = 30.0, **broker_keys: Any) -> None:
        self.device = f"bike-{uuid.uuid4().hex[:8]}"
        self.prefix = f"ebike/v1/{self.device}/"
        self.boot = uuid.uuid4().hex
        self.cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive=5, max_inflight=4,
                                max_batch_records=max_batch, ack=ack, ack_timeout=ack_timeout, **broker_keys)
        self.outbox = Outbox(str(tmp_path / f"{self.device}.sqlite"), 1 << 30)
        self.uplink = Uplink(self.device, self.cfg, self.prefix, birth=self.state(True), death=self.state(False))
        self.failed: list[int] = []

    def state(self, online: bool) -> bytes:
        return cbor2.dumps({"online": online, "boot": self.boot, "version": "test", "kernel": "py"})

    def append(self, n: int) -> list[int]:
        start = self.outbox.stats()["last_seq"]
        return self.outbox.append([(LANE_LIVE, float(start + i), window(start + i)) for i in range(n)])

    def step(self) -> None:
        acked, failed = self.uplink.poll()
        self.failed += failed
        self.outbox.ack(acked)
        self.outbox.release(failed)
        send_batches(self.outbox, self.uplink, self.device, self.cfg.max_batch_records)

    def close(self) -> None:
        self.uplink.client.loop_stop()
        self.uplink.client.disconnect()
        self.outbox.close()


class Cloud:
    """The reference consumer, run in the test's thread like ``ebike-agent ingest`` runs it."""

    def __init__(self, tmp_path: Path, broker: Mosquitto, topic: str) -> None:
        self.ingest = Ingest(str(tmp_path / f"cloud-{uuid.uuid4().hex[:6]}.sqlite"))
        self.acking = True
        self.payloads: list[tuple[str, bytes]] = []
        self.subscribed = False
        self.sub = Subscriber(f"cloud-{uuid.uuid4().hex[:8]}", broker.host, broker.port, topic, self._message)
        on_subscribe = self.sub.client.on_subscribe

        def subscribed(*args: object) -> None:
            on_subscribe(*args)
            self.subscribed = True

        self.sub.client.on_subscribe = subscribed
        self.sub.connect()

    def _message(self, topic: str, payload: bytes) -> None:
        self.payloads.append((topic, payload))
        stored = self.ingest.handle(topic, payload)
        if stored and self.acking:
            self.sub.publish(*ack_for(topic, stored, payload))

    def stored(self, device: str) -> list[int]:
        return [s for (s,) in self.ingest.db.execute("SELECT seq FROM records WHERE device=? ORDER BY seq",
                                                     (device,))]

    def close(self) -> None:
        self.sub.close()
        self.ingest.close()


def pump(what: str, link: Link | None, cloud: Cloud | None, done: Callable[[], bool], timeout: float) -> None:
    """Drive both sides in this thread until ``done``, bounded in time."""
    def turn() -> bool:
        if link is not None:
            link.step()
        if cloud is not None:
            cloud.sub.loop(0.02)
        return done()

    wait_for(what, turn, timeout, interval=0.005)


def connect(link: Link, cloud: Cloud) -> None:
    """The consumer subscribed first (nothing published before is lost), then the device."""
    pump("the consumer to subscribe", None, cloud, lambda: cloud.subscribed, 10)
    link.uplink.start()
    pump("the uplink to connect", link, None, lambda: link.uplink.connected, 10)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[list[Link | Cloud]]:
    made: list[Link | Cloud] = []
    yield made
    for p in reversed(made):
        p.close()


def test_records_published_acked_and_stored(tmp_path: Path, mosquitto: Mosquitto,
                                            parts: list[Link | Cloud]) -> None:
    """Rows leave the outbox only on the broker's ack, and the batch that carried them
    decodes at the consumer to exactly those records."""
    link = Link(tmp_path, mosquitto)
    cloud = Cloud(tmp_path, mosquitto, link.prefix + "telemetry")
    parts += [link, cloud]
    connect(link, cloud)
    seqs = link.append(12)
    assert seqs == list(range(1, 13))
    pump("every record acked", link, cloud, lambda: link.outbox.stats()["records"] == 0, 10)
    assert link.outbox.stats()["last_acked"] == 12
    assert link.uplink.status()["records_acked"] == 12 and link.uplink.window.batches_acked == 3
    pump("the consumer to store them", None, cloud, lambda: len(cloud.stored(link.device)) == 12, 10)
    assert cloud.stored(link.device) == seqs
    assert cloud.ingest.bad_batches == 0 and cloud.ingest.duplicates == 0
    got = []
    for topic, payload in cloud.payloads:
        assert topic == link.prefix + "telemetry"
        device, records = wire.decode_batch(payload)
        assert device == link.device
        got += [(seq, wire.window_values(rec["s"][0])[2]) for seq, rec in records]
    assert got == [(i + 1, float(i)) for i in range(12)]


def test_broker_outage_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     parts: list[Link | Cloud]) -> None:
    """The broker dies with a batch in flight and comes back on the same address: the
    in-flight rows are released, new rows wait on disk, and in the end the cloud has
    every record once (a re-sent batch may be delivered twice; Ingest drops the copy)."""
    workdir = tmp_path / "private-broker"
    workdir.mkdir()
    broker = Mosquitto(str(workdir)).start()
    try:
        link = Link(tmp_path, broker, max_batch=3)
        cloud = Cloud(tmp_path, broker, link.prefix + "telemetry")
        parts += [link, cloud]
        connect(link, cloud)
        link.append(6)
        pump("the first records acked", link, cloud, lambda: link.outbox.stats()["records"] == 0, 10)

        # Freeze the broker so the next batches stay unacknowledged, then kill it.
        assert broker.proc is not None
        broker.proc.send_signal(19)  # SIGSTOP
        link.append(4)
        link.step()
        window = link.uplink.window
        in_flight = sorted(s for digest in window.inflight.values() for s in window.batches[digest])
        assert in_flight == [7, 8, 9, 10]
        broker.proc.kill()
        broker.proc.wait(5)
        broker.stop()
        cloud.subscribed = False
        pump("the uplink to see the broker gone", link, None, lambda: not link.uplink.connected, 15)
        assert sorted(link.failed) == in_flight, "in-flight rows must be released on disconnect"
        assert link.outbox.stats()["in_flight"] == 0
        link.append(5)
        for _ in range(20):
            link.step()
            time.sleep(0.01)
        stats = link.outbox.stats()
        assert stats["records"] == 9 and stats["last_acked"] == 6, "rows must wait on disk for the broker"

        port = broker.port
        monkeypatch.setattr(devtools.broker, "free_port", lambda: port)
        broker.start()
        assert broker.port == port
        pump("the consumer to resubscribe", None, cloud, lambda: cloud.subscribed, 15)
        pump("the backlog acked", link, cloud, lambda: link.outbox.stats()["records"] == 0, 30)
        pump("the consumer to store everything", link, cloud, lambda: len(cloud.stored(link.device)) == 15, 10)
        assert cloud.stored(link.device) == list(range(1, 16))
        assert cloud.ingest.gaps() == {}
        assert cloud.ingest.bad_batches == 0
        assert cloud.ingest.records == 15
        assert link.uplink.connects == 2
    finally:
        broker.stop()


def test_birth_and_last_will(tmp_path: Path, mosquitto: Mosquitto, parts: list[Link | Cloud]) -> None:
    """``state`` is retained: online true once connected, and online false from the
    broker when the agent's connection dies without a goodbye."""
    link = Link(tmp_path, mosquitto)
    parts.append(link)
    link.uplink.start()
    pump("the uplink to connect", link, None, lambda: link.uplink.connected, 10)

    def retained_state(client: str) -> list[dict[str, object]]:
        """A late subscriber's view of ``state``: what the broker retained."""
        seen: list[dict[str, object]] = []
        watcher = Subscriber(client, mosquitto.host, mosquitto.port, link.prefix + "state",
                             lambda topic, payload: seen.append(cbor2.loads(payload)))
        watcher.connect()
        try:
            wait_for("the retained state", lambda: watcher.loop(0.05) or seen, 10, interval=0)
        finally:
            watcher.close()
        return seen

    assert retained_state(f"w1-{link.device}")[-1] == {"online": True, "boot": link.boot, "version": "test",
                                                       "kernel": "py"}
    # Die uncleanly: no DISCONNECT, the TCP connection just ends.
    link.uplink.client.loop_stop()
    sock = link.uplink.client.socket()
    assert sock is not None
    sock.close()

    def offline() -> bool:
        return retained_state(f"w-{uuid.uuid4().hex[:6]}")[-1]["online"] is False

    wait_for("the last will on state", offline, 10, interval=0.1)
    assert retained_state(f"w3-{link.device}")[-1]["boot"] == link.boot


def batch(device: str, *seqs: int, t: int = 0) -> bytes:
    return cbor2.dumps([1, device, [[s, {"k": "win", "t": t + s, "d": 1000, "s": [[SIG, 1, 1.5, 1.5, 1.5, 1.5],
                                                                                [2, 2, -3, 4, 0.5, 4]]}]
                                    for s in seqs]])


def test_ingest_counts_bad_batches_and_duplicates(tmp_path: Path) -> None:
    """The consumer never crashes on what arrives: garbage and mismatched devices are
    counted, duplicates stored once, gaps reported as ranges."""
    ingest = Ingest(str(tmp_path / "cloud.sqlite"))
    topic = "ebike/v1/bike-a/telemetry"
    ingest.handle(topic, b"\xffnot cbor")
    ingest.handle(topic, cbor2.dumps([1, "bike-a", [[0, {}]]]))
    ingest.handle(topic, batch("bike-b", 1))
    assert (ingest.bad_batches, ingest.batches, ingest.records) == (3, 0, 0)
    assert "does not match the topic" in ingest.last_error

    ingest.handle(topic, batch("bike-a", 1, 2, 3))
    ingest.handle(topic, batch("bike-a", 2, 3, 6))
    ingest.handle(topic, batch("bike-a", 9, 10))
    ingest.handle("ebike/v1/bike-c/telemetry", batch("bike-c", 5, 7))
    assert (ingest.batches, ingest.records, ingest.duplicates, ingest.bad_batches) == (4, 8, 2, 3)
    assert ingest.gaps() == {"bike-a": [(4, 5), (7, 8)], "bike-c": [(6, 6)]}
    report = ingest.report()
    a = report["devices"]["bike-a"]
    assert (a["records"], a["first"], a["last"], a["duplicates"], a["unannounced"]) == (6, 1, 10, 2, 4)
    assert report["devices"]["bike-c"]["duplicates"] == 0 and a["active_alarms"] == []
    assert report["gaps"] == {"bike-a": [[4, 5], [7, 8]], "bike-c": [[6, 6]]}
    rows = ingest.db.execute("SELECT signal, count, min, max, mean, last FROM window_signals "
                             "WHERE device='bike-a' AND seq=2 ORDER BY signal").fetchall()
    assert rows == [(SIG, 1, 1.5, 1.5, 1.5, 1.5), (2, 2, -3, 4, 0.5, 4)]
    ingest.close()


def test_ingest_survives_a_batch_the_database_cannot_take(tmp_path: Path) -> None:
    """A batch that decodes but cannot be stored (the same signal twice in a window, a
    uint beyond SQLite's int64) is a bad batch, stored not at all, and the next one works."""
    ingest = Ingest(str(tmp_path / "cloud.sqlite"))
    topic = "ebike/v1/bike-a/telemetry"
    twice = {"k": "win", "t": 5, "d": 1000, "s": [[SIG, 1, 1, 1, 1, 1], [SIG, 1, 2, 2, 2, 2]]}
    huge = {"k": "win", "t": 2**64 - 1, "d": 1000, "s": []}
    ingest.handle(topic, cbor2.dumps([1, "bike-a", [[1, {"k": "win", "t": 0, "d": 1, "s": []}], [2, twice]]]))
    ingest.handle(topic, cbor2.dumps([1, "bike-a", [[3, huge]]]))
    assert ingest.bad_batches == 2 and ingest.records == 0 and ingest.batches == 0
    assert ingest.db.execute("SELECT count(*) FROM records").fetchone() == (0,)
    ingest.handle(topic, batch("bike-a", 1, 2))
    assert ingest.records == 2 and ingest.gaps() == {}
    ingest.close()


def test_rows_wait_for_the_cloud_ack_and_are_resent_without_it(tmp_path: Path, mosquitto: Mosquitto,
                                                             parts: list[Link | Cloud]) -> None:
    """With ack = "cloud" a PUBACK is not enough: rows stay until the consumer says it
    stored them, and what no ack covers in ack_timeout is sent again (the consumer keeps
    one copy). A broker that crashes after its PUBACK therefore loses nothing."""
    link = Link(tmp_path, mosquitto, ack_timeout=0.5)
    cloud = Cloud(tmp_path, mosquitto, link.prefix + "telemetry")
    cloud.acking = False
    parts += [link, cloud]
    connect(link, cloud)
    link.append(10)
    pump("PUBACKs and a resend", link, cloud, lambda: link.uplink.window.resent_unacked >= 10, 10)
    assert link.outbox.stats()["records"] == 10, "rows deleted without the cloud's ack"
    assert link.uplink.window.batches_acked >= 2 and link.uplink.window.records_acked == 0
    cloud.acking = True
    pump("the cloud's acks to empty the outbox", link, cloud, lambda: link.outbox.stats()["records"] == 0, 10)
    assert cloud.stored(link.device) == list(range(1, 11))
    assert cloud.ingest.duplicates >= 10
    assert link.uplink.status()["records_acked"] == 10


def test_broker_ack_mode_deletes_on_puback(tmp_path: Path, mosquitto: Mosquitto,
                                           parts: list[Link | Cloud]) -> None:
    """ack = "broker", for backends that cannot acknowledge: PUBACK is enough."""
    link = Link(tmp_path, mosquitto, ack="broker")
    parts.append(link)
    link.uplink.start()
    pump("the uplink to connect", link, None, lambda: link.uplink.connected, 10)
    link.append(7)
    pump("rows deleted on PUBACK", link, None, lambda: link.outbox.stats()["records"] == 0, 10)
    assert link.uplink.window.records_acked == 7


def test_forged_or_bad_acks_delete_nothing(tmp_path: Path, mosquitto: Mosquitto, parts: list[Link | Cloud]) -> None:
    """Through the broker: a garbled ack, an old-format ack covering every sequence
    number, and one of the new format with a made-up digest delete nothing; each is
    counted. The cloud's own acks then empty the outbox. (tests/test_acks.py has each
    case of the check on its own.)"""
    link = Link(tmp_path, mosquitto, ack_timeout=30.0)
    cloud = Cloud(tmp_path, mosquitto, link.prefix + "telemetry")
    cloud.acking = False
    parts += [link, cloud]
    connect(link, cloud)
    link.append(100)
    # The window fills with PUBACKed batches awaiting the cloud; the rest waits on disk unsent.
    pump("the window full of PUBACKed batches", link, cloud,
         lambda: not link.uplink.window.inflight and not link.uplink.can_send(), 10)
    out = len(link.uplink.window.awaiting_seqs)
    assert 0 < out < 100
    cloud.sub.publish(link.prefix + "ack", b"\xff\x00garbage")
    cloud.sub.publish(link.prefix + "ack", cbor2.dumps([1, [[1, 2**64 - 1]]]))
    cloud.sub.publish(link.prefix + "ack", wire.encode_ack(b"\x00" * wire.DIGEST_BYTES, list(range(1, 101))))
    pump("the three acks seen", None, cloud, lambda: link.uplink.events.qsize() >= 3, 10)
    link.outbox.ack(link.uplink.poll()[0])
    status = link.uplink.status()
    assert status["acks_refused"] == 3 and status["cloud_acks"] == 0 and status["records_acked"] == 0
    assert status["acks_refused_by"] == {"malformed": 2, "unknown_batch": 1}
    assert link.outbox.stats()["records"] == 100, "a forged ack deleted rows"
    cloud.acking = True
    for topic, payload in cloud.payloads:  # what the consumer received so far, acked now
        cloud.sub.publish(*ack_for(topic, cloud.ingest.handle(topic, payload), payload))
    pump("the cloud's acks to empty the outbox", link, cloud, lambda: link.outbox.stats()["records"] == 0, 20)
    assert cloud.stored(link.device) == list(range(1, 101))


def test_two_consumers_share_the_subscription(tmp_path: Path, mosquitto: Mosquitto,
                                              parts: list[Link | Cloud]) -> None:
    """``ebike-agent ingest --group``: two consumers split the stream (MQTT 5 shared
    subscription), write one database, and every record is stored once."""
    import json

    from tests.helpers import log_has, spawn, stop

    db = tmp_path / "cloud.sqlite"
    logs = [tmp_path / f"ingest{i}.log" for i in range(2)]
    consumers = [spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", str(db), "--group", "g1",
                        "--client-id", f"shared-{i}-{uuid.uuid4().hex[:6]}"], log) for i, log in enumerate(logs)]
    try:
        wait_for("both consumers to subscribe", lambda: all(log_has(log, "subscribed to") for log in logs), 20)
        link = Link(tmp_path, mosquitto, max_batch=5)
        parts.append(link)
        link.uplink.start()
        pump("the uplink to connect", link, None, lambda: link.uplink.connected, 10)
        link.append(200)
        pump("every record acknowledged by the cloud", link, None, lambda: link.outbox.stats()["records"] == 0, 30)
    finally:
        codes = [stop(c) for c in consumers]
    assert codes == [0, 0], [log.read_text() for log in logs]
    reports = [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]
    assert all(r["batches"] > 0 for r in reports), "one consumer got nothing: the subscription was not shared"
    cloud = Ingest(str(db))
    try:
        assert [s for (s,) in cloud.db.execute("SELECT seq FROM records WHERE device=? ORDER BY seq",
                                               (link.device,))] == list(range(1, 201))
    finally:
        cloud.close()


def test_consumers_starting_together_all_open_one_new_database(tmp_path: Path) -> None:
    """SQLite refuses, at once and without waiting, one of two connections that set up a
    new file at the same moment; consumers of a shared subscription start together, so
    each must still open it. 100 rounds of 3 processes released at one instant; without
    the retry, this failed in each of 3 runs out of 3."""
    import os

    failed = []
    for n in range(100):
        path = str(tmp_path / f"cloud{n}.sqlite")
        start = time.time() + 0.02
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    while time.time() < start:
                        pass
                    Ingest(path).close()
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        failed += [n for code in codes if code]
    assert not failed, f"a consumer could not open the database in rounds {failed}"


def test_batches_fit_the_brokers_maximum_packet_size(tmp_path: Path, parts: list[Link | Cloud]) -> None:
    """MQTT 5 CONNACK says how big a packet the broker takes; batches are built to fit."""
    workdir = tmp_path / "small-packets"
    workdir.mkdir()
    broker = Mosquitto(str(workdir), extra_config="max_packet_size 1200\n").start()
    try:
        link = Link(tmp_path, broker, max_batch=200)
        cloud = Cloud(tmp_path, broker, link.prefix + "telemetry")
        parts += [link, cloud]
        connect(link, cloud)
        assert link.uplink.max_packet == 1200
        link.append(100)
        pump("every record stored and acknowledged", link, cloud, lambda: link.outbox.stats()["records"] == 0, 20)
        assert cloud.stored(link.device) == list(range(1, 101))
        assert len(cloud.payloads) > 1 and max(len(p) for _, p in cloud.payloads) <= link.uplink.batch_bytes()
    finally:
        broker.stop()


def test_bandwidth_cap_spreads_the_backlog(tmp_path: Path, mosquitto: Mosquitto, parts: list[Link | Cloud]) -> None:
    """``max_bytes_per_s`` holds the send rate down (cellular data costs money)."""
    link = Link(tmp_path, mosquitto, max_batch=2, max_bytes_per_s=600)
    cloud = Cloud(tmp_path, mosquitto, link.prefix + "telemetry")
    parts += [link, cloud]
    connect(link, cloud)
    link.append(45)
    started = time.monotonic()
    pump("every record delivered", link, cloud, lambda: link.outbox.stats()["records"] == 0, 30)
    took = time.monotonic() - started
    sent = sum(len(p) for _, p in cloud.payloads)
    assert sent > 1800 and took >= sent / 600 - 1.5, (sent, took)


def test_mqtt_311_only_by_choice_and_with_a_warning(tmp_path: Path, mosquitto: Mosquitto,
                                                    parts: list[Link | Cloud],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        link = Link(tmp_path, mosquitto, protocol="3.1.1")
    parts.append(link)
    assert "MQTT 3.1.1" in caplog.text and "lost silently" in caplog.text
    cloud = Cloud(tmp_path, mosquitto, link.prefix + "telemetry")
    parts.append(cloud)
    connect(link, cloud)
    link.append(6)
    pump("delivered and acknowledged by the cloud", link, cloud, lambda: link.outbox.stats()["records"] == 0, 10)
    assert cloud.stored(link.device) == list(range(1, 7))


def test_reconnect_waits_double_with_jitter_up_to_two_minutes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """1 s to 120 s, each wait drawn from the upper half of a cap that doubles every 4
    failures (a short outage is retried about every second), so a fleet cut off together
    does not come back in lockstep."""
    links = [Link(tmp_path, mosquitto) for _ in range(2)]
    try:
        seqs = [[link.uplink.next_reconnect_delay() for _ in range(36)] for link in links]
        for delays in seqs:
            cap = 1.0
            for n, d in enumerate(delays, start=1):
                assert max(1.0, cap / 2) <= d <= cap
                if n % 4 == 0:
                    cap = min(120.0, cap * 2)
            assert delays[:4] == [1.0] * 4 and delays[-1] >= 60.0
        assert seqs[0][8:] != seqs[1][8:], "two devices drew the same waits"
        link = links[0]
        link.uplink.start()
        pump("a connection", link, None, lambda: link.uplink.connected, 10)
        assert link.uplink.backoff.cap == 1.0, "a good connection resets the backoff"
    finally:
        for link in links:
            link.close()


def test_long_outage_small_quota_announces_the_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     shared_data: Path) -> None:
    """The real agent loop (in process) rides a looping candump replay with the broker
    away and a quota far too small: it keeps running, drops the oldest rows, and once the
    broker is back the cloud has every kept record and an announcement for every dropped
    one: no unexplained gap."""
    from agent import config
    from agent.runtime import Runtime

    log = tmp_path / "ride.log"
    log.write_bytes((shared_data / "bafang_can" / "ride-coasting-excerpt.log").read_bytes())
    port = devtools.broker.free_port()
    cfg = config.parse(str(tmp_path / "agent.toml"), {
        "device_id": "quota-bike", "control_socket": str(tmp_path / "control.sock"),
        "sources": [{"name": "can0", "kind": "candump", "port": str(log), "protocol": "bafang-can",
                     "replay_speed": 20.0, "loop": True}],
        "broker": {"host": "127.0.0.1", "port": port, "keepalive": 5},
        "outbox": {"path": str(tmp_path / "outbox.sqlite"), "quota_mb": 0.06, "commit_interval": 0.05},
        "windows": {"live": 0.05},
    })
    rt = Runtime(cfg)
    cloud: Cloud | None = None
    broker: Mosquitto | None = None
    rt.control.start(rt.selector)
    rt.uplink.start()
    try:
        deadline = time.monotonic() + 20
        while rt.outbox.stats()["dropped"] == 0 and time.monotonic() < deadline:
            rt.step(0.02)
        assert rt.outbox.stats()["dropped"] > 0, "the quota never bit"
        for _ in range(20):
            rt.step(0.02)
        monkeypatch.setattr(devtools.broker, "free_port", lambda: port)
        workdir = tmp_path / "broker"
        workdir.mkdir()
        broker = Mosquitto(str(workdir)).start()
        cloud = Cloud(tmp_path, broker, "ebike/v1/quota-bike/telemetry")
        wait_for("the consumer to subscribe", lambda: (cloud.sub.loop(0.02), cloud.subscribed)[1], 10)
        rt.sources[0].close()
        rt.sources[0].finished = True  # the ride is over; drain what is kept
        deadline = time.monotonic() + 30
        while (rt.outbox.stats()["records"] or rt.recorder.pending) and time.monotonic() < deadline:
            rt.step(0.01)
            cloud.sub.loop(0.01)
        assert rt.outbox.stats()["records"] == 0, rt.uplink.status()
        for _ in range(50):
            cloud.sub.loop(0.01)
        report = cloud.ingest.report()
        assert report["announced_drops"].get("quota-bike"), "nothing announced"
        assert report["gaps"] == {}, "a dropped record was not announced"
        announced = {s for a, b in report["announced_drops"]["quota-bike"] for s in range(a, b + 1)}
        stored = set(cloud.stored("quota-bike"))
        assert len(announced) == rt.outbox.stats()["dropped"] and not announced & stored
        assert stored | announced == set(range(1, rt.outbox.stats()["last_seq"] + 1)), \
            "every sequence number is either in the cloud or announced as dropped"
    finally:
        rt.shutdown()
        if cloud is not None:
            cloud.close()
        if broker is not None:
            broker.stop()


def test_the_consumer_stores_every_record_kind(tmp_path: Path) -> None:
    """One batch of each record kind the agent makes: each stored once with its time (a
    change record's is its first change), and the consumer does not fall over on any."""
    from agent.commands.envelope import result_message

    t = 1_700_000_000.0
    bodies = [
        window(1),
        wire.change_record([(SIG, t + 0.25, 1.5), (SIG, t + 0.5, 2.5)]),
        wire.alarm_record(t + 1, 7, "overheat", -1, 2, True, 91.0, 90.0),
        *wire.snapshot_records(t + 2, 7, -1, t - 8, t + 2, [SIG, SIG], [t - 1, t], [1.0, 2.0]),
        wire.gap_record([(100, 120)], "quota", t + 3),
        wire.result_record(t + 4, result_message("c1", "executed", "pong", {"received": t + 4})),
    ]
    cloud = Ingest(str(tmp_path / "cloud.sqlite"))
    try:
        stored = cloud.handle("ebike/v1/dev/telemetry", wire.encode_batch("dev", list(enumerate(bodies, 1)), True))
        assert stored == list(range(1, len(bodies) + 1)) and cloud.bad_batches == 0
        rows = cloud.db.execute("SELECT kind, t_ms FROM records ORDER BY seq").fetchall()
    finally:
        cloud.close()
    assert rows == [("win", 1_700_000_001_000), ("chg", 1_700_000_000_250), ("alm", 1_700_000_001_000),
                    ("snap", 1_700_000_002_000), ("gap", 1_700_000_003_000), ("res", 1_700_000_004_000)]
