"""Simulator faults of the serial links: ``unplug`` (a port disappears and returns),
``noisy-line`` on the SLCAN line, and ``--fault-at``; of the sensors (``gnss-stuck``,
``gnss-negative``, ``gnss-frozen``, ``wheel-magnet``) and the CAN bus (``can-noise``),
each checked against the same ride without the fault.

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

from agent.protocols.slcan import EXTENDED_FLAG, SlcanParser
from firmware_sim import cli, scenario
from firmware_sim.encoders import bafang, nmea
from firmware_sim.encoders.bafang import slcan_frame
from tests.helpers import reap, start_sim, wait_ready

ROOT = Path(__file__).resolve().parent.parent


class Rec:
    """Keeps frames and faults of an in-process ride."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, float, object, str, dict]] = []
        self.faults: list[dict] = []
        self.truths: list[tuple[float, dict]] = []

    def fault(self, rec) -> None:
        self.faults.append(rec)

    def truth(self, t, state) -> None:
        self.truths.append((t, state))

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
    for word in ("--fault-at", "--unplug-bus", "unplug", "SLCAN line", "--can-noise-share",
                 "gnss-stuck", "wheel-magnet", "can-noise"):
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


# Receiver, wheel sensor and CAN bus faults, in process ----------------------------------

GNSS = ("GGA", "RMC", "VTG")
RIDING = 8                  # a seed that rides at ~20 km/h from 5 s to 55 s
KT_STANDING = b"\x17\x70"    # KT wheel period 6000 ms: the wheel stands


def _fields(sentence: bytes) -> list[str]:
    """The fields of one NMEA sentence, once its checksum is checked."""
    body, star, ck = sentence.decode("ascii").rstrip("\r\n")[1:].rpartition("*")
    assert star == "*" and ck == nmea.checksum(body), sentence
    return body.split(",")


def _gnss_fault(name: str, **kw) -> tuple[float, float, list[tuple[str, list[str], list[str]]]]:
    """Ride with receiver fault ``name`` beside the same ride without it: the fault's start
    and end, and each sentence sent meanwhile as (kind, fields sent, fields a healthy
    receiver sent). Before and after the fault both receivers send the same bytes."""
    w = _ride("commute+" + name, 60.0, buses=("nmea",), sentences=GNSS, seed=RIDING, **kw)
    ref = _ride("commute", 60.0, buses=("nmea",), sentences=GNSS, seed=RIDING)
    t0, t1 = w.fault_t(name), w.fault_t(name + "-cleared")
    (start,) = [f for f in w.faults if f["what"] == name]
    assert start["until"] == t1
    during = []
    for (_b, t, got, kind, _v), (_rb, rt, want, _rk, _rv) in zip(w.frames, ref.frames, strict=True):
        assert t == rt
        if t0 <= t < t1:
            during.append((kind, _fields(got), _fields(want)))
        else:
            assert got == want
    knots = [float(want[7]) for kind, _got, want in during if kind == "RMC"]
    assert min(knots) * nmea.KNOTS_KMH > 15.0       # the bike rides all along
    return t0, t1, during


def test_gnss_stuck_reports_speed_zero_with_a_valid_fix():
    t0, t1, during = _gnss_fault("gnss-stuck")
    assert (t0, t1) == (18.0, 36.0)
    courses = set()
    for kind, got, want in during:
        if kind == "GGA":
            assert got == want                      # fix quality, position, altitude as usual
        elif kind == "RMC":
            assert got[:7] == want[:7] and got[2] == "A"  # time, status A, the moving position
            assert got[7] == "0.000" and got[9:] == want[9:]
            courses.add(got[8])
        else:
            assert (got[5], got[7], got[9]) == ("0.000", "0.00", "A")
            courses.add(got[1])
    (course,) = courses                             # held at its last value ...
    first = next(want for kind, _got, want in during if kind == "RMC")
    assert abs(float(course) - float(first[8])) < 3.0
    assert len({want[8] for kind, _got, want in during if kind == "RMC"}) > 10   # ... not followed


def test_gnss_negative_writes_minus_the_speed():
    t0, t1, during = _gnss_fault("gnss-negative", fault_at=10.0)
    assert (t0, t1) == (10.0, pytest.approx(28.0))
    for kind, got, want in during:
        if kind == "RMC":
            assert got[:7] == want[:7] and got[8:] == want[8:] and got[2] == "A"
            assert got[7] == "-" + want[7]          # e.g. -11.300 knots
        elif kind == "VTG":
            assert got[:5] == want[:5] and got[6] == want[6] and got[8:] == want[8:]
            assert (got[5], got[7]) == ("-" + want[5], "-" + want[7])
        else:
            assert got == want


def _deg(field: str, hemi: str) -> float:
    """An NMEA (d)ddmm.mmmm field in degrees."""
    dot = field.index(".")
    deg = int(field[:dot - 2]) + float(field[dot - 2:]) / 60.0
    return -deg if hemi in "SW" else deg


def test_gnss_frozen_repeats_the_last_fix():
    t0, t1, during = _gnss_fault("gnss-frozen")
    assert (t0, t1) == (18.0, 36.0)
    # Position and altitude (GGA), position, speed and course (RMC, VTG): one value each ...
    frozen = {"GGA": (2, 3, 4, 5, 9), "RMC": (3, 4, 5, 6, 7, 8), "VTG": (1, 5, 7)}
    held = {}
    for kind, fields in frozen.items():
        sent = [(got, want) for k, got, want in during if k == kind]
        (held[kind],) = {tuple(got[i] for i in fields) for got, _want in sent}
        assert len({tuple(want[i] for i in fields) for _got, want in sent}) > 10   # not the bike's
        for got, want in sent:                      # the rest as usual: time, fix, status A
            assert [x for i, x in enumerate(got) if i not in fields] == \
                [x for i, x in enumerate(want) if i not in fields]
    # ... of a single fix, the one of when the fault started.
    gga, rmc, vtg = held["GGA"], held["RMC"], held["VTG"]
    assert gga[:4] == rmc[:4] and (vtg[0], vtg[1]) == (rmc[5], rmc[4])
    first = next(want for kind, _got, want in during if kind == "RMC")
    north = (_deg(rmc[0], rmc[1]) - _deg(first[3], first[4])) * 111320.0
    east = (_deg(rmc[2], rmc[3]) - _deg(first[5], first[6])) * 111320.0 * 0.87
    assert (north * north + east * east) ** 0.5 < 2.0
    assert abs(float(rmc[4]) - float(first[7])) * nmea.KNOTS_KMH < 1.0


def test_wheel_magnet_reads_speed_zero_on_the_controller_only():
    kw = {"buses": ("can", "kt", "nmea"), "seed": RIDING}
    w = _ride("commute+wheel-magnet", 60.0, **kw)
    ref = _ride("commute", 60.0, **kw)
    t0, t1 = w.fault_t("wheel-magnet"), w.fault_t("wheel-magnet-cleared")
    assert (t0, t1) == (18.0, 36.0)
    assert w.truths == ref.truths                   # the truth keeps the true speed
    truth_kmh = {t: state["speed_kmh"] for t, state in w.truths}
    riding = 0
    for (bus, t, got, kind, values), (_b, _t, want, _k, ref_values) in zip(w.frames, ref.frames, strict=True):
        if not (t0 <= t < t1 and kind in ("32/01", "41")):
            assert (got, values) == (want, ref_values)      # GNSS, 31/00, 32/00, 34/xx: true
            continue
        riding += truth_kmh[float(int(t))] > 10.0
        assert values == {**ref_values, "Vehicle.Speed": 0.0} and ref_values["Vehicle.Speed"] > 5.0
        if bus == "can":
            assert got[0] == want[0] == bafang.ID_CTRL_32_01
            assert got[1][:2] == b"\0\0" and got[1][2:] == want[1][2:]   # current, V, temps true
        else:
            assert got[3:5] == KT_STANDING and got[:3] == want[:3] and got[7:] == want[7:]
            x = 0
            for b in got[1:6] + got[7:]:
                x ^= b
            assert got[6] == x                      # its check byte fits the new period
    assert riding > 200                             # 18 s x (4 Hz 32/01 + 10 Hz KT), at ~20 km/h


BAFANG_IDS = {bafang.ID_TORQUE_31_00, bafang.ID_CTRL_32_00, bafang.ID_CTRL_32_01,
              bafang.ID_CTRL_32_03, bafang.ID_BATT_34_00, bafang.ID_BATT_34_01}


def test_can_noise_replaces_its_share_under_real_ids():
    kw = {"buses": ("can", "nmea", "kt")}
    w = _ride("commute+can-noise", 120.0, can_noise_share=0.25, **kw)
    ref = _ride("commute", 120.0, **kw)
    (rec,) = w.faults
    assert (rec["what"], rec["t"], rec["share"]) == ("can-noise", 0.0, 0.25)
    can = noise = changed = 0
    for (bus, t, got, kind, values), want in zip(w.frames, ref.frames, strict=True):
        can += bus == "can"
        if kind != "noise":
            assert (bus, t, got, kind, values) == want      # every other stream unchanged
            continue
        noise += 1
        assert (bus, t, values) == ("can", want[1], {})
        assert got[0] == want[2][0] and got[0] in BAFANG_IDS     # a real id ...
        assert len(got[1]) == len(want[2][1])                    # ... and data length
        changed += got[1] != want[2][1]
    assert can == 120 * 64 and abs(noise / can - 0.25) < 0.02
    assert changed == noise


def test_can_noise_cli_manifest_and_candump(tmp_path):
    out, man = tmp_path / "can.log", tmp_path / "m.jsonl"
    assert cli.main(["--out", str(out), "--manifest", str(man), "--speed", "0", "--duration", "4",
                     "--scenario", "commute+can-noise", "--can-noise-share", "0.5", "--fault-at", "1",
                     "--can-fill", "300"]) == 0
    recs = _manifest(man)
    assert recs[0]["can_noise_share"] == 0.5
    (rec,) = [r for r in recs if r["type"] == "fault"]
    assert (rec["what"], rec["t"], rec["share"]) == ("can-noise", 1.0, 0.5)
    frames = [r for r in recs if r["type"] == "frame"]
    assert recs[-1]["frames"]["can"] == len(frames) == 4 * 300
    noise = [r for r in frames if r["kind"] == "noise"]
    assert all(r["t"] >= 1.0 and r["values"] == {} and int(r["id"], 16) in BAFANG_IDS for r in noise)
    assert abs(len(noise) / sum(r["t"] >= 1.0 for r in frames) - 0.5) < 0.05
    assert any(r.get("fill") for r in noise) and not all(r.get("fill") for r in noise)
    log = out.read_text().splitlines()
    assert [x.split(" ")[2] for x in log] == [f"{r['id']}#{r['data'].upper()}" for r in frames]


def test_can_noise_share_usage():
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(cli.UsageError, match="--can-noise-share"):
            cli.parse_args(["--out", "/dev/null", "--can-noise-share", bad])
    assert cli.parse_args(["--out", "/dev/null", "--can-noise-share", "1"]).can_noise_share == 1.0


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
