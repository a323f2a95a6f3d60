"""Cloud acks that cannot be forged cheaply (issue 14, item 6).

A device deletes rows only on an ack carrying the digest of a batch it has out and
naming only that batch's sequence numbers (with ``[commands] ack_keys``, signed by a
consumer key too). Batches go through a real mosquitto; acks are handed to the uplink
the way its MQTT callback hands them over, so each case is checked on its own. The
end-to-end tests run the simulator, the agent and ``ebike-agent ingest`` as processes,
with forged acks published by another client while the cloud has not stored the rows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import wire
from agent.fleet.signing import Signer, generate_key_pair
from agent.fleet.subscriber import Subscriber
from agent.uplink.mqtt import Uplink
from devtools.broker import Mosquitto
from tests.helpers import log_has, spawn, stop, wait_for
from tests.test_e2e import agent_config
from tests.test_uplink import Cloud, Link, connect, pump

BATCHES = 4
PER_BATCH = 5


def keypair(tmp_path: Path, kid: str) -> tuple[Path, Path]:
    """(private, public) PEM files of a new Ed25519 pair."""
    private, public = generate_key_pair()
    (tmp_path / f"{kid}.key.pem").write_bytes(private)
    (tmp_path / f"{kid}.pub.pem").write_bytes(public)
    return tmp_path / f"{kid}.key.pem", tmp_path / f"{kid}.pub.pem"


def sent(tmp_path: Path, broker: Mosquitto, made: list[Link | Cloud], **uplink: Any) -> tuple[Link, Cloud]:
    """A device with BATCHES batches PUBACKed and awaiting the cloud, which received them
    (``cloud.payloads``) but acknowledged none. ``uplink``: Uplink keywords (ack_keys)."""
    link = Link(tmp_path, broker, max_batch=PER_BATCH, ack_timeout=120.0)
    if uplink:
        link.uplink = Uplink(link.device, link.cfg, link.prefix, birth=link.state(True), death=link.state(False),
                             **uplink)
    cloud = Cloud(tmp_path, broker, link.prefix + "telemetry")
    cloud.acking = False
    made += [link, cloud]
    connect(link, cloud)
    link.append(BATCHES * PER_BATCH)
    pump("every batch PUBACKed and received", link, cloud,
         lambda: len(link.uplink.window.awaiting_seqs) == BATCHES * PER_BATCH and len(cloud.payloads) == BATCHES, 10)
    return link, cloud


def seqs_of(payload: bytes) -> list[int]:
    return [seq for seq, _ in wire.decode_batch(payload)[1]]


def deliver(link: Link, ack: bytes) -> tuple[list[int], list[int]]:
    """Hand ``ack`` to the uplink as its MQTT callback would, and drive the outbox the
    way the agent's loop does: (deleted, to send again)."""
    link.uplink.events.put(("ack", ack, None))
    acked, failed = link.uplink.poll()
    link.outbox.ack(acked)
    link.outbox.release(failed)
    return acked, failed


@pytest.fixture
def made() -> Iterator[list[Link | Cloud]]:
    parts: list[Link | Cloud] = []
    yield parts
    for p in reversed(parts):
        p.close()


def test_the_right_digest_deletes_exactly_its_batch(tmp_path: Path, mosquitto: Mosquitto,
                                                    made: list[Link | Cloud]) -> None:
    link, cloud = sent(tmp_path, mosquitto, made)
    payload = cloud.payloads[1][1]
    acked, failed = deliver(link, wire.encode_ack(wire.batch_digest(payload), seqs_of(payload)))
    assert sorted(acked) == seqs_of(payload) and failed == []
    assert link.outbox.stats()["records"] == (BATCHES - 1) * PER_BATCH
    status = link.uplink.status()
    assert status["cloud_acks"] == 1 and status["records_acked"] == PER_BATCH and status["acks_refused"] == 0


def _forgeries(payloads: list[bytes]) -> list[tuple[str, str, bytes]]:
    """(case, reason, ack): each must delete nothing."""
    first, second = payloads[0], payloads[1]
    digest = wire.batch_digest(first)
    return [
        ("unknown batch", "unknown_batch", wire.encode_ack(os.urandom(wire.DIGEST_BYTES), seqs_of(first))),
        ("wrong digest", "unknown_batch", wire.encode_ack(wire.batch_digest(first + b"\x00"), seqs_of(first))),
        ("another batch's digest", "wrong_seqs", wire.encode_ack(wire.batch_digest(second), seqs_of(first))),
        ("numbers not in flight", "wrong_seqs",
         wire.encode_ack(digest, [BATCHES * PER_BATCH + 1 + i for i in range(PER_BATCH)])),
        ("the batch and one more", "wrong_seqs", wire.encode_ack(digest, [*seqs_of(first), seqs_of(second)[0]])),
        ("every number there is", "wrong_seqs", cbor2.dumps([2, digest, [[1, 2**64 - 1]]])),
        ("version 1", "malformed", cbor2.dumps([1, [[1, 2**64 - 1]]])),
        ("garbage", "malformed", b"\xff\x00garbage"),
        ("short digest", "malformed", cbor2.dumps([2, digest[:4], [[1, 5]]])),
        ("too long", "malformed", wire.encode_ack(digest, seqs_of(first)) + bytes(wire.MAX_ACK)),
        ("signed, not COSE", "malformed", b"\xd2\x80"),
    ]


def test_forged_acks_delete_nothing_and_are_counted(tmp_path: Path, mosquitto: Mosquitto,
                                                    made: list[Link | Cloud]) -> None:
    link, cloud = sent(tmp_path, mosquitto, made)
    forgeries = _forgeries([p for _, p in cloud.payloads])
    for n, (case, reason, ack) in enumerate(forgeries, 1):
        assert deliver(link, ack) == ([], []), case
        status = link.uplink.status()
        assert status["acks_refused"] == n and status["last_ack_refused"].startswith(reason + ":"), case
        assert link.outbox.stats()["records"] == BATCHES * PER_BATCH, case
    assert link.uplink.status()["cloud_acks"] == 0 and link.uplink.window.records_acked == 0
    assert len(link.uplink.window.awaiting_seqs) == BATCHES * PER_BATCH
    # The cloud's own acks still work afterwards.
    for _, payload in cloud.payloads:
        deliver(link, wire.encode_ack(wire.batch_digest(payload), seqs_of(payload)))
    assert link.outbox.stats()["records"] == 0 and link.uplink.window.records_acked == BATCHES * PER_BATCH


def test_a_replayed_ack_is_refused(tmp_path: Path, mosquitto: Mosquitto, made: list[Link | Cloud]) -> None:
    link, cloud = sent(tmp_path, mosquitto, made)
    payload = cloud.payloads[0][1]
    ack = wire.encode_ack(wire.batch_digest(payload), seqs_of(payload))
    assert sorted(deliver(link, ack)[0]) == seqs_of(payload)
    assert deliver(link, ack) == ([], [])
    assert link.uplink.status()["acks_refused_by"] == {"late": 1}
    assert link.uplink.window.records_acked == PER_BATCH and link.outbox.stats()["records"] == (BATCHES - 1) * PER_BATCH


def test_a_partial_ack_deletes_its_part_and_sends_the_rest_again(tmp_path: Path, mosquitto: Mosquitto,
                                                                  made: list[Link | Cloud]) -> None:
    link, cloud = sent(tmp_path, mosquitto, made)
    payload = cloud.payloads[2][1]
    seqs = seqs_of(payload)
    acked, failed = deliver(link, wire.encode_ack(wire.batch_digest(payload), seqs[:2]))
    assert sorted(acked) == seqs[:2] and sorted(failed) == seqs[2:]
    assert not set(seqs) & link.uplink.window.awaiting_seqs
    assert link.outbox.stats()["records"] == BATCHES * PER_BATCH - 2


def test_refusals_are_logged_now_and_then(tmp_path: Path, mosquitto: Mosquitto, made: list[Link | Cloud],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A flood of forged acks is counted in full but logged once per interval."""
    link, _cloud = sent(tmp_path, mosquitto, made)
    caplog.set_level(logging.WARNING, logger="agent.uplink.window")
    for _ in range(50):
        deliver(link, wire.encode_ack(os.urandom(wire.DIGEST_BYTES), [1]))
    warnings = [r for r in caplog.records if "cloud ack refused" in r.getMessage()]
    assert len(warnings) == 1 and link.uplink.window.acks_refused == 50
    link.uplink.window.ack_warned -= 60  # the interval has passed
    deliver(link, b"garbage")
    warnings = [r for r in caplog.records if "cloud ack refused" in r.getMessage()]
    assert len(warnings) == 2 and "49 more refused" in warnings[1].getMessage()
    assert warnings[1].levelno == logging.WARNING


def test_signed_acks_only_when_required(tmp_path: Path, mosquitto: Mosquitto, made: list[Link | Cloud]) -> None:
    """With ack keys, an ack counts only signed by one of them (not revoked); its digest
    is checked as well. Unsigned acks, acks signed by another key under the right key id,
    or under an unknown or revoked one, delete nothing."""
    ingest_key, ingest_pub = keypair(tmp_path, "ingest-1")
    old_key, old_pub = keypair(tmp_path, "ingest-0")
    stranger, _ = keypair(tmp_path, "stranger")
    link, cloud = sent(tmp_path, mosquitto, made, ack_keys={"ingest-1": ingest_pub.read_text(),
                                                            "ingest-0": old_pub.read_text()},
                       revoked=["ingest-0"])
    assert link.uplink.status()["signed_acks"] is True
    payloads = [p for _, p in cloud.payloads]
    plain = wire.encode_ack(wire.batch_digest(payloads[0]), seqs_of(payloads[0]))
    signer = Signer(ingest_key.read_bytes(), "ingest-1")
    refused = [
        ("unsigned", plain),
        ("bad_signature", Signer(stranger.read_bytes(), "ingest-1").sign(plain)),
        ("unknown_key", Signer(stranger.read_bytes(), "stranger").sign(plain)),
        ("revoked_key", Signer(old_key.read_bytes(), "ingest-0").sign(plain)),
        ("unknown_batch", signer.sign(wire.encode_ack(os.urandom(wire.DIGEST_BYTES), seqs_of(payloads[0])))),
        ("wrong_seqs", signer.sign(wire.encode_ack(wire.batch_digest(payloads[0]), seqs_of(payloads[1])))),
    ]
    for reason, ack in refused:
        assert deliver(link, ack) == ([], []), reason
        assert link.uplink.window.last_ack_refused.startswith(reason + ":")
    assert link.outbox.stats()["records"] == BATCHES * PER_BATCH
    assert sorted(deliver(link, signer.sign(plain))[0]) == seqs_of(payloads[0])
    assert link.outbox.stats()["records"] == (BATCHES - 1) * PER_BATCH


def test_a_device_not_requiring_signatures_reads_signed_acks(tmp_path: Path, mosquitto: Mosquitto,
                                                              made: list[Link | Cloud]) -> None:
    """A fleet can start signing before its devices require it; the digest still counts."""
    key, _ = keypair(tmp_path, "ingest-1")
    link, cloud = sent(tmp_path, mosquitto, made)
    signer = Signer(key.read_bytes(), "ingest-1")
    payload = cloud.payloads[0][1]
    assert deliver(link, signer.sign(wire.encode_ack(os.urandom(wire.DIGEST_BYTES), seqs_of(payload)))) == ([], [])
    assert sorted(deliver(link, signer.sign(wire.encode_ack(wire.batch_digest(payload), seqs_of(payload))))[0]) \
        == seqs_of(payload)


# ---------------------------------------------------------------------------------------
# End to end: simulator -> agent -> mosquitto -> ebike-agent ingest, and a forger.

RIDE_S = 200
SPEEDUP = 20
DEVICE = "e2e-bike-1"  # agent_config's default; the consumer's database is read for it


def agent_status(tmp: Path) -> dict[str, Any] | None:
    """``ebike-agent status --json`` of the running agent, or None while it cannot answer."""
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--config", str(tmp / "agent.toml")],
                         capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else None


class Forger(threading.Thread):
    """Another MQTT client that publishes acks on the device's ack topic every 0.1 s:
    ones it makes up, and, with ``eavesdrop`` (reading the telemetry), ones with a
    batch's true digest, unsigned and signed with its own key under the consumer's key id
    (what only signed acks stop)."""

    def __init__(self, broker: Mosquitto, stranger_key: bytes, kid: str, eavesdrop: bool) -> None:
        super().__init__(daemon=True)
        self.payloads: list[bytes] = []
        topic = f"ebike/v1/{DEVICE}/telemetry" if eavesdrop else f"forger/{uuid.uuid4().hex}"
        self.sub = Subscriber(f"forger-{uuid.uuid4().hex[:6]}", broker.host, broker.port, topic,
                              lambda _t, p: self.payloads.append(p), persistent=False)
        self.signer = Signer(stranger_key, kid)
        self.done = threading.Event()
        self.published = 0

    def forgeries(self) -> list[bytes]:
        made_up = [wire.encode_ack(os.urandom(wire.DIGEST_BYTES), list(range(1, 5000))),
                   cbor2.dumps([1, [[1, 2**64 - 1]]])]
        if not self.payloads:
            return made_up
        payload = self.payloads[-1]
        true = wire.encode_ack(wire.batch_digest(payload), [seq for seq, _ in wire.decode_batch(payload)[1]])
        return [*made_up, true, self.signer.sign(true)]

    def run(self) -> None:
        self.sub.connect()
        while not self.done.is_set():
            for ack in self.forgeries():
                self.sub.publish(f"ebike/v1/{DEVICE}/ack", ack)
                self.published += 1
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                self.sub.loop(0.02)
        self.sub.close()


@pytest.mark.e2e
@pytest.mark.parametrize("signed", [False, True], ids=["digest", "signed"])
def test_forged_acks_lose_nothing_end_to_end(tmp_path: Path, mosquitto: Mosquitto, signed: bool) -> None:
    """The agent sends while no consumer runs; a forger acks what it sent (made-up
    digests; and, signed, the true digest read off the telemetry, unsigned or signed with
    another key). Nothing is deleted until the real consumer (started late, its default
    client id, signing with ``--ack-key`` when the device requires it) stores the rows; in
    the end every record is stored once, none lost, and the refusals show in ``status``."""
    ingest_key, ingest_pub = keypair(tmp_path, "ingest-1")
    stranger, _ = keypair(tmp_path, "stranger")
    extra = f'[commands]\nack_keys = {{ ingest-1 = "{ingest_pub}" }}\n' if signed else ""
    config = agent_config(tmp_path, mosquitto, extra=extra, sim_speed=SPEEDUP)
    config.write_text(config.read_text().replace("[broker]\n", "[broker]\nack_timeout = 2.0\n"))
    sim = spawn(["firmware_sim", "--slcan", str(tmp_path / "can"), "--nmea", str(tmp_path / "gps"),
                 "--speed", str(SPEEDUP), "--duration", str(RIDE_S), "--seed", "5",
                 "--wait-open", "60", "--linger", "2"], tmp_path / "sim.log")
    forger = Forger(mosquitto, stranger.read_bytes(), "ingest-1", eavesdrop=signed)
    agent = consumer = None
    try:
        wait_for("the simulator's ptys", lambda: log_has(tmp_path / "sim.log", "ready"), 20)
        agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
        wait_for("batches PUBACKed, no consumer yet",
                 lambda: (agent_status(tmp_path) or {}).get("uplink", {}).get("batches_acked", 0) >= 3, 30)
        forger.start()
        wanted = {"unsigned", "bad_signature"} if signed else {"unknown_batch", "malformed"}

        def refused() -> dict[str, Any] | None:
            up: dict[str, Any] = (agent_status(tmp_path) or {}).get("uplink", {})
            return up if wanted <= set(up.get("acks_refused_by", {})) else None

        before = wait_for("forged acks refused", refused, 20)
        assert before["records_acked"] == 0 and before["cloud_acks"] == 0, "a forged ack deleted rows"
        assert before["signed_acks"] is signed
        ingest_args = ["--ack-key", str(ingest_key), "--ack-kid", "ingest-1"] if signed else []
        consumer = spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", str(tmp_path / "cloud.sqlite"),
                          *ingest_args], tmp_path / "ingest.log")
        assert wait_for("the simulated ride to end", lambda: sim.poll() is not None, RIDE_S / SPEEDUP + 60,
                        interval=0.2) and sim.returncode == 0, (tmp_path / "sim.log").read_text()
        wait_for("the outbox to empty", lambda: (agent_status(tmp_path) or {}).get("outbox", {}).get("records") == 0,
                 30, interval=0.3)
        after = agent_status(tmp_path)
        assert after is not None
        forger.done.set()
        forger.join(5)
        assert stop(agent) == 0, (tmp_path / "agent.log").read_text()
    finally:
        forger.done.set()
        for proc in (sim, agent, consumer):
            if proc is not None:
                stop(proc)
    up = after["uplink"]
    assert up["acks_refused"] > before["acks_refused"], "the forger kept going during the ride"
    assert up["cloud_acks"] > 0 and up["records_acked"] >= 1
    with sqlite3.connect(tmp_path / "outbox.sqlite") as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        (left,) = c.execute("SELECT count(*) FROM records").fetchone()
    assert left == 0
    with sqlite3.connect(tmp_path / "cloud.sqlite") as c:
        seqs = [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY seq", (DEVICE,))]
    assert seqs == list(range(1, next_seq)), "a record was lost or stored twice"
    report = json.loads((tmp_path / "ingest.log").read_text().strip().splitlines()[-1])
    assert report["gaps"] == {} and report["bad_batches"] == 0
    assert forger.published > 0 and "Traceback" not in (tmp_path / "agent.log").read_text()


def test_ack_keys_in_the_configuration(tmp_path: Path) -> None:
    """``[commands] ack_keys`` are read like command keys; a key listed as both is refused,
    so the consumer's key can never sign a command."""
    from agent.config import load
    from agent.errors import ConfigError

    _, fleet = keypair(tmp_path, "fleet-1")
    _, ingest = keypair(tmp_path, "ingest-1")
    base = ('device_id = "bike-1"\n[[sources]]\nname = "gps"\nkind = "uart"\nport = "/dev/null"\n'
            'protocol = "nmea"\n[commands]\n')
    path = tmp_path / "agent.toml"
    path.write_text(base + f'keys = {{ fleet-1 = "{fleet}" }}\nack_keys = {{ ingest-1 = "ingest-1.pub.pem" }}\n')
    cfg = load(str(path))
    assert cfg.commands.ack_keys == (("ingest-1", ingest.read_text()),) and cfg.commands.enabled
    for ack_keys in (f'{{ fleet-1 = "{fleet}" }}', f'{{ other = "{fleet}" }}'):
        path.write_text(base + f'keys = {{ fleet-1 = "{fleet}" }}\nack_keys = {ack_keys}\n')
        with pytest.raises(ConfigError, match="is a command key too"):
            load(str(path))
    path.write_text(base + 'ack_keys = { ingest-1 = "missing.pem" }\n')
    with pytest.raises(ConfigError, match="commands.ack_keys.ingest-1"):
        load(str(path))
