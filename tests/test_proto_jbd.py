"""JBD BMS: frames built here by the PROTOCOLS.md rules, values worked out by hand."""

import pytest

from agent.errors import DecodeError
from agent.protocols import jbd, protocol
from agent.signals import BY_NAME


def frame(reg: int, data: bytes, status: int = 0, extra: bytes = b"") -> bytes:
    """DD reg status len data [extra] chkH chkL 77, chk = 0x10000 - sum(status..data)."""
    covered = bytes([status, len(data)]) + data
    chk = (0x10000 - sum(covered)) & 0xFFFF
    return bytes([0xDD, reg]) + covered + extra + bytes([chk >> 8, chk & 0xFF, 0x77])


# 52.30 V, -1.50 A, 10.00 Ah of 20.00 Ah, 12 cycles, date, balance 0, protection bits 0+1,
# sw 10, RSOC 50 %, FET 02 (discharge on only), 13 cells, 2 NTCs 2981 and 3000 (0.1 K).
BASIC = bytes.fromhex("146E FF6A 03E8 07D0 000C 2A21 0000 0000 0003 10 32 02 0D 02 0BA5 0BB8".replace(" ", ""))
CELLS = bytes.fromhex("0CE4 0CF0 0CDF".replace(" ", ""))  # 3300, 3312, 3295 mV


def test_request_bytes():
    assert jbd.request(3) == bytes.fromhex("DDA50300FFFD77")  # the well-known read of 03
    assert jbd.request(4) == bytes.fromhex("DDA50400FFFC77")
    # write 1 byte 0x01 to register E1: chk = 0x10000 - (E1 + 01 + 01) = FF1D
    assert jbd.write_request(0xE1, b"\x01") == bytes.fromhex("DD5AE10101FF1D77")


def test_basic_info():
    got = jbd.decode(frame(3, BASIC))
    assert got == pytest.approx({
        "Vehicle.Powertrain.TractionBattery.CurrentVoltage": 52.30,
        "Vehicle.Powertrain.TractionBattery.CurrentCurrent": -1.50,
        "Vehicle.LEV.Battery.RemainingCapacity": 10.0,
        "Vehicle.LEV.Battery.FullCapacity": 20.0,
        "Vehicle.LEV.Battery.CycleCount": 12,
        "Vehicle.LEV.Battery.ProtectionFlags": 3,
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 50,
        "Vehicle.LEV.Battery.ChargeEnabled": 0,
        "Vehicle.LEV.Battery.DischargeEnabled": 1,
        "Vehicle.LEV.Battery.Temperature.1": 298.1 - 273.15,
        "Vehicle.LEV.Battery.Temperature.2": 300.0 - 273.15,
        "Vehicle.Powertrain.TractionBattery.Temperature.Min": 298.1 - 273.15,
        "Vehicle.Powertrain.TractionBattery.Temperature.Max": 300.0 - 273.15,
    })
    assert got.keys() <= BY_NAME.keys()


def test_cells():
    got = jbd.decode(frame(4, CELLS))
    assert got == pytest.approx({
        "Vehicle.LEV.Battery.CellVoltage.1": 3.300,
        "Vehicle.LEV.Battery.CellVoltage.2": 3.312,
        "Vehicle.LEV.Battery.CellVoltage.3": 3.295,
        "Vehicle.Powertrain.TractionBattery.CellVoltage.Min": 3.295,
        "Vehicle.Powertrain.TractionBattery.CellVoltage.Max": 3.312,
    })
    assert got.keys() <= BY_NAME.keys()


def test_name_register_and_error_reply_have_no_signals():
    p = protocol("jbd")
    name = frame(5, b"JBD-SP04S034")
    err = bytes.fromhex("DD0380 00 FF80 77".replace(" ", ""))  # status 80, chk 0x10000-0x80
    fr = p.framer()
    assert fr.feed(name + err) == [name, err]
    assert fr.error_replies == 1
    assert p.decode(name) == {} and p.understood(name)
    assert p.decode(err) == {} and p.understood(err)
    unknown = frame(0x10, b"\x00\x01")
    assert p.decode(unknown) == {} and not p.understood(unknown)


def test_bad_frames_counted_by_reason():
    good = frame(4, CELLS)
    bad_chk = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]
    bad_trailer = good[:-1] + b"\x78"
    bad_status = good[:2] + b"\x01" + good[3:]
    fr = jbd.framer(quirk=False)
    assert fr.feed(bad_chk + bad_trailer + bad_status + good) == [good]
    assert fr.bad == {"checksum": 1, "trailer": 1, "status": 1}


def test_frame_after_false_start_in_garbage():
    good = frame(3, BASIC)
    fr = jbd.framer()
    # DD 03 00 40: a plausible header promising 64 bytes that contain the real frame
    assert fr.feed(b"\x00\xdd\x03\x00\x40" + good + bytes(40)) == [good]
    assert fr.bad == {"trailer": 1}


def test_three_extra_bytes_quirk():
    quirky = frame(4, CELLS, extra=b"\x01\x02\x03")
    fr = jbd.framer()
    assert fr.feed(quirky + frame(4, CELLS)) == [quirky, frame(4, CELLS)]
    assert jbd.decode(quirky)["Vehicle.LEV.Battery.CellVoltage.2"] == pytest.approx(3.312)
    strict = jbd.framer(quirk=False)
    assert strict.feed(quirky) == []
    assert strict.bad == {"trailer": 1}


@pytest.mark.parametrize("quirk", [True, False])
def test_bad_checksum_at_the_end_of_the_stream_is_a_checksum(quirk: bool) -> None:
    """The last frame of a read, with a bad checksum: the quirk form would need 3 more
    bytes, but the line went quiet, so the plain form's fault is counted, not
    "truncated"; a frame that really stops short still is."""
    good = frame(4, CELLS)
    bad_chk = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]
    fr = jbd.framer(quirk)
    assert fr.feed(bad_chk) + fr.flush() == []
    assert next(iter(fr.bad)) == "checksum" and fr.pending == 0
    cut = jbd.framer(quirk)
    assert cut.feed(good[:-1]) + cut.flush() == []
    assert next(iter(cut.bad)) == "truncated"
    after = jbd.framer(quirk)
    assert after.feed(bad_chk) + after.feed(good) == [good]
    assert after.bad == {"checksum": 1}


def test_malformed_content_raises():
    with pytest.raises(DecodeError):
        jbd.decode(frame(3, BASIC[:-2]))  # says 2 NTCs, carries 1
    with pytest.raises(DecodeError):
        jbd.decode(frame(4, CELLS[:-1]))  # odd length
    with pytest.raises(DecodeError):
        jbd.decode(frame(4, CELLS)[:-2] + b"\x00\x77")  # checksum
    with pytest.raises(DecodeError):
        jbd.decode(b"\xdd\x03")


def test_poll_match():
    r3, r4 = jbd.POLL_REQUESTS
    assert jbd.match(r3, frame(3, BASIC)) and not jbd.match(r4, frame(3, BASIC))
