"""devtools/fleet.py, the fleet load generator, against a real broker and real consumers
(``ebike-agent ingest`` processes storing into SQLite): what it reports must be true, and
each of its checks (unacked, lost, stored twice) must be able to fail."""

from __future__ import annotations

import concurrent.futures
import json
import math
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.fleet.ingest import Ingest
from devtools import fleet
from devtools.broker import Mosquitto
from tests.helpers import REPO, start_ingest, stop

DEVICES = 50


def prefix() -> str:
    """Device ids of the test's own: the broker is shared with other tests."""
    return f"t{uuid.uuid4().hex[:6]}-"


def assert_latencies(report: dict[str, Any]) -> None:
    p50, p99, top = report["ack_latency_p50_s"], report["ack_latency_p99_s"], report["ack_latency_max_s"]
    assert all(isinstance(x, float) and math.isfinite(x) for x in (p50, p99, top)), report
    assert 0 <= p50 <= p99 <= top, report


def test_fleet_through_a_consumer_loses_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """50 devices for 5 s through one SQLite consumer, from the command line: every
    record acked and stored once, and stored as what it is (a window of 21 signals, in
    fixed point); exit 0."""
    db, log = tmp_path / "cloud.sqlite", tmp_path / "ingest.log"
    consumer = start_ingest(mosquitto.address, db, log)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "devtools.fleet", "--broker", mosquitto.address, "--devices", str(DEVICES),
             "--duration", "5", "--connections", "5", "--device-prefix", prefix(), "--db", str(db), "--json"],
            cwd=REPO, capture_output=True, timeout=60, check=False)
    finally:
        assert stop(consumer) == 0, log.read_text()
    assert out.returncode == 0, out.stderr.decode()
    report = json.loads(out.stdout)
    assert report["devices"] == DEVICES and report["connections"] == 5
    assert report["records_sent"] == DEVICES * 5 == report["records_acked"]
    assert report["unacked"] == 0 and report["lost"] == 0 and report["stored_twice"] == 0
    assert report["publishes"] == report["records_sent"] + report["resends"]
    assert report["bad_acks"] == 0 and report["disconnects"] == 0
    assert report["acked_per_s"] > 0 and report["behind_s"] is not None
    assert_latencies(report)
    with sqlite3.connect(db) as c:
        kinds = c.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall()
        signals = c.execute("SELECT count(DISTINCT signal), count(*) FROM window_signals").fetchone()
    assert kinds == [("win", DEVICES * 5)]
    assert signals == (len(fleet.DECIMALS), DEVICES * 5 * len(fleet.DECIMALS))


def test_late_consumer_is_caught_up_by_resends(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The devices publish for 2 s before any consumer listens (the broker keeps nothing
    for no one): those batches go again after the ack timeout, and nothing is lost."""
    db, log = tmp_path / "cloud.sqlite", tmp_path / "ingest.log"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(fleet.run, mosquitto.host, mosquitto.port, devices=DEVICES, duration=5.0,
                             connections=4, ack_timeout=1.0, drain_timeout=15.0, db=str(db), device_prefix=prefix())
        time.sleep(2.0)
        consumer = start_ingest(mosquitto.address, db, log)
        try:
            report = future.result(timeout=60)
        finally:
            assert stop(consumer) == 0, log.read_text()
    assert report["resends"] >= DEVICES, report  # at least the first second's batches
    assert report["records_acked"] == report["records_sent"] == DEVICES * 5 and report["unacked"] == 0
    assert report["ack_latency_max_s"] >= 1.0, report  # the first records waited for the consumer
    assert_latencies(report)
    assert report["lost"] == 0 and report["stored_twice"] == 0


def test_a_consumer_that_does_not_ack_fails_the_run(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """``--no-ack``: everything is stored but nothing acknowledged, so the generator
    resends until its drain ends and reports every record unacked; exit 1."""
    db, log = tmp_path / "cloud.sqlite", tmp_path / "ingest.log"
    consumer = start_ingest(mosquitto.address, db, log, "--no-ack")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "devtools.fleet", "--broker", mosquitto.address, "--devices", "10",
             "--duration", "2", "--connections", "2", "--ack-timeout", "1", "--drain-timeout", "1.5",
             "--device-prefix", prefix(), "--db", str(db), "--json"],
            cwd=REPO, capture_output=True, timeout=60, check=False)
    finally:
        assert stop(consumer) == 0, log.read_text()
    assert out.returncode == 1, out.stderr.decode()
    report = json.loads(out.stdout)
    assert report["unacked"] == report["records_sent"] == 20 and report["records_acked"] == 0
    assert report["resends"] > 0 and report["ack_latency_p50_s"] is None and report["drain_s"] is None
    assert report["lost"] == 0 and report["stored_twice"] == 0


def test_store_check_counts_lost_and_extra_records(tmp_path: Path) -> None:
    """The store check, exactly, on a real consumer database: rows taken out are lost,
    rows never sent are stored twice, a device with no row lost all it sent."""
    db = tmp_path / "cloud.sqlite"
    store = Ingest(str(db))
    store.db.executemany("INSERT INTO records VALUES (?, ?, 'win', 0, x'')",
                         [(dev, seq) for dev in ("x-0001", "x-0002") for seq in range(1, 11)])
    store.db.commit()
    store.close()
    assert fleet.check_store(fleet._stored(str(db)), {"x-0001": 10, "x-0002": 10}) == (0, 0)
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM records WHERE device='x-0001' AND seq IN (1, 4, 5, 10)")
        c.execute("INSERT INTO records VALUES ('x-0002', 12, 'win', 0, x'')")
    report = fleet._stored(str(db))
    assert fleet.check_store(report, {"x-0001": 10, "x-0002": 10, "x-0003": 3}) == (4 + 3, 1)
    assert fleet.check_store(report, {"x-0001": 10, "x-0002": 8}) == (4, 3)  # 9, 10 and 12 were never sent
    # A store without the unique key: a number stored twice is one row too many.
    doubled = {"devices": {"a": {"records": 11, "first": 1, "last": 10}}, "gaps": {}}
    assert fleet.check_store(doubled, {"a": 10}) == (0, 1)
    # A run refuses a store that already holds its devices (before connecting): a row of
    # an earlier run would pass for one of this run and hide a loss.
    with pytest.raises(ConfigError, match="already holds records of 2 of these devices"):
        fleet.run("127.0.0.1", 1, devices=2, device_prefix="x-", db=str(db))
