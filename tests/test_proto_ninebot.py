"""Ninebot / M365 bus: frames built by the PROTOCOLS.md rules, values by hand."""

import pytest

from agent.errors import DecodeError
from agent.protocols import ninebot, protocol


def frame(dev: int, kind: int, reg: int, data: bytes) -> bytes:
    body = bytes([len(data) + 2, dev, kind, reg]) + data
    ck = (sum(body) & 0xFFFF) ^ 0xFFFF
    return b"\x55\xaa" + body + bytes([ck & 0xFF, ck >> 8])


# regs 31..35: 5000 mAh, 77 %, -2.50 A (FF06), 38.50 V (0F0A), temps 45 and 43 (-20 C)
BMS = frame(0x25, 0x01, 0x31, bytes.fromhex("8813 4D00 06FF 0A0F 2D2B".replace(" ", "")))


def test_known_request():
    # the classic M365 "read ESC serial number, 14 bytes"
    assert ninebot.request(0x20, 0x10, 14) == bytes.fromhex("55AA032001100EBDFF")


def test_bms_block():
    assert ninebot.decode(BMS) == pytest.approx({
        "Vehicle.LEV.Battery.RemainingCapacity": 5.0,
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 77,
        "Vehicle.Powertrain.TractionBattery.CurrentCurrent": -2.5,
        "Vehicle.Powertrain.TractionBattery.CurrentVoltage": 38.5,
        "Vehicle.LEV.Battery.Temperature.1": 25,
        "Vehicle.LEV.Battery.Temperature.2": 23,
        "Vehicle.Powertrain.TractionBattery.Temperature.Min": 23,
        "Vehicle.Powertrain.TractionBattery.Temperature.Max": 25,
    })


def test_partial_span_decodes_only_what_it_carries():
    got = ninebot.decode(frame(0x25, 0x01, 0x33, bytes.fromhex("06FF0A0F")))
    assert got == pytest.approx({
        "Vehicle.Powertrain.TractionBattery.CurrentCurrent": -2.5,
        "Vehicle.Powertrain.TractionBattery.CurrentVoltage": 38.5,
    })


def test_esc_range():
    f = frame(0x23, 0x01, 0x25, bytes.fromhex("D204"))  # 1234 -> 12.34 km
    assert ninebot.decode(f) == pytest.approx({"Vehicle.LEV.Range": 12.34})


def test_others_are_not_understood_requests_are():
    p = protocol("ninebot")
    serial = frame(0x23, 0x01, 0x10, b"N1GTS1234567890"[:14])
    assert p.decode(serial) == {} and not p.understood(serial)
    req = ninebot.request(0x22, 0x31, 10)
    assert p.decode(req) == {} and p.understood(req)
    assert ninebot.match(req, BMS)
    assert not ninebot.match(ninebot.request(0x20, 0x31, 10), BMS)


def test_framer_reasons_and_false_start():
    fr = ninebot.framer()
    bad_chk = BMS[:-1] + bytes([BMS[-1] ^ 0x40])
    bad_len = b"\x55\xaa\x01"
    # 55 AA 30 promises 54 bytes and swallows BMS: BMS comes out once that window is
    # complete and fails (here: zeros after it), not before.
    assert fr.feed(bad_chk + bad_len + b"\x55\x55\xaa\x30" + BMS) == []
    assert fr.feed(bytes(40)) == [BMS]
    assert fr.bad == {"checksum": 2, "length": 1}


def test_malformed_raises():
    with pytest.raises(DecodeError):
        ninebot.decode(BMS[:-1])
    with pytest.raises(DecodeError):
        ninebot.decode(BMS[:-1] + b"\x00")
