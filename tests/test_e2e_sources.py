"""End to end through each kind of source, all real: the ``python -m agent run`` process,
ptys whose far end a thread in the test plays (a polled JBD BMS, a Sur-Ron capture),
candump logs replayed by the agent, a python-can virtual bus (in-process: that bus only
links buses of one process), the agent's SQLite outbox, mosquitto and the reference
consumer (``python -m agent ingest``). Frames are built here by hand from
shared/PROTOCOLS.md, never with the agent's own encoders.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.control.client import request
from agent.errors import AgentError
from agent.fusion.kernel import BUILD
from agent.signals import signal_id
from devtools.broker import Mosquitto
from tests.helpers import REPO, consumer_report, spawn, stop, wait_for
from tests.helpers import consumer as reference_consumer

pytestmark = pytest.mark.e2e

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
SPEED = "Vehicle.Speed"
EXACT = 1e-9


# --- the shared consumer and small helpers -------------------------------------------------------------

@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Path]:
    """One reference consumer for the module; each test has its own device id."""
    tmp = tmp_path_factory.mktemp("consumer")
    with reference_consumer(mosquitto.address, tmp, "e2e-sources") as db:
        yield db
    report = consumer_report(tmp)
    assert report["bad_batches"] == 0 and report["gaps"] == {}, report


def write_config(tmp: Path, broker: Mosquitto, device: str, sources: str, live: float = 0.5) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
device_id = "{device}"
control_socket = "control.sock"

{sources}

[broker]
host = "{broker.host}"
port = {broker.port}

[outbox]
path = "outbox.sqlite"
commit_interval = 0.2

[windows]
live = {live}
""")
    return path


def source(port: Path, kind: str, protocol: str, extra: str = "", name: str = "") -> str:
    """A ``[[sources]]`` table (named after the port unless ``name`` is given)."""
    return (f'\n[[sources]]\nname = "{name or port.name}"\nkind = "{kind}"\nport = "{port}"\n'
            f'protocol = "{protocol}"\n{extra}')


def uart_source(port: Path, protocol: str, extra: str = "") -> str:
    """A 9600-baud UART source."""
    return source(port, "uart", protocol, "baudrate = 9600\n" + extra)


def status_cli(sock: Path) -> dict[str, Any]:
    """What ``ebike-agent status --json`` prints, as an operator would run it."""
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--socket", str(sock)], cwd=REPO,
                         capture_output=True, timeout=15, check=True)
    st: dict[str, Any] = json.loads(out.stdout)
    return st


def status_now(sock: Path) -> dict[str, Any] | None:
    """The same status straight from the control socket, for cheap polling; None if not up yet."""
    try:
        st: dict[str, Any] = request(str(sock))["status"]
    except AgentError:
        return None
    return st


def source_status(sock: Path) -> dict[str, Any]:
    st = status_now(sock)
    return st["sources"][0] if st else {}


def stop_and_collect(agent: subprocess.Popen[bytes], log: Path, outbox: Path, db: Path, device: str) -> int:
    """Stop the agent cleanly; every committed record must reach the consumer. Returns the count."""
    assert stop(agent) == 0, log.read_text()
    with sqlite3.connect(outbox) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        (left,) = c.execute("SELECT count(*) FROM records").fetchone()
    committed = int(next_seq) - 1
    assert left == 0, "records left in the outbox after a clean shutdown with the broker up"
    assert committed > 0, "no window was committed"

    def stored() -> bool:
        with sqlite3.connect(db) as c:
            return bool(c.execute("SELECT count(*) FROM records WHERE device=?", (device,)).fetchone()[0]
                        == committed)

    wait_for(f"the consumer to store {committed} records of {device}", stored, 10)
    with sqlite3.connect(db) as c:
        seqs = [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY seq", (device,))]
    assert seqs == list(range(1, committed + 1))
    assert "Traceback" not in log.read_text()
    return committed


HISTORY_MS = 60000


def windows(db: Path, device: str, name: str) -> list[tuple[int, int, int, float, float, float, float]]:
    """(t_ms, dur_ms, count, min, max, mean, last) of one signal in the live windows (the
    history windows, 60 s, summarise the same samples), in sequence order."""
    with sqlite3.connect(db) as c:
        return c.execute("SELECT t_ms, dur_ms, count, min, max, mean, last FROM window_signals "
                         f"WHERE device=? AND signal=? AND dur_ms < {HISTORY_MS} ORDER BY seq",
                         (device, signal_id(name))).fetchall()


def assert_constant(db: Path, device: str, name: str, value: float) -> int:
    """Every window of ``name`` holds only ``value``; returns the number of samples."""
    rows = windows(db, device, name)
    assert rows, f"no window carries {name}"
    for _, _, _, vmin, vmax, mean, last in rows:
        assert (vmin, vmax, mean, last) == pytest.approx((value,) * 4, abs=EXACT), name
    return sum(r[2] for r in rows)


@contextlib.contextmanager
def pty_link(link: Path) -> Iterator[int]:
    """A pty pair: the slave, raw, behind ``link`` as a udev symlink would be; yields the master."""
    master, slave = os.openpty()
    tty.setraw(slave)
    link.symlink_to(os.ttyname(slave))
    try:
        yield master
    finally:
        os.close(master)
        os.close(slave)


def log_time(log: Path, text: str) -> float:
    """The time (epoch s) of the agent's first log line containing ``text``."""
    for line in log.read_text().splitlines():
        if text in line:
            return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no log line with {text!r}:\n{log.read_text()}")


# --- 1. a polled JBD BMS on a pty ---------------------------------------------------------------------

# PROTOCOLS.md: request DD A5 <reg> <len=00> <chkH> <chkL> 77, chk = 0x10000 - (reg + len).
REQ_BASIC = bytes.fromhex("DD A5 03 00 FF FD 77")
REQ_CELLS = bytes.fromhex("DD A5 04 00 FF FC 77")
CELLS_MV = (4005, 4010, 3998, 4012, 4007, 4003, 4009, 4001, 4011, 4006, 4008, 4002, 4015)
NTC_DK = (2982, 3007)  # 0.1 K: 298.2 K and 300.7 K (25.0 / 27.5 C are not whole 0.1 K steps)
GARBAGE = bytes.fromhex("00 13 FF 42 77 10 A5 00")  # no DD: nothing in it can start a frame


def u16(v: int) -> bytes:
    return (v & 0xFFFF).to_bytes(2, "big")


def jbd_response(reg: int, data: bytes) -> bytes:
    """DD <reg> <status 00> <len> <data> <chkH> <chkL> 77; chk = 0x10000 - sum(status..data)."""
    body = bytes([0x00, len(data)]) + data
    return bytes([0xDD, reg]) + body + u16(0x10000 - sum(body)) + b"\x77"


def jbd_basic(centivolts: int) -> bytes:
    data = (u16(centivolts)            # pack voltage, 10 mV
            + u16(-320)                # current -3.20 A, 10 mA, signed
            + u16(800)                 # remaining 8.00 Ah, 10 mAh
            + u16(1000)                # full 10.00 Ah
            + u16(12)                  # cycles
            + u16((24 << 9) | (5 << 5) | 17)  # made 2024-05-17
            + u16(0) + u16(0)          # balance bits
            + u16(0)                   # protection bits
            + bytes([0x10, 80, 0x03, len(CELLS_MV), len(NTC_DK)])  # sw, RSOC 80 %, both FETs on, cells, NTCs
            + b"".join(u16(t) for t in NTC_DK))
    return jbd_response(0x03, data)


def jbd_cells() -> bytes:
    return jbd_response(0x04, b"".join(u16(mv) for mv in CELLS_MV))


def corrupted(frame: bytes) -> bytes:
    """One flipped bit in the pack voltage, the checksum left as it was."""
    return frame[:5] + bytes([frame[5] ^ 0x01]) + frame[6:]


class FakeJbd(threading.Thread):
    """The BMS at the master end of the pty: answers each read request on its own, goes
    silent on demand, and once prefixes an answer (pack 51.00 V) with garbage and a corrupt frame."""

    def __init__(self, master: int) -> None:
        super().__init__(daemon=True)
        self.master = master
        self.done = threading.Event()
        self.silent = threading.Event()
        self.garbage_next = threading.Event()
        self.garbage_sent = threading.Event()
        self.received = bytearray()
        self.basic_replies = 0
        self.cell_replies = 0

    def run(self) -> None:
        pending = b""
        while not self.done.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            self.received += data
            pending += data
            while len(pending) >= len(REQ_BASIC):
                req, pending = pending[:len(REQ_BASIC)], pending[len(REQ_BASIC):]
                if not self.silent.is_set():
                    os.write(self.master, self.answer(req))

    def answer(self, req: bytes) -> bytes:
        if req == REQ_CELLS:
            self.cell_replies += 1
            return jbd_cells()
        if req != REQ_BASIC:
            return b""
        self.basic_replies += 1
        if not self.garbage_next.is_set():
            return jbd_basic(5210)
        self.garbage_next.clear()
        self.garbage_sent.set()
        return GARBAGE + corrupted(jbd_basic(5100)) + GARBAGE + jbd_basic(5100)


def test_polled_jbd_bms_on_a_pty(tmp_path: Path, mosquitto: Mosquitto, consumer: Path) -> None:
    assert jbd_response(0x04, b"\x0f\xa0")[-3:] == bytes.fromhex("FF 4F 77")  # 0x10000 - (0 + 2 + 0x0F + 0xA0)
    assert 0xDD not in corrupted(jbd_basic(5100))[1:], "the corrupt frame holds no other start byte"
    device = "e2e-jbd"
    sock, log = tmp_path / "control.sock", tmp_path / "agent.log"
    config = write_config(tmp_path, mosquitto, device,
                          uart_source(tmp_path / "bms", "jbd", "poll_interval = 0.2\npoll_timeout = 0.4\n"))
    with pty_link(tmp_path / "bms") as master:
        bms = FakeJbd(master)
        bms.start()
        agent = spawn(["agent", "run", "--config", str(config)], log)
        try:
            def polled(key: str, n: int) -> Any:
                return lambda: (s := source_status(sock)) and s["decode"]["poll"][key] >= n and s

            # answered: both registers, several rounds
            wait_for("six answered polls", polled("answered", 6), 10)
            src = status_cli(sock)["sources"][0]
            dec, poll = src["decode"], src["decode"]["poll"]
            assert src["open"] and src["kind"] == "uart" and dec["protocol"] == "jbd"
            assert poll["sent"] >= 6 and poll["answered"] >= 6
            assert poll["timeouts"] == 0 and poll["unsolicited"] == 0 and poll["echoes"] == 0
            assert dec["frames"] == poll["answered"] and dec["bad_frames"] == {} and dec["bad_content"] == {}
            assert dec["garbage_bytes"] == 0 and dec["not_understood"] == 0

            # the BMS goes silent: timeouts are counted, the agent keeps polling
            bms.silent.set()
            silent = wait_for("two poll timeouts", polled("timeouts", 2), 10)["decode"]["poll"]
            # Polling goes on: another request goes out (within a poll_timeout and a turn of
            # the loop), unanswered.
            later = wait_for("another poll while the BMS is silent", lambda: (s := source_status(sock)) and s[
                "decode"]["poll"]["sent"] > silent["sent"] and s, 5)["decode"]["poll"]
            assert agent.poll() is None, log.read_text()
            assert later["sent"] > silent["sent"] and later["answered"] == silent["answered"]

            # back, then garbage + a corrupt frame before a good answer
            bms.silent.clear()
            resumed = wait_for("answers again", polled("answered", later["answered"] + 2), 10)["decode"]
            bms.garbage_next.set()
            wait_for("the garbage to be sent", bms.garbage_sent.is_set, 5)
            after = wait_for("answers after the garbage", polled("answered", resumed["poll"]["answered"] + 3), 10)
            assert after["decode"]["poll"]["timeouts"] == resumed["poll"]["timeouts"], "the good answer was lost"

            # quiet the BMS, let the agent catch up: every answer written was read and matched
            bms.silent.set()
            replies = wait_for("every answer matched", lambda: (s := source_status(sock)) and s["decode"]["poll"][
                "answered"] == bms.basic_replies + bms.cell_replies and s, 5)
            final = status_cli(sock)["sources"][0]["decode"]
            assert final["bad_frames"] == {"checksum": 1} and final["bad_content"] == {}, final
            assert final["garbage_bytes"] == 2 * len(GARBAGE) + len(jbd_basic(5100)), final
            assert final["not_understood"] == 0 and final["poll"]["unsolicited"] == 0
            assert final["frames"] == replies["decode"]["frames"] == bms.basic_replies + bms.cell_replies
            assert final["poll"]["timeouts"] >= 2 and agent.poll() is None
            stop_and_collect(agent, log, tmp_path / "outbox.sqlite", consumer, device)
        finally:
            stop(agent)
            bms.done.set()
            bms.join(5)

    # requests: exactly well-formed ones, alternating 03 / 04 from the first
    sent = bytes(bms.received)
    assert len(sent) % 7 == 0, sent.hex()
    reqs = [sent[i:i + 7] for i in range(0, len(sent), 7)]
    assert reqs == [(REQ_BASIC, REQ_CELLS)[i % 2] for i in range(len(reqs))]

    # windows: exact values; every good register 03 answer is one voltage sample
    volts = windows(consumer, device, VOLTAGE)
    assert {round(v, 9) for r in volts for v in r[3:5]} == {52.1, 51.0}
    assert sum(r[2] for r in volts) == bms.basic_replies, "a register 03 answer was lost or counted twice"
    assert any(r[3] == pytest.approx(51.0, abs=EXACT) for r in volts), "the answer after the garbage was lost"
    expected = {
        CURRENT: -3.2, SOC: 80.0,
        "Vehicle.LEV.Battery.RemainingCapacity": 8.0, "Vehicle.LEV.Battery.FullCapacity": 10.0,
        "Vehicle.LEV.Battery.CycleCount": 12.0, "Vehicle.LEV.Battery.ProtectionFlags": 0.0,
        "Vehicle.LEV.Battery.ChargeEnabled": 1.0, "Vehicle.LEV.Battery.DischargeEnabled": 1.0,
        "Vehicle.LEV.Battery.Temperature.1": 2982 * 0.1 - 273.15,
        "Vehicle.LEV.Battery.Temperature.2": 3007 * 0.1 - 273.15,
        "Vehicle.Powertrain.TractionBattery.Temperature.Min": 2982 * 0.1 - 273.15,
        "Vehicle.Powertrain.TractionBattery.Temperature.Max": 3007 * 0.1 - 273.15,
        "Vehicle.Powertrain.TractionBattery.CellVoltage.Min": 3.998,
        "Vehicle.Powertrain.TractionBattery.CellVoltage.Max": 4.015,
    }
    expected |= {f"Vehicle.LEV.Battery.CellVoltage.{i + 1}": mv / 1000 for i, mv in enumerate(CELLS_MV)}
    for name, value in expected.items():
        assert assert_constant(consumer, device, name, value) == (
            bms.cell_replies if "CellVoltage" in name else bms.basic_replies), name
    assert windows(consumer, device, f"Vehicle.LEV.Battery.CellVoltage.{len(CELLS_MV) + 1}") == []
    assert windows(consumer, device, "Vehicle.LEV.Battery.Temperature.3") == []


# --- 2. candump replay ---------------------------------------------------------------------------------

def candump_times(text: str) -> list[float]:
    return [float(line.split(")")[0].lstrip("(")) for line in text.splitlines() if line.startswith("(")]


def speeds_of(text: str) -> list[float]:
    """Vehicle.Speed of each 02F83201 line (PROTOCOLS.md: u16 LE, 0.01 km/h), by hand."""
    out = []
    for line in text.splitlines():
        if "02F83201#" in line:
            data = bytes.fromhex(line.split("#")[1].split()[0])
            out.append((data[0] | data[1] << 8) * 0.01)
    return out


def test_candump_replay_as_fast_as_possible(tmp_path: Path, mosquitto: Mosquitto, consumer: Path,
                                            shared_data: Path) -> None:
    capture = tmp_path / "ride.log"
    shutil.copy(shared_data / "bafang_can" / "ride-coasting-excerpt.log", capture)
    text = capture.read_text()
    n_speed = text.count("02F83201#")
    times = candump_times(text)
    duration = max(times) - min(times)
    assert n_speed == 12 and len(times) == 493 and 2.5 < duration < 3.5
    device, live = "e2e-candump-fast", 0.5
    sock, log = tmp_path / "control.sock", tmp_path / "agent.log"
    config = write_config(tmp_path, mosquitto, device, source(capture, "candump", "bafang-can",
                                                              "replay_speed = 0\n", name="replay"), live=live)
    started = time.time()
    agent = spawn(["agent", "run", "--config", str(config)], log)
    try:
        wait_for("the replay to finish", lambda: source_status(sock).get("finished"), 10)
        st = status_cli(sock)
        src = st["sources"][0]
        assert st["kernel"] == BUILD, "the agent runs the kernel this test run asked for"
        assert src["finished"] and not src["open"] and src["kind"] == "candump"
        assert src["lines"] == len(times) and src["passes"] == 1 and src["bad_timestamps"] == 0
        fusion = st["fusion"]
        assert fusion["bad_lines"] == 0 and fusion["frames"] > 0
        assert sum(fusion[k] for k in ("frames", "unknown", "truncated", "remote_frames", "error_frames",
                                       "fd_frames")) == len(times), fusion
        assert agent.poll() is None, "the agent must outlive a finished replay"
        stop_and_collect(agent, log, tmp_path / "outbox.sqlite", consumer, device)
    finally:
        stop(agent)

    rows = windows(consumer, device, SPEED)
    assert sum(r[2] for r in rows) == n_speed, "every speed frame is one sample, none lost or doubled"
    speeds = speeds_of(text)
    assert min(r[3] for r in rows) == pytest.approx(min(speeds), abs=EXACT)
    assert max(r[4] for r in rows) == pytest.approx(max(speeds), abs=EXACT)
    assert rows[-1][6] == pytest.approx(speeds[-1], abs=EXACT)
    # the windows keep the log's timing (shifted to when the replay began), not the replay's
    with sqlite3.connect(consumer) as c:
        rec = c.execute("SELECT DISTINCT seq, t_ms FROM window_signals WHERE device=? AND dur_ms < ? ORDER BY seq",
                        (device, HISTORY_MS)).fetchall()
        durs = {d for (d,) in c.execute("SELECT DISTINCT dur_ms FROM window_signals WHERE device=? AND dur_ms < ?",
                                        (device, HISTORY_MS))}
    starts = [t / 1000 for _, t in rec]
    assert durs == {live * 1000} and len(starts) == len(set(starts)) >= 3
    assert starts == sorted(starts), "windows out of order"
    span = max(starts) - min(starts)
    assert abs(span - duration) < live, (span, duration)
    assert started - 2 * live <= min(starts) <= started + 10


def test_candump_replay_at_ten_times(tmp_path: Path, mosquitto: Mosquitto, consumer: Path) -> None:
    t0, step, n = 1700000000.0, 0.5, 41  # 20 s of log, 2 s of replay
    lines = []
    for i in range(n):
        speed = 2000 + 10 * i  # 20.00 km/h and up
        data = bytes([speed & 0xFF, speed >> 8, 0xF4, 0x01, 0xC0, 0x12, 0x41, 0xFF])
        lines.append(f"({t0 + i * step:.6f}) can0 02F83201#{data.hex().upper()}\n")
    capture = tmp_path / "short.log"
    capture.write_text("".join(lines))
    device, live = "e2e-candump-x10", 0.5
    sock, log = tmp_path / "control.sock", tmp_path / "agent.log"
    config = write_config(tmp_path, mosquitto, device, source(capture, "candump", "bafang-can",
                                                              "replay_speed = 10\n", name="replay"), live=live)
    agent = spawn(["agent", "run", "--config", str(config)], log)
    try:
        wait_for("the replay to finish", lambda: source_status(sock).get("finished"), 10)
        src = status_cli(sock)["sources"][0]
        assert src["finished"] and src["lines"] == n
        stop_and_collect(agent, log, tmp_path / "outbox.sqlite", consumer, device)
    finally:
        stop(agent)
    took = log_time(log, "; finished") - log_time(log, "source replay: opened")
    expected = (n - 1) * step / 10
    assert expected - 0.05 <= took <= expected + 0.8, f"replay of {expected} s took {took:.3f} s"
    rows = windows(consumer, device, SPEED)
    assert sum(r[2] for r in rows) == n
    assert [r[6] for r in rows][-1] == pytest.approx(20.0 + 0.1 * (n - 1), abs=EXACT)
    span = (rows[-1][0] - rows[0][0]) / 1000
    assert abs(span - (n - 1) * step) < live, "windows follow the log's time, 10x the wall time"


# --- 3. Sur-Ron capture through a pty ------------------------------------------------------------------

SURRON_GARBAGE = bytes.fromhex("00 FF 13 42 99")  # none of 46 / 47 / 57, the command bytes


def read_capture(path: Path) -> list[bytes]:
    """The capture format: a ``HH:MM:SS.mmm:`` line, then what was read, in hex."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.endswith(":"):
            out.append(bytes.fromhex(line))
    return out


def test_surron_capture_through_a_pty(tmp_path: Path, mosquitto: Mosquitto, consumer: Path,
                                      shared_data: Path) -> None:
    frames = read_capture(shared_data / "surron_lightbee_bms_rs485" /
                          "output_2024-03-05_22-04-43_75percent_62.0V_5265km.log")
    assert len(frames) == 270
    device = "e2e-surron"
    sock, log = tmp_path / "control.sock", tmp_path / "agent.log"
    config = write_config(tmp_path, mosquitto, device, uart_source(tmp_path / "rs485", "surron"))
    chunk, garbage = 7, 0
    with pty_link(tmp_path / "rs485") as master:
        agent = spawn(["agent", "run", "--config", str(config)], log)
        try:
            # pyserial flushes the input on open: write only once the port is open
            wait_for("the port to open", lambda: source_status(sock).get("open"), 10)
            for i in range(0, len(frames), chunk):
                os.write(master, b"".join(frames[i:i + chunk]) + SURRON_GARBAGE)
                garbage += len(SURRON_GARBAGE)
                time.sleep(0.005)
            dec = wait_for("every frame framed", lambda: (s := source_status(sock)) and s["decode"]["frames"]
                           + s["decode"]["not_understood"] == len(frames) and s["decode"], 10)
            dec = status_cli(sock)["sources"][0]["decode"]
            assert dec["bad_frames"] == {} and dec["bad_content"] == {}, dec
            assert dec["garbage_bytes"] == garbage
            stop_and_collect(agent, log, tmp_path / "outbox.sqlite", consumer, device)
        finally:
            stop(agent)

    soc = windows(consumer, device, SOC)
    assert {r[3] for r in soc} == {r[4] for r in soc} == {75.0}
    responses_13 = sum(1 for f in frames if f[0] == 0x47 and f[3] == 13)
    assert sum(r[2] for r in soc) >= responses_13 == 22
    volts = windows(consumer, device, VOLTAGE)
    assert volts and all(62.0 <= r[3] <= r[4] <= 62.1 for r in volts), volts
    assert sum(r[2] for r in volts) >= sum(1 for f in frames if f[0] == 0x47 and f[3] == 9)


# --- 4. python-can virtual bus, in-process ----------------------------------------------------------

def test_python_can_virtual_bus_in_process(tmp_path: Path, mosquitto: Mosquitto) -> None:
    can = pytest.importorskip("can", minversion="4.3", reason="python-can is not installed (pip install .[can])")
    from agent import config, wire
    from agent.fleet.subscriber import Subscriber
    from agent.runtime import Runtime

    device, channel = "e2e-pycan", f"e2e-{uuid.uuid4().hex[:8]}"
    cfg = config.parse(str(tmp_path / "agent.toml"), {
        "device_id": device, "control_socket": str(tmp_path / "control.sock"),
        "sources": [{"name": "vcan", "kind": "python-can", "interface": "virtual", "channel": channel,
                     "protocol": "bafang-can"}],
        # No consumer runs here: the broker's PUBACK is the ack (with "cloud", the test
        # passed only when another test's consumer on the same broker acknowledged for it).
        "broker": {"host": mosquitto.host, "port": mosquitto.port, "ack": "broker"},
        "outbox": {"path": str(tmp_path / "outbox.sqlite"), "commit_interval": 0.1},
        "windows": {"live": 0.2},
    })
    payloads: list[bytes] = []
    subscribed = threading.Event()
    sub = Subscriber(f"e2e-pycan-{channel}", mosquitto.host, mosquitto.port, f"ebike/v1/{device}/telemetry",
                     lambda topic, payload: payloads.append(payload))
    on_subscribe: Any = sub.client.on_subscribe

    def note_subscribed(*args: Any) -> None:
        on_subscribe(*args)
        subscribed.set()

    sub.client.on_subscribe = note_subscribed
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            sub.loop(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    sub.connect()
    watcher.start()

    speeds = (2500, 2550, 2600, 2575, 2525)  # 0.01 km/h
    runtime = Runtime(cfg)
    bus = None
    try:
        try:
            assert subscribed.wait(10), "the test's subscriber never subscribed"
            runtime.control.start(runtime.selector)
            runtime.uplink.start()

            def run_until(what: str, check: Any, timeout: float = 5.0) -> None:
                deadline = time.monotonic() + timeout
                while not check():
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    runtime.step(0.05)

            run_until("the bus to open", lambda: runtime.sources[0].is_open)
            bus = can.Bus(interface="virtual", channel=channel)
            for s in speeds:  # 32/01: speed, motor current 5.00 A, 48.00 V, 25 C, no motor sensor
                bus.send(can.Message(arbitration_id=0x02F83201, is_extended_id=True,
                                     data=bytes([s & 0xFF, s >> 8, 0xF4, 0x01, 0xC0, 0x12, 65, 0xFF])))
            bus.send(can.Message(arbitration_id=0x123, is_extended_id=False, data=b"\x01"))  # not in the DBC
            # The unknown frame, sent last, may come in the read after the others.
            run_until("every frame in the kernel", lambda: runtime.kernel.frames == len(speeds)
                      and runtime.kernel.counters()["unknown"] >= 1)
            assert runtime.kernel.counters()["unknown"] == 1 and runtime.kernel.frames == len(speeds)
            latest = {sid: value for sid, value, _ in runtime.kernel.latest()}
            assert latest[signal_id(SPEED)] == pytest.approx(speeds[-1] / 100, abs=EXACT)
            assert latest[signal_id("Vehicle.LEV.Controller.Voltage")] == pytest.approx(48.0, abs=EXACT)
            assert latest[signal_id("Vehicle.LEV.Controller.MotorCurrent")] == pytest.approx(5.0, abs=EXACT)
            assert latest[signal_id("Vehicle.LEV.Controller.Temperature")] == pytest.approx(25.0, abs=EXACT)
            assert signal_id("Vehicle.Powertrain.ElectricMotor.Temperature") not in latest  # FF: no sensor
            run_until("a committed window", lambda: runtime.recorder.records >= 1)
            run_until("the broker to ack it", lambda: runtime.uplink.status()["records_acked"] >= 1)
            st = runtime.status()
            src = st["sources"][0]
            assert src["kind"] == "python-can" and src["open"] and src["frames"] == len(speeds) + 1
            assert src["fd_dropped"] == src["overflows"] == 0 and st["records_committed"] >= 1
        finally:
            if bus is not None:
                bus.shutdown()
            runtime.shutdown()
        committed = runtime.recorder.records
        wait_for("every record at the subscriber",
                 lambda: len({seq for p in payloads for seq, _ in wire.decode_batch(p)[1]}) >= committed, 10)
    finally:
        done.set()
        watcher.join(5)
        sub.close()
    records = dict(rec for p in payloads for rec in wire.decode_batch(p)[1])  # seq -> record, QoS 1 may repeat
    assert sorted(records) == list(range(1, committed + 1))
    live = [rec for rec in records.values() if rec["k"] == "win" and rec["d"] < HISTORY_MS]
    speed_rows = [wire.window_values(row) for rec in live for row in rec["s"] if row[0] == signal_id(SPEED)]
    assert sum(row[1] for row in speed_rows) == len(speeds)
    assert min(row[2] for row in speed_rows) == pytest.approx(25.0, abs=EXACT)
    assert max(row[3] for row in speed_rows) == pytest.approx(26.0, abs=EXACT)
