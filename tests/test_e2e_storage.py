"""Field faults of the unit, through the real CLI and real processes: a second
``ebike-agent run`` beside a running one, a killed agent's stale socket, an outbox on a
read-only filesystem (a worn SD card) and in a directory the agent's user may not
write. The simulator, mosquitto and the reference consumer are real; the tests run as
root, as CI does, to mount and to switch users."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from devtools.broker import Mosquitto
from tests import test_e2e as e2e
from tests.helpers import REPO, log_has, spawn, stop, wait_for
from tests.test_e2e_sources import status_now
from tests.test_storage_faults import NOBODY, ReadOnlyMount

DEVICE = "storage-bike-1"


def config_in(tmp: Path, broker: Mosquitto, outbox: str = "outbox.sqlite") -> Path:
    """test_e2e's agent (SLCAN + NMEA from the simulator) with its outbox at ``outbox``."""
    path = e2e.agent_config(tmp, broker, DEVICE, sim_speed=5)
    path.write_text(path.read_text().replace('path = "outbox.sqlite"', f'path = "{outbox}"'))
    return path


def start_sim(tmp: Path, duration: float = 600) -> subprocess.Popen[bytes]:
    sim = spawn(["firmware_sim", "--slcan", str(tmp / "can"), "--nmea", str(tmp / "gps"), "--speed", "5",
                 "--duration", str(duration), "--seed", "5", "--wait-open", "60", "--linger", "2"], tmp / "sim.log")
    wait_for("the simulator's ptys", lambda: log_has(tmp / "sim.log", "ready"), 20)
    return sim


def status(tmp: Path) -> dict[str, Any]:
    return status_now(tmp / "control.sock") or {}


def alarm_names(tmp: Path) -> set[str]:
    return {a["name"] for a in status(tmp).get("alarms", [])}


def cloud_alarms(db: Path) -> list[tuple[str, bool]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT body FROM records WHERE device=? AND kind='alm' ORDER BY seq", (DEVICE,)).fetchall()
    return [(rec["name"], rec["on"]) for rec in (cbor2.loads(body) for (body,) in rows)]


def cloud_count(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT count(*) FROM records WHERE device=?", (DEVICE,)).fetchone()[0])


@pytest.fixture
def parts() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in reversed(procs):
        stop(proc)


@pytest.mark.e2e
def test_a_second_agent_on_the_same_outbox_exits_and_touches_nothing(tmp_path: Path, mosquitto: Mosquitto,
                                                                     parts: list[Any]) -> None:
    """Started by hand beside systemd's: exit 1 naming the first's pid and the outbox;
    the first keeps its socket, its ports and its MQTT session."""
    config = config_in(tmp_path, mosquitto)
    parts.append(start_sim(tmp_path))
    first = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    parts.append(first)
    wait_for("the agent to connect", lambda: (status(tmp_path).get("uplink") or {}).get("connected"), 30)
    wait_for("frames from both sources", lambda: all(s.get("open") for s in status(tmp_path)["sources"]), 20)
    before = status(tmp_path)
    sock_inode = os.stat(tmp_path / "control.sock").st_ino
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name.startswith("outbox")}

    second = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    outbox = tmp_path / "outbox.sqlite"
    assert second.returncode == 1, second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: another ebike-agent (pid {first.pid}) is running with {outbox}"), second.stderr

    time.sleep(1.0)  # what a second agent would have broken shows by now
    after = status(tmp_path)
    assert after["pid"] == first.pid and os.stat(tmp_path / "control.sock").st_ino == sock_inode
    assert after["uplink"]["connects"] == before["uplink"]["connects"], "the MQTT session was taken over"
    assert all(s["open"] for s in after["sources"])
    for name in ("outbox.sqlite.ballast", "outbox.sqlite.lock"):
        assert (tmp_path / name).stat().st_mtime_ns == files[name], f"{name} was touched"
    assert first.poll() is None


@pytest.mark.e2e
def test_a_killed_agents_socket_is_cleaned_up_by_the_next(tmp_path: Path, mosquitto: Mosquitto,
                                                          parts: list[Any]) -> None:
    config = config_in(tmp_path, mosquitto)
    parts.append(start_sim(tmp_path))
    first = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    wait_for("the first agent's status", lambda: status(tmp_path).get("pid") == first.pid, 30)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert (tmp_path / "control.sock").exists(), "a killed agent leaves its socket"
    again = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent2.log")
    parts.append(again)
    wait_for("the next agent's status", lambda: status(tmp_path).get("pid") == again.pid, 30)


@pytest.mark.e2e
def test_read_only_outbox_runs_from_memory_and_comes_back_with_nothing_lost(
        tmp_path: Path, mosquitto: Mosquitto, parts: list[Any]) -> None:
    """A worn card: the outbox's filesystem is read-only when the agent starts. Nothing
    is moved aside, the cause is named in the log and in status, live data and the
    storage_failed alarm reach the consumer from RAM; after a remount read-write the
    agent is back on its outbox by itself, and the cloud has every record, no gap."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a filesystem: run it as root (CI does)")
    mount = ReadOnlyMount(tmp_path / "store")
    try:
        config = config_in(tmp_path, mosquitto, "store/outbox.sqlite")
        db = tmp_path / "cloud.sqlite"
        consumer, sim = e2e.start_consumer_and_sim(tmp_path, mosquitto, "storage-ingest", [
            "--speed", "5", "--duration", "600", "--seed", "5"])
        parts.extend([consumer, sim])
        # A first life on a healthy card: the outbox exists, with numbers used.
        agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent0.log")
        wait_for("records in the cloud", lambda: cloud_count(db) >= 5, 60)
        assert stop(agent) == 0
        files = sorted(p.name for p in mount.directory.iterdir())

        mount.read_only(True)
        log = tmp_path / "agent.log"
        agent = spawn(["agent", "run", "--config", str(config)], log)
        parts.append(agent)
        failed = wait_for("status of a storage failure", lambda: (status(tmp_path).get("outbox") or {}).get(
            "storage_failed"), 30)
        assert failed["cause"].startswith("read-only filesystem") and failed["memory_only"]
        assert log_has(log, "CANNOT BE WRITTEN (read-only filesystem")
        assert not log_has(log, "CORRUPT")
        wait_for("the storage_failed alarm", lambda: "storage_failed" in alarm_names(tmp_path), 20)
        wait_for("the alarm in the cloud", lambda: ("storage_failed", True) in cloud_alarms(db), 30)
        reached = cloud_count(db)
        wait_for("live data from memory in the cloud", lambda: cloud_count(db) >= reached + 5, 30)
        assert sorted(p.name for p in mount.directory.iterdir()) == files, "the read-only card was touched"

        mount.read_only(False)
        wait_for("the agent back on its outbox", lambda: (status(tmp_path).get("outbox") or {}).get(
            "storage_failed", 0) is None, 30)
        wait_for("the alarm cleared", lambda: "storage_failed" not in alarm_names(tmp_path), 20)
        assert log_has(log, "can be written again")
        assert stop(agent) == 0, log.read_text()
        with sqlite3.connect(mount.directory / "outbox.sqlite") as c:
            (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        wait_for("every record in the cloud", lambda: cloud_count(db) >= next_seq - 1, 30)
        with sqlite3.connect(db) as c:
            seqs = [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY seq", (DEVICE,))]
        assert seqs == list(range(1, next_seq)), "a gap or a duplicate across the memory-only time"
        assert ("storage_failed", False) in cloud_alarms(db)
        assert "Traceback" not in log.read_text()
    finally:
        for proc in reversed(parts):
            stop(proc)
        parts.clear()
        mount.close()


@pytest.mark.e2e
def test_outbox_directory_the_user_may_not_write(shared_dir: Path, mosquitto: Mosquitto,
                                                 parts: list[Any]) -> None:
    """The agent as an unprivileged user, its outbox directory root's: permission denied
    named, no file made there, live data reaching the consumer from RAM."""
    tmp = shared_dir
    (tmp / "store").mkdir(mode=0o755)
    db = tmp / "cloud.sqlite"
    # The GNSS alone: a DBC is compiled in a child process, which an unprivileged user
    # cannot start from a virtualenv whose interpreter lies in root's home (as here).
    config = tmp / "agent.toml"
    config.write_text(f"""
device_id = "{DEVICE}"
control_socket = "control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "{tmp / 'gps'}"
protocol = "nmea"
baudrate = 9600

[broker]
host = "{mosquitto.host}"
port = {mosquitto.port}

[outbox]
path = "store/outbox.sqlite"
commit_interval = 0.5
""")
    parts.append(spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", str(db), "--client-id",
                        "storage-ingest-2"], tmp / "ingest.log"))
    parts.append(spawn(["firmware_sim", "--nmea", str(tmp / "gps"), "--speed", "5", "--duration", "600",
                        "--seed", "5"], tmp / "sim.log"))
    wait_for("the consumer to subscribe", lambda: log_has(tmp / "ingest.log", "subscribed to"), 20)
    wait_for("the simulator's pty", lambda: log_has(tmp / "sim.log", "ready"), 20)
    os.chmod(os.path.realpath(tmp / "gps"), 0o666)  # the simulator's pty, for the agent's user
    os.chmod(tmp, 0o777)  # the control socket is made beside the configuration
    log = tmp / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                  sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    parts.append(agent)
    failed = wait_for("status of a storage failure", lambda: (status(tmp).get("outbox") or {}).get(
        "storage_failed"), 30)
    assert failed["cause"].startswith("permission denied"), failed
    line = subprocess.run([sys.executable, "-m", "agent", "status", "--socket", str(tmp / "control.sock")], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    # Words wrapped at 80 columns are one text again.
    assert f"IN MEMORY ONLY (storage failed: {failed['cause']})" in " ".join(line.stdout.split()), line.stdout
    wait_for("live data from memory in the cloud", lambda: cloud_count(db) >= 5, 60)
    wait_for("the alarm in the cloud", lambda: ("storage_failed", True) in cloud_alarms(db), 30)
    assert list((tmp / "store").iterdir()) == []
    assert agent.poll() is None and "Traceback" not in log.read_text()
