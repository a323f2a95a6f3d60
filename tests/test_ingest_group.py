"""Consumers of one shared subscription on PostgreSQL, under fire: the fleet generator's
virtual devices (devtools/fleet.py) through the real broker, consumers SIGKILLed and
restarted, the database crashed and restarted mid-stream. Every record is stored exactly
once, none is lost, and the database's report shows no gap no device announced."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from devtools import fleet
from devtools.broker import Mosquitto
from devtools.postgres import Postgres
from tests.helpers import REPO, log_has, start_ingest, stop


def init(url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "ingest", "--init", "--db", url], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def start_consumer(broker: Mosquitto, url: str, log: Path) -> subprocess.Popen[bytes]:
    return start_ingest(broker.address, url, log, "--group", "cloud")


def run_fleet(broker: Mosquitto, url: str, out: dict[str, Any], **kw: Any) -> threading.Thread:
    """The generator in a thread (the test meanwhile kills things): its report in ``out``."""
    def go() -> None:
        try:
            out["report"] = fleet.run(broker.host, broker.port, db=url, **kw)
        except Exception as e:  # noqa: BLE001 - handed to the test thread, which fails with it
            out["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def db_report(url: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "agent", "ingest", "report", "--db", url, "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    devices: dict[str, Any] = json.loads(done.stdout)["devices"]
    return devices


def check(out: dict[str, Any], url: str, devices: int) -> dict[str, Any]:
    assert "error" not in out, out.get("error")
    report = out["report"]
    assert report["unacked"] == 0, report
    assert (report["lost"], report["stored_twice"]) == (0, 0), report
    stored = db_report(url)
    assert len(stored) == devices
    assert all(v["gaps"] == [] and v["first"] == 1 and v["records"] == v["last"] for v in stored.values())
    assert sum(v["records"] for v in stored.values()) == report["records_sent"]
    return report


def test_three_consumers_one_killed_every_few_seconds(tmp_path: Path, mosquitto: Mosquitto, pg_url: str) -> None:
    init(pg_url)
    rng = random.Random(19)
    logs = [tmp_path / f"consumer{i}.log" for i in range(3)]
    procs = [start_consumer(mosquitto, pg_url, log) for log in logs]
    out: dict[str, Any] = {}
    kills = 0
    try:
        thread = run_fleet(mosquitto, pg_url, out, devices=200, rate=2.0, duration=20.0, connections=4,
                           ack_timeout=2.0, drain_timeout=40.0, device_prefix="group-")
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline - 2:
            time.sleep(rng.uniform(1.5, 3.0))
            i = rng.randrange(3)
            procs[i].send_signal(signal.SIGKILL)
            procs[i].wait(10)
            kills += 1
            logs[i] = tmp_path / f"consumer{i}-{kills}.log"
            procs[i] = start_consumer(mosquitto, pg_url, logs[i])
        thread.join(90)
        assert not thread.is_alive(), "the generator did not finish"
    finally:
        for proc in procs:
            stop(proc)
    assert kills >= 5
    report = check(out, pg_url, 200)
    assert report["resends"] > 0, "no kill cost a batch its ack: the test proved nothing"


def test_a_database_crash_mid_stream_acknowledges_nothing_uncommitted(tmp_path: Path,
                                                                       mosquitto: Mosquitto) -> None:
    """PostgreSQL SIGKILLed (its uncommitted transactions gone) and restarted on the same
    port: had a consumer acknowledged a record before its COMMIT, the device would never
    send it again and it would be missing."""
    with Postgres() as pg:
        init(pg.dsn)
        logs = [tmp_path / f"consumer{i}.log" for i in range(2)]
        procs = [start_consumer(mosquitto, pg.dsn, log) for log in logs]
        out: dict[str, Any] = {}
        try:
            thread = run_fleet(mosquitto, pg.dsn, out, devices=100, rate=2.0, duration=12.0, connections=4,
                               ack_timeout=2.0, drain_timeout=40.0, device_prefix="crash-")
            time.sleep(4.0)
            pg.kill()
            time.sleep(2.0)
            pg.start()
            thread.join(90)
            assert not thread.is_alive(), "the generator did not finish"
            assert any(log_has(log, "nothing is acknowledged until it is back") for log in logs)
            assert any(log_has(log, "reachable again") for log in logs)
            # A consumer that cannot store leaves the group (the others take its share) and joins again.
            left = [log for log in logs if log_has(log, "left $share/cloud/")]
            assert left and all(log.read_text().count("subscribed to") >= 2 for log in left)
            assert all(proc.poll() is None for proc in procs), "a consumer died with the database"
        finally:
            for proc in procs:
                stop(proc)
        check(out, pg.dsn, 100)
