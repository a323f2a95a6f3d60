"""KT LCD3 <-> controller: frames built by the PROTOCOLS.md rules, values by hand."""

import pytest

from agent.errors import DecodeError
from agent.protocols import kt, protocol


def xor(bs: bytes) -> int:
    x = 0
    for b in bs:
        x ^= b
    return x


def controller(period_ms: int, error: int = 0, power: int = 40, motor_temp: int = 35, flags: int = 0) -> bytes:
    b1_5 = bytes([0x0C, 0x30, period_ms >> 8, period_ms & 0xFF, error])
    b7_11 = bytes([flags, power, motor_temp, 0x00, 0x00])
    return b"\x41" + b1_5 + bytes([xor(b1_5 + b7_11)]) + b7_11


def display(assist: int) -> bytes:
    b0_4 = bytes([0x0C, assist, 0x51, 0x2E, 0x00])
    b6_12 = bytes([0x0A, 0x15, 0x0C, 0x14, 0x00, 0x32, 0x0E])
    return b0_4 + bytes([xor(b0_4 + b6_12) ^ 0x02]) + b6_12


def test_controller_frame():
    f = controller(500, error=0x08)
    # 2200 mm per 500 ms = 4.4 m/s = 15.84 km/h; B8 40 -> about 10 A; B9 35 C
    assert kt.decode(f) == pytest.approx({
        "Vehicle.Speed": 15.84,
        "Vehicle.LEV.Controller.FaultCode": 8,
        "Vehicle.LEV.Controller.MotorCurrent": 10.0,
        "Vehicle.Powertrain.ElectricMotor.Temperature": 35,
        "Vehicle.LEV.Locked": 0.0,
    })
    assert protocol("kt-lcd3", circumference_mm=2100).decode(f)["Vehicle.Speed"] == pytest.approx(15.12)
    assert kt.decode(controller(6000, flags=0x11))["Vehicle.LEV.Locked"] == 1.0


@pytest.mark.parametrize("period", [0, 6000, 0xFFFF])
def test_stopped_wheel(period):
    assert kt.decode(controller(period))["Vehicle.Speed"] == 0.0


def test_controller_framer_reasons_and_false_start():
    good = controller(500)
    bad = good[:6] + bytes([good[6] ^ 1]) + good[7:]
    fr = kt.framer()
    # 41 in garbage just before a frame: 41 41 0C ... fails its XOR, the real one follows
    assert fr.feed(bad + b"\x41" + good + controller(1000)) == [good, controller(1000)]
    assert fr.bad == {"checksum": 2}


def test_display_frames_framed_by_trailer():
    d1, d2 = display(2), display(3)
    fr = protocol("kt-lcd3", direction="display").framer()
    bad = d1[:5] + bytes([d1[5] ^ 0xFF]) + d1[6:]
    out = []
    for chunk in (b"\x32\x0e\x00" + bad, d1[:7], d1[7:] + d2):
        out += fr.feed(chunk)
    assert out == [d1, d2]
    assert fr.bad == {"checksum": 1}
    p = protocol("kt-lcd3")
    assert p.decode(d1) == {} and p.understood(d1)


def test_malformed_raises():
    with pytest.raises(DecodeError):
        kt.decode(controller(500)[:-1])
    with pytest.raises(DecodeError):
        kt.decode(b"\x42" + controller(500)[1:])
    with pytest.raises(DecodeError):
        kt.decode(display(1)[:-1] + b"\x0f")
    with pytest.raises(ValueError):
        kt.framer("both")
