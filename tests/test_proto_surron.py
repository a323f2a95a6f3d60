"""Sur-Ron Light Bee BMS: hand-built frames and the real RS-485 captures."""

from pathlib import Path

import pytest

from agent.errors import DecodeError
from agent.protocols import protocol, surron
from agent.protocols.surron import read_surron_log

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
CAPTURES = "surron_lightbee_bms_rs485"


def frame(cmd: int, param: int, data: bytes, addr: int = 0x0116, wanted: int = 0) -> bytes:
    """PROTOCOLS.md: 46 len = bytes wanted (no data), 47 len = data, 57 len = data + chk."""
    size = {0x46: wanted, 0x47: len(data), 0x57: len(data) + 1}[cmd]
    body = bytes([cmd, addr & 0xFF, addr >> 8, param, size]) + data
    return body + bytes([sum(body) & 0xFF])


def test_capture_lines_match_the_rules():
    # verbatim lines of the 75percent capture
    assert frame(0x46, 9, b"", wanted=4) == bytes.fromhex("46160109046A")
    assert frame(0x47, 9, bytes.fromhex("6BF20000")) == bytes.fromhex("47160109046BF20000C8")
    assert frame(0x57, 0x4B, b"\x01", addr=0x0183) == bytes.fromhex("5783014B020129")
    assert surron.request(9, 4) == bytes.fromhex("46160109046A")


def test_params():
    cases = [
        (9, bytes.fromhex("6BF20000"), {VOLTAGE: 62.059}),  # 0xF26B mV
        (10, bytes.fromhex("3CF6FFFF"), {"Vehicle.Powertrain.TractionBattery.CurrentCurrent": -2.5}),
        (13, b"\x4b", {SOC: 75}),
        (14, b"\x62", {"Vehicle.Powertrain.TractionBattery.StateOfHealth": 98}),
        (15, bytes.fromhex("2823"), {"Vehicle.LEV.Battery.RemainingCapacity": 9.0}),  # 9000 mAh
        (16, bytes.fromhex("E0930400"), {"Vehicle.LEV.Battery.FullCapacity": 300.0}),  # 300000 mAh
        (23, bytes.fromhex("3412"), {"Vehicle.LEV.Battery.CycleCount": 0x1234}),
        (36, bytes.fromhex("A00F960F"), {
            "Vehicle.LEV.Battery.CellVoltage.1": 4.0,
            "Vehicle.LEV.Battery.CellVoltage.2": 3.99,
            "Vehicle.Powertrain.TractionBattery.CellVoltage.Min": 3.99,
            "Vehicle.Powertrain.TractionBattery.CellVoltage.Max": 4.0,
        }),
    ]
    for param, data, expected in cases:
        f = frame(0x47, param, data)
        assert surron.decode(f) == pytest.approx(expected), param
        assert surron.understood(f)


def test_display_update():
    data = bytes.fromhex("4B6BF20000000080000000")  # SoC 75, 62.059 V, stand down
    assert surron.decode(frame(0x57, 0x48, data, addr=0x0183)) == pytest.approx({SOC: 75, VOLTAGE: 62.059})
    missing = bytes.fromhex("0000000000000081000000")
    assert surron.decode(frame(0x57, 0x48, missing, addr=0x0183)) == {}
    not_read_yet = bytes.fromhex("4B000000000000800000 00".replace(" ", ""))
    assert surron.decode(frame(0x57, 0x48, not_read_yet, addr=0x0183)) == {SOC: 75}


def test_requests_and_unknown_params():
    p = protocol("surron")
    req = frame(0x46, 9, b"", wanted=4)
    assert p.decode(req) == {} and p.understood(req)
    flags = frame(0x47, 22, bytes.fromhex("E00300000000000000"))
    assert p.decode(flags) == {} and not p.understood(flags)


def test_framer_reasons_and_false_start():
    good = frame(0x47, 13, b"\x4b")
    fr = surron.framer()
    bad = good[:-1] + b"\x00"
    wrong_addr = bytes.fromhex("4716020D01")
    bad_len = bytes.fromhex("57830148 00".replace(" ", ""))
    # 47 16 01 0D 00 in garbage: a 6-byte frame whose checksum would be the real
    # frame's first byte (47, not 6B); the search resumes inside it and finds the frame
    assert fr.feed(bad + wrong_addr + bad_len + b"\x47\x16\x01\x0d\x00" + good) == [good]
    assert fr.bad == {"checksum": 2, "address": 1, "length": 1}


def test_malformed_raises():
    for bad in (frame(0x47, 9, b"\x01\x02"), frame(0x47, 36, b"\x01\x02\x03"), b"\x47\x16\x01"):
        with pytest.raises(DecodeError):
            surron.decode(bad)
    with pytest.raises(DecodeError):
        list(read_surron_log(["12:00:00.000:", "47zz"]))


# --- real captures --------------------------------------------------------------------

def line_verifies(b: bytes) -> bool:
    """The PROTOCOLS.md rule applied to one capture line, independently of the module."""
    if len(b) < 6 or b[0] not in (0x46, 0x47, 0x57):
        return False
    total = {0x46: 6, 0x47: 6 + b[4], 0x57: 5 + b[4]}[b[0]]
    return total == len(b) and sum(b[:-1]) & 0xFF == b[-1]


# Capture lines that are not one whole frame, by file and line number, and why:
NOT_FRAMES = {
    # one frame cut in two by the sniffer (578301480C000000 + 0000000081000000B0): the
    # stream joins the halves into a valid 57/48 frame with status 81 (battery missing)
    "battery_detached": {1474, 1476},
    # line noise (92 92 12 02 ...) during power-up, no frame in it
    "startup_regen_1": set(range(2, 29, 2)),
    "startup_regen_3": set(range(50, 83, 2)),
}


def _captures(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / CAPTURES).glob("*.log"))
    if not files:
        pytest.skip("no Sur-Ron captures in %s" % (shared_data / CAPTURES))
    return files


def test_every_capture_line_is_a_frame_except_the_listed_ones(shared_data):
    for path in _captures(shared_data):
        lines = path.read_text().splitlines()
        bad = set()
        for number, text in enumerate(lines, 1):
            if text.strip() and not text.strip().endswith(":") and not line_verifies(bytes.fromhex(text)):
                bad.add(number)
        key = next((k for k in NOT_FRAMES if k in path.name), None)
        assert bad == NOT_FRAMES.get(key, set()), path.name


def test_captures_frame_without_loss(shared_data):
    p = protocol("surron")
    for path in _captures(shared_data):
        lines = path.read_text().splitlines()
        key = next((k for k in NOT_FRAMES if k in path.name), None)
        skip = NOT_FRAMES.get(key, set())
        whole = []
        for n, t in enumerate(lines, 1):
            if n == 1474 and key == "battery_detached":
                whole.append(bytes.fromhex(t + lines[n + 1]))  # the joined halves
            elif t.strip() and not t.endswith(":") and n not in skip:
                whole.append(bytes.fromhex(t))
        fr = p.framer()
        got = []
        for chunk in read_surron_log(lines):
            got += fr.feed(chunk)
        assert got == whole, path.name
        assert fr.bad == {} and fr.pending == 0
        noise = sum(len(bytes.fromhex(lines[n - 1])) for n in skip) if key != "battery_detached" else 0
        assert fr.garbage_bytes == noise
        for f in got:
            p.decode(f)  # no DecodeError on any real frame
        if key == "battery_detached":
            joined = bytes.fromhex("578301480C000000" + "0000000081000000B0")
            assert joined in got and p.decode(joined) == {}  # battery missing: nothing to report


def test_75_percent_62_volt_capture(shared_data):
    path = next(p for p in _captures(shared_data) if "75percent_62.0V" in p.name)
    p = protocol("surron")
    fr = p.framer()
    socs, volts = set(), set()
    for chunk in read_surron_log(path.read_text().splitlines()):
        for f in fr.feed(chunk):
            got = p.decode(f)
            socs.update([got[SOC]] if SOC in got else [])
            volts.update([got[VOLTAGE]] if VOLTAGE in got else [])
    assert socs == {75.0}
    assert volts
    # The BMS reports 62.051..62.059 V (F263..F26B mV), so "within 0.05 V of 62.0"
    # does not hold by up to 9 mV; the display shows 62.0 because it truncates.
    assert all(62.0 <= v < 62.1 for v in volts), sorted(volts)
    assert all(abs(v - 62.0) < 0.06 for v in volts)
