"""The data budget end to end, all real: the simulator on ptys, the agent process with a
budget far too small for a ride, mosquitto and the reference consumer. The agent steps
down to the last level (its status says so, its windows reach the cloud merged), and
every alarm it raised or cleared still reaches the cloud."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.uplink.budget import EVAL_S, LEVELS, LIVE_FACTOR
from devtools.broker import Mosquitto
from tests.helpers import spawn, stop, wait_all_stored, wait_for
from tests.test_e2e import DEVICE, agent_config, start_consumer_and_sim
from tests.test_e2e_sources import status_now

SPEEDUP = 5
# Long enough for the agent to climb every level (one step per EVAL_S) before the fault.
RIDE_S = 300
FAULT_AT_S = 200
TINY_MB = 0.01
LOGGED_ALARM = re.compile(r"alarm (\w+)(?: \(source [^)]*\))? level \d (raised|cleared)")


def _cloud(db: Path, kind: str) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT body FROM records WHERE device=? AND kind=? ORDER BY seq", (DEVICE, kind)).fetchall()
    return [cbor2.loads(body) for (body,) in rows]


@pytest.mark.e2e
def test_a_tiny_budget_degrades_the_agent_and_every_alarm_still_arrives(tmp_path: Path,
                                                                        mosquitto: Mosquitto) -> None:
    db = tmp_path / "cloud.sqlite"
    agent_log = tmp_path / "agent.log"
    consumer, sim = start_consumer_and_sim(tmp_path, mosquitto, "e2e-budget-ingest", [
        "--scenario", "controller-fault", "--fault-at", str(FAULT_AT_S), "--speed", str(SPEEDUP),
        "--duration", str(RIDE_S), "--seed", "11"])
    config = agent_config(tmp_path, mosquitto, sim_speed=SPEEDUP,
                          extra=f"[uplink]\nbudget_mb_per_month = {TINY_MB}\n")
    agent = None
    levels: list[int] = []
    text = ""
    try:
        agent = spawn(["agent", "run", "--config", str(config)], agent_log)

        def watch() -> bool:
            st = status_now(tmp_path / "control.sock")
            if st is not None and (not levels or st["budget"]["level"] != levels[-1]):
                levels.append(st["budget"]["level"])
            return bool(levels) and levels[-1] == len(LEVELS) - 1

        wait_for("the agent to reach the last level", watch, (len(LEVELS) + 1) * EVAL_S + 30, interval=0.2)
        st = status_now(tmp_path / "control.sock")
        assert st is not None
        budget = st["budget"]
        assert budget["budget_mb"] == TINY_MB and budget["used_mb"] > 0 and budget["pace_mb"] > TINY_MB
        assert budget["meaning"].startswith(LEVELS[-1][3]) and budget["raw_enabled"] is False
        assert budget["live_merged"] == LIVE_FACTOR
        text = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(config)],
                              capture_output=True, text=True, timeout=30).stdout
        wait_for("the simulated ride to end", lambda: sim.poll() is not None, RIDE_S / SPEEDUP + 60, interval=0.2)
        assert sim.returncode == 0
        assert stop(agent) == 0, agent_log.read_text()
        with sqlite3.connect(tmp_path / "outbox.sqlite") as c:
            saved = dict(c.execute("SELECT key, value FROM kernel_state").fetchall())
        wait_all_stored(db, tmp_path / "outbox.sqlite")
    finally:
        for proc in (sim, agent, consumer):
            if proc is not None:
                stop(proc)

    assert levels == list(range(levels[0], len(LEVELS))), f"levels seen {levels}: one step at a time"
    assert "DATA BUDGET" in text and f"of {TINY_MB * 1e3:.1f} kB" in text and f"level {len(LEVELS) - 1}:" in text, text
    assert saved["budget.used"] >= budget["used_mb"] * 1e6, "the month's count is kept in the outbox"
    logged = sorted((name, how == "raised") for name, how in LOGGED_ALARM.findall(agent_log.read_text()))
    alarms = sorted((a["name"], a["on"]) for a in _cloud(db, "alm"))
    assert ("controller_fault", True) in logged and ("controller_fault", False) in logged
    assert alarms == logged, "an alarm the agent raised or cleared is missing in the cloud"
    assert _cloud(db, "snap"), "the fault's event capture is never withheld"
    lengths = {w["d"] for w in _cloud(db, "win")}
    assert 1000 in lengths and 1000 * LIVE_FACTOR in lengths, lengths
    report = json.loads((tmp_path / "ingest.log").read_text().strip().splitlines()[-1])
    assert report["gaps"] == {} and report["bad_batches"] == 0
    assert "Traceback" not in agent_log.read_text()
