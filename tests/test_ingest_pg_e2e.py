"""``ebike-agent ingest`` on PostgreSQL end to end: the real broker, real consumers
started as a user would, a real cluster; ``--init``, a batch off the CDDL refused and not
acknowledged while the consumer goes on, and ``ingest report`` from the database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cbor2

from agent import wire
from agent.fleet.subscriber import Subscriber, publish_once, wait_until
from devtools.broker import Mosquitto
from devtools.postgres import Postgres
from tests.helpers import REPO, log_has, spawn, stop, wait_for

SIG = 3


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


class Acks:
    """What the devices would hear: every ack published, by device."""

    def __init__(self, broker: Mosquitto) -> None:
        self.got: dict[str, list[list[int]]] = {}
        self.sub = Subscriber("acks-watch", broker.host, broker.port, "ebike/v1/+/ack", self._on, persistent=False)
        self.sub.connect()
        assert wait_until(lambda: self.sub.subscribed, 10, self.sub.loop)

    def _on(self, topic: str, payload: bytes) -> None:
        _digest, ranges = wire.decode_ack(payload)
        self.got.setdefault(topic.split("/")[2], []).extend([list(r) for r in ranges])

    def wait(self, done: object, timeout: float) -> bool:
        return wait_until(lambda: bool(done()), timeout, self.sub.loop)  # type: ignore[operator]


def test_init_refusal_bad_batch_and_report(tmp_path: Path, mosquitto: Mosquitto, postgres: Postgres,
                                           pg_url: str) -> None:
    # A consumer on a database without the schema refuses to start, and says how to fix it.
    refused = cli("ingest", "--broker", mosquitto.address, "--db", pg_url, "--duration", "1")
    assert refused.returncode != 0 and "ingest --init" in refused.stderr, refused.stderr
    made = cli("ingest", "--init", "--db", pg_url)
    assert made.returncode == 0, made.stderr
    assert postgres.psql("SELECT version FROM ingest_schema", pg_url).strip() == "1"

    log = tmp_path / "ingest.log"
    proc = spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", pg_url, "--group", "cloud"], log)
    acks = Acks(mosquitto)
    try:
        wait_for("the consumer to subscribe", lambda: log_has(log, "subscribed to"), 20)
        body = wire.window_record(1.7e9, 1.0, [(SIG, 4, 1.0, 2.0, 1.5, 2.0, None)])
        # Off the CDDL: a sequence number 0, then a window without its length.
        bad = [cbor2.dumps([1, "bike-x", [[0, cbor2.loads(body)]]]),
               cbor2.dumps([1, "bike-x", [[1, {"k": "win", "t": 5, "s": []}]]])]
        for payload in bad:
            publish_once(mosquitto.host, mosquitto.port, "ebike/v1/bike-x/telemetry", payload, 60)
        alarm = wire.alarm_record(1.7e9, 21, "overtemp", 0, 2, True, 95.0, 90.0)
        good = wire.encode_batch("bike-x", [(1, body), (2, alarm), (4, body)])
        publish_once(mosquitto.host, mosquitto.port, "ebike/v1/bike-x/telemetry", good, 60)
        assert acks.wait(lambda: acks.got.get("bike-x"), 20), log.read_text()
        assert acks.got == {"bike-x": [[1, 2], [4, 4]]}, "only the good batch is acknowledged"
        assert log.read_text().count("refused, not acknowledged") == 2
    finally:
        acks.sub.close()
        stop(proc)
    assert proc.returncode != 0, "a consumer that refused batches says so as it exits"
    lines = log.read_text().strip().splitlines()
    assert lines[-1] == "error: 2 bad batches received"
    assert json.loads(lines[-2])["bad_batches"] == 2

    table = cli("ingest", "report", "--db", pg_url)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:2] == ["DEVICE", "LAST"] and "ACTIVE ALARMS" in header
    assert row.split()[0] == "bike-x" and "overtemp#0" in row and "1 in 1" in row
    report = json.loads(cli("ingest", "report", "--db", pg_url, "--json").stdout)["devices"]["bike-x"]
    assert (report["records"], report["last"], report["gaps"], report["duplicates"]) == (3, 4, [[3, 3]], 0)
    assert report["active_alarms"] == [{"name": "overtemp", "instance": 0, "level": 2}]


def test_report_reads_a_sqlite_store_and_refuses_a_missing_one(tmp_path: Path) -> None:
    db = tmp_path / "cloud.sqlite"
    missing = cli("ingest", "report", "--db", str(db))
    assert missing.returncode != 0 and "no such SQLite database" in missing.stderr, missing.stderr
    assert not db.exists(), "a report must not make the database it reads"
    from agent.fleet.ingest import Ingest

    store = Ingest(str(db))
    body = wire.window_record(1.7e9, 1.0, [(SIG, 4, 1.0, 2.0, 1.5, 2.0, None)])
    alarm = wire.alarm_record(1.7e9, 21, "undervolt", 1, 3, True, 30.0, 33.0)
    store.handle("ebike/v1/bike-s/telemetry", wire.encode_batch("bike-s", [(1, body), (2, alarm), (5, body)]))
    store.close()
    table = cli("ingest", "report", "--db", str(db))
    assert table.returncode == 0, table.stderr
    row = table.stdout.splitlines()[1].split()
    assert row[0] == "bike-s" and "undervolt#1" in row and "2 in 1" in table.stdout.splitlines()[1]
    assert table.stdout.splitlines()[-1] == "1 devices, 3 records, 2 missing without an announcement"
