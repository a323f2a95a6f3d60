"""Simulator faults of the serial links: ``unplug`` (a port disappears and returns),
``noisy-line`` on the SLCAN line, and ``--fault-at``.

The host side is built by hand with os/termios, as in test_sim_buses; every wait is
bounded. SLCAN bytes are decoded with the agent's own parser.
"""

from __future__ import annotations

import json
import os
import select
import termios
import time
import tty
from pathlib import Path

import pytest

from agent.sources.slcan import EXTENDED_FLAG, SlcanParser
from firmware_sim import cli, scenario
from firmware_sim.encoders.bafang import slcan_frame
from tests.helpers import reap, start_sim, wait_ready

ROOT = Path(__file__).resolve().parent.parent


class Rec:
    """Keeps frames and faults of an in-process ride."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, float, object, str, dict]] = []
        self.faults: list[dict] = []

    def fault(self, rec) -> None:
        self.faults.append(rec)

    def frame(self, bus, t, payload, kind, values) -> None:
        self.frames.append((bus, t, payload, kind, values))

    def fault_t(self, what: str) -> float:
        (rec,) = [f for f in self.faults if f["what"] == what]
        return rec["t"]


def _ride(name: str, duration: float, **kw) -> Rec:
    w = Rec()
    scenario.run(w, name, kw.pop("seed", 5), duration, **kw)
    return w


# --fault-at ---------------------------------------------------------------------

def test_fault_at_moves_the_gnss_outage():
    default = _ride("gnss-outage", 50.0, buses=("nmea",))
    assert (default.fault_t("gnss-lost"), default.fault_t("gnss-restored")) == (15.0, 30.0)
    w = _ride("gnss-outage", 50.0, buses=("nmea",), fault_at=4.0)
    t0, t1 = w.fault_t("gnss-lost"), w.fault_t("gnss-restored")
    assert (t0, t1) == (4.0, pytest.approx(19.0))
    (lost,) = [f for f in w.faults if f["what"] == "gnss-lost"]
    assert lost["until"] == pytest.approx(19.0)
    fixes = [(t, v["Vehicle.LEV.GNSS.FixQuality"]) for b, t, _p, k, v in w.frames if k == "GGA"]
    assert all(q == 0 for t, q in fixes if t0 <= t < t1 - 1e-9)
    assert all(q > 0 for t, q in fixes if t < t0 or t >= t1)


def test_fault_at_moves_the_theft():
    w = _ride("theft", 30.0, buses=("can",), fault_at=3.0)
    assert w.fault_t("parked") == 0.0 and w.fault_t("moved") == 3.0
    speeds = [(t, v["Vehicle.Speed"]) for b, t, _p, k, v in w.frames if k == "32/01"]
    assert all(s == 0.0 for t, s in speeds if t < 3.0)
    assert all(s == pytest.approx(8.0, abs=0.01) for t, s in speeds if t > 3.1)


def test_fault_at_and_unplug_bus_usage():
    with pytest.raises(cli.UsageError, match="fault-at"):
        cli.parse_args(["--nmea", "/tmp/x", "--duration", "10", "--fault-at", "10"])
    with pytest.raises(cli.UsageError, match="needs --slcan"):
        cli.parse_args(["--nmea", "/tmp/x", "--scenario", "unplug", "--unplug-bus", "can"])
    with pytest.raises(cli.UsageError, match="unplug scenario"):
        cli.parse_args(["--nmea", "/tmp/x", "--unplug-bus", "nmea"])
    args = cli.parse_args(["--jbd", "/tmp/j", "--nmea", "/tmp/n", "--scenario", "commute+unplug"])
    assert args.unplug_bus == "nmea"        # the first bus given, in the order of --help
    args = cli.parse_args(["--jbd", "/tmp/j", "--slcan", "/tmp/c", "--scenario", "unplug"])
    assert args.unplug_bus == "can"


def test_help_documents_the_new_flags(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--fault-at", "--unplug-bus", "unplug", "SLCAN line"):
        assert word in out


# noisy-line on the SLCAN line, in process ----------------------------------------------

def test_noisy_slcan_line_decodes_to_the_intact_frames_only():
    w = _ride("commute+noisy-line", 30.0, buses=("can",), noise_rate=0.2)
    stream = b""
    intact = []
    corrupted = 0
    for bus, _t, payload, kind, _v in w.frames:
        assert bus == "can"
        if kind == "garbage":
            stream += payload
            continue
        line = slcan_frame(payload[0], payload[1])
        if len(payload) == 3:
            line = scenario.edit_line(line, payload[2])
            corrupted += 1
        else:
            intact.append((payload[0] | EXTENDED_FLAG, payload[1]))
        stream += line
    p = SlcanParser()
    keys, datas = p.feed(stream)
    assert list(zip(keys, datas, strict=True)) == intact
    kinds = {f["what"] for f in w.faults}
    assert {"garbage", "bit-error", "stray-byte"} <= kinds
    assert corrupted == sum(1 for f in w.faults if f["what"] in ("bit-error", "stray-byte"))
    assert corrupted > 50 and p.bad >= corrupted


# Over ptys -------------------------------------------------------------------------




def _session(path: Path, hello: bytes, deadline: float) -> bytes:
    """Open the port, send ``hello``, read until the port goes away (EOF or EIO)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd, termios.TCSANOW)     # keep what the device sent before we opened
        if hello:
            os.write(fd, hello)
        out = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.05)
            if not r:
                continue
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                break                       # EIO: the device is gone
            if not chunk:
                break                       # hung up
            out += chunk
        return out
    finally:
        os.close(fd)


def _reopen_wait(path: Path, deadline: float) -> tuple[float, int]:
    """Wait for the link to come back; returns the wall time and how many tries failed."""
    misses = 0
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return time.time(), misses
        misses += 1
        time.sleep(0.02)
    raise AssertionError(f"{path} did not come back")


def _manifest(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _decode(data: bytes) -> list[tuple[int, bytes]]:
    keys, datas = SlcanParser().feed(data)
    return list(zip(keys, datas, strict=True))


def _frames(recs: list[dict]) -> list[tuple[int, bytes]]:
    return [(int(r["id"], 16) | EXTENDED_FLAG, bytes.fromhex(r["data"])) for r in recs]


@pytest.mark.e2e
def test_unplug_slcan_port_disappears_and_returns(tmp_path):
    link, man = tmp_path / "can", tmp_path / "m.jsonl"
    proc = start_sim(["--slcan", str(link), "--scenario", "commute+unplug", "--duration", "8",
                   "--speed", "4", "--fault-at", "2", "--linger", "0.5", "--manifest", str(man),
                   "--seed", "3"])
    try:
        wait_ready(proc)
        deadline = time.monotonic() + 20
        before = _session(link, b"C\rS5\rO\r", deadline)
        gone = time.time()
        back, misses = _reopen_wait(link, deadline)
        after = _session(link, b"S5\rO\r", deadline)
        assert proc.wait(20) == 0
    finally:
        reap(proc)
    recs = _manifest(man)
    header = recs[0]
    assert header["fault_at"] == 2.0 and header["unplug_bus"] == "can"
    (unplug,) = [r for r in recs if r.get("what") == "unplug"]
    (replug,) = [r for r in recs if r.get("what") == "replug"]
    assert (unplug["t"], unplug["bus"]) == (2.0, "can")
    assert unplug["until"] == pytest.approx(2.0 + 0.3 * 8) and replug["t"] == pytest.approx(4.4)
    assert unplug["wall"] <= gone + 0.05 and misses > 0 and back >= replug["wall"]
    assert replug["tty"] and 0.3 < replug["wall"] - unplug["wall"] < 1.5   # 2.4 sim s at 4x

    frames = [r for r in recs if r["type"] == "frame"]
    pre = [r for r in frames if r["wall"] < unplug["wall"]]
    post = [r for r in frames if r["wall"] > replug["wall"]]
    assert len(pre) + len(post) == len(frames)          # nothing delivered while unplugged
    assert all(r["t"] < unplug["t"] for r in pre) and all(r["t"] >= replug["t"] for r in post)
    assert len(pre) > 100 and len(post) > 100

    # Before: a prefix of what was delivered; the rest is what the kernel still held.
    got = _decode(before)
    assert got == _frames(pre)[:len(got)]
    sent = sum(len(slcan_frame(int(r["id"], 16), bytes.fromhex(r["data"]))) for r in pre)
    assert len(before) + unplug["unread_bytes"] == sent + 3   # + the replies to C, S5, O
    # After: a new adapter, opened again, carries everything delivered since.
    assert _decode(after) == _frames(post)
    assert after.startswith(b"\r\r")                    # OK to S5 and O: it started closed

    end = recs[-1]
    assert end["reason"] == "done" and end["unplugged"]["can"] > 150
    assert end["frames"]["can"] == len(frames)


@pytest.mark.e2e
def test_unplug_uart_port_default_bus(tmp_path):
    link, man = tmp_path / "gps", tmp_path / "m.jsonl"
    proc = start_sim(["--nmea", str(link), "--scenario", "unplug", "--duration", "6", "--speed", "4",
                   "--linger", "0.5", "--manifest", str(man), "--nmea-rate", "10"])
    try:
        wait_ready(proc)
        deadline = time.monotonic() + 20
        before = _session(link, b"", deadline)
        _reopen_wait(link, deadline)
        after = _session(link, b"", deadline)
        assert proc.wait(20) == 0
    finally:
        reap(proc)
    recs = _manifest(man)
    (unplug,) = [r for r in recs if r.get("what") == "unplug"]
    (replug,) = [r for r in recs if r.get("what") == "replug"]
    assert unplug["bus"] == "nmea" and unplug["t"] == pytest.approx(1.8)
    assert replug["t"] == pytest.approx(3.6)
    frames = [r for r in recs if r["type"] == "frame"]
    pre = "".join(r["sentence"] + "\r\n" for r in frames if r["wall"] < unplug["wall"])
    post = "".join(r["sentence"] + "\r\n" for r in frames if r["wall"] > replug["wall"])
    assert len(pre) + len(post) == sum(len(r["sentence"]) + 2 for r in frames)
    assert pre.startswith(before.decode()) and len(before) + unplug["unread_bytes"] == len(pre)
    assert after.decode() == post
    assert recs[-1]["unplugged"]["nmea"] > 20


@pytest.mark.e2e
def test_noisy_slcan_pty_decodes_to_the_intact_frames(tmp_path):
    link, man = tmp_path / "can", tmp_path / "m.jsonl"
    proc = start_sim(["--slcan", str(link), "--scenario", "commute+noisy-line", "--noise-rate", "0.1",
                   "--duration", "6", "--speed", "6", "--linger", "0.5", "--manifest", str(man)])
    try:
        wait_ready(proc)
        data = _session(link, b"Z1\rO\r", time.monotonic() + 20)
        assert proc.wait(20) == 0
    finally:
        reap(proc)
    recs = _manifest(man)
    frames = [r for r in recs if r["type"] == "frame"]
    intact = [r for r in frames if r["kind"] != "garbage" and not r.get("corrupted")]
    assert _decode(data) == _frames(intact)
    assert sum(1 for r in frames if r.get("corrupted")) > 20
    assert sum(1 for r in frames if r["kind"] == "garbage") > 20
    assert recs[-1]["dropped"]["can"] == 0
