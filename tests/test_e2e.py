"""The first path, all real: simulator on ptys -> agent (pyserial, SLCAN, DBC, kernel,
SQLite outbox) -> mosquitto -> reference consumer, with the manifest as ground truth."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import wire
from agent.fleet.subscriber import Subscriber
from agent.signals import signal_id
from devtools.broker import Mosquitto
from tests.conftest import WIRE_CDDL, WireSchema
from tests.helpers import log_has, spawn, stop, wait_for

SPEED = signal_id("Vehicle.Speed")
VOLTAGE = signal_id("Vehicle.Powertrain.TractionBattery.CurrentVoltage")
LATITUDE = signal_id("Vehicle.CurrentLocation.Latitude")
DEVICE = "e2e-bike-1"
RIDE_S = 120
SPEEDUP = 20


def agent_config(tmp: Path, broker: Mosquitto, device: str = DEVICE, sources: str = "", extra: str = "",
                 sim_speed: float = 1.0) -> Path:
    """GNSS first: the ride starts when the SLCAN channel opens, and pyserial flushes a
    port's input on open, so a receiver opened later would lose its first sentences.
    ``sources``: more [[sources]] tables; ``extra``: more tables after [outbox];
    ``sim_speed``: the simulator's --speed (the rates values may change at scale with it)."""
    path = tmp / "agent.toml"
    path.write_text(f"""
device_id = "{device}"
control_socket = "control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "{tmp / 'gps'}"
protocol = "nmea"
baudrate = 9600

[[sources]]
name = "can0"
kind = "slcan"
port = "{tmp / 'can'}"
protocol = "bafang-can"
bitrate = 250000
{sources}
[broker]
host = "{broker.host}"
port = {broker.port}

[outbox]
path = "outbox.sqlite"
commit_interval = 0.5

[fusion]
rate_scale = {sim_speed}
{extra}""")
    return path


def _buffer_stats(tmp: Path) -> dict[str, Any] | None:
    out = subprocess.run([sys.executable, "-m", "agent", "buffer", "stats", "--json", "--config",
                          str(tmp / "agent.toml")], capture_output=True, text=True, timeout=30)
    stats: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {}
    return stats if stats.get("source") == "agent" else None


def manifest_series(manifest: Path, name: str) -> list[float]:
    """The values of one signal in the order the simulator delivered them."""
    out = []
    for line in manifest.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "frame" and name in rec["values"]:
            out.append(float(rec["values"][name]))
    return out


def windows(db: Path, signal: int) -> list[tuple[int, float, float, float]]:
    """The live (1 s) windows of ``signal``; the 60 s history windows summarise the same samples."""
    with sqlite3.connect(db) as c:
        return c.execute("SELECT count, min, max, mean FROM window_signals WHERE device=? AND signal=? "
                         "AND dur_ms=1000 ORDER BY seq", (DEVICE, signal)).fetchall()


def assert_windows_match(series: list[float], rows: list[tuple[int, float, float, float]], resolution: float) -> None:
    """The windows, in order, partition the delivered series exactly: nothing lost or
    repeated, and each window's min/max/mean is that of its slice within resolution."""
    pos = 0
    for count, vmin, vmax, mean in rows:
        chunk = series[pos:pos + count]
        assert len(chunk) == count
        assert vmin == pytest.approx(min(chunk), abs=resolution / 2)
        assert vmax == pytest.approx(max(chunk), abs=resolution / 2)
        assert mean == pytest.approx(sum(chunk) / count, abs=resolution / 2)
        pos += count
    assert pos == len(series), f"{len(series) - pos} delivered values never reached the cloud"


def start_consumer_and_sim(tmp: Path, broker: Mosquitto, client_id: str,
                           sim_args: list[str]) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The reference consumer (``tmp``/cloud.sqlite, ingest.log) subscribed, and the
    simulator's SLCAN and NMEA ptys (``tmp``/can, gps; sim.log) ready for the agent."""
    consumer = spawn(["agent", "ingest", "--broker", broker.address, "--db", str(tmp / "cloud.sqlite"),
                      "--client-id", client_id], tmp / "ingest.log")
    sim = spawn(["firmware_sim", "--slcan", str(tmp / "can"), "--nmea", str(tmp / "gps"), *sim_args,
                 "--wait-open", "60", "--linger", "2"], tmp / "sim.log")
    wait_for("the consumer to subscribe", lambda: log_has(tmp / "ingest.log", "subscribed to"), 20)
    wait_for("the simulator's ptys", lambda: log_has(tmp / "sim.log", "ready"), 20)
    return consumer, sim


@pytest.mark.e2e
def test_ride_from_simulator_to_cloud(tmp_path: Path, mosquitto: Mosquitto) -> None:
    schema = WireSchema(WIRE_CDDL)
    payloads: list[bytes] = []
    raw = Subscriber("e2e-raw", mosquitto.host, mosquitto.port, f"ebike/v1/{DEVICE}/telemetry",
                     lambda topic, payload: payloads.append(payload))
    raw.connect()
    done = threading.Event()
    watcher = threading.Thread(target=lambda: [raw.loop(0.1) for _ in iter(done.is_set, True)], daemon=True)
    watcher.start()

    consumer_db = tmp_path / "cloud.sqlite"
    consumer_log = tmp_path / "ingest.log"
    sim_log = tmp_path / "sim.log"
    agent_log = tmp_path / "agent.log"
    manifest = tmp_path / "manifest.jsonl"
    consumer, sim = start_consumer_and_sim(tmp_path, mosquitto, "e2e-ingest", [
        "--speed", str(SPEEDUP), "--duration", str(RIDE_S), "--seed", "3", "--manifest", str(manifest)])
    agent = None
    try:
        agent = spawn(["agent", "run", "--config", str(agent_config(tmp_path, mosquitto, sim_speed=SPEEDUP))],
                      agent_log)
        live = wait_for("buffer stats from the running agent", lambda: _buffer_stats(tmp_path), 20)
        assert live["source"] == "agent" and "in_flight" in live
        assert wait_for("the simulated ride to end", lambda: sim.poll() is not None, RIDE_S / SPEEDUP + 60,
                        interval=0.2) and sim.returncode == 0, sim_log.read_text()
        assert stop(agent) == 0, agent_log.read_text()
        with sqlite3.connect(tmp_path / "outbox.sqlite") as c:
            (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            (left,) = c.execute("SELECT count(*) FROM records").fetchone()
        committed = next_seq - 1
        assert left == 0, "records left in the outbox after a clean shutdown with the broker up"
        assert committed >= RIDE_S / SPEEDUP, "fewer windows than seconds of riding"

        def received() -> bool:
            with sqlite3.connect(consumer_db) as c:
                return bool(c.execute("SELECT count(*) FROM records").fetchone()[0] == committed)

        wait_for("the consumer to store every record", received, 30, interval=0.2)
    finally:
        for proc in (sim, agent, consumer):
            if proc is not None:
                stop(proc)
        done.set()
        watcher.join(5)
        raw.close()

    with sqlite3.connect(consumer_db) as c:
        seqs = [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY seq", (DEVICE,))]
    assert seqs == list(range(1, committed + 1)), "gap or duplicate in the cloud's sequence numbers"
    report = json.loads(consumer_log.read_text().strip().splitlines()[-1])
    assert report["gaps"] == {} and report["bad_batches"] == 0

    assert payloads, "no telemetry batch seen on the broker"
    for payload in payloads:
        schema.validate_cbor(payload)
    seen: set[int] = set()
    for payload in payloads:
        assert cbor2.loads(payload)[0] == wire.VERSION_DEFLATE, "batches are deflated by default"
        device, records = wire.decode_batch(payload)
        assert device == DEVICE
        seen.update(seq for seq, _ in records)
    assert seen == set(range(1, committed + 1))

    assert_windows_match(manifest_series(manifest, "Vehicle.Speed"), windows(consumer_db, SPEED), 0.01)
    assert_windows_match(manifest_series(manifest, "Vehicle.Powertrain.TractionBattery.CurrentVoltage"),
                         windows(consumer_db, VOLTAGE), 0.01)
    assert_windows_match(manifest_series(manifest, "Vehicle.CurrentLocation.Latitude"),
                         windows(consumer_db, LATITUDE), 1e-6)
    assert "Traceback" not in agent_log.read_text()


