"""The writes the agent makes to act on the vehicle (signed cloud commands): JBD MOS
control, the KT display's lock frame, the Bafang speed-limit write, and ``send_frame``
on the CAN sources.

Each encoder's bytes must be taken by the simulator's own parser (firmware_sim, which
the agent never imports) and change the simulated vehicle as MANIFEST.md documents;
then the same writes go through real ptys to a running ``ebike-sim``, whose answers and
manifest must show the change. Every wait is bounded.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.decode import CanDecoder
from agent.config import SourceConfig
from agent.dbc.compile import compile_dbc, profile_path
from agent.errors import SourceError
from agent.feed import UartFeed
from agent.protocols import bafang, jbd, kt, protocol
from agent.protocols.slcan import EXTENDED_FLAG, SlcanParser
from agent.signals import BY_NAME
from agent.sources.base import CAN_EFF_FLAG, PACKED_FRAME, Source
from agent.sources.candump import CandumpSource
from agent.sources.slcan import SlcanSource
from agent.sources.socketcan import SocketcanSource
from agent.sources.uart import UartSource
from firmware_sim.encoders import bafang as sim_bafang
from firmware_sim.encoders import jbd as sim_jbd
from firmware_sim.encoders import kt as sim_kt
from firmware_sim.link import SlcanAdapter
from firmware_sim.scenario import Ride
from firmware_sim.vehicle import Vehicle
from tests.helpers import reap, start_sim, stop, wait_for, wait_ready

SPEED_LIMIT = "Vehicle.LEV.SpeedLimit"

# --- JBD MOS control ------------------------------------------------------------


@pytest.mark.parametrize(("charge_off", "discharge_off", "bits"),
                         [(False, False, 0), (True, False, 1), (False, True, 2), (True, True, 3)])
def test_jbd_mos_control_is_obeyed_by_the_simulated_bms(charge_off: bool, discharge_off: bool, bits: int) -> None:
    req = jbd.mos_control_request(charge_off, discharge_off)
    assert req[:6] == bytes((0xDD, 0x5A, 0xE1, 0x02, 0x00, bits)) and req[8] == 0x77 and len(req) == 9
    # chk = 0x10000 - (E1 + 02 + 00 + XX), big endian: the agent's checker and by hand.
    assert (req[6] << 8) | req[7] == jbd.checksum(req[2:6]) == 0x10000 - (0xE1 + 0x02 + bits)
    p = sim_jbd.parser()
    assert p.feed(b"\x00\xdd\x13" + req) == [req]
    v = Vehicle(2)
    answer, kind, values = sim_jbd.serve(v, req)
    assert (kind, values) == ("E1", {})
    assert (v.charge_on, v.discharge_on) == (not charge_off, not discharge_off)
    assert answer == bytes.fromhex("dde10000000077")
    # The register-03 answer now reports those FETs, read by the agent's decoder.
    basic, _kind, _values = sim_jbd.from_vehicle(v, jbd.REG_BASIC)
    got = jbd.decode(basic)
    assert (got[jbd.CHARGE_ON], got[jbd.DISCHARGE_ON]) == (float(not charge_off), float(not discharge_off))


def test_jbd_mos_literal_and_a_damaged_write_is_ignored() -> None:
    req = jbd.mos_control_request(charge_off=False, discharge_off=True)
    assert req == bytes.fromhex("dd5ae1020002ff1b77")
    bad = req[:7] + bytes((req[7] ^ 1,)) + req[8:]
    assert sim_jbd.parser().feed(bad) == [], "the simulator checks the checksum: the test above means something"


def test_discharge_fet_off_stops_the_pack_current_and_the_motor() -> None:
    v = Vehicle(1)
    for _ in range(6000):  # ride until the motor is pulling
        v.step(0.01)
        if v.motor_w > 50.0:
            break
    assert v.pack_i < -1.0 and v.motor_w > 50.0
    sim_jbd.serve(v, jbd.mos_control_request(charge_off=False, discharge_off=True))
    for _ in range(500):
        v.step(0.01)
        assert v.pack_i == 0.0 and v.motor_w == 0.0


class _Kernel:
    """The three kernel calls UartFeed makes, recorded."""

    def __init__(self) -> None:
        self.frames = 0
        self.errors = 0
        self.values: list[float] = []

    def note_frames(self, slot: int, times: list[float]) -> None:
        self.frames += len(times)

    def note_errors(self, slot: int, checksum: int, counter: int) -> None:
        self.errors += checksum + counter

    def feed_values(self, ids: list[int], times: list[float], values: list[float]) -> list[Any]:
        self.values += values
        return []


def test_the_mos_acknowledgement_is_a_good_frame_in_the_runtime() -> None:
    """The BMS's E1 answer goes through the agent's UART path as understood, no values:
    neither "not understood" nor bad content nor a checksum error."""
    ack = sim_jbd.serve(Vehicle(1), jbd.mos_control_request(False, True))[0]
    p = protocol("jbd")
    (frame,) = p.framer().feed(ack)
    assert p.understood(frame) and p.decode(frame) == {}
    k = _Kernel()
    handler = UartFeed(SourceConfig(name="bms", kind="uart", port="/dev/null", protocol="jbd"), k, 0, 0)
    handler.feed(b"\x00" + ack, 0.0)
    assert (handler.ok, handler.not_understood, handler.bad, k.frames, k.errors, k.values) == (1, 0, {}, 1, 0, [])


# --- KT display frame: lock, unlock, assist level -------------------------------


@pytest.mark.parametrize("assist", [0, 3, 5, 15])
@pytest.mark.parametrize("light", [False, True])
def test_kt_display_frame_locks_and_unlocks_the_simulated_controller(assist: int, light: bool) -> None:
    v = Vehicle(1)
    for locked in (True, False, True):
        f = kt.display_frame(assist, locked, light)
        assert f == sim_kt.display_frame(assist, locked, light)
        assert len(f) == 13 and f[11:] == b"\x32\x0e" and f[1] & 0x0F == assist
        assert bool(f[4] & 0x80) is locked and bool(f[1] & 0x80) is light
        # B5 = XOR of the other 12 bytes, then XOR 02: by hand and by the agent's checker.
        x = 0x02
        for i, b in enumerate(f):
            if i != 5:
                x ^= b
        assert f[5] == x == kt.display_check(f)
        assert kt.framer(kt.DISPLAY).feed(b"\x32\x0e\x01" + f) == [f] and kt.decode(f) == {}
        assert sim_kt.parser().feed(b"\x0e\x32" + f) == [f]
        sim_kt.serve(v, f)
        assert v.locked is locked and v.assist_level == assist
        assert v.assisting is not locked
        ctrl, _values = sim_kt.from_vehicle(v)
        assert bool(ctrl[7] & kt.FLAG_LOCKED) is locked
        assert kt.decode(ctrl)[kt.LOCKED] == float(locked)


def test_kt_bad_frames_are_ignored_and_bad_assist_refused() -> None:
    f = kt.display_frame(3, locked=True)
    bad = f[:5] + bytes((f[5] ^ 0x10,)) + f[6:]
    assert sim_kt.parser().feed(bad) == [], "the simulator checks B5: the test above means something"
    for assist in (-1, 16):
        with pytest.raises(ValueError, match="assist level"):
            kt.display_frame(assist, locked=False)


# --- Bafang speed-limit write ---------------------------------------------------


def _decoder() -> CanDecoder:
    return CanDecoder(compile_dbc(profile_path("bafang")))


@pytest.mark.parametrize(("kmh", "data"), [(15.0, b"\xdc\x05"), (25.5, b"\xf6\x09"), (0.0, b"\x00\x00"),
                                           (655.35, b"\xff\xff"), (7, b"\xbc\x02")])
def test_speed_limit_write_is_obeyed_by_the_simulated_controller(kmh: float, data: bytes) -> None:
    can_id, payload = bafang.speed_limit_write(kmh)
    assert payload == data
    assert can_id == 0x05103203 <= 0x1FFFFFFF
    fields = (can_id >> 24, (can_id >> 19) & 0x1F, (can_id >> 16) & 7, (can_id >> 8) & 0xFF, can_id & 0xFF)
    assert fields == (5, 2, 0, 0x32, 0x03)  # service tool -> controller, write, 32/03
    ride = Ride("commute", seed=1, duration=10.0)
    assert ride.vehicle.speed_limit_kmh == 25.0
    assert ride.can_write(can_id, payload) is True
    assert ride.vehicle.speed_limit_kmh == pytest.approx(kmh, abs=1e-9)
    # The controller's 32/03 reports it, read by the agent's own DBC tables and kernel;
    # a limit beyond what any two-wheeler rides (the field's top, 655.35) is not believed.
    sid, sdata, _values = sim_bafang.controller_32_03(ride.vehicle.speed_limit_kmh, 0, 2200)
    assert sdata[:2] == data
    decoded = _decoder().decode(sid | EXTENDED_FLAG, sdata)
    if kmh <= BY_NAME[SPEED_LIMIT].maximum:
        assert decoded["signals"][SPEED_LIMIT] == pytest.approx(kmh, abs=1e-9)
    else:
        assert decoded["refused"][SPEED_LIMIT].startswith("out of range: 655.35 km/h")


def test_the_rider_cruises_at_the_new_limit() -> None:
    top = {}
    for limit in (None, 15.0):
        ride = Ride("commute", seed=1, duration=120.0)
        if limit is not None:
            assert ride.can_write(*bafang.speed_limit_write(limit))
        fastest = 0.0
        for _ in range(12000):
            ride.vehicle.step(0.01)
            fastest = max(fastest, ride.vehicle.speed_kmh)
        top[limit] = fastest
    assert top[None] > 20.0 and top[15.0] < 19.0, top


@pytest.mark.parametrize("kmh", [-0.01, 655.36, 1e9, math.nan, math.inf, -math.inf])
def test_speed_limit_out_of_range_is_refused(kmh: float) -> None:
    with pytest.raises(ValueError, match="speed limit"):
        bafang.speed_limit_write(kmh)


# --- send_frame on the sources --------------------------------------------------


def _captured(src: Source) -> list[bytes]:
    sent: list[bytes] = []
    src.write = sent.append  # type: ignore[method-assign]
    return sent


def _slcan() -> SlcanSource:
    return SlcanSource(SourceConfig(name="can0", kind="slcan", port="/dev/null", protocol="bafang-can"))


@pytest.mark.parametrize(("can_id", "data", "extended", "line"), [
    (0x05103203, b"\xdc\x05", True, b"T051032032DC05\r"),
    (0x1FFFFFFF, bytes(range(8)), True, b"T1FFFFFFF80001020304050607\r"),
    (0x0, b"", True, b"T000000000\r"),
    (0x123, b"\xaa", False, b"t1231AA\r"),
    (0x7FF, b"", False, b"t7FF0\r"),
])
def test_slcan_send_frame_writes_a_lawicel_line(can_id: int, data: bytes, extended: bool, line: bytes) -> None:
    src = _slcan()
    sent = _captured(src)
    src.send_frame(can_id, data, extended)
    assert sent == [line]
    # The simulated adapter takes it as a transmit request, the agent's parser reads it back.
    text = line[:-1].decode()
    assert SlcanAdapter._valid_tx(text[0], text[1:])
    assert SlcanParser().feed(line) == ([can_id | EXTENDED_FLAG if extended else can_id], [data])


BAD_FRAMES = [(0x20000000, b"", True), (-1, b"", True), (0x800, b"", False), (0x123, bytes(9), True)]


@pytest.mark.parametrize(("can_id", "data", "extended"), BAD_FRAMES)
def test_frames_can_cannot_carry_are_refused(can_id: int, data: bytes, extended: bool) -> None:
    for src in (_slcan(), SocketcanSource(SourceConfig(name="can", kind="socketcan", port="can0",
                                                        protocol="bafang-can"))):
        sent = _captured(src)
        with pytest.raises(ValueError, match="CAN"):
            src.send_frame(can_id, data, extended)
        assert sent == []


class _Sock:
    """What SocketcanSource.write sends on its socket."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, record: bytes) -> int:
        self.sent.append(bytes(record))
        return len(record)


def test_socketcan_send_frame_sends_one_can_frame_record() -> None:
    src = SocketcanSource(SourceConfig(name="can", kind="socketcan", port="can0", protocol="bafang-can"))
    sock = _Sock()
    src.sock = sock  # type: ignore[assignment]
    src.send_frame(*bafang.speed_limit_write(15.0))
    src.send_frame(0x123, b"\x01\x02\x03", extended=False)
    assert [len(r) for r in sock.sent] == [16, 16]
    assert PACKED_FRAME.unpack(sock.sent[0]) == (0x05103203 | CAN_EFF_FLAG, 2, b"\xdc\x05" + bytes(6))
    assert PACKED_FRAME.unpack(sock.sent[1]) == (0x123, 3, b"\x01\x02\x03" + bytes(5))
    assert sock.sent[0] == struct.pack("=IB3x8s", 0x85103203, 2, b"\xdc\x05")
    assert src.tx_frames == 2


def test_python_can_send_frame_reaches_the_bus() -> None:
    can = pytest.importorskip("can", minversion="4.3", reason="python-can is not installed (pip install .[can])")
    from agent.sources.pythoncan import PythonCanSource

    channel = f"ebike-writes-{uuid.uuid4().hex[:8]}"
    src = PythonCanSource(SourceConfig(name="pcan", kind="python-can", port="", protocol="bafang-can",
                                       interface="virtual", channel=channel))
    peer = can.Bus(interface="virtual", channel=channel)
    try:
        assert src.poll_open()
        src.send_frame(*bafang.speed_limit_write(15.0))
        src.send_frame(0x321, b"\x55", extended=False)
        got = [peer.recv(2.0), peer.recv(2.0)]
    finally:
        src.close()
        peer.shutdown()
    assert [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in got] == [
        (0x05103203, True, b"\xdc\x05"), (0x321, False, b"\x55")]


def test_sources_that_cannot_transmit_say_so(tmp_path: Path) -> None:
    log = tmp_path / "ride.log"
    log.write_text("(1.0) can0 02F83201#00\n")
    replay = CandumpSource(SourceConfig(name="replay", kind="candump", port=str(log), protocol="bafang-can"))
    with pytest.raises(SourceError, match="cannot transmit"):
        replay.send_frame(*bafang.speed_limit_write(15.0))
    uart = UartSource(SourceConfig(name="gnss", kind="uart", port="/dev/null", protocol="nmea"))
    sent = _captured(uart)
    with pytest.raises(SourceError, match="does not carry CAN"):
        uart.send_frame(0x123, b"", extended=False)
    assert sent == []


# --- end to end: the real simulator on ptys ---------------------------------------


def _records(path: Path) -> list[dict[str, Any]]:
    """The manifest's complete lines so far (it is written while we read)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class _Reader:
    """A source read through an agent framer, or the SLCAN parser, into a list of frames."""

    def __init__(self, src: Source, feed: Any) -> None:
        self.src = src
        self.feed = feed
        self.frames: list[Any] = []

    def until(self, what: str, check: Any, timeout: float = 5.0) -> Any:
        def more() -> Any:
            data = self.src.read()
            if data:
                self.frames += self.feed(data)
            return check(self.frames)

        return wait_for(what, more, timeout, interval=0.005)


def _slcan_frames(parser: SlcanParser) -> Any:
    def feed(data: bytes) -> list[tuple[int, bytes]]:
        keys, datas = parser.feed(data)
        return list(zip(keys, datas, strict=True))

    return feed


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[dict[str, Path], subprocess.Popen[bytes]]]:
    """``ebike-sim`` with an SLCAN adapter, a JBD BMS and a KT controller on ptys."""
    paths = {b: tmp_path / b for b in ("can", "jbd", "kt")}
    paths["manifest"] = tmp_path / "m.jsonl"
    proc = start_sim(["--slcan", str(paths["can"]), "--jbd", str(paths["jbd"]), "--kt", str(paths["kt"]),
                      "--speed", "10", "--duration", "150", "--wait-open", "10", "--linger", "0",
                      "--manifest", str(paths["manifest"])])
    try:
        wait_ready(proc)
        yield paths, proc
    finally:
        reap(proc)


@pytest.mark.e2e
def test_writes_through_ptys_change_the_running_simulator(
        sim: tuple[dict[str, Path], subprocess.Popen[bytes]]) -> None:
    paths, proc = sim
    man = paths["manifest"]
    can_src = SlcanSource(SourceConfig(name="can0", kind="slcan", port=str(paths["can"]), protocol="bafang-can"))
    bms = UartSource(SourceConfig(name="bms", kind="uart", port=str(paths["jbd"]), protocol="jbd", baudrate=9600))
    ktl = UartSource(SourceConfig(name="kt", kind="uart", port=str(paths["kt"]), protocol="kt-lcd3",
                                  baudrate=9600))
    sources: list[Source] = [can_src, bms, ktl]
    try:
        for s in sources:
            assert s.poll_open(), s.last_error

        # Speed limit over SLCAN: 32/03 said 25.00 km/h, then the write, then 15.00 km/h.
        key_32_03 = sim_bafang.ID_CTRL_32_03 | EXTENDED_FLAG
        parser = SlcanParser()
        can_rx = _Reader(can_src, _slcan_frames(parser))
        can_rx.until("a 32/03 frame", lambda fs: any(k == key_32_03 for k, _ in fs))
        assert [d[:2] for k, d in can_rx.frames if k == key_32_03][-1] == b"\xc4\x09"  # 2500: 25.00 km/h
        can_src.send_frame(*bafang.speed_limit_write(15.0))
        (cmd,) = wait_for("the command record", lambda: [r for r in _records(man) if r["type"] == "command"], 5)
        assert {k: cmd[k] for k in ("bus", "id", "data", "what", "speed_limit_kmh")} == {
            "bus": "can", "id": "05103203", "data": "dc05", "what": "speed-limit", "speed_limit_kmh": 15.0}
        seen = len(can_rx.frames)
        can_rx.until("a 32/03 frame with 15.00 km/h",
                     lambda fs: any(k == key_32_03 and d[:2] == b"\xdc\x05" for k, d in fs[seen:]))
        assert parser.errors == 0 and parser.bad == 0, "the adapter refused the transmit (BEL) or a line broke"
        # A frame's record is written once its last byte was handed over: it may trail our read.
        later = wait_for("a 32/03 record after the command", lambda: [
            r for r in _records(man) if r["type"] == "frame" and r["kind"] == "32/03" and r["t"] > cmd["t"]], 5)
        assert all(r["values"][SPEED_LIMIT] == 15.0 and r["data"][:4] == "dc05" for r in later)
        last = [d for k, d in can_rx.frames if k == key_32_03][-1]
        assert _decoder().decode(key_32_03, last)["signals"][SPEED_LIMIT] == 15.0

        # JBD: the MOS write is acknowledged (E1), and register 03 shows the discharge FET off.
        p = protocol("jbd")
        bms_rx = _Reader(bms, p.framer().feed)

        def answer(request: bytes, reg: int) -> bytes:
            n = len(bms_rx.frames)
            bms.write(request)
            (got,) = bms_rx.until(f"the BMS's answer for register {reg:02X}", lambda fs: fs[n:])
            assert got[1] == reg and p.understood(got)
            return bytes(got)

        fets = []
        for req, reg in ((jbd.request(3), 3), (jbd.mos_control_request(False, True), 0xE1), (jbd.request(3), 3),
                         (jbd.mos_control_request(False, False), 0xE1), (jbd.request(3), 3)):
            got = answer(req, reg)
            if reg == 0xE1:
                assert got == bytes.fromhex("dde10000000077") and p.decode(got) == {}
            else:
                fets.append(got[4 + 20])  # FET state byte of the register-03 data
                assert p.decode(got)[jbd.DISCHARGE_ON] == float(fets[-1] >> 1 & 1)
        assert fets == [0b11, 0b01, 0b11]

        # KT: the lock frame sets the controller frames' flag bit 4; unlocking clears it.
        kp = protocol("kt-lcd3")
        kt_rx = _Reader(ktl, kp.framer().feed)

        def first_after(n: int, locked: bool) -> int:
            """Index of the first frame from ``n`` on whose flag bit 4 says ``locked``."""
            def at(fs: list[bytes]) -> int | None:
                for i in range(n, len(fs)):
                    if bool(fs[i][7] & kt.FLAG_LOCKED) is locked:
                        return i + 1  # truthy for wait_for; the caller subtracts
                return None

            return int(kt_rx.until(f"a KT controller frame with locked={locked}", at)) - 1

        first_after(0, False)
        ktl.write(kt.display_frame(3, locked=True))
        start = first_after(len(kt_rx.frames), True)
        kt_rx.until("five more KT frames", lambda fs: len(fs) >= start + 6)
        assert all(kp.decode(f)[kt.LOCKED] == 1.0 for f in kt_rx.frames[start:]), "it stays locked"
        ktl.write(kt.display_frame(3, locked=False))
        first_after(len(kt_rx.frames), False)
    finally:
        for s in sources:
            s.close()
    assert stop(proc) == 0, proc.stderr.read() if proc.stderr else b""

    recs = _records(man)
    assert recs[-1]["type"] == "end" and recs[-1]["reason"] == "SIGTERM"
    jbd_kinds = [r["kind"] for r in recs if r["type"] == "frame" and r["bus"] == "jbd"]
    assert jbd_kinds == ["03", "E1", "03", "E1", "03"]
    runs: list[int] = []
    for r in recs:
        if r["type"] == "frame" and r["bus"] == "kt":
            flag = r["values"]["Vehicle.LEV.Locked"]
            if not runs or runs[-1] != flag:
                runs.append(flag)
    assert runs == [0, 1, 0], "the controller locked once and unlocked once, as the frames said"
