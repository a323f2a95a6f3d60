"""``ebike-agent watch`` and ``frames``: the rendering from reply dicts and decoded
frames (no agent), the tap's streams decoded as ``decode`` decodes them, and both
commands against the workshop's agent: piped (plain text, JSON lines, ``--count``) and
on a terminal driven in tmux, where the screen must show the simulator's values and
Ctrl-C must end the command cleanly."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.cli import decode, frames, view, watch
from agent.control.client import request
from agent.dbc.compile import EXTENDED_FLAG, compile_dbc
from agent.feed import dbc_for
from agent.sources.base import CAN_ERR_FLAG, PACKED_FRAME, pack_can_frame
from tests.helpers import REPO, wait_for
from tests.workshop import Workshop

NOW = 1_700_000_000.0
FRAME = "02F83201#6C091F05840D40FF"  # 24.12 km/h, 13.11 A, 34.6 V, 24 C (tests/test_decode_cli.py)
# The sim's commute: cruise at 20-24.5 km/h; a 10-cell pack, 3.0-4.2 V a cell.
SPEED_KMH = (0.0, 35.0)
PACK_V = (30.0, 43.0)


def assert_fits(text: str) -> None:
    wide = [line for line in text.splitlines() if len(line) > view.WIDTH]
    assert not wide, f"wider than {view.WIDTH} columns: {wide}"


def bafang_ids() -> set[int]:
    """The CAN ids the Bafang DBC has a message for."""
    return {key & ~EXTENDED_FLAG for key in compile_dbc(dbc_for("bafang-can")).msg_index}


# --- watch: rendering ------------------------------------------------------------------------

def sig(value: float, unit: str, source: str, age: float, stale: bool = False) -> dict[str, Any]:
    return {"value": value, "unit": unit, "at": NOW - age, "source": source, "stale": stale}


def live_reply() -> dict[str, Any]:
    b = "Vehicle.Powertrain.TractionBattery."
    return {"t": NOW, "motion": {"verdict": "moving", "why": "wheel 0.0 km/h, GNSS 21.0 km/h disagree"},
            "signals": {"Vehicle.Speed": sig(0.0, "km/h", "can0", 0.1),
                        "Vehicle.LEV.GNSS.Speed": sig(21.04, "km/h", "gnss", 0.2),
                        "Vehicle.LEV.Fused.Speed": sig(20.96, "km/h", "fusion", 0.1),
                        b + "CurrentVoltage": sig(39.456, "V", "bms", 12.0, stale=True),
                        b + "CellVoltage.Min": sig(3.936, "V", "bms", 0.5),
                        b + "CellVoltage.Max": sig(3.954, "V", "bms", 0.7),
                        "Vehicle.CurrentLocation.Latitude": sig(48.1234567, "deg", "gnss", 0.2),
                        "Vehicle.CurrentLocation.Longitude": sig(-11.5, "deg", "gnss", 0.2),
                        "Vehicle.LEV.GNSS.FixQuality": sig(1.0, "enum", "gnss", 0.2),
                        "Vehicle.LEV.GNSS.Satellites": sig(13.0, "count", "gnss", 0.2),
                        "Vehicle.LEV.GNSS.HDOP": sig(0.9, "ratio", "gnss", 0.2)},
            "alarms": [{"name": "wheel_speed_implausible", "code": 7, "level": 2, "since": NOW - 4, "value": 21.0,
                        "source": None}]}


def row(text: str, label: str) -> list[str]:
    """The cells of the row whose label is ``label``: value, source, age (split on 2+ spaces)."""
    line = next(line for line in text.splitlines() if re.search(rf"\b{re.escape(label)}  ", line))
    return re.split(r"\s{2,}", line.split(label, 1)[1].strip())


def test_watch_rows_show_each_source_with_its_age() -> None:
    text = watch.plain(live_reply())
    assert_fits(text)
    assert text.splitlines()[0].endswith("motion: moving")
    assert row(text, "wheel") == ["0.0 km/h", "can0", "0.1 s"]
    assert row(text, "GNSS") == ["21.0 km/h", "gnss", "0.2 s"]
    assert row(text, "fused") == ["21.0 km/h", "fusion", "0.1 s"]
    assert row(text, "voltage") == ["39.46 V", "bms", "12 s STALE"]
    assert row(text, "min / max") == ["3.936 / 3.954 V", "bms", "0.7 s"]
    assert row(text, "latitude, longitude") == ["48.12346, -11.50000", "gnss", "0.2 s"]
    assert row(text, "fix, satellites, HDOP") == ["1, 13, 0.9", "gnss", "0.2 s"]
    assert row(text, "charge (BMS)") == ["-", "never"]
    assert "ACTIVE ALARMS (1)" in text
    assert f"level 2 wheel_speed_implausible, since {view.when(NOW - 4, NOW)}" in text
    trouble = watch.plain(live_reply(), "agent not answering (12:00:00): no agent answering on /x")
    assert trouble.splitlines()[2].startswith("agent not answering")


# --- frames: the tap's streams and their lines ------------------------------------------------

def test_can_streams_decode_as_decode_does() -> None:
    """The same frame as SLCAN cut between two reads, as a candump line joined midway,
    and as packed records: each one object, equal to ``decode``'s for that frame."""
    want = next(decode.given_frames("can", "bafang-can", "candump", [FRAME]))
    can_id, data = FRAME.split("#")
    slcan = decode.stream("slcan", "bafang-can", joined=True)
    got = slcan.feed(b"T02F832018" + data[:5].encode()) + slcan.feed(data[5:].encode() + b"\r")
    candump = decode.stream("candump", "bafang-can", joined=True)
    got += candump.feed(b"00 can0 " + FRAME.encode() + b"\n(1.0) can0 " + FRAME.encode() + b"\n(1.1) can0 123")
    got += candump.feed(b"#00\n")
    packed = decode.stream("packed", "bafang-can")
    records = pack_can_frame(int(can_id, 16), bytes.fromhex(data)) + PACKED_FRAME.pack(CAN_ERR_FLAG | 4, 8, bytes(8))
    got += packed.feed(records[:9]) + packed.feed(records[9:])
    extra = {"id": can_id, "data": data}
    # SLCAN, candump (its cut line before the first line end dropped), candump, packed, packed.
    assert len(got) == 5
    assert [got[0], got[1], got[3]] == [{**want, **extra}] * 3
    assert got[2] == {"ok": True, "frame": "123#00", "signals": {}, "message": None, "id": "123", "data": "00"}
    assert got[4] == {"ok": False, "frame": "20000004#0000000000000000", "error": "CAN error frame"}


def test_uart_stream_says_what_the_framer_dropped_as_it_happens() -> None:
    from firmware_sim.encoders import jbd

    good = jbd.basic_info(52.1, -3.2, 8000, 10000, 12, 0, 80, True, True, 13, [25.0])[0]
    bad = bytearray(good)
    bad[-3] ^= 1
    s = decode.stream("bytes", "jbd")
    first = s.feed(b"\x00\x11\x22" + good)
    assert [o["ok"] for o in first] == [True, False]
    assert first[0] == decode.given_uart_frame(decode.protocol("jbd"), good.hex(" "))
    assert first[1]["error"] == "3 bytes outside any frame"
    second = s.feed(bytes(bad) + good)
    assert [o.get("error") for o in second] == [None, "1 candidate frames dropped: checksum",
                                               f"{len(bad)} bytes outside any frame"]


def test_frame_lines_like_candump_within_80_columns() -> None:
    from firmware_sim.encoders import jbd, nmea

    can = decode.stream("slcan", "bafang-can").feed(b"T02F8320186C091F05840D40FF\rt1231AB\rT04F834011FF\r")
    known, unknown, short = (frames.line(NOW, "can0", "bafang-can", o) for o in can)
    assert known.startswith(time.strftime("%H:%M:%S.000  can0   02F83201  [8]  6C 09 1F 05 84 0D 40 FF  "
                                          "Controller_32_01", time.localtime(NOW)))
    assert "Speed=24.12 km/h  Controller.MotorCurrent=13.11 A" in " ".join(known.split("\n"))
    assert "Controller.Voltage=34.6 V" in known and "Controller.Temperature=24 C" in known
    assert unknown.endswith("     123  [1]  AB                       unknown")
    assert short.split("  ")[-1].startswith("BAD truncated: ")
    good = jbd.basic_info(52.1, -3.2, 8000, 10000, 12, 0, 80, True, True, 13, [25.0])[0]
    bms, garbage = decode.stream("bytes", "jbd").feed(b"\x00" + good)
    bms_line = frames.line(NOW, "bms", "jbd", bms)
    assert bms_line.split("\n")[0].endswith(f"bms    DD 03 00 {good[3]:02X} 14 5A FE .. 77 [{len(good)}]")
    assert "TractionBattery.CurrentVoltage=52.1 V" in bms_line and "Battery.CycleCount=12" in bms_line
    assert frames.line(NOW, "bms", "jbd", garbage).endswith("bms    -- 1 bytes outside any frame")
    sentence = nmea.gga(3600.0, 48.1, 11.5, 1, 8, 0.9, 520.0)[0]
    (gga,) = decode.stream("bytes", "nmea").feed(sentence)
    gga_line = frames.line(NOW, "gnss", "nmea", gga)
    assert gga_line.split("\n")[0][21:].startswith(sentence.decode()[:40])
    assert "CurrentLocation.Latitude=48.1 deg" in gga_line and "GNSS.Satellites=8" in gga_line
    for text in (known, unknown, short, bms_line, gga_line):
        assert_fits(text)


# --- against the workshop's agent, piped ------------------------------------------------------

def value_of(text: str, label: str) -> float:
    return float(row(text, label)[0].split()[0])


def test_watch_piped_snapshots_and_json(workshop: Workshop) -> None:
    wait_for("the BMS's cells", lambda: "Vehicle.Powertrain.TractionBattery.CellVoltage.Min" in request(
        str(workshop.socket), "live")["live"]["signals"], 20)
    proc = workshop.cli("watch", "--config", str(workshop.config), "--count", "2", "--interval", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout)
    snapshots = [s for s in proc.stdout.split("\n\n") if s.strip()]
    assert len(snapshots) == 2 and "\x1b[" not in proc.stdout
    for text in snapshots:
        for label in ("wheel", "GNSS", "fused"):
            assert SPEED_KMH[0] <= value_of(text, label) <= SPEED_KMH[1], text
        assert PACK_V[0] <= value_of(text, "voltage") <= PACK_V[1], text
        assert row(text, "wheel")[1] == "can0" and row(text, "GNSS")[1] == "gnss"
        assert row(text, "min / max")[1] == "bms"
    proc = workshop.cli("watch", "--socket", str(workshop.socket), "--count", "2", "--interval", "0.2", "--json")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2 and lines[1]["t"] > lines[0]["t"]
    assert {"Vehicle.Speed", "Vehicle.LEV.GNSS.Speed", "Vehicle.LEV.Fused.Speed"} <= set(lines[1]["signals"])


def test_frames_piped_filtered_and_the_same_as_decode(workshop: Workshop) -> None:
    """``--id`` keeps one message; ``--json`` objects carry what ``decode`` says of the
    same bytes; every text line within 80 columns."""
    proc = workshop.cli("frames", "--config", str(workshop.config), "--id", "0x2F83201", "--count", "5")
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout)
    heads = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert len(heads) == 5 and all(" can0   02F83201  [8]  " in h and h.endswith("Controller_32_01") for h in heads)
    speeds = [float(s) for s in re.findall(r"\bSpeed=([0-9.]+) km/h", proc.stdout)]
    assert len(speeds) == 5 and all(SPEED_KMH[0] <= s <= SPEED_KMH[1] for s in speeds)
    proc = workshop.cli("frames", "--socket", str(workshop.socket), "--json", "--count", "60")
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objs) == 60
    assert {o["source"] for o in objs} >= {"can0"}
    can = [o for o in objs if o["source"] == "can0" and o["ok"]][:5]
    assert can
    given = [f"{o['id']}#{o['data']}" for o in can]
    out = workshop.cli("decode", "--protocol", "bafang-can", *given)
    for obj, line in zip(can, out.stdout.splitlines(), strict=True):
        assert {k: obj[k] for k in ("ok", "signals", "message")} == {k: v for k, v in json.loads(line).items()
                                                                       if k in ("ok", "signals", "message")}
    assert {int(o["id"], 16) for o in can} <= bafang_ids()


# --- on a terminal, in tmux -------------------------------------------------------------------

class Tmux:
    """One command in an 80x30 tmux pane on a private server; the shell echoes MARK-<exit
    status> once it ends, and keeps the pane open for a last look."""

    def __init__(self, command: list[str]) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed")
        self.server = f"ebike-test-{uuid.uuid4().hex[:8]}"
        script = f"cd {shlex.quote(str(REPO))} && {shlex.join(command)}; echo MARK-$?; sleep 120"
        self._tmux("new-session", "-d", "-s", "t", "-x", "80", "-y", "30", f"bash --norc -c {shlex.quote(script)}")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def wait_screen(self, what: str, ok: Any, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if ok(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.2)

    def ctrl_c(self) -> str:
        """Ctrl-C, then the screen once the command has ended (MARK-<status>)."""
        self._tmux("send-keys", "-t", "t", "C-c")
        return self.wait_screen("the command to end", lambda s: "MARK-" in s, 10)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux() -> Iterator[Any]:
    started: list[Tmux] = []

    def start(*args: str) -> Tmux:
        t = Tmux([sys.executable, "-m", "agent", *args])
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def assert_ended_cleanly(screen: str) -> None:
    assert "MARK-0" in screen and "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen


def test_watch_on_a_terminal_until_ctrl_c(workshop: Workshop, tmux: Any) -> None:
    """The live view shows the simulator's speeds and pack voltage, refreshes in place
    (one view, not a scroll of them), and Ctrl-C ends it with exit 0."""
    t = tmux("watch", "--config", str(workshop.config))
    first = t.wait_screen("the live view", lambda s: "fused" in s and "ACTIVE ALARMS" in s, 20)
    clock = first.splitlines()[0][:8]
    screen = t.wait_screen("a refresh", lambda s: s.splitlines()[0][:8] != clock, 10)
    assert screen.count("ACTIVE ALARMS") == 1
    for label in ("wheel", "GNSS", "fused"):
        assert SPEED_KMH[0] <= value_of(screen, label) <= SPEED_KMH[1], screen
    assert PACK_V[0] <= value_of(screen, "voltage") <= PACK_V[1], screen
    assert row(screen, "wheel")[1] == "can0" and row(screen, "latitude, longitude")[1] == "gnss"
    assert_ended_cleanly(t.ctrl_c())


def test_frames_on_a_terminal_until_ctrl_c(workshop: Workshop, tmux: Any) -> None:
    """Frame lines of the three buses scroll by: CAN ids the Bafang DBC knows with
    their message names and values; Ctrl-C ends the stream with exit 0."""
    t = tmux("frames", "--config", str(workshop.config))
    screen = t.wait_screen("CAN frame lines", lambda s: len(re.findall(r" can0 +[0-9A-F]{8}  \[\d\]  ", s)) >= 3, 20)
    ids = {int(i, 16) for i in re.findall(r" can0 +([0-9A-F]{8})  \[\d\]  ", screen)}
    assert ids and ids <= bafang_ids(), screen
    assert re.search(r"(Controller|Battery|TorqueSensor)_3\d_0\d", screen), screen
    assert_ended_cleanly(t.ctrl_c())
