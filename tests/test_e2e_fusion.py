"""Alarms end to end, all real: the simulator injects a controller fault and pulls the GNSS
receiver's plug; the agent process raises and clears the alarms, captures the event, and
the consumer stores alarm, snapshot and history records from mosquitto."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.fusion.spec import ALARM_NAMES
from devtools.broker import Mosquitto
from tests.helpers import log_has, spawn, stop, wait_all_stored, wait_for
from tests.test_e2e import DEVICE, agent_config, start_consumer_and_sim
from tests.test_e2e_sources import status_now

RIDE_S = 60
SPEEDUP = 5


def _records(db: Path, kind: str) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT body FROM records WHERE device=? AND kind=? ORDER BY seq", (DEVICE, kind)).fetchall()
    return [cbor2.loads(body) for (body,) in rows]


@pytest.mark.e2e
def test_fault_alarms_and_snapshot_reach_the_cloud(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "cloud.sqlite"
    consumer_log = tmp_path / "ingest.log"
    sim_log = tmp_path / "sim.log"
    agent_log = tmp_path / "agent.log"
    consumer, sim = start_consumer_and_sim(tmp_path, mosquitto, "e2e-fusion-ingest", [
        "--scenario", "controller-fault+unplug", "--unplug-bus", "nmea", "--speed", str(SPEEDUP),
        "--duration", str(RIDE_S), "--seed", "5", "--manifest", str(tmp_path / "manifest.jsonl")])
    agent = None
    seen_active: set[str] = set()
    try:
        agent = spawn(["agent", "run", "--config", str(agent_config(tmp_path, mosquitto, sim_speed=SPEEDUP))],
                      agent_log)

        def ride_over() -> bool:
            st = status_now(tmp_path / "control.sock")
            seen_active.update(a["name"] for a in (st or {}).get("alarms", []))
            return sim.poll() is not None

        wait_for("the simulated ride to end", ride_over, RIDE_S / SPEEDUP + 60, interval=0.1)
        assert sim.returncode == 0, sim_log.read_text()
        assert stop(agent) == 0, agent_log.read_text()
        wait_all_stored(db, tmp_path / "outbox.sqlite")
    finally:
        for proc in (sim, agent, consumer):
            if proc is not None:
                stop(proc)

    alarms = [(a["name"], a["inst"], a["lvl"], a["on"]) for a in _records(db, "alm")]
    assert ("controller_fault", -1, 2, True) in alarms and ("controller_fault", -1, 2, False) in alarms
    # The GNSS receiver is source 0 in the agent's config: its plug was pulled.
    assert ("communication_lost", 0, 2, True) in alarms and ("communication_lost", 0, 2, False) in alarms
    assert alarms.index(("controller_fault", -1, 2, True)) < alarms.index(("controller_fault", -1, 2, False))
    assert {"controller_fault", "communication_lost"} <= seen_active, "status shows the active alarms"
    fault = next(a for a in _records(db, "alm") if a["name"] == "controller_fault" and a["on"])
    assert fault["v"] == 0x21 and fault["code"] in ALARM_NAMES
    # The first level-2 alarm starts the capture; one raised while it runs is inside it.
    first = min((a for a in _records(db, "alm") if a["on"] and a["lvl"] >= 2), key=lambda a: a["t"])
    parts = [s for s in _records(db, "snap") if (s["t"], s["code"], s["inst"]) == (first["t"], first["code"],
                                                                                   first["inst"])]
    assert parts and sorted(p["part"] for p in parts) == list(range(parts[0]["parts"]))
    assert abs(parts[0]["from"] - (first["t"] - 10000)) <= 1 and abs(parts[0]["to"] - (first["t"] + 5000)) <= 1
    assert sum(len(col[1]) for p in parts for col in p["s"]) > 100
    windows = _records(db, "win")
    assert {w["d"] for w in windows} == {1000, 60000}
    assert "Traceback" not in agent_log.read_text()
    report = json.loads(consumer_log.read_text().strip().splitlines()[-1])
    assert report["gaps"] == {} and report["bad_batches"] == 0


@pytest.mark.e2e
def test_trip_and_energy_carry_on_when_the_agent_restarts(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The agent stops in the middle of a ride and starts again: the fused trip and the
    energy counters go on from where they were (the outbox keeps them), not from zero."""
    sim = spawn(["firmware_sim", "--slcan", str(tmp_path / "can"), "--nmea", str(tmp_path / "gps"),
                 "--scenario", "commute", "--speed", "10", "--duration", "600", "--wait-open", "60"],
                tmp_path / "sim.log")
    config = agent_config(tmp_path, mosquitto, sim_speed=10)
    saved: list[dict[str, float]] = []
    try:
        wait_for("the simulator's ptys", lambda: log_has(tmp_path / "sim.log", "ready"), 20)
        for run_no in range(2):
            log = tmp_path / f"agent{run_no}.log"
            agent = spawn(["agent", "run", "--config", str(config)], log)
            try:
                wait_for("the agent to ride a while", lambda: (status_now(tmp_path / "control.sock") or {}).get(
                    "fusion", {}).get("ticks", 0) > 80, 60, interval=0.1)
            finally:
                assert stop(agent) == 0, log.read_text()
            with sqlite3.connect(tmp_path / "outbox.sqlite") as c:
                saved.append(dict(c.execute("SELECT key, value FROM kernel_state").fetchall()))
    finally:
        stop(sim)
    first, second = saved
    # 8 s of fusion steps (the agent's clock is the wall's) at 20-25 km/h, tens of W on average.
    assert first["trip_km"] > 0.01 and first["energy_out_wh"] > 0.02, first
    assert log_has(tmp_path / "agent1.log", "kernel state restored")
    assert second["trip_km"] > first["trip_km"] + 0.01, "the trip started again from zero"
    assert second["energy_out_wh"] > first["energy_out_wh"] + 0.02, "the energy count started again from zero"
