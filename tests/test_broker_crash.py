"""The broker crashes mid-stream: SIGKILL, so whatever it PUBACKed but had not delivered
is gone with it (persistence off, as good as mosquitto's default 30-minute autosave).
The real agent rides the simulator with ack = "cloud" (the default) and the reference
consumer stores what arrives; the consumer stalls for a moment before the crash, so the
broker holds acknowledged batches it never delivers; the broker comes back on the same
port, and:

- nothing is lost end to end: every record the agent committed reaches the consumer,
  which drops the duplicates the resends bring (sequence numbers 1..last, once each);
- live data first: the first record the consumer stores after the restart is the newest
  the agent had when it reconnected, no older than anything committed when the broker
  came back;
- the backlog drains: a clean stop leaves no row in the outbox.

The consumer is let back first (the agent is paused with SIGSTOP while it resubscribes):
a batch published while no one is subscribed goes nowhere and comes back only after
ack_timeout, which proves the resend but says nothing about the order.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

import devtools.broker
from devtools.broker import Mosquitto
from tests.helpers import log_has, spawn, stop, wait_for
from tests.test_power_cut import committed

DEVICE = "crash-bike-1"
SIM_SPEED = 10  # ebike-sim --speed: the agent's rate_scale too


def arrivals(db: Path) -> list[int]:
    """The device's sequence numbers in the order the consumer stored them."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY rowid", (DEVICE,))]


def agent_config(tmp_path: Path, broker: Mosquitto) -> Path:
    """The simulator's SLCAN and NMEA ptys in tmp_path, commits every 0.2 s, resends after 2 s."""
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "{DEVICE}"\ncontrol_socket = "control.sock"\n'
                      f'[[sources]]\nname = "gnss"\nkind = "uart"\nport = "{tmp_path / "gps"}"\nprotocol = "nmea"\n'
                      f'[[sources]]\nname = "can0"\nkind = "slcan"\nport = "{tmp_path / "can"}"\n'
                      f'protocol = "bafang-can"\n'
                      f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nack_timeout = 2.0\n'
                      f'[outbox]\npath = "outbox.sqlite"\ncommit_interval = 0.2\n[windows]\nlive = 0.25\n'
                      f'[fusion]\nrate_scale = {SIM_SPEED}\n')
    return config


@pytest.mark.e2e
def test_broker_sigkill_loses_nothing_and_live_data_goes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(str(workdir)).start()
    cloud_db, outbox = tmp_path / "cloud.sqlite", tmp_path / "outbox.sqlite"
    ingest_log = tmp_path / "ingest.log"
    consumer = spawn(["agent", "ingest", "--broker", broker.address, "--db", str(cloud_db),
                      "--client-id", f"crash-ingest-{os.getpid()}"], ingest_log)
    sim = spawn(["firmware_sim", "--slcan", str(tmp_path / "can"), "--nmea", str(tmp_path / "gps"),
                 "--speed", str(SIM_SPEED), "--duration", "3600", "--wait-open", "60"], tmp_path / "sim.log")
    agent = None
    try:
        wait_for("the consumer to subscribe", lambda: log_has(ingest_log, "subscribed to"), 20)
        wait_for("the simulator's ptys", lambda: log_has(tmp_path / "sim.log", "ready"), 20)
        agent = spawn(["agent", "run", "--config", str(agent_config(tmp_path, broker))], tmp_path / "agent.log")
        wait_for("records at the consumer", lambda: len(arrivals(cloud_db)) >= 20, 30)

        assert broker.proc is not None
        consumer.send_signal(signal.SIGSTOP)  # a busy consumer: the broker queues what it PUBACKs
        try:
            queued = committed(outbox)[0]
            wait_for("batches the broker acknowledged and holds", lambda: committed(outbox)[0] >= queued + 10, 30)
            broker.proc.kill()  # SIGKILL mid-stream: what it held is gone
            broker.proc.wait(5)
        finally:
            consumer.send_signal(signal.SIGCONT)
        at_kill = committed(outbox)[0]
        wait_for("a backlog to build up while the broker is down", lambda: committed(outbox)[0] >= at_kill + 20, 30)

        # The consumer may still be storing what it had read before the crash: only once
        # that has settled does "the first record after the restart" mean anything.
        settled = [len(arrivals(cloud_db))]
        wait_for("the consumer to store what it had read before the crash",
                 lambda: settled.append(len(arrivals(cloud_db))) or settled[-1] == settled[-2], 30, interval=1.0)
        agent.send_signal(signal.SIGSTOP)
        try:
            seen_before = len(arrivals(cloud_db))
            back_at = committed(outbox)[0]
            port = broker.port
            monkeypatch.setattr(devtools.broker, "free_port", lambda: port)
            broker.start()
            wait_for("the consumer to subscribe again",
                     lambda: ingest_log.read_text().count("subscribed to") >= 2, 20)
        finally:
            agent.send_signal(signal.SIGCONT)
        wait_for("records after the restart", lambda: len(arrivals(cloud_db)) > seen_before, 30)
        first_after = arrivals(cloud_db)[seen_before]
        assert first_after >= back_at, \
            f"the first record after the restart was {first_after}, backlog before {back_at}: not live data first"

        assert stop(agent) == 0, (tmp_path / "agent.log").read_text()
        agent = None
        last, left = committed(outbox)
        assert left == 0, "the backlog did not drain"
        wait_for("the consumer to hold every committed record", lambda: len(set(arrivals(cloud_db))) >= last, 30)
    finally:
        for proc in (agent, sim, consumer):
            if proc is not None:
                stop(proc)
        broker.stop()
    assert sorted(arrivals(cloud_db)) == list(range(1, last + 1)), "a record was lost or stored twice"
    assert last > back_at > at_kill
