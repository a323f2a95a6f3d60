"""``ebike-agent decode`` and ``signals`` as a technician runs them, on real captures.

Expected values are computed here from the byte layouts in ../shared/PROTOCOLS.md,
not taken from the decoder, so a wrong factor, offset or byte order shows.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\(\d+\.\d+\) \w+ ([0-9A-F]+)#([0-9A-F]*)( [RT])?$")


def agent(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=60)


def decode_file(protocol: str, path: Path) -> list[dict[str, Any]]:
    proc = agent("decode", "--protocol", protocol, "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def controller_32_01(data: bytes) -> dict[str, float]:
    """PROTOCOLS.md: speed u16 0.01 km/h; motor current u16 0.01 A; voltage u16 0.01 V;
    controller temp u8 (value-40 C); motor temp u8 (value-40 C, FF = no sensor)."""
    speed, current, voltage, ctemp, mtemp = struct.unpack("<HHHBB", data)
    out = {"Vehicle.Speed": speed / 100, "Vehicle.LEV.Controller.MotorCurrent": current / 100,
           "Vehicle.LEV.Controller.Voltage": voltage / 100, "Vehicle.LEV.Controller.Temperature": ctemp - 40}
    if mtemp != 0xFF:
        out["Vehicle.Powertrain.ElectricMotor.Temperature"] = mtemp - 40
    return out


def assert_signals(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name


def test_bafang_captures(shared_data: Path) -> None:
    """Every real frame decodes; the damaged lines and error frames are reported, not
    fatal; every controller 32/01 frame gives the values of its bytes."""
    files = sorted((shared_data / "bafang_can").glob("*.log"))
    assert len(files) == 5
    checked = 0
    for path in files:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        out = decode_file("bafang-can", path)
        assert len(out) == len(lines), path.name
        damaged = []
        errors = []
        for number, (line, obj) in enumerate(zip(lines, out, strict=True), start=1):
            m = LINE.match(line)
            assert m, f"{path.name}:{number}: not a candump line: {line!r}"
            can_id, hexdata = int(m.group(1), 16), bytes.fromhex(m.group(2))
            if m.group(1) == "20000080" and not m.group(3):
                errors.append(number)
                assert obj == {"ok": False, "frame": f"{m.group(1)}#{m.group(2)}", "error": "CAN error frame"}
            elif can_id > 0x1FFFFFFF:
                damaged.append(number)
                assert obj["ok"] is False and "29 bits" in obj["error"], (path.name, number, obj)
            else:
                assert obj["ok"] is True, (path.name, number, obj)
                assert obj["frame"] == f"{m.group(1)}#{m.group(2)}"
                if can_id == 0x02F83201 and len(hexdata) == 8:
                    assert_signals(obj["signals"], controller_32_01(hexdata))
                    checked += 1
        if path.name == "display-interaction-excerpt.log":
            assert damaged == [49, 82]
        else:
            assert damaged == []
        assert len(errors) == (8 if path.name == "ride-bus-errors-excerpt.log" else 0)
    assert checked > 30, "too few controller frames checked against their bytes"


def test_speed_limit_reprogrammed_to_45(shared_data: Path) -> None:
    """The capture's README says the limit was set to 45 km/h: 32/03 must say so."""
    out = decode_file("bafang-can", shared_data / "bafang_can" / "ride-above-cutoff-excerpt.log")
    limits = {o["signals"]["Vehicle.LEV.SpeedLimit"] for o in out
              if o["ok"] and "Vehicle.LEV.SpeedLimit" in o["signals"]}
    assert limits == {45.0}


def nmea_latitude(sentence: str) -> float | None:
    """GGA latitude by hand (ddmm.mmmm, S negative) when the receiver has a fix: with fix
    quality 0 a receiver repeats its last position, which the agent does not report."""
    fields = sentence.split("*")[0].split(",")
    if not fields[0].endswith("GGA") or not fields[2] or fields[6] in ("", "0"):
        return None
    value = int(fields[2][:2]) + float(fields[2][2:]) / 60
    return -value if fields[3] == "S" else value


def test_nmea_captures(shared_data: Path) -> None:
    """Every receiver sentence decodes (the harness comments are skipped), and each GGA
    fix has the latitude its digits say."""
    files = sorted((shared_data / "nmea_gpsd").glob("*.log"))
    assert len(files) == 3
    fixes = 0
    for path in files:
        sentences = [line.strip() for line in path.read_text(errors="replace").splitlines()
                     if line.strip() and not line.startswith("#")]
        out = decode_file("nmea", path)
        assert len(out) == len(sentences), path.name
        for sentence, obj in zip(sentences, out, strict=True):
            assert obj["ok"] is True and obj["frame"] == sentence, (path.name, obj)
            lat = nmea_latitude(sentence)
            if lat is not None:
                assert obj["signals"]["Vehicle.CurrentLocation.Latitude"] == pytest.approx(lat, abs=1e-7)
                fixes += 1
    assert fixes > 10


FRAME = "02F83201#6C091F05840D40FF"
FRAME_SIGNALS = {"Vehicle.Speed": 24.12, "Vehicle.LEV.Controller.MotorCurrent": 13.11,
                 "Vehicle.LEV.Controller.Voltage": 34.6, "Vehicle.LEV.Controller.Temperature": 24}


def test_frames_on_the_command_line() -> None:
    """0x096C = 2412 -> 24.12 km/h; 0x051F = 1311 -> 13.11 A; 0x0D84 = 3460 -> 34.6 V;
    0x40 - 40 = 24 C; motor FF = no sensor, so no motor temperature at all."""
    proc = agent("decode", "--protocol", "bafang-can", FRAME, "123#00", "02F83201#6C09")
    assert proc.returncode == 1, "a given frame did not decode"
    first, unknown, short = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["ok"] is True and first["frame"] == FRAME
    assert_signals(first["signals"], FRAME_SIGNALS)
    assert unknown == {"ok": False, "frame": "123#00", "error": "unknown id: no message of the DBC has it"}
    assert short["ok"] is False and short["error"].startswith("truncated: ")
    good = agent("decode", "--protocol", "bafang-can", FRAME, FRAME)
    assert good.returncode == 0, good.stderr


def test_slcan_format_and_stdin() -> None:
    slcan = agent("decode", "--protocol", "bafang-can", "--format", "slcan", "T02F8320186C091F05840D40FF",
                  "t12")
    assert slcan.returncode == 1, slcan.stderr
    good, bad = (json.loads(line) for line in slcan.stdout.splitlines())
    assert good["ok"] is True
    assert_signals(good["signals"], FRAME_SIGNALS)
    assert bad["ok"] is False
    stdin = agent("decode", "--protocol", "bafang-can", "--file", "-",
                  stdin=f"(1.000000) can0 {FRAME} R\n\n(2.000000) can0 nonsense\n")
    assert stdin.returncode == 0, stdin.stderr
    objs = [json.loads(line) for line in stdin.stdout.splitlines()]
    assert [o["ok"] for o in objs] == [True, False]
    assert_signals(objs[0]["signals"], FRAME_SIGNALS)


@pytest.mark.parametrize(("args", "message"), [
    (["--protocol", "jbd-x", FRAME], "unknown protocol"),
    (["--protocol", "bafang-can", "--file", "x.log", FRAME], "not both"),
    (["--protocol", "bafang-can"], "neither"),
    (["--protocol", "bafang-can", "--file", "/nonexistent/capture.log"], "cannot read /nonexistent/capture.log"),
    (["--protocol", "nmea", "--format", "candump", "$GPGGA"], "does not carry"),
])
def test_decode_refusals(args: list[str], message: str) -> None:
    """Input that cannot be read at all is the one case with a non-zero exit."""
    proc = agent("decode", *args)
    assert proc.returncode == 1
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


DESIGN_NAMES = [
    "Vehicle.Speed", "Vehicle.TraveledDistance", "Vehicle.CurrentLocation.Latitude",
    "Vehicle.CurrentLocation.Longitude", "Vehicle.CurrentLocation.Altitude", "Vehicle.CurrentLocation.Heading",
    "Vehicle.LEV.GNSS.Speed", "Vehicle.LEV.GNSS.FixQuality", "Vehicle.LEV.GNSS.Satellites", "Vehicle.LEV.GNSS.HDOP",
    "Vehicle.Powertrain.TractionBattery.CurrentVoltage", "Vehicle.Powertrain.TractionBattery.CurrentCurrent",
    "Vehicle.Powertrain.TractionBattery.CurrentPower", "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
    "Vehicle.Powertrain.TractionBattery.StateOfHealth", "Vehicle.Powertrain.TractionBattery.CellVoltage.Min",
    "Vehicle.Powertrain.TractionBattery.CellVoltage.Max", "Vehicle.Powertrain.TractionBattery.Temperature.Min",
    "Vehicle.Powertrain.TractionBattery.Temperature.Max", "Vehicle.LEV.Battery.RemainingCapacity",
    "Vehicle.LEV.Battery.FullCapacity", "Vehicle.LEV.Battery.CycleCount", "Vehicle.LEV.Battery.CellVoltage.1",
    "Vehicle.LEV.Battery.Temperature.1", "Vehicle.LEV.Battery.ProtectionFlags", "Vehicle.LEV.Battery.ChargeEnabled",
    "Vehicle.LEV.Battery.DischargeEnabled", "Vehicle.Powertrain.ElectricMotor.Temperature",
    "Vehicle.LEV.Controller.Temperature", "Vehicle.LEV.Controller.Voltage", "Vehicle.LEV.Controller.MotorCurrent",
    "Vehicle.LEV.Controller.FaultCode", "Vehicle.LEV.SpeedLimit", "Vehicle.LEV.WheelCircumference",
    "Vehicle.LEV.Pedal.Torque", "Vehicle.LEV.Pedal.Cadence", "Vehicle.LEV.TripDistance", "Vehicle.LEV.Range",
]


def test_signals_catalogue_json() -> None:
    """The catalogue the backend maps ids with: unique ids and names, every contract name."""
    proc = agent("signals", "--json")
    assert proc.returncode == 0, proc.stderr
    sigs = json.loads(proc.stdout)
    ids = [s["id"] for s in sigs]
    names = [s["name"] for s in sigs]
    assert len(set(ids)) == len(ids) and len(set(names)) == len(names)
    assert all(isinstance(i, int) and i >= 1 for i in ids)
    assert all(s["unit"] for s in sigs)
    missing = set(DESIGN_NAMES) - set(names)
    assert not missing
    by_name = {s["name"]: s for s in sigs}
    assert by_name["Vehicle.Speed"]["unit"] == "km/h"
    assert by_name["Vehicle.Powertrain.TractionBattery.CurrentVoltage"]["unit"] == "V"
    assert all(s["minimum"] < s["maximum"] and s["max_rate"] >= 0 for s in sigs), "every signal has a range"
    soc = by_name["Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"]
    assert (soc["minimum"], soc["maximum"]) == (0, 100)
    assert by_name["Vehicle.LEV.GNSS.Satellites"]["maximum"] == 99


def test_values_the_agent_would_not_believe_are_shown_refused_with_the_reason() -> None:
    """A 32/01 frame from a noisy bus: 273 km/h is out of range; the frame's other values
    still decode. An NMEA sentence with a negative speed: the speed refused, the course kept."""
    speed = 27300
    data = struct.pack("<HHHBB", speed, 350, 3900, 60, 55).hex().upper()
    proc = agent("decode", "--protocol", "bafang-can", f"02F83201#{data}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and "Vehicle.Speed" not in out["signals"]
    assert out["refused"] == {"Vehicle.Speed": "out of range: 273 km/h outside 0 to 150"}
    assert out["signals"]["Vehicle.LEV.Controller.MotorCurrent"] == pytest.approx(3.5)
    body = "GPRMC,123519,A,4807.038,N,01131.000,E,-12.4,084.4,230394,003.1,W"
    sentence = f"${body}*{functools.reduce(lambda a, c: a ^ ord(c), body, 0):02X}"
    out = json.loads(agent("decode", "--protocol", "nmea", sentence).stdout)
    assert list(out["refused"]) == ["Vehicle.LEV.GNSS.Speed"]
    assert out["signals"]["Vehicle.CurrentLocation.Heading"] == 84.4


# --- binary UART protocols ------------------------------------------------------------

def jbd_basic_frame() -> bytes:
    """A JBD register-03 answer built by hand from PROTOCOLS.md: 52.10 V, -3.20 A (discharge),
    8.00 of 10.00 Ah, 12 cycles, RSOC 80 %, both FETs on, 13 cells, 1 NTC at 298.1 K."""
    data = struct.pack(">HhHHHHHHHBBBBB", 5210, -320, 800, 1000, 12, 0, 0, 0, 0, 0x10, 80, 0b11, 13, 1)
    data += struct.pack(">H", 2981)
    body = bytes([0x03, 0x00, len(data)]) + data
    chk = (0x10000 - sum(body[1:])) & 0xFFFF
    return b"\xdd" + body + struct.pack(">H", chk) + b"\x77"


def test_jbd_frame_on_the_command_line() -> None:
    out = agent("decode", "--protocol", "jbd", jbd_basic_frame().hex(" "))
    assert out.returncode == 0, out.stderr
    (obj,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert obj["ok"] is True
    assert_signals(obj["signals"], {
        "Vehicle.Powertrain.TractionBattery.CurrentVoltage": 52.10,
        "Vehicle.Powertrain.TractionBattery.CurrentCurrent": -3.20,
        "Vehicle.LEV.Battery.RemainingCapacity": 8.0,
        "Vehicle.LEV.Battery.FullCapacity": 10.0,
        "Vehicle.LEV.Battery.CycleCount": 12,
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 80,
        "Vehicle.LEV.Battery.ChargeEnabled": 1,
        "Vehicle.LEV.Battery.DischargeEnabled": 1,
        "Vehicle.LEV.Battery.ProtectionFlags": 0,
        "Vehicle.LEV.Battery.Temperature.1": 24.95,  # 2981 x 0.1 K - 273.15
        "Vehicle.Powertrain.TractionBattery.Temperature.Min": 24.95,
        "Vehicle.Powertrain.TractionBattery.Temperature.Max": 24.95,
    })


def test_raw_stream_with_garbage_reports_what_it_dropped(tmp_path: Path) -> None:
    frame = jbd_basic_frame()
    corrupt = bytearray(frame)
    corrupt[10] ^= 0xFF
    path = tmp_path / "bms.bin"
    path.write_bytes(b"\x00\xdd\x13garbage" + frame + bytes(corrupt) + frame + b"\xdd")
    out = agent("decode", "--protocol", "jbd", "--format", "raw", "--file", str(path))
    assert out.returncode == 0, out.stderr
    objs = [json.loads(line) for line in out.stdout.splitlines()]
    good = [o for o in objs if o["ok"]]
    assert len(good) == 2 and all(o["frame"] == frame.hex(" ").upper() for o in good)
    errors = [o["error"] for o in objs if not o["ok"]]
    assert any("checksum" in e for e in errors) and any("bytes outside any frame" in e for e in errors)
    stats = agent("decode", "--protocol", "jbd", "--format", "raw", "--stats", "--file", str(path))
    assert json.loads(stats.stdout)["ok"] == 2


def test_surron_capture_gives_the_state_its_file_name_says(shared_data: Path) -> None:
    """75 %, 62.0 V: the BMS reports 62.05x V, which the display shows truncated."""
    path = shared_data / "surron_lightbee_bms_rs485" / "output_2024-03-05_22-04-43_75percent_62.0V_5265km.log"
    out = agent("decode", "--protocol", "surron", "--format", "surron-log", "--file", str(path))
    assert out.returncode == 0, out.stderr
    objs = [json.loads(line) for line in out.stdout.splitlines()]
    assert objs and all(o["ok"] for o in objs)
    soc = {o["signals"]["Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"] for o in objs
           if "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current" in o["signals"]}
    volts = [o["signals"]["Vehicle.Powertrain.TractionBattery.CurrentVoltage"] for o in objs
             if "Vehicle.Powertrain.TractionBattery.CurrentVoltage" in o["signals"]]
    assert soc == {75.0}
    assert volts and all(62.0 <= v < 62.1 for v in volts)


def test_uart_protocol_refuses_a_can_format() -> None:
    out = agent("decode", "--protocol", "surron", "--format", "candump", "00")
    assert out.returncode == 1 and "does not carry protocol surron" in out.stderr


# --- the per-frame contract, over every protocol -------------------------------------
# One JSON line per FRAME argument, in order; a failure names its fault; exit 1 when
# any given frame did not decode, 0 when all did. Valid frames come from the
# simulator's encoders, the faults are made here.

def good_uart_frames() -> dict[str, bytes]:
    from firmware_sim.encoders import daly, jbd, kt, ninebot, surron

    return {
        "jbd": jbd.basic_info(52.1, -3.2, 8000, 10000, 12, 0, 80, True, True, 13, [25.0])[0],
        "daly": daly.soc_frame(52.1, -3.2, 80)[0],
        "ninebot": ninebot.bms_block(8000, 80, -3.2, 52.1, 25, 26)[0],
        "kt-lcd3": kt.controller_frame(25, 2200, 80, 0, True, False, 10, 40)[0],
        "surron": surron.response(surron.P_VOLTAGE, 4, 62.0, -3, 75, 99, 1, 2, 3, [3.9] * 4)[0],
    }


def flipped(frame: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(frame)
    out[index] ^= mask
    return bytes(out)


GARBAGE = b"\x00\x11\x22\x33"  # no start byte of any protocol


def uart_cases(proto: str, good: bytes) -> list[tuple[str, str | None]]:
    """(hex FRAME argument, expected error prefix or None for a frame that decodes)."""
    cases: list[tuple[bytes, str | None]] = [
        (good, None),
        (flipped(good, -3), "checksum: "),  # a byte the check covers
        (good[:-1], "truncated: "),
        (good + b"\x00", "length: "),
        (good + good, "length: 2 frames"),
        (GARBAGE, "no frame: "),
        (b"", "no frame: "),
    ]
    length_field = {"daly": (3, 0x0F), "ninebot": (2, 0x0D)}  # 08 -> 07; 0C -> 01 (< 2)
    if proto in length_field:
        cases.append((flipped(good, *length_field[proto]), "length: "))
    if proto == "surron":
        cases.append((flipped(good, 1), "unknown id: "))  # BMS address 0116 -> 0117
    return [(frame.hex(" "), want) for frame, want in cases]


def assert_one_line_each(proc: subprocess.CompletedProcess[str], cases: list[tuple[str, str | None]]) -> None:
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objs) == len(cases), proc.stdout
    for (text, want), obj in zip(cases, objs, strict=True):
        if want is None:
            assert obj["ok"] is True and obj["signals"], (text, obj)
        else:
            assert obj["ok"] is False and obj["error"].startswith(want), (text, want, obj)
    assert proc.returncode == (0 if all(want is None for _text, want in cases) else 1), proc.stderr


@pytest.mark.parametrize("proto", ["jbd", "daly", "ninebot", "kt-lcd3", "surron"])
def test_uart_given_frames_one_line_each_naming_the_fault(proto: str) -> None:
    cases = uart_cases(proto, good_uart_frames()[proto])
    assert_one_line_each(agent("decode", "--protocol", proto, *(text for text, _want in cases)), cases)
    good = cases[:1]
    assert_one_line_each(agent("decode", "--protocol", proto, good[0][0], good[0][0]), good * 2)


def nmea_cases() -> list[tuple[str, str | None]]:
    from firmware_sim.encoders import nmea

    good = nmea.gga(3600.0, 48.1, 11.5, 1, 8, 0.9, 520.0)[0].decode().strip()
    return [
        (good, None),
        (good.replace("4806.0000", "4806.0001"), "bad checksum"),
        (good[:30], "no checksum"),
        ("garbage", "sentence does not start with '$'"),
        ("", "no frame: "),
    ]


CAN_CASES = {
    "candump": [
        (FRAME, None),
        ("02F83201#6C09", "truncated: "),
        (FRAME + "00", "classic CAN data longer than 8 bytes"),
        ("nonsense", "no '#' in frame"),
        ("", "no frame: "),
    ],
    "slcan": [
        ("T02F8320186C091F05840D40FF", None),
        ("T02F8320126C09", "truncated: "),
        ("t12", "not an SLCAN data frame"),
        ("", "no frame: "),
    ],
}


@pytest.mark.parametrize("fmt", ["candump", "slcan", "nmea"])
def test_can_and_nmea_given_frames_one_line_each_naming_the_fault(fmt: str) -> None:
    proto = "nmea" if fmt == "nmea" else "bafang-can"
    cases = nmea_cases() if fmt == "nmea" else CAN_CASES[fmt]
    args = ("decode", "--protocol", proto, "--format", fmt)
    assert_one_line_each(agent(*args, *(text for text, _want in cases)), cases)
    assert_one_line_each(agent(*args, cases[0][0]), cases[:1])


def test_unknown_can_id_given_is_a_fault_and_in_a_capture_is_counted(tmp_path: Path) -> None:
    """A given frame the profile has no message for did not decode (exit 1); in a
    capture (real ones are full of them) it is a frame with ``message: null``, exit 0."""
    proc = agent("decode", "--protocol", "bafang-can", "123#00")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout) == {"ok": False, "frame": "123#00",
                                       "error": "unknown id: no message of the DBC has it"}
    capture = tmp_path / "capture.log"
    capture.write_text(f"(0.000000) can0 123#00\n(0.010000) can0 {FRAME}\n")
    proc = agent("decode", "--protocol", "bafang-can", "--file", str(capture))
    assert proc.returncode == 0, proc.stderr
    unknown = json.loads(proc.stdout.splitlines()[0])
    assert unknown["ok"] is True and unknown["message"] is None and unknown["signals"] == {}


@pytest.mark.parametrize("proto", ["jbd", "daly", "ninebot", "kt-lcd3", "surron", "nmea"])
def test_stats_count_bytes_outside_frames(tmp_path: Path, proto: str) -> None:
    """``--stats`` on a capture with garbage around a good and a bad frame: the good one
    decodes, the bad one is counted by its fault, and every byte outside a frame is
    counted, NMEA included (its checksums are the decoder's, so a bad one is ``bad``)."""
    if proto == "nmea":
        good, bad = (text.encode() + b"\r\n" for text, _want in nmea_cases()[:2])
    else:
        good = good_uart_frames()[proto]
        bad = flipped(good, -3)
    path = tmp_path / "capture.bin"
    path.write_bytes(GARBAGE + good + bad + GARBAGE)
    fmt = "nmea" if proto == "nmea" else "raw"
    proc = agent("decode", "--protocol", proto, "--format", fmt, "--stats", "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["ok"] == 1
    if proto == "nmea":
        assert (stats["bad"], stats["dropped"], stats["garbage_bytes"]) == ({"bad checksum": 1}, {}, 2 * len(GARBAGE))
    else:
        assert (stats["bad"], stats["dropped"]) == ({}, {"checksum": 1})
        assert stats["garbage_bytes"] == 2 * len(GARBAGE) + len(bad)


def test_a_capture_with_bad_frames_still_exits_0(tmp_path: Path) -> None:
    """The exit status speaks for FRAME arguments; a capture's damage is in its lines."""
    path = tmp_path / "bms.hex"
    good = good_uart_frames()["daly"]
    path.write_text(f"{good.hex(' ')}\n{flipped(good, -3).hex(' ')}\n")
    proc = agent("decode", "--protocol", "daly", "--file", str(path))
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["ok"] for o in objs] == [True, False, False]
    assert objs[1]["error"] == "1 candidate frames dropped: checksum"
