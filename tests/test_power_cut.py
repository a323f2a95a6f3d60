"""Pull the plug: SIGKILL the agent at random moments during a simulated ride, restart it
each time, and check that every record it ever committed reaches the cloud exactly once,
with no gap in the sequence numbers (they survive restarts and are never reused).

``make test`` cuts 20 times; ``make soak`` sets EBIKE_POWER_CUTS=200.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from devtools.broker import Mosquitto
from tests.helpers import log_has, spawn, stop, wait_for

CUTS = int(os.environ.get("EBIKE_POWER_CUTS", "20"))
DEVICE = "cut-bike-1"
SIM_SPEED = 10  # ebike-sim --speed: the agent's rate_scale too


def committed(outbox: Path) -> tuple[int, int]:
    """(last sequence number ever committed, rows still in the outbox)."""
    with sqlite3.connect(outbox) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        (left,) = c.execute("SELECT count(*) FROM records").fetchone()
    return int(next_seq) - 1, int(left)


def stored(db: Path) -> list[int]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY seq", (DEVICE,))]


@pytest.mark.e2e
def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = random.Random(20261121)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
device_id = "{DEVICE}"
control_socket = "control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "{tmp_path / 'gps'}"
protocol = "nmea"

[[sources]]
name = "can0"
kind = "slcan"
port = "{tmp_path / 'can'}"
protocol = "bafang-can"

[broker]
host = "{mosquitto.host}"
port = {mosquitto.port}
ack_timeout = 2.0

[outbox]
path = "outbox.sqlite"
commit_interval = 0.2

[windows]
live = 0.25

[fusion]
rate_scale = {SIM_SPEED}
""")
    cloud_db, outbox = tmp_path / "cloud.sqlite", tmp_path / "outbox.sqlite"
    consumer = spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", str(cloud_db),
                      "--client-id", f"cut-ingest-{os.getpid()}"], tmp_path / "ingest.log")
    sim = spawn(["firmware_sim", "--slcan", str(tmp_path / "can"), "--nmea", str(tmp_path / "gps"),
                 "--speed", str(SIM_SPEED), "--duration", "3600", "--wait-open", "60"], tmp_path / "sim.log")
    agent = None
    try:
        wait_for("the consumer to subscribe", lambda: log_has(tmp_path / "ingest.log", "subscribed to"), 20)
        wait_for("the simulator's ptys", lambda: log_has(tmp_path / "sim.log", "ready"), 20)
        for cut in range(CUTS):
            agent = spawn(["agent", "run", "--config", str(config)], tmp_path / f"agent{cut}.log")
            # A random moment: during start-up, the adapter handshake, or mid-ride between
            # and during group commits.
            time.sleep(rng.uniform(0.3, 1.5))
            assert agent.poll() is None, (tmp_path / f"agent{cut}.log").read_text()
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
        agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent-final.log")
        first = committed(outbox)[0] if outbox.exists() else 0
        # Enough records to say anything, and some of them committed after the last restart:
        # how many the cuts left depends on how fast this machine brought the agent up.
        wait_for("records committed after the last restart",
                 lambda: committed(outbox)[0] > max(first, CUTS), 60)
        assert stop(agent) == 0, (tmp_path / "agent-final.log").read_text()
        agent = None
        last, left = committed(outbox)
        assert left == 0, "a clean stop with the consumer up left rows behind"
        wait_for("the cloud to hold every committed record", lambda: len(stored(cloud_db)) >= last, 30)
    finally:
        for proc in (agent, sim, consumer):
            if proc is not None:
                stop(proc)
    assert last >= CUTS, "too few records to say anything"
    assert stored(cloud_db) == list(range(1, last + 1)), "gap or duplicate after power cuts"
