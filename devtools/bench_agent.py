"""``make bench``'s agent figures: CPU and memory of the real agent process on a
saturated CAN bus.

All of it real, on this machine: a private mosquitto on a free loopback port, the
reference consumer acknowledging what it stores (so the outbox runs as in the field,
``ack = "cloud"``), the simulator on ptys at ``--speed 1`` (Bafang CAN through its SLCAN
adapter at 1 Mbit/s padded with ``--can-fill``, NMEA at 5 Hz, a JBD BMS answering the
agent's polls once a second) and ``ebike-agent run`` with its outbox on a real file.

Once the agent decodes CAN frames, and after a warm-up, CPU (user + sys of all its
threads, /proc/<pid>/stat) is taken over a steady interval; RSS (VmRSS, /proc/<pid>/status,
in MiB) at its end. The frames its kernel decoded over the same interval (the control
socket's status, as ``ebike-agent status`` shows it) are the CAN rate it really received.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

from agent.control.client import request
from agent.errors import AgentError
from devtools.broker import Mosquitto
from devtools.procs import log_has, spawn, stop, wait_for

CAN_BITRATE = 1_000_000
CPU_GOAL_PCT = 5.0
RSS_GOAL_MB = 35.0
START_LIMIT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class AgentBenchError(Exception):
    """A process did not come up, or the agent died while measured; the message ends
    with the processes' logs."""


CONFIG = """\
device_id = "bench-bike"
control_socket = "control.sock"
sources = [
  {{ name = "can0", kind = "slcan", port = "{run}/can", protocol = "bafang-can", bitrate = {bitrate} }},
  {{ name = "bms", kind = "uart", port = "{run}/bms", protocol = "jbd", baudrate = 9600, poll_interval = 1.0 }},
  {{ name = "gnss", kind = "uart", port = "{run}/gps", protocol = "nmea", baudrate = 9600 }},
]
broker = {{ host = "{host}", port = {port} }}
outbox = {{ path = "outbox.sqlite" }}
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far (fields 14 and 15 of
    /proc/<pid>/stat; split after the command name, which may hold blanks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` now, MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AgentBenchError(f"no VmRSS for pid {pid} (has it exited?)")


def _status(sock: Path) -> dict[str, Any]:
    """The agent's status from its control socket (what ``ebike-agent status --json`` prints)."""
    st: dict[str, Any] = request(str(sock))["status"]
    return st


def _decoding(agent: Popen[bytes], sock: Path) -> bool:
    """Whether the agent is up and its kernel decodes CAN frames; fails if it exited."""
    if agent.poll() is not None:
        raise AgentBenchError(f"the agent exited with {agent.returncode}")
    try:
        return int(_status(sock)["fusion"]["frames"]) > 0
    except AgentError:
        return False


def _uart_frames(st: dict[str, Any]) -> int:
    """Frames the UART sources (NMEA, JBD) decoded."""
    return sum(s["decode"].get("frames", 0) for s in st["sources"])


def _measure(agent: int, sim: int, sock: Path, seconds: float) -> dict[str, Any]:
    """CPU of the agent (and of the simulator feeding it) over ``seconds``, RSS at the end,
    and the rates the agent decoded in that time."""
    st0 = _status(sock)
    s0 = time.monotonic()
    cpu0, sim0, w0 = cpu_seconds(agent), cpu_seconds(sim), time.monotonic()
    time.sleep(seconds)
    cpu1, sim1, w1 = cpu_seconds(agent), cpu_seconds(sim), time.monotonic()
    rss = rss_mb(agent)
    st1 = _status(sock)
    s1 = time.monotonic()
    return {
        "cpu_pct": 100.0 * (cpu1 - cpu0) / (w1 - w0), "rss_mb": rss, "interval_s": w1 - w0,
        "can_frames_per_s": (st1["fusion"]["frames"] - st0["fusion"]["frames"]) / (s1 - s0),
        "uart_frames_per_s": (_uart_frames(st1) - _uart_frames(st0)) / (s1 - s0),
        "status_frames_per_s": st1["frames_per_s"], "kernel": st1["kernel"],
        "bad_lines": st1["fusion"]["bad_lines"] - st0["fusion"]["bad_lines"],
        "records_committed": st1["records_committed"], "broker_connected": st1["uplink"]["connected"],
        "sim_cpu_pct": 100.0 * (sim1 - sim0) / (w1 - w0),
    }


def _log_tails(run: Path) -> str:
    """The end of each process's log, for an error message."""
    return "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-1500:]}"
                   for log in sorted(run.glob("*.log")))


@dataclass
class Rig:
    """The processes of a bench run, in its temporary directory ``run``."""

    run: Path
    agent: Popen[bytes]
    sim: Popen[bytes]
    sock: Path


@contextlib.contextmanager
def rig(sim_args: list[str], bitrate: int, ride: float, agent_wrapper: tuple[str, ...] = (),
        start_limit: float = START_LIMIT) -> Iterator[Rig]:
    """Broker, consumer, simulator (``--speed 1``, ``sim_args`` added, riding ``ride``
    s) and agent (run by ``agent_wrapper`` if given, e.g. valgrind), until the agent
    decodes CAN frames (within ``start_limit`` s); on leaving, everything it started
    stopped, agent first. A failure inside is an AgentBenchError with the logs."""
    with tempfile.TemporaryDirectory(prefix="ebike-bench-") as tmp, Mosquitto(tmp) as broker:
        run = Path(tmp)
        procs: list[Popen[bytes]] = []
        try:
            procs.append(spawn(["agent", "ingest", "--broker", broker.address, "--db", str(run / "cloud.sqlite"),
                                "--client-id", "bench-ingest"], run / "ingest.log"))
            wait_for("the consumer to subscribe", lambda: log_has(run / "ingest.log", "subscribed to"), START_LIMIT)
            sim = spawn(["firmware_sim", "--slcan", str(run / "can"), "--nmea", str(run / "gps"),
                         "--jbd", str(run / "bms"), "--can-bitrate", str(bitrate), "--speed", "1",
                         "--duration", str(ride), "--wait-open", str(START_LIMIT), *sim_args], run / "sim.log")
            procs.append(sim)
            wait_for("the simulator's ptys", lambda: log_has(run / "sim.log", "ready"), START_LIMIT)
            config = run / "agent.toml"
            config.write_text(CONFIG.format(run=run, bitrate=bitrate, host=broker.host, port=broker.port))
            agent = spawn(["agent", "run", "--config", str(config)], run / "agent.log", wrapper=agent_wrapper)
            procs.append(agent)
            sock = run / "control.sock"
            wait_for("the agent to decode CAN frames", lambda: _decoding(agent, sock), start_limit)
            yield Rig(run, agent, sim, sock)
        except (AssertionError, AgentError, AgentBenchError) as e:
            raise AgentBenchError(f"{e}{_log_tails(run)}") from e
        finally:
            for proc in reversed(procs):
                stop(proc)


def agent_figures(seconds: float, fill: int, warmup: float) -> dict[str, Any]:
    """Run broker, consumer, simulator and agent; measure the agent over ``seconds`` after
    ``warmup`` seconds of it decoding; stop everything it started, agent first."""
    with rig(["--can-fill", str(fill)], CAN_BITRATE, warmup + seconds + 2 * START_LIMIT) as r:
        time.sleep(warmup)
        return _measure(r.agent.pid, r.sim.pid, r.sock, seconds)
