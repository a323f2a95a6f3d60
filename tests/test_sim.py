"""Tests of the vehicle simulator (firmware_sim): core, encoders, and the ptys end to end.

Frames are decoded here independently, with struct and PROTOCOLS.md, not with the
simulator's own code. Every loop that waits on a process or a pty is bounded in time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from firmware_sim import scenario
from firmware_sim.encoders import bafang, nmea
from firmware_sim.prng import Prng
from firmware_sim.vehicle import Vehicle
from tests.helpers import open_raw, reap, start_sim, wait_ready

ROOT = Path(__file__).resolve().parent.parent


class Collect:
    """Writer that keeps everything the scheduler emits."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, float, object, str, dict]] = []
        self.truths: list[tuple[float, dict]] = []

    def frame(self, bus, t, payload, kind, values) -> None:
        self.frames.append((bus, t, payload, kind, values))

    def truth(self, t, state) -> None:
        self.truths.append((t, state))


def _wire(frames) -> bytes:
    out = []
    for bus, _t, payload, _kind, _values in frames:
        if bus == "can":
            can_id, data = payload
            out.append(struct.pack(">I", can_id) + bytes([len(data)]) + data)
        else:
            out.append(payload)
    return b"".join(out)


# PRNG -------------------------------------------------------------------------

def test_prng_deterministic_and_pinned():
    a, b = Prng(1), Prng(1)
    seq = [a.next_u32() for _ in range(1000)]
    assert seq == [b.next_u32() for _ in range(1000)]
    # Pinned so a MicroPython port can be checked against CPython.
    assert seq[:3] == [4020896444, 1346862338, 1124809937]
    assert Prng(2).next_u32() != seq[0]
    assert all(0 <= x < 2**32 for x in seq)


def test_prng_distributions():
    p = Prng(7)
    u = [p.uniform(2.0, 3.0) for _ in range(5000)]
    assert min(u) >= 2.0 and max(u) < 3.0
    assert abs(sum(u) / len(u) - 2.5) < 0.02
    g = [p.gauss(10.0, 2.0) for _ in range(20000)]
    mean = sum(g) / len(g)
    sd = (sum((x - mean) ** 2 for x in g) / len(g)) ** 0.5
    assert abs(mean - 10.0) < 0.05 and abs(sd - 2.0) < 0.05
    first, second = Prng(8), Prng(8)
    assert [first.gauss() for _ in range(5)] == [second.gauss() for _ in range(5)]
    ints = [p.randint(3, 5) for _ in range(300)]
    assert set(ints) == {3, 4, 5}


# Determinism of the whole output ------------------------------------------------

def test_same_seed_same_bytes_different_seed_differs():
    runs = []
    for seed in (5, 5, 6):
        w = Collect()
        scenario.run(w, "commute", seed, 30.0)
        runs.append(_wire(w.frames))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_unknown_scenario_lists_known():
    with pytest.raises(ValueError, match="commute"):
        scenario.run(Collect(), "everest", 1, 1.0)


def test_frame_rates():
    w = Collect()
    scenario.run(w, "commute", 3, 10.0, nmea_rate=5)
    counts: dict[str, int] = {}
    for _bus, _t, _p, kind, _v in w.frames:
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == {"31/00": 500, "32/01": 40, "32/00": 40, "34/01": 40,
                      "34/00": 10, "32/03": 10, "GGA": 50, "RMC": 50}
    assert [t for t, _ in w.truths] == [float(s) for s in range(10)]
    times = [t for _b, t, _p, _k, _v in w.frames]
    assert times == sorted(times)
    counters = [p[1][3] for b, _t, p, k, _v in w.frames if k == "31/00"]
    assert counters[:3] == [0, 1, 2]
    assert all((b - a) % 256 == 1 for a, b in zip(counters, counters[1:], strict=False))


# Bafang encoders, decoded independently -------------------------------------------

def _split_id(can_id: int) -> tuple[int, int, int, int, int]:
    return ((can_id >> 24) & 0x1F, (can_id >> 19) & 0x1F, (can_id >> 16) & 0x7,
            (can_id >> 8) & 0xFF, can_id & 0xFF)


def test_bafang_32_01_round_trip():
    can_id, data, values = bafang.controller_32_01(22.347, 9.876, 38.214, 31.4, 55.6)
    assert can_id == 0x02F83201
    assert _split_id(can_id) == (2, 0x1F, 0, 0x32, 0x01)
    speed, cur, volt, ct, mt = struct.unpack("<HHHBB", data)
    assert (speed, cur, volt, ct, mt) == (2235, 988, 3821, 71, 96)
    assert values == {
        "Vehicle.Speed": speed * 0.01,
        "Vehicle.LEV.Controller.MotorCurrent": pytest.approx(cur * 0.01),
        "Vehicle.LEV.Controller.Voltage": pytest.approx(volt * 0.01),
        "Vehicle.LEV.Controller.Temperature": ct - 40,
        "Vehicle.Powertrain.ElectricMotor.Temperature": mt - 40,
    }


def test_bafang_32_01_clamps_and_no_sensor():
    _id, data, values = bafang.controller_32_01(-3.0, 900.0, 1e6, -80.0, 400.0)
    speed, cur, volt, ct, mt = struct.unpack("<HHHBB", data)
    assert (speed, cur, volt, ct, mt) == (0, 0xFFFF, 0xFFFF, 0, 0xFE)   # FF is "no sensor"
    assert values["Vehicle.LEV.Controller.Temperature"] == -40
    _id, data, values = bafang.controller_32_01(10.0, 1.0, 36.0, 20.0, None)
    assert data[7] == 0xFF
    assert "Vehicle.Powertrain.ElectricMotor.Temperature" not in values


def test_bafang_32_00_round_trip():
    can_id, data, values = bafang.controller_32_00(81.6, 12.345, 71.2, 1789, 52.678)
    assert can_id == 0x02F83200 and len(data) == 8
    soc, trip, cad, tq, rng = struct.unpack("<BHBHH", data)
    assert (soc, trip, cad, tq, rng) == (82, 1235, 71, 1789, 5268)
    assert values["Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"] == soc
    assert values["Vehicle.LEV.TripDistance"] == pytest.approx(trip * 0.01)
    assert values["Vehicle.LEV.Pedal.Cadence"] == cad
    assert values["Vehicle.LEV.Pedal.Torque"] == tq
    assert values["Vehicle.LEV.Range"] == pytest.approx(rng * 0.01)
    _id, data, _v = bafang.controller_32_00(150, 9999, 400, -5, 1e9)
    assert struct.unpack("<BHBHH", data) == (100, 0xFFFF, 0xFF, 0, 0xFFFF)


def test_bafang_32_03_round_trip():
    can_id, data, values = bafang.controller_32_03(25.0, 0x01C0, 2200)
    assert can_id == 0x02F83203
    assert struct.unpack("<HHH", data) == (2500, 0x01C0, 2200)
    assert values == {"Vehicle.LEV.SpeedLimit": 25.0, "Vehicle.LEV.WheelSizeCode": 0x01C0,
                      "Vehicle.LEV.WheelCircumference": 2200}


def test_bafang_31_00_round_trip():
    can_id, data, values = bafang.torque_31_00(1777.4, 68.6, 0x1A5)
    assert can_id == 0x01F83100
    assert _split_id(can_id) == (1, 0x1F, 0, 0x31, 0x00)
    tq, cad, counter = struct.unpack("<HBB", data)
    assert (tq, cad, counter) == (1777, 69, 0xA5)
    assert values == {"Vehicle.LEV.Pedal.Torque": tq, "Vehicle.LEV.Pedal.Cadence": cad}


def test_bafang_34_00_round_trip():
    can_id, data, values = bafang.battery_34_00(14000, 11234.6, 80.2)
    assert can_id == 0x04F83400
    full, rem, soc = struct.unpack("<HHB", data)
    assert (full, rem, soc) == (14000, 11235, 80)
    assert values == {"Vehicle.LEV.Battery.FullCapacity": 14.0,
                      "Vehicle.LEV.Battery.RemainingCapacity": pytest.approx(11.235),
                      "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 80}


def test_bafang_34_01_round_trip_signed():
    can_id, data, values = bafang.battery_34_01(-5.554, 36.17, 22.0)
    assert can_id == 0x04F83401
    cur, volt, temp = struct.unpack("<hHB", data)
    assert (cur, volt, temp) == (-555, 3617, 62)
    # Same bytes as the real capture ride-bus-errors: 04F83401#D5FD210E3E.
    assert data == bytes.fromhex("D5FD210E3E")
    assert values["Vehicle.Powertrain.TractionBattery.CurrentCurrent"] == pytest.approx(-5.55)
    assert values["Vehicle.Powertrain.TractionBattery.CurrentVoltage"] == pytest.approx(36.17)
    assert values["Vehicle.LEV.Battery.Temperature.1"] == 22
    _id, data, _v = bafang.battery_34_01(-1000.0, 36.0, 20.0)
    assert struct.unpack("<hHB", data)[0] == -32768


def test_slcan_and_candump_format():
    data = bytes.fromhex("2a0a0000880e40ff")
    assert bafang.slcan_frame(0x02F83201, data) == b"T02F8320182A0A0000880E40FF\r"
    assert bafang.slcan_frame(0x02F83201, data, 61500) == b"T02F8320182A0A0000880E40FF05DC\r"
    assert bafang.slcan_frame(0x01F83100, b"") == b"T01F831000\r"
    line = bafang.candump_line(1700000000.123456, "can0", 0x02F83201, data)
    assert line == "(1700000000.123456) can0 02F83201#2A0A0000880E40FF"


def test_encoded_values_match_vehicle_state():
    w = Collect()
    scenario.run(w, "commute", 11, 20.0)
    last = {}
    for bus, _t, payload, kind, values in w.frames:
        if bus == "can":
            last[kind] = (payload, values)
    (_cid, data), values = last["32/01"]
    speed = struct.unpack("<HHHBB", data)[0]
    assert values["Vehicle.Speed"] == pytest.approx(speed / 100)


# NMEA ----------------------------------------------------------------------------

def _check_nmea(sentence: bytes) -> list[str]:
    text = sentence.decode("ascii")
    assert text.startswith("$") and text.endswith("\r\n") and len(text) <= 82
    body, star, ck = text[1:-2].rpartition("*")
    assert star == "*"
    x = 0
    for ch in body:
        x ^= ord(ch)
    assert ck == f"{x:02X}"
    return body.split(",")


def _nmea_deg(field: str, hemi: str) -> float:
    dot = field.index(".")
    deg = int(field[:dot - 2]) + float(field[dot - 2:]) / 60.0
    return -deg if hemi in "SW" else deg


def test_nmea_gga_fields_and_checksum():
    t = 3723.45            # 09:02:03.45 on the sim epoch day
    sentence, values = nmea.gga(t, 29.6789012, 106.5812345, 1, 9, 1.04, 312.46)
    f = _check_nmea(sentence)
    assert f[0] == "GNGGA" and f[1] == "090203.45"
    assert f[3] == "N" and f[5] == "E" and f[6] == "1" and f[7] == "09"
    assert len(f[2].split(".")[1]) == 4 and len(f[4].split(".")[0]) == 5
    lat, lon = _nmea_deg(f[2], f[3]), _nmea_deg(f[4], f[5])
    assert abs(lat - 29.6789012) < 2e-6 and abs(lon - 106.5812345) < 2e-6
    assert values["Vehicle.CurrentLocation.Latitude"] == pytest.approx(lat, abs=1e-12)
    assert values["Vehicle.CurrentLocation.Longitude"] == pytest.approx(lon, abs=1e-12)
    assert values["Vehicle.LEV.GNSS.FixQuality"] == 1
    assert values["Vehicle.LEV.GNSS.Satellites"] == 9
    assert values["Vehicle.LEV.GNSS.HDOP"] == float(f[8]) == 1.0
    assert values["Vehicle.CurrentLocation.Altitude"] == float(f[9]) == 312.5
    assert f[10] == "M"


def test_nmea_rmc_fields_talker_and_date_rollover():
    t = 16 * 3600 + 5.0    # 08:00 + 16 h = 00:00:05 next day
    sentence, values = nmea.rmc(t, -33.5, -70.25, 22.4, 359.96, talker="GB")
    f = _check_nmea(sentence)
    assert f[0] == "GBRMC" and f[1] == "000005.00" and f[2] == "A"
    assert f[9] == "221126"
    assert _nmea_deg(f[3], f[4]) == pytest.approx(-33.5) and f[4] == "S" and f[6] == "W"
    knots = float(f[7])
    assert len(f[7].split(".")[1]) == 3 and knots == pytest.approx(22.4 / 1.852, abs=6e-4)
    assert values["Vehicle.LEV.GNSS.Speed"] == pytest.approx(knots * 1.852, abs=1e-9)
    assert f[8] == "0.0" and values["Vehicle.CurrentLocation.Heading"] == 0.0
    assert values["Vehicle.CurrentLocation.Latitude"] == pytest.approx(-33.5)


def test_nmea_epoch_start():
    sentence, _ = nmea.rmc(0.0, 29.67, 106.58, 0.0, 90.0)
    f = _check_nmea(sentence)
    assert f[1] == "080000.00" and f[9] == "211126"


# Physics -------------------------------------------------------------------------

def test_ride_physics_sane():
    v = Vehicle(4)
    dt = 0.01
    soc0, mah0 = v.soc, v.remaining_mah
    temps0 = (v.motor_temp, v.ctrl_temp)
    stops = 0
    moving = False
    max_speed = 0.0
    for _ in range(int(400 / dt)):
        v.step(dt)
        assert 0.0 <= v.speed_kmh <= 30.0
        max_speed = max(max_speed, v.speed_kmh)
        if v.speed_kmh > 15.0:
            moving = True
        elif v.speed_kmh == 0.0 and moving:
            stops += 1
            moving = False
        assert 29.65 <= v.lat <= 29.70 and 106.55 <= v.lon <= 106.62
        assert 250.0 <= v.alt <= 350.0
        assert 30.0 <= v.pack_v <= 42.0
        assert v.pack_i <= 0.0                      # discharging only: + = charging
        assert 8 <= v.sats <= 14 and 0.8 <= v.hdop <= 1.5
        if v.motor_i > 1.0:
            assert v.pack_v < 10 * 4.18 and v.pack_i < -1.0
    assert 19.0 <= max_speed <= 27.0
    assert 5 <= stops <= 11                        # a stop every ~45-70 s
    assert v.soc < soc0 and v.remaining_mah < mah0
    assert v.motor_temp > temps0[0] and v.ctrl_temp > temps0[1]
    assert 0.5 < v.trip_km < 3.0
    assert v.range_km > 10.0
    assert abs(v.gnss_lat - v.lat) * 111320 < 15.0


def test_pack_voltage_follows_ocv_and_resistance():
    v = Vehicle(9)
    for _ in range(3000):
        v.step(0.01)
        if v.motor_i > 5.0:
            break
    from firmware_sim.vehicle import CELLS, ocv_cell
    ocv = CELLS * ocv_cell(v.soc)
    assert v.pack_v == pytest.approx(ocv + v.pack_i * v.r_int, abs=0.05)
    assert 39.0 < CELLS * ocv_cell(80.0) < 40.5


# CLI in-process ------------------------------------------------------------------

def test_cli_errors_exit_2(capsys):
    from firmware_sim.cli import main
    assert main(["--scenario", "nope", "--out", "/dev/null"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown scenario 'nope'")
    assert main(["--nmea-rate", "20", "--out", "/dev/null"]) == 2
    assert "error: --nmea-rate" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--slcan", "/nonexistent-dir/x"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_candump_file_and_manifest(tmp_path):
    from firmware_sim.cli import main
    out, man = tmp_path / "can.log", tmp_path / "m.jsonl"
    assert main(["--out", str(out), "--manifest", str(man), "--speed", "0",
                 "--duration", "5", "--seed", "3"]) == 0
    lines = out.read_text().splitlines()
    recs = [json.loads(x) for x in man.read_text().splitlines()]
    assert recs[0]["type"] == "header" and recs[0]["seed"] == 3
    assert recs[-1]["type"] == "end" and recs[-1]["frames"] == {"can": 320, "nmea": 0}
    frames = [r for r in recs if r["type"] == "frame"]
    assert len(frames) == len(lines) == 320
    for line, r in zip(lines, frames, strict=True):
        stamp, iface, frame = line.split(" ")
        assert iface == "can0"
        assert float(stamp[1:-1]) == pytest.approx(1795248000 + r["t"], abs=1e-6)
        assert frame == f"{r['id']}#{r['data'].upper()}"
    assert sum(r["type"] == "truth" for r in recs) == 5


# --can-fill -------------------------------------------------------------------------

FILL = ["--can-bitrate", "1000000", "--can-fill", "8400"]


def _ride_manifest(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    """A 3 s ride flat out into a candump file, with its manifest."""
    from firmware_sim.cli import main
    man = tmp_path / f"{name}.jsonl"
    assert main(["--out", str(tmp_path / f"{name}.log"), "--manifest", str(man), "--speed", "0",
                 "--duration", "3", "--seed", "4", *extra]) == 0
    return _manifest(man)


def test_can_fill_delivers_its_rate_every_sim_second(tmp_path):
    from agent.cli.decode import CanDecoder
    from agent.dbc.compile import compile_dbc, profile_path
    recs = _ride_manifest(tmp_path, "fill", *FILL)
    assert recs[0]["can_fill"] == 8400 and recs[0]["buses"]["can"]["bitrate"] == 1000000
    frames = [r for r in recs if r["type"] == "frame"]
    assert recs[-1]["frames"]["can"] == len(frames) == 3 * 8400
    per_second: dict[int, int] = {}
    for r in frames:
        per_second[int(r["t"])] = per_second.get(int(r["t"]), 0) + 1
    assert per_second == {0: 8400, 1: 8400, 2: 8400}
    # Spread over the steps, not bunched: 8336 fill frames/s are 83 or 84 in every 10 ms step.
    per_step: dict[float, int] = {}
    for r in frames:
        if r.get("fill"):
            per_step[r["t"]] = per_step.get(r["t"], 0) + 1
    assert len(per_step) == 300 and set(per_step.values()) == {83, 84}

    # The scenario's own frames and the truth are those of the same ride without fill.
    plain = _ride_manifest(tmp_path, "plain")
    own = [r for r in frames if not r.get("fill")]
    assert [(r["t"], r["id"], r["data"]) for r in own] == \
        [(r["t"], r["id"], r["data"]) for r in plain if r["type"] == "frame"]
    assert [r for r in recs if r["type"] == "truth"] == [r for r in plain if r["type"] == "truth"]

    # The fill: messages the Bafang DBC knows, in turn, each decoding to its recorded values.
    fill = [r for r in frames if r.get("fill")]
    assert [r["kind"] for r in fill[:6]] == ["32/01", "32/00", "34/01", "34/00", "32/03", "32/01"]
    decoder = CanDecoder(compile_dbc(profile_path("bafang")))
    for r in fill[::97]:
        got = decoder.decode(int(r["id"], 16) | 0x80000000, bytes.fromhex(r["data"]))["signals"]
        assert got == pytest.approx(r["values"], abs=1e-9), r
    log = (tmp_path / "fill.log").read_text().splitlines()
    assert [x.split(" ")[2] for x in log] == [f"{r['id']}#{r['data'].upper()}" for r in frames]


def test_can_fill_must_fit_the_bus(capsys):
    from firmware_sim.cli import main
    assert main(["--out", "/dev/null", "--can-fill", "8400"]) == 2
    assert "more than the 250000 bit/s bus carries (at most 2122 frames/s" in capsys.readouterr().err
    assert main(["--out", "/dev/null", "--can-bitrate", "1000000", "--can-fill", "8500"]) == 2
    assert "(at most 8467 frames/s" in capsys.readouterr().err
    assert main(["--out", "/dev/null", "--can-fill", "64"]) == 2
    assert "above the 64 frames/s the scenario sends itself" in capsys.readouterr().err
    assert main(["--jbd", "/nonexistent/x", "--can-fill", "1000"]) == 2
    assert "--can-fill needs --slcan or --out" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "--can-fill FRAMES_PER_S" in capsys.readouterr().out


# Through real ptys -----------------------------------------------------------------





def _read_for(fd: int, want: int, timeout: float) -> bytes:
    """Read until ``want`` bytes arrived or ``timeout`` passed."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            out += os.read(fd, want - len(out))
    return out


def _command(fd: int, cmd: bytes, reply_len: int) -> bytes:
    os.write(fd, cmd)
    return _read_for(fd, reply_len, 5.0)


def _read_all(fds: dict[str, int], proc: subprocess.Popen, timeout: float,
              on_progress=None) -> dict[str, bytes]:
    got = {k: b"" for k in fds}
    deadline = time.monotonic() + timeout
    closed: set[str] = set()
    exited_at = None
    while time.monotonic() < deadline and len(closed) < len(fds):
        if exited_at is None and proc.poll() is not None:
            exited_at = time.monotonic()
        if exited_at is not None and time.monotonic() - exited_at > 1.0:
            break
        live = {fd: k for k, fd in fds.items() if k not in closed}
        r, _, _ = select.select(list(live), [], [], 0.05)
        for fd in r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:            # EIO: the simulator closed the master
                chunk = b""
            if not chunk:
                closed.add(live[fd])
            got[live[fd]] += chunk
        if on_progress is not None:
            on_progress(got)
    return got


def _manifest(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.e2e
def test_end_to_end_through_ptys(tmp_path):
    can, gps, man = tmp_path / "can", tmp_path / "gps", tmp_path / "m.jsonl"
    proc = start_sim(["--slcan", str(can), "--nmea", str(gps), "--speed", "20", "--duration", "10",
                   "--manifest", str(man), "--wait-open", "15", "--linger", "1.5"])
    try:
        lines = wait_ready(proc)
        assert lines[0].startswith(f"slcan {can} /dev/pts/")
        assert lines[1].startswith(f"nmea {gps} /dev/pts/")
        assert can.is_symlink() and os.readlink(can) == lines[0].split()[2]
        fd_can, fd_gps = open_raw(can), open_raw(gps)
        assert _command(fd_can, b"S5\r", 1) == b"\r"
        assert _command(fd_can, b"V\r", 6) == b"V1013\r"
        assert _command(fd_can, b"N\r", 6) == b"NA123\r"
        assert _command(fd_can, b"Z0\r", 1) == b"\r"
        assert _command(fd_can, b"S9\r", 1) == b"\x07"
        assert _command(fd_can, b"Q\r", 1) == b"\x07"
        assert _read_for(fd_gps, 1, 0.3) == b""          # nothing before the ride starts
        assert _command(fd_can, b"O\r", 1) == b"\r"

        sent_midway = []

        def poke(got: dict[str, bytes]) -> None:
            if not sent_midway and got["can"].count(b"\r") > 100:
                os.write(fd_can, b"S6\r")                 # bitrate change while open: BEL
                sent_midway.append(True)

        got = _read_all({"can": fd_can, "gps": fd_gps}, proc, 30.0, poke)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        reap(proc)
    os.close(fd_can)
    os.close(fd_gps)
    assert not can.exists() and not gps.exists()          # links removed on exit

    recs = _manifest(man)
    assert recs[0]["type"] == "header" and recs[0]["speed"] == 20.0
    assert recs[0]["buses"]["can"]["slcan"]["path"] == str(can)
    end = recs[-1]
    assert end["type"] == "end" and end["dropped"] == {"can": 0, "nmea": 0}
    want_can = [f"T{r['id']}{len(r['data']) // 2}{r['data'].upper()}\r".encode()
                for r in recs if r["type"] == "frame" and r["bus"] == "can"]
    want_gps = [(r["sentence"] + "\r\n").encode()
                for r in recs if r["type"] == "frame" and r["bus"] == "nmea"]
    assert len(want_can) == end["frames"]["can"] == 640
    assert len(want_gps) == end["frames"]["nmea"] == 100

    assert sent_midway and got["can"].count(b"\x07") == 1
    assert got["can"].replace(b"\x07", b"") == b"".join(want_can)
    assert got["gps"] == b"".join(want_gps)
    walls = [r["wall"] for r in recs if r["type"] == "frame"]
    assert walls == sorted(walls)
    # Paced at 20x: 10 sim seconds take about half a real second.
    assert 0.3 < walls[-1] - walls[0] < 6.0


@pytest.mark.e2e
def test_timestamps_and_overflow_are_recorded(tmp_path):
    can, man = tmp_path / "can", tmp_path / "m.jsonl"
    proc = start_sim(["--slcan", str(can), "--speed", "0", "--duration", "300",
                   "--manifest", str(man), "--linger", "3.0"])
    try:
        wait_ready(proc)
        fd = open_raw(can)
        assert _command(fd, b"Z1\r", 1) == b"\r"
        os.write(fd, b"O\r")
        # Do not read until the ride is over: the pty and the adapter queue overflow.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _ride_over(man, 299):
            time.sleep(0.05)
        got = _read_all({"can": fd}, proc, 20.0)["can"]
        assert proc.wait(10) == 0
    finally:
        reap(proc)
    os.close(fd)
    recs = _manifest(man)
    end = recs[-1]
    assert end["type"] == "end"
    assert end["dropped"]["can"] > 0
    assert end["frames"]["can"] + end["dropped"]["can"] == 300 * 64
    frames = [r for r in recs if r["type"] == "frame"]
    assert len(frames) == end["frames"]["can"]
    assert got[:1] == b"\r"
    lines = got[1:].split(b"\r")[:-1]
    assert len(lines) == len(frames)
    for line, r in zip(lines, frames, strict=True):
        stamp = int(line[-4:], 16)
        assert stamp == round(r["t"] * 1000) % 60000
        assert line[:-4].decode() == f"T{r['id']}{len(r['data']) // 2}{r['data'].upper()}"


@pytest.mark.e2e
def test_can_fill_through_the_slcan_pty(tmp_path):
    """At --speed 1 the fill reaches the host like any frame, once it opened the adapter at
    the bus's 1 Mbit/s (S8): every second of sim time produces 8400 frames, and the host
    reads exactly those the manifest says were delivered, in order."""
    can, man = tmp_path / "can", tmp_path / "m.jsonl"
    proc = start_sim(["--slcan", str(can), *FILL, "--speed", "1", "--duration", "1",
                      "--manifest", str(man), "--wait-open", "15", "--linger", "1.0"])
    try:
        wait_ready(proc)
        fd = open_raw(can)
        assert _command(fd, b"S8\r", 1) == b"\r"
        assert _command(fd, b"O\r", 1) == b"\r"
        got = _read_all({"can": fd}, proc, 20.0)["can"]
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        reap(proc)
    os.close(fd)
    recs = _manifest(man)
    assert recs[0]["buses"]["can"]["bitrate"] == 1000000
    end = recs[-1]
    assert end["type"] == "end" and end["adapter_closed"] == {"can": 0}
    assert end["frames"]["can"] + end["dropped"]["can"] == 8400
    frames = [r for r in recs if r["type"] == "frame"]
    assert len(frames) == end["frames"]["can"]
    assert got == b"".join(f"T{r['id']}{len(r['data']) // 2}{r['data'].upper()}\r".encode() for r in frames)


def _ride_over(man: Path, last_truth_t: float) -> bool:
    """True once the manifest holds the truth record at ``last_truth_t``."""
    for line in man.read_text().splitlines():
        if line.startswith('{"type":"truth"') and json.loads(line)["t"] >= last_truth_t:
            return True
    return False


@pytest.mark.e2e
def test_wait_open_timeout_exits_2(tmp_path):
    can = tmp_path / "can"
    proc = start_sim(["--slcan", str(can), "--wait-open", "0.5"])
    try:
        wait_ready(proc)
        assert proc.wait(10) == 2
        assert proc.stderr.read().decode().startswith("error: the SLCAN channel was not opened")
    finally:
        reap(proc)
    assert not can.exists()


@pytest.mark.e2e
def test_sigterm_stops_cleanly(tmp_path):
    gps, man = tmp_path / "gps", tmp_path / "m.jsonl"
    proc = start_sim(["--nmea", str(gps), "--duration", "600", "--manifest", str(man)])
    try:
        wait_ready(proc)
        fd = open_raw(gps)
        assert _read_for(fd, 1, 5.0)                      # the ride is running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        reap(proc)
    os.close(fd)
    assert not gps.exists()
    end = _manifest(man)[-1]
    assert end["type"] == "end" and end["reason"] == "SIGTERM"
    assert end["frames"]["nmea"] >= 2
