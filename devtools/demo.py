"""``make run``: the whole path on one machine: a private mosquitto, the simulated
vehicle on pseudo-terminals, the agent reading them, and the reference consumer.

Shows one live status line; Ctrl-C stops everything it started, by pid, agent first
(so it flushes and drains), and prints a summary. Files go to .run/ in the repo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.control.client import request
from agent.errors import AgentError
from devtools.broker import BrokerMissing, Mosquitto
from devtools.procs import REPO, log_has, spawn, stop, wait_for

DEVICE = "demo-bike-1"

CONFIG = """\
device_id = "{device}"
control_socket = "control.sock"

# GNSS first: the ride starts when the CAN adapter opens.
[[sources]]
name = "gnss"
kind = "uart"
port = "{run}/gps"
protocol = "nmea"
baudrate = 9600

[[sources]]
name = "can0"
kind = "slcan"
port = "{run}/can"
protocol = "bafang-can"
bitrate = 250000

[broker]
host = "{host}"
port = {port}

[outbox]
path = "outbox.sqlite"

[fusion]
rate_scale = {speed}                # ebike-sim --speed: its vehicle's values change that much faster
"""


def _consumer_records(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as c:
            return int(c.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return 0


def _outbox_figures(db: Path) -> tuple[int, int]:
    """Records the agent ever committed, and how many its outbox still holds."""
    if not db.exists():
        return 0, 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        (left,) = c.execute("SELECT count(*) FROM records").fetchone()
    return int(next_seq) - 1, int(left)


def _agent_status(sock: Path) -> dict[str, Any] | None:
    try:
        return request(str(sock))["status"]
    except AgentError:
        return None


def _line(st: dict[str, Any] | None, received: int) -> str:
    if st is None:
        return f"agent starting...  consumer received {received}"
    ob, up = st["outbox"], st["uplink"]
    return (f"{st['frames_per_s']:7.0f} frames/s | buffered {ob['records']:5d} | committed {st['records_committed']:6d}"
            f" | batches sent {up['batches_sent']:5d} acked {up['batches_acked']:5d}"
            f" | consumer received {received:6d} | broker {'up' if up['connected'] else 'DOWN'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make run", description=__doc__)
    p.add_argument("--speed", type=float, default=1.0, help="simulated time per real second")
    p.add_argument("--duration", type=float, default=3600.0, help="simulated ride length, s")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    run = REPO / ".run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    stopping = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stopping.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))

    try:
        broker = Mosquitto(str(run)).start()
    except BrokerMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        consumer_db = run / "cloud.sqlite"
        procs.append(("consumer", spawn(["agent", "ingest", "--broker", broker.address, "--db", str(consumer_db),
                                         "--client-id", "demo-ingest"], run / "ingest.log")))
        wait_for("the consumer to subscribe", lambda: log_has(run / "ingest.log", "subscribed to"), 20)
        procs.append(("simulator", spawn(["firmware_sim", "--slcan", str(run / "can"), "--nmea", str(run / "gps"),
                                          "--speed", str(args.speed), "--duration", str(args.duration),
                                          "--seed", str(args.seed), "--manifest", str(run / "manifest.jsonl"),
                                          "--wait-open", "60"], run / "sim.log")))
        wait_for("the simulator's ptys", lambda: log_has(run / "sim.log", "ready"), 20)
        (run / "agent.toml").write_text(CONFIG.format(device=DEVICE, run=run, host=broker.host, port=broker.port,
                                                      speed=args.speed))
        procs.append(("agent", spawn(["agent", "run", "--config", str(run / "agent.toml")], run / "agent.log")))
        print(f"broker {broker.address}, logs and databases in {run}; Ctrl-C stops everything", flush=True)
        tty = sys.stdout.isatty()
        last_print = 0.0
        while not stopping["now"]:
            dead = [(name, proc.returncode) for name, proc in procs if proc.poll() is not None]
            if dead:
                name, rc = dead[0]
                why = "the ride is over" if name == "simulator" and rc == 0 else f"{name} exited with {rc}"
                print(f"\n{why}; stopping (see {run}/*.log)", flush=True)
                break
            line = _line(_agent_status(run / "control.sock"), _consumer_records(consumer_db))
            if tty:
                print("\r" + line, end="", flush=True)
            elif time.monotonic() - last_print >= 5:
                print(line, flush=True)
                last_print = time.monotonic()
            time.sleep(1.0)
    finally:
        codes = {name: stop(proc) for name, proc in reversed(procs) if name != "consumer"}
        committed, left = _outbox_figures(run / "outbox.sqlite")
        try:
            wait_for("the consumer to catch up", lambda: _consumer_records(consumer_db) >= committed - left, 10)
        except AssertionError as e:
            print(f"\n{e}")
        codes.update({name: stop(proc) for name, proc in procs if name == "consumer"})
        broker.stop()
    received = _consumer_records(consumer_db)
    report = (run / "ingest.log").read_text().strip().splitlines()[-1:] if (run / "ingest.log").exists() else []
    print("\nsummary:")
    print(f"  agent: {committed} records committed, {left} still in its outbox (sent on its next start)")
    print(f"  consumer: {received} records stored")
    if report:
        try:
            rep = json.loads(report[0])
            print(f"  consumer report: duplicates {rep['duplicates']}, gaps {rep['gaps'] or 'none'}")
        except (ValueError, KeyError) as e:
            print(f"  consumer report unreadable ({e}): {report[0]}")
    print(f"  exit codes: {codes}")
    return 0 if all(rc == 0 for rc in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
