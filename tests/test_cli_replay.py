"""``ebike-agent replay`` as a technician runs it, offline: real captures and the
simulator's logs through the agent's kernel (whichever build EBIKE_AGENT_PUREPYTHON
selects), checked against what the capture itself says (the simulator's manifest, the
file names of the real captures, the README's counts)."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import capture
from firmware_sim.encoders import jbd

REPO = Path(__file__).resolve().parents[1]
SIM_S = 120


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def replay_json(*args: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The objects of ``replay --json`` (each line must parse) and its final summary."""
    proc = agent("replay", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert objs and objs[-1]["type"] == "summary"
    assert {o["type"] for o in objs[:-1]} <= {"window", "alarm", "event", "change"}
    return objs[:-1], objs[-1]


def live(objs: list[dict[str, Any]], signal: str) -> list[dict[str, Any]]:
    return [o["signals"][signal] for o in objs if o["type"] == "window" and o["set"] == "live"
            and signal in o["signals"]]


@pytest.fixture(scope="module")
def overheat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An overheating ride, as the simulator writes it: the --out candump log and the manifest."""
    tmp = tmp_path_factory.mktemp("overheat")
    log, manifest = tmp / "ride.log", tmp / "manifest.jsonl"
    subprocess.run([sys.executable, "-m", "firmware_sim", "--scenario", "overheat", "--duration", str(SIM_S),
                    "--speed", "0", "--seed", "3", "--out", str(log), "--manifest", str(manifest)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return log, manifest


def test_a_real_candump_log_replays_with_its_bad_frames_counted(shared_data: Path) -> None:
    path = shared_data / "bafang_can" / "ride-bus-errors-excerpt.log"
    objs, s = replay_json(str(path))
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    # The README: 8 error frames; every other line is a frame of the DBC or an id it lacks.
    assert s["bad_frames"]["error frames"] == 8
    assert s["frames"] + 8 + s["bad_frames"]["unknown ids"] == len(lines)
    assert sum(s["unknown_ids"].values()) == s["bad_frames"]["unknown ids"]
    assert all(i.startswith("0x") and len(i) == 10 for i in s["unknown_ids"])
    first, last = (float(line.split(")")[0][1:]) for line in (lines[0], lines[-1]))
    assert s["start"] == pytest.approx(first) and s["duration_s"] == pytest.approx(last - first, abs=1e-3)
    assert s["clock"] == "unix" and s["agent"].startswith("not used")
    speeds = live(objs, "Vehicle.Speed")
    assert len(speeds) >= 2 and all(0 < w["min"] <= w["max"] < 30 for w in speeds)


def test_the_text_summary_fits_80_columns(shared_data: Path) -> None:
    proc = agent("replay", str(shared_data / "bafang_can" / "ride-bus-errors-excerpt.log"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "offline: no agent used" in out and "8 error frames" in out
    assert "CAN ids not in the DBC: 0x" in out and "wheel speed" in out


def test_a_real_sniffer_log_shows_what_its_name_says(shared_data: Path, tmp_path: Path) -> None:
    """output_..._75percent_62.0V_...: the Sur-Ron BMS at 75 % and 62.0 V, the protocol
    recognised from the bytes, times from the sniffer's lines; the vehicle's 16-cell
    configuration keeps the default 10-cell pack's over-voltage alarm away."""
    path = shared_data / "surron_lightbee_bms_rs485" / "output_2024-03-05_22-04-43_75percent_62.0V_5265km.log"
    objs, s = replay_json(str(path))
    assert s["format"] == "sniff" and s["sources"][0]["protocol"] == "surron" and s["notes"]
    assert s["clock"] == "day" and s["start"] == pytest.approx(22 * 3600 + 8 * 60 + 14.92)
    soc = live(objs, "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current")
    volts = live(objs, "Vehicle.Powertrain.TractionBattery.CurrentVoltage")
    assert soc and all(w["min"] == w["max"] == 75 for w in soc)
    assert volts and all(61.9 <= w["min"] <= w["max"] <= 62.1 for w in volts)
    assert [a["name"] for a in s["alarms"]] == ["pack_over_voltage"]

    config = tmp_path / "agent.toml"
    config.write_text('device_id = "lightbee"\n[[sources]]\nname = "bms485"\nkind = "uart"\nport = "/dev/ttyUSB0"\n'
                      'protocol = "surron"\nbaudrate = 9600\n[fusion]\ncells = 16\n')
    _objs, s = replay_json(str(path), "--config", str(config))
    assert s["alarms"] == [] and s["sources"][0]["name"] == "bms485"


def test_a_real_nmea_log_runs_on_its_fix_times(shared_data: Path) -> None:
    objs, s = replay_json(str(shared_data / "nmea_gpsd" / "haicom-305N.log"))
    # 09:52:55.810 to 09:54:15.787 UTC on 2007-04-08 (RMC date 080407).
    assert s["clock"] == "unix" and s["start"] == pytest.approx(1176025975.81)
    assert s["duration_s"] == pytest.approx(79.977, abs=1e-3)
    assert s["sources"][0]["protocol"] == "nmea" and s["frames"] > 200
    assert live(objs, "Vehicle.LEV.GNSS.Speed")


def test_the_simulators_overheat_raises_its_alarms_with_their_values(overheat: tuple[Path, Path]) -> None:
    log, manifest = overheat
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    epoch = records[0]["sim_epoch_unix"]
    frames = [r for r in records if r["type"] == "frame"]
    objs, s = replay_json(str(log))
    assert s["frames"] == len(frames) and s["bad_frames"] == {}
    # Each alarm's value is a temperature the controller sent just then, past the threshold
    # for the raise delay (3 s; a window of frames arrives between two fusion steps).
    for name, signal, limit in (("controller_temperature", "Vehicle.LEV.Controller.Temperature", 75),
                                ("motor_temperature", "Vehicle.Powertrain.ElectricMotor.Temperature", 110)):
        alarm = next(a for a in s["alarms"] if a["name"] == name)
        assert alarm["raised"] and alarm["level"] == 2 and alarm["threshold"] == limit
        sent = [(epoch + f["t"], f["values"][signal]) for f in frames if signal in f["values"]]
        over = next(t for t, v in sent if v > limit)
        assert over + 3.0 <= alarm["t"] <= over + 3.5
        assert alarm["value"] in [v for t, v in sent if alarm["t"] - 1 <= t <= alarm["t"]]
        assert any(o["type"] == "alarm" and o["name"] == name for o in objs)
    assert s["events"] == len([o for o in objs if o["type"] == "event"]) >= 1
    # Every live window holds exactly the wheel speeds the simulator sent in it.
    wheel = [(epoch + f["t"], f["values"]["Vehicle.Speed"]) for f in frames if "Vehicle.Speed" in f["values"]]
    windows = [o for o in objs if o["type"] == "window" and o["set"] == "live"]
    assert len(windows) >= SIM_S
    for w in windows:
        sent = [v for t, v in wheel if w["t"] <= t < w["t"] + w["d"]]
        got = w["signals"].get("Vehicle.Speed")
        assert (got is None) == (not sent), w["t"]
        if got is not None:
            assert got["n"] == len(sent)
            assert (got["min"], got["max"], got["last"]) == pytest.approx((min(sent), max(sent), sent[-1]))


def test_the_simulators_manifest_replays_as_its_candump_log(overheat: tuple[Path, Path]) -> None:
    log, manifest = overheat
    by_log, s_log = replay_json(str(log))
    by_manifest, s_manifest = replay_json(str(manifest))
    assert s_manifest["format"] == "manifest" and s_manifest["sources"][0]["format"] == "slcan"
    assert [(a["name"], a["t"], a["value"]) for a in s_manifest["alarms"]] == \
        [(a["name"], a["t"], a["value"]) for a in s_log["alarms"]]
    assert live(by_manifest, "Vehicle.Speed") == live(by_log, "Vehicle.Speed")


def test_corrupt_lines_are_counted_not_fatal(shared_data: Path, tmp_path: Path) -> None:
    clean = shared_data / "bafang_can" / "ride-coasting-excerpt.log"
    lines = clean.read_bytes().splitlines(keepends=True)
    damaged = tmp_path / "damaged.log"
    junk = [b"(1787223560.5) can0 XYZ#00\n", b"\xff\xfe garbage \x00\x01\n", b"(" + b"9" * 9000 + b"\n",
            b"(1787223560.6) can0 01F83100#0102\n"[:20] + b"\n", b"not a frame at all\n"]
    out = lines[:100] + junk + lines[100:]
    damaged.write_bytes(b"".join(out))
    _objs, good = replay_json(str(clean))
    _objs, bad = replay_json(str(damaged))
    assert bad["frames"] == good["frames"]
    assert bad["bad_frames"].get("bad lines", 0) + bad["bad_frames"].get("unreadable lines", 0) == len(junk)


def test_a_corrupt_manifest_line_is_counted(overheat: tuple[Path, Path], tmp_path: Path) -> None:
    _log, manifest = overheat
    lines = manifest.read_text().splitlines(keepends=True)
    frame = json.loads(lines[1])
    assert frame["type"] == "frame"
    broken = tmp_path / "manifest.jsonl"
    broken.write_text("".join(lines[:5] + ['{"type": "frame", "bus": "can", "t": 0.1, "id": "01F8\n',
                                           json.dumps({**frame, "data": "zz"}) + "\n"] + lines[5:]))
    _objs, s = replay_json(str(broken))
    assert s["bad_frames"] == {"unreadable lines": 2}
    assert s["frames"] == sum(1 for line in lines if '"type":"frame"' in line)


def test_speed_paces_the_replay(shared_data: Path) -> None:
    """--speed 4: a 2.7 s capture takes at least 2.7 / 4 s; flat out, a fraction of that."""
    args = argparse.Namespace(file=str(shared_data / "bafang_can" / "ride-bus-errors-excerpt.log"), protocol="",
                              dbc=None, can_protocol=None, config=None, rate=capture.NOMINAL_HZ)
    took = []
    for speed in (0.0, 4.0):
        run = capture.replay_from_args(args, speed)
        started = time.monotonic()
        assert sum(1 for _ in run.outputs()) > 0
        took.append(time.monotonic() - started)
    span = run.summary()["duration_s"]
    assert took[0] < span / 8 <= span / 4 <= took[1] < span / 4 + 1.0


def test_a_raw_uart_dump_needs_no_times(tmp_path: Path) -> None:
    """A binary JBD dump with --protocol: read at the stated nominal rate, every frame decoded."""
    dump = tmp_path / "bms.bin"
    frames = []
    for n in range(50):
        basic, _values = jbd.basic_info(39.0, -2.0, 9000, 13000, 12, 0, 70, True, True, 10, [25.0, 26.0])
        cells, _values = jbd.cell_voltages([3.9] * 9 + [3.9 - 0.001 * n])
        frames += [basic, cells]
    dump.write_bytes(b"".join(frames))
    objs, s = replay_json(str(dump), "--protocol", "jbd", "--rate", "20")
    assert s["format"] == "raw" and s["frames"] == len(frames) and s["bad_frames"] == {}
    assert s["clock"] == "" and "nominal 20/s" in s["timing"]
    assert live(objs, "Vehicle.Powertrain.TractionBattery.CurrentVoltage")
    text = agent("replay", str(dump), "--protocol", "jbd").stdout
    assert "nominal 10/s" in text


@pytest.mark.parametrize("content", [b"hello\nthis is no capture of any bus\n" * 20,
                                     bytes(random.Random(7).randrange(256) for _ in range(4000)), b""])
def test_a_file_of_no_known_format_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "mystery.bin"
    path.write_bytes(content)
    proc = agent("replay", str(path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {path}") and "Traceback" not in proc.stderr


def test_a_missing_file_is_named() -> None:
    proc = agent("replay", "/nonexistent/ride.log")
    assert proc.returncode == 1 and "/nonexistent/ride.log" in proc.stderr
