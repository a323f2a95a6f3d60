"""UART buses of ``ebike-sim`` on ptys, end to end: the host side is built by hand here.

Requests are written with os/termios on the pty as a host would; answers must be what
the manifest says was delivered, and decode with the agent's decoders to its values.
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path

import pytest

from agent.protocols import protocol
from tests.helpers import open_raw, reap, start_sim, wait_ready

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e






def _read_for(fd: int, want: int, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                out += os.read(fd, want - len(out))
            except OSError:
                break
    return out


def _drain(fd: int, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def _manifest(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _jbd_request(reg: int) -> bytes:
    # Built by hand from PROTOCOLS.md: DD A5 reg 00 chkH chkL 77, chk = 0x10000 - sum.
    chk = (0x10000 - (reg + 0)) & 0xFFFF
    return bytes((0xDD, 0xA5, reg, 0x00, chk >> 8, chk & 0xFF, 0x77))


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_jbd_bms_answers_polls_on_a_pty(tmp_path):
    bms, man = tmp_path / "bms", tmp_path / "m.jsonl"
    proc = start_sim(["--jbd", str(bms), "--speed", "20", "--duration", "5", "--manifest", str(man),
                   "--linger", "2.0"])
    fd = None
    try:
        lines = wait_ready(proc)
        assert lines[0].startswith(f"jbd {bms} /dev/pts/")
        fd = open_raw(bms)
        answers = []
        # Noise first: a BMS ignores bytes that are not a checked request.
        os.write(fd, b"\x00\xdd\x13\x77")
        for reg in (3, 4, 3, 5):
            os.write(fd, _jbd_request(reg))
            head = _read_for(fd, 4, 3.0)
            assert len(head) == 4 and head[0] == 0xDD and head[1] == reg, head
            answers.append(head + _read_for(fd, head[3] + 3, 3.0))
        assert _read_for(fd, 1, 0.2) == b""                    # nothing unasked
        assert proc.wait(15) == 0, proc.stderr.read()
    finally:
        reap(proc)
        if fd is not None:
            os.close(fd)
    recs = _manifest(man)
    assert recs[0]["buses"]["jbd"]["path"] == str(bms)
    frames = [r for r in recs if r["type"] == "frame"]
    assert [r["bus"] for r in frames] == ["jbd"] * 4
    assert [r["kind"] for r in frames] == ["03", "04", "03", "05"]
    assert [bytes.fromhex(r["data"]) for r in frames] == answers
    p = protocol("jbd")
    for r, raw in zip(frames, answers, strict=True):
        (f,) = p.framer().feed(raw)
        _same(p.decode(f), r["values"])
    basic = frames[0]["values"]
    assert basic["Vehicle.LEV.Battery.DischargeEnabled"] == 1
    assert 30.0 < basic["Vehicle.Powertrain.TractionBattery.CurrentVoltage"] < 42.0
    end = recs[-1]
    assert end["type"] == "end" and end["frames"]["jbd"] == 4 and end["dropped"]["jbd"] == 0


def test_all_uart_buses_at_once(tmp_path):
    """Daly and Ninebot answer polls, KT and Sur-Ron stream, Sur-Ron answers 46 polls,
    and a JBD MOS write opens the discharge switch (closing the loop through the pty)."""
    paths = {b: tmp_path / b for b in ("jbd", "daly", "ninebot", "kt", "surron", "gps")}
    man = tmp_path / "m.jsonl"
    proc = start_sim(["--jbd", str(paths["jbd"]), "--daly", str(paths["daly"]),
                   "--ninebot", str(paths["ninebot"]), "--kt", str(paths["kt"]),
                   "--surron", str(paths["surron"]), "--nmea", str(paths["gps"]),
                   "--nmea-sentences", "GGA,RMC,VTG,GSA", "--talker", "GB",
                   "--speed", "10", "--duration", "20", "--manifest", str(man), "--linger", "1.0",
                   "--scenario", "commute"])
    fds: dict[str, int] = {}
    got: dict[str, bytes] = {}
    try:
        wait_ready(proc)
        fds = {b: open_raw(p) for b, p in paths.items()}
        daly_req = bytes((0xA5, 0x80, 0x90, 0x08)) + bytes(8)
        os.write(fds["daly"], daly_req + bytes((sum(daly_req) & 0xFF,)))
        body = bytes((0x03, 0x22, 0x01, 0x31, 0x0A))
        ck = (sum(body) & 0xFFFF) ^ 0xFFFF
        os.write(fds["ninebot"], b"\x55\xaa" + body + bytes((ck & 0xFF, ck >> 8)))
        sreq = bytes((0x46, 0x16, 0x01, 0x09, 0x04))
        os.write(fds["surron"], sreq + bytes((sum(sreq) & 0xFF,)))
        # JBD write E1 = 00 02: discharge FET off.
        wbody = bytes((0xE1, 0x02, 0x00, 0x02))
        chk = (0x10000 - sum(wbody)) & 0xFFFF
        os.write(fds["jbd"], b"\xdd\x5a" + wbody + bytes((chk >> 8, chk & 0xFF, 0x77)))
        time.sleep(0.3)
        os.write(fds["jbd"], _jbd_request(3))
        deadline = time.monotonic() + 30
        got = {b: b"" for b in fds}
        while proc.poll() is None and time.monotonic() < deadline:
            for b, fd in fds.items():
                got[b] += _drain(fd, 0.02)
        for b, fd in fds.items():
            got[b] += _drain(fd, 0.2)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        reap(proc)
        for fd in fds.values():
            os.close(fd)
    recs = _manifest(man)
    frames = [r for r in recs if r["type"] == "frame"]
    names = {"jbd": "jbd", "daly": "daly", "ninebot": "ninebot", "kt": "kt-lcd3",
             "surron": "surron", "gps": "nmea"}
    for b in fds:
        bus = "nmea" if b == "gps" else b
        mine = [r for r in frames if r["bus"] == bus]
        assert mine, bus
        if bus == "nmea":
            want = b"".join((r["sentence"] + "\r\n").encode() for r in mine)
        else:
            want = b"".join(bytes.fromhex(r["data"]) for r in mine)
        if bus in ("jbd", "daly", "ninebot"):
            assert got[b] == want, bus
        else:
            # Streams started at "ready"; opening the pty (raw mode, TCSAFLUSH) may have
            # discarded the first bytes: what arrived is the end of what was delivered.
            assert want.endswith(got[b]) and len(got[b]) > 0.8 * len(want), bus
        p = protocol(names[b])
        decoded = [p.decode(f) for f in p.framer().feed(got[b])]
        assert len(decoded) >= 0.8 * len(mine), bus
        for d, r in zip(decoded, mine[len(mine) - len(decoded):], strict=True):
            _same(d, r["values"])
    kinds = {b: [r["kind"] for r in frames if r["bus"] == b] for b in ("daly", "ninebot", "jbd")}
    assert kinds == {"daly": ["90"], "ninebot": ["25/31"], "jbd": ["E1", "03"]}
    jbd03 = [r for r in frames if r["bus"] == "jbd" and r["kind"] == "03"][0]["values"]
    assert jbd03["Vehicle.LEV.Battery.DischargeEnabled"] == 0
    assert jbd03["Vehicle.Powertrain.TractionBattery.CurrentCurrent"] == 0.0
    assert sum(1 for r in frames if r["bus"] == "kt") == 200
    assert sum(1 for r in frames if r["bus"] == "surron" and r["kind"] == "47/9") == 1
    assert [r["kind"] for r in frames if r["bus"] == "nmea"][:4] == ["GGA", "RMC", "VTG", "GSA"]
    # After the discharge switch opened the controller gets nothing: the KT power byte is 0.
    t_open = [r for r in frames if r["bus"] == "jbd" and r["kind"] == "E1"][0]["t"]
    late = [r for r in frames if r["bus"] == "kt" and r["t"] > t_open + 0.05]
    assert late and all(r["values"]["Vehicle.LEV.Controller.MotorCurrent"] == 0 for r in late)
