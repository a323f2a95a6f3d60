"""The simulator's UART and NMEA encoders, decoded by the AGENT's framers and decoders.

This is the issue's "every encoder's output decodes with the agent's decoder to the
manifest's values" check: each frame's bytes go through ``agent.protocols.protocol(name)``
framer + decode and must give back exactly the ``values`` the encoder reported.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.protocols import protocol
from firmware_sim import scenario
from firmware_sim.encoders import daly, jbd, kt, ninebot, nmea, surron, wire
from firmware_sim.vehicle import Vehicle


def _decode_all(name: str, stream: bytes, **options) -> list[dict]:
    p = protocol(name, **options)
    fr = p.framer()
    return [p.decode(f) for f in fr.feed(stream)]


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def _ridden(seed: int = 3, seconds: float = 40.0) -> Vehicle:
    v = Vehicle(seed)
    for _ in range(int(seconds * 100)):
        v.step(0.01)
    return v


def test_jbd_answers_registers_like_a_bms():
    v = _ridden()
    assert v.pack_i < 0
    frames = []
    for reg in (3, 4, 5, 0x77):
        out, kind, values = jbd.from_vehicle(v, reg)
        frames.append((out, values))
    got = _decode_all("jbd", b"".join(f for f, _ in frames))
    assert len(got) == 4
    for g, (_f, want) in zip(got, frames, strict=True):
        _same(g, want)
    basic = frames[0][1]
    assert basic[jbd.CURRENT] < 0 and basic[jbd.DISCHARGE_ON] == 1 and basic[jbd.CHARGE_ON] == 1
    assert basic[jbd.SOC] == round(v.soc)
    cells = frames[1][1]
    assert sum(1 for k in cells if k.startswith("Vehicle.LEV.Battery.CellVoltage.")) == v.cells
    spread = cells[wire.CELL_MAX] - cells[wire.CELL_MIN]
    assert 0.001 <= spread < 0.1                         # real packs differ by mV
    assert frames[3][0][2] == jbd.STATUS_ERROR           # unknown register: error reply


def test_jbd_protection_fets_temps_and_13s():
    out, values = jbd.basic_info(48.1, 12.34, 9876, 20000, 321, 0x0A01, 47.6, False, True, 13,
                                 [25.0, -3.2, 61.7])
    (got,) = _decode_all("jbd", out)
    _same(got, values)
    assert got[jbd.PROTECTION] == 0x0A01 and got[jbd.CHARGE_ON] == 0 and got[jbd.DISCHARGE_ON] == 1
    assert got[jbd.CURRENT] == pytest.approx(12.34) and got[jbd.TEMP_MAX] == pytest.approx(61.7, abs=0.051)
    out, values = jbd.cell_voltages([3.7 + 0.001 * i for i in range(13)])
    (got,) = _decode_all("jbd", out)
    _same(got, values)


def test_daly_answers_0x90():
    v = _ridden(5)
    req = daly.request()
    p = daly.parser()
    assert p.feed(b"\x00\xa5" + req[:5]) == [] and p.feed(req[5:]) == [req]
    out, kind, values = daly.serve(v, req)
    assert kind == "90" and len(out) == 13
    (got,) = _decode_all("daly", out)
    _same(got, values)
    out, values = daly.soc_frame(40.2, 7.5, 99.95)     # charging: + current
    (got,) = _decode_all("daly", out)
    _same(got, values)
    assert got[daly.CURRENT] == pytest.approx(7.5)


def test_ninebot_bms_block_and_esc_range():
    v = _ridden(6)
    stream = b""
    wants = []
    for req in (ninebot.request(0x22, 0x31, 10), ninebot.request(0x20, 0x25, 2),
                ninebot.request(0x22, 0x31, 6)):
        (parsed,) = ninebot.parser().feed(b"\x55" + req)
        out, _kind, values = ninebot.serve(v, parsed)
        stream += out
        wants.append(values)
    got = _decode_all("ninebot", stream)
    assert len(got) == 3
    for g, w in zip(got, wants, strict=True):
        _same(g, w)
    assert ninebot.TEMP2 in wants[0] and ninebot.VOLTAGE not in wants[2]
    assert ninebot.serve(v, ninebot.request(0x22, 0x40, 2)) is None


def test_kt_controller_frames():
    stream = b""
    wants = []
    for speed, err, cur, temp in ((0.0, 0, 0.0, 20.0), (23.4, 0, 6.3, 41.0), (12.0, 0x21, 0.0, 90.0)):
        out, values = kt.controller_frame(speed, 2200, 70.0, err, cur > 0, False, cur, temp)
        assert len(out) == 12 and out[0] == 0x41
        stream += out
        wants.append(values)
    got = _decode_all("kt-lcd3", b"\x41\x00" + stream)       # a false start first
    assert len(got) == 3
    for g, w in zip(got, wants, strict=True):
        _same(g, w)
    assert got[1][kt.SPEED] == pytest.approx(23.4, abs=0.05)   # 1 ms period resolution
    assert got[0][kt.SPEED] == 0.0 and got[2][kt.FAULT] == 0x21


def test_kt_display_frame_is_valid_for_the_agent_and_locks():
    frame = kt.display_frame(0, lock=True)
    p = protocol("kt-lcd3", direction="display")
    (f,) = p.framer().feed(b"\x99" + frame)
    assert p.decode(f) == {}
    v = Vehicle(1)
    (req,) = kt.parser().feed(b"\x01\x02" + frame)
    kt.serve(v, req)
    assert v.locked and v.assist_level == 0 and not v.assisting
    (req,) = kt.parser().feed(kt.display_frame(3))
    kt.serve(v, req)
    assert not v.locked and v.assist_level == 3


def test_surron_responses_and_display_frames():
    v = _ridden(7)
    stream = b""
    wants = []
    for param, width in ((9, 4), (10, 4), (13, 1), (14, 1), (15, 2), (16, 4), (23, 2), (36, 0)):
        (req,) = surron.parser().feed(b"\x46\x83" + surron.request(param, width))
        out, _kind, values = surron.serve(v, req)
        stream += out
        wants.append(values)
    out, values = surron.from_vehicle(v)
    stream += out
    wants.append(values)
    got = _decode_all("surron", stream)
    assert len(got) == len(wants)
    for g, w in zip(got, wants, strict=True):
        _same(g, w)
    assert wants[1][surron.CURRENT] < 0
    assert surron.serve(v, surron.request(99, 1)) is None


def test_surron_display_frame_matches_capture_layout():
    out, _ = surron.display_frame(75, 62.055, True)
    assert out.hex().upper() == "578301480C4B67F2000000008000000053"   # a real frame


@pytest.mark.parametrize("talker", ["GN", "GB", "BD", "GP"])
def test_nmea_all_sentences_decode(talker):
    out = []
    for fix in (True, False):
        out.append(nmea.gga(12.3, 29.68, 106.56, 1 if fix else 0, 11, 1.1 if fix else 99.9, 300.2, talker))
        out.append(nmea.rmc(12.3, 29.68, 106.56, 21.7, 123.4, talker, fix))
        out.append(nmea.vtg(21.7, 123.4, talker, fix))
        out.append(nmea.gsa(11, 1.1, fix, talker))
    p = protocol("nmea")
    frames = p.framer().feed(b"".join(s for s, _ in out))
    assert len(frames) == len(out)
    for f, (s, values) in zip(frames, out, strict=True):
        assert len(s) <= 82 and p.understood(f)
        _same(p.decode(f), values)


def test_every_streamed_frame_of_a_ride_decodes_to_its_values():
    """A whole composed ride on every streamed bus, through the agent's framers."""
    class W:
        def __init__(self):
            self.by_bus: dict[str, list] = {}

        def frame(self, bus, t, payload, kind, values):
            self.by_bus.setdefault(bus, []).append((payload, kind, values))

    w = W()
    scenario.run(w, "commute+gnss-outage+controller-fault", 2, 30.0, buses=("nmea", "kt", "surron"),
                 talker="BD", sentences=("GGA", "RMC", "VTG", "GSA"))
    names = {"nmea": "nmea", "kt": "kt-lcd3", "surron": "surron"}
    for bus, frames in w.by_bus.items():
        got = _decode_all(names[bus], b"".join(p for p, _k, _v in frames))
        assert len(got) == len(frames), bus
        for g, (_p, _k, values) in zip(got, frames, strict=True):
            _same(g, values)
    assert len(w.by_bus["kt"]) == 300 and len(w.by_bus["surron"]) == 60
    assert len(w.by_bus["nmea"]) == 4 * 150


def test_wheel_circumference_is_configurable() -> None:
    """The KT wheel period and the Bafang 32/03 circumference follow --wheel-circumference."""
    class Keep:
        def __init__(self) -> None:
            self.frames: list[tuple[str, Any, dict[str, Any]]] = []

        def frame(self, bus: str, t: float, payload: Any, kind: str, values: dict[str, Any]) -> None:
            self.frames.append((kind, payload, values))

    for circ in (1500, 2300):
        keep = Keep()
        scenario.run(keep, "commute", 3, 3.0, buses=("can",), wheel_circ_mm=circ)
        limits = [v for kind, _, v in keep.frames if kind == "32/03"]
        assert limits and all(v["Vehicle.LEV.WheelCircumference"] == circ for v in limits)
    with pytest.raises(ValueError, match="circumference"):
        scenario.run(Keep(), "commute", 3, 1.0, wheel_circ_mm=50)
