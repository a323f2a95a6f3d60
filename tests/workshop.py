"""The technician's bench: a running agent fed by the simulated vehicle (GNSS over NMEA,
the controller over SLCAN with the Bafang DBC, a JBD BMS polled over UART) through real
ptys, sending to the real broker, where the reference consumer (``ingest``, cloud.sqlite)
stores and acknowledges what it sends. The technicians' commands are run against it as a
technician would: ``python -m agent ...`` in a subprocess.

    def test_x(workshop: Workshop) -> None:
        out = workshop.cli("status")
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control.client import request
from agent.errors import AgentError
from devtools.broker import Mosquitto
from tests.helpers import REPO, log_has, spawn, stop, wait_for
from tests.test_e2e import agent_config

DEVICE = "workshop-bike-1"
# Long enough for any test of the toolkit; the simulator stops with the fixture.
RIDE_S = 900
SIM_SPEED = 2.0


def workshop_config(tmp: Path, broker: Mosquitto, extra: str = "") -> Path:
    """The bench's agent.toml in ``tmp`` (ptys gps, can, bms there); ``extra``: tables appended."""
    bms = f"""
[[sources]]
name = "bms"
kind = "uart"
port = "{tmp / 'bms'}"
protocol = "jbd"
baudrate = 9600
poll_interval = 0.5
"""
    return agent_config(tmp, broker, DEVICE, sources=bms, extra=extra, sim_speed=SIM_SPEED)


class Workshop:
    """The simulator and the agent, started and stopped by the ``workshop`` fixture."""

    def __init__(self, tmp: Path, broker: Mosquitto, scenario: str = "commute", extra: str = "",
                 sim_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.broker = broker
        self.config = workshop_config(tmp, broker, extra)
        self.socket = tmp / "control.sock"
        self.outbox = tmp / "outbox.sqlite"
        self.log = tmp / "agent.log"
        self.sim = spawn(["firmware_sim", "--slcan", str(tmp / "can"), "--nmea", str(tmp / "gps"),
                          "--jbd", str(tmp / "bms"), "--scenario", scenario, "--duration", str(RIDE_S),
                          "--speed", str(SIM_SPEED), "--manifest", str(tmp / "manifest.jsonl"),
                          "--wait-open", "60", "--linger", "2", *sim_args], tmp / "sim.log")
        self.consumer = spawn(["agent", "ingest", "--broker", broker.address, "--db", str(tmp / "cloud.sqlite"),
                               "--client-id", f"workshop-{tmp.name}"], tmp / "ingest.log")
        self.agent: subprocess.Popen[bytes] | None = None
        wait_for("the simulator's ptys", lambda: log_has(tmp / "sim.log", "ready"), 20)
        wait_for("the consumer to subscribe", lambda: log_has(tmp / "ingest.log", "subscribed to"), 20)

    def start_agent(self, env: dict[str, str] | None = None) -> None:
        """``ebike-agent run`` on the bench's configuration (``env``: more environment),
        once every source reads frames."""
        self.agent = spawn(["agent", "run", "--config", str(self.config)], self.log, env=env)
        wait_for("the agent to read every source", self._all_sources_heard, 30, interval=0.1)

    def stop_agent(self) -> int:
        """SIGTERM the agent and wait; its exit code."""
        assert self.agent is not None
        rc = stop(self.agent)
        self.agent = None
        return rc

    def _all_sources_heard(self) -> bool:
        try:
            st = request(str(self.socket))["status"]
        except AgentError:
            return False
        heard = {row["source"] for row in st["health"]}
        return heard == {s["name"] for s in st["sources"]}

    def status(self) -> dict[str, object]:
        status: dict[str, object] = request(str(self.socket))["status"]
        return status

    def cli(self, *args: str, timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m agent ARGS`` as a technician runs it (not a terminal: stdout piped)."""
        return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        if self.agent is not None:
            self.stop_agent()
        stop(self.sim)
        stop(self.consumer)


@pytest.fixture
def workshop(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Workshop]:
    """The bench with its agent running; stopped afterwards (agent first)."""
    bench = Workshop(tmp_path, mosquitto)
    try:
        bench.start_agent()
        yield bench
    finally:
        bench.close()


@pytest.fixture
def workshop_down(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Workshop]:
    """The bench with the simulator running and no agent (``start_agent`` starts it)."""
    bench = Workshop(tmp_path, mosquitto)
    try:
        yield bench
    finally:
        bench.close()
