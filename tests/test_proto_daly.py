"""Daly BMS: 13-byte frames, values worked out by hand from PROTOCOLS.md."""

import pytest

from agent.errors import DecodeError
from agent.protocols import daly, protocol

# A5 01 90 08 | 020B (523 -> 52.3 V) 0000 749A (29850 -> -15.0 A) 0357 (855 -> 85.5 %) | B3
ANSWER = bytes.fromhex("A5019008020B0000749A0357B3")


def test_answer_checksum_by_hand():
    assert sum(ANSWER[:12]) & 0xFF == 0xB3


def test_decode_cmd_90():
    assert daly.decode(ANSWER) == pytest.approx({
        "Vehicle.Powertrain.TractionBattery.CurrentVoltage": 52.3,
        "Vehicle.Powertrain.TractionBattery.CurrentCurrent": -15.0,  # below 30000: discharging
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 85.5,
    })


def test_requests_for_both_host_addresses():
    assert daly.request() == bytes.fromhex("A5809008" + "00" * 8 + "BD")
    assert daly.request(host=0x40) == bytes.fromhex("A5409008" + "00" * 8 + "7D")
    assert protocol("daly", host=0x40).poll_requests == (bytes.fromhex("A5409008" + "00" * 8 + "7D"),)


def test_other_commands_and_requests():
    other = bytes.fromhex("A5019508" + "01" * 8)
    other += bytes([sum(other) & 0xFF])
    p = protocol("daly")
    assert p.decode(other) == {} and not p.understood(other)
    req = daly.request()
    assert p.decode(req) == {} and p.understood(req)
    assert daly.match(req, ANSWER) and not daly.match(req, other) and not daly.match(req, req)


def test_framer_reasons_and_false_start():
    fr = daly.framer()
    bad_chk = ANSWER[:-1] + b"\x00"
    bad_len = b"\xa5\x01\x90\x07"
    # A5 inside garbage right before the real frame: A5 A5 01 90 -> byte 3 is 90, not 08
    assert fr.feed(bad_chk + bad_len + b"\x11\xa5" + ANSWER) == [ANSWER]
    assert fr.bad == {"checksum": 1, "length": 2}


def test_malformed_raises():
    for bad in (ANSWER[:-1], ANSWER[:-1] + b"\x00", b"\x5a" + ANSWER[1:]):
        with pytest.raises(DecodeError):
            daly.decode(bad)
