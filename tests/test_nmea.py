"""NMEA 0183 framer and decoder, against hand-made sentences and real receiver logs."""

import contextlib
from functools import reduce
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DecodeError
from agent.protocols.nmea import (
    MAX_SENTENCE,
    SUPPORTED,
    NmeaFramer,
    decode_sentence,
    sentence_time,
    sentence_type,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nmea_gpsd"

LAT = "Vehicle.CurrentLocation.Latitude"
LON = "Vehicle.CurrentLocation.Longitude"
ALT = "Vehicle.CurrentLocation.Altitude"
HEADING = "Vehicle.CurrentLocation.Heading"
SPEED = "Vehicle.LEV.GNSS.Speed"
FIX = "Vehicle.LEV.GNSS.FixQuality"
SATS = "Vehicle.LEV.GNSS.Satellites"
HDOP = "Vehicle.LEV.GNSS.HDOP"


def nmea(body: str) -> str:
    """A sentence with its checksum, computed here independently of the module."""
    return f"${body}*{reduce(lambda a, c: a ^ ord(c), body, 0):02X}"


GGA = nmea("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
RMC = nmea("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W")
VTG = nmea("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K")


def test_names_are_catalogue_signals():
    from agent.signals import BY_NAME

    assert {LAT, LON, ALT, HEADING, SPEED, FIX, SATS, HDOP} <= BY_NAME.keys()
    for body in (GGA, RMC, VTG):
        assert decode_sentence(body).keys() <= BY_NAME.keys()


# --- checksum ---------------------------------------------------------------

def test_checksum_of_textbook_sentences():
    # The textbook examples carry these checksums; our helper must agree.
    assert GGA.endswith("*47")
    assert RMC.endswith("*6A")
    assert VTG.endswith("*48")
    assert decode_sentence(GGA)


def test_checksum_lower_case_hex_accepted():
    assert decode_sentence(RMC[:-2] + RMC[-2:].lower()) == decode_sentence(RMC)


def test_bad_checksum():
    with pytest.raises(DecodeError, match="bad checksum"):
        decode_sentence(GGA[:-2] + "48")


def test_corrupted_body_fails_checksum():
    with pytest.raises(DecodeError, match="bad checksum"):
        decode_sentence(GGA.replace("4807", "4817"))


@pytest.mark.parametrize("text", ["$GPGGA,123519,,,,,0,00,,,M,,M,,", "$GPGGA,123519*"])
def test_missing_checksum(text):
    with pytest.raises(DecodeError, match="no checksum"):
        decode_sentence(text)


@pytest.mark.parametrize("tail", ["*4", "*4G", "*470"])
def test_malformed_checksum_field(tail):
    with pytest.raises(DecodeError, match="bad checksum"):
        decode_sentence(GGA[:-3] + tail)


def test_not_a_sentence():
    with pytest.raises(DecodeError, match="does not start"):
        decode_sentence(nmea("AIVDM,1,1,,A,13aG?N,0")[1:])
    with pytest.raises(DecodeError, match="does not start"):
        decode_sentence("!" + VTG[1:])


def test_non_ascii_bytes():
    with pytest.raises(DecodeError, match="non-ASCII"):
        decode_sentence(b"$GPGGA,\xff*00")


@pytest.mark.parametrize("body", ["GPVTG,054.7,T,$34.4,M,005.5,N,010.2,K", "GPVTG,054.7,T,\t34.4,M,005.5,N,010.2,K"])
def test_reserved_characters_rejected_even_with_good_checksum(body):
    with pytest.raises(DecodeError, match="reserved or non-printable"):
        decode_sentence(nmea(body))


def test_bytes_and_line_endings_accepted():
    expect = decode_sentence(VTG)
    assert decode_sentence(VTG.encode()) == expect
    assert decode_sentence(VTG + "\r\n") == expect
    assert decode_sentence((VTG + "\n").encode()) == expect
    assert decode_sentence(memoryview(bytearray(VTG.encode()))) == expect


# --- GGA --------------------------------------------------------------------

def test_gga_values():
    got = decode_sentence(GGA)
    assert got.keys() == {LAT, LON, ALT, FIX, SATS, HDOP}
    assert got[LAT] == pytest.approx(48 + 7.038 / 60)  # 48.1173
    assert got[LON] == pytest.approx(11 + 31.0 / 60)  # 11.516667
    assert got[ALT] == 545.4
    assert got[FIX] == 1.0
    assert got[SATS] == 8.0
    assert got[HDOP] == 0.9
    assert all(isinstance(v, float) for v in got.values())


def test_gga_south_west_negative():
    got = decode_sentence(nmea("GPGGA,095304.802,2712.6520,S,15303.1397,W,1,04,17.0,3.0,M,42.2,M,,"))
    assert got[LAT] == pytest.approx(-(27 + 12.6520 / 60))
    assert got[LON] == pytest.approx(-(153 + 3.1397 / 60))


def test_gga_no_fix_hides_position_even_when_filled():
    # Haicom SiRF-II style: stale position with fix quality 0.
    got = decode_sentence(nmea("GPGGA,095257.809,2712.6404,S,15303.1201,E,0,00,00.0,4.0,M,42.2,M,,"))
    assert got == {FIX: 0.0, SATS: 0.0, HDOP: 0.0}


def test_gga_empty_fields_omitted():
    got = decode_sentence(nmea("GPGGA,053229.438,,,,,0,00,,,M,0.0,M,,0000"))
    assert got == {FIX: 0.0, SATS: 0.0}
    got = decode_sentence(nmea("GPGGA,053229.438,3114.8789,N,12135.2442,E,2,,,,M,,M,,"))
    assert got.keys() == {FIX, LAT, LON}


@pytest.mark.parametrize("talker", ["GP", "GN", "GB", "BD", "GL", "GA"])
def test_all_talkers_accepted(talker):
    got = decode_sentence(nmea(talker + "GGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"))
    assert got[SATS] == 8.0
    assert sentence_type(nmea(talker + "RMC,")) == "RMC"


def test_extra_comma_before_checksum_quirk():
    # Verbatim from beidou-bd.log: the GNGGA has a trailing empty field (no fix)
    # or an extra field (with a fix); the checksum vouches for both.
    nofix = "$GNGGA,074150.799,,,,,0,00,,,M,0.0,M,,0000,*64"
    fix = "$GNGGA,074155.799,3114.8770,N,12135.2463,E,1,05,1.3,156.9,M,8.3,M,,0000,4.9*77"
    assert decode_sentence(nofix) == {FIX: 0.0, SATS: 0.0}
    got = decode_sentence(fix)
    assert got[LAT] == pytest.approx(31 + 14.8770 / 60)
    assert got[LON] == pytest.approx(121 + 35.2463 / 60)
    assert got[ALT] == 156.9
    assert got[SATS] == 5.0
    assert got[HDOP] == 1.3


@pytest.mark.parametrize(
    "body, field",
    [
        ("GPGGA,123519,12a4.5,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "latitude"),
        ("GPGGA,123519,4807.038,N,011x1.000,E,1,08,0.9,545.4,M,46.9,M,,", "longitude"),
        ("GPGGA,123519,4807.038,N,01131.000,E,1,0B,0.9,545.4,M,46.9,M,,", "satellites"),
        ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0..9,545.4,M,46.9,M,,", "HDOP"),
        ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,5e3,M,46.9,M,,", "altitude"),
        ("GPGGA,123519,4807.038,N,01131.000,E,x,08,0.9,545.4,M,46.9,M,,", "fix quality"),
        ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,nan,M,46.9,M,,", "altitude"),
        ("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "latitude hemisphere"),
        ("GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "latitude"),
        ("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "latitude"),
        ("GPGGA,123519,-4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "latitude"),
        ("GPGGA,123519,48,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "latitude"),
        ("GPRMC,123519,A,4807.038,N,01131.000,E,22.4.1,084.4,230394,003.1,W", "speed"),
        ("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,08-4,230394,003.1,W", "course"),
        ("GPVTG,054.7,T,034.4,M,005.5,N,1O.2,K", "speed km/h"),
    ],
)
def test_bad_numbers_name_the_field(body, field):
    with pytest.raises(DecodeError, match="bad " + field):
        decode_sentence(nmea(body))


def test_short_sentence_rejected():
    with pytest.raises(DecodeError, match="GGA too short"):
        decode_sentence(nmea("GPGGA,123519,4807.038,N"))
    with pytest.raises(DecodeError, match="RMC too short"):
        decode_sentence(nmea("GPRMC,123519,A"))
    with pytest.raises(DecodeError, match="VTG too short"):
        decode_sentence(nmea("GPVTG,054.7,T"))


# --- RMC, VTG, GSA and unknowns -----------------------------------------------

def test_rmc_values():
    got = decode_sentence(RMC)
    assert got[LAT] == pytest.approx(48 + 7.038 / 60)
    assert got[LON] == pytest.approx(11 + 31.0 / 60)
    assert got[SPEED] == pytest.approx(22.4 * 1.852)  # 41.4848 km/h
    assert got[HEADING] == 84.4


@pytest.mark.parametrize("body", [
    "GPRMC,095255.810,V,2712.6404,S,15303.1201,E,0.00,0.00,080407,,,A",   # status V with values
    "GNRMC,053229.438,V,,,,,,,020315,,,N",                                 # status V, empty
    "GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W,N",  # mode indicator N
])
def test_rmc_without_a_fix_says_no_fix_and_no_speed(body):
    """"No fix" is not "standing still": no speed 0 that a stationary decision could
    believe, no position, no course; only the fix quality 0 that says so."""
    assert decode_sentence(nmea(body)) == {FIX: 0.0}


def test_rmc_status_other_than_a_or_v_is_refused():
    with pytest.raises(DecodeError, match="bad RMC status"):
        decode_sentence(nmea("GPRMC,123519,X,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"))


def test_vtg_mode_n_has_no_speed_or_course():
    assert decode_sentence(nmea("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K,N")) == {}
    assert decode_sentence(nmea("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K,A"))[SPEED] == 10.2


def test_gga_quality_0_has_no_position():
    got = decode_sentence(nmea("GPGGA,123519,4807.038,N,01131.000,E,0,03,9.9,545.4,M,46.9,M,,"))
    assert got == {FIX: 0.0, SATS: 3.0, HDOP: 9.9}


def test_rmc_empty_course_omitted():
    got = decode_sentence(nmea("GPRMC,123519,A,4807.038,S,01131.000,W,1.0,,230394,,"))
    assert got[LAT] < 0 and got[LON] < 0
    assert HEADING not in got


def test_vtg_values():
    got = decode_sentence(VTG)
    assert got == {HEADING: 54.7, SPEED: 10.2}


def test_vtg_knots_when_kmh_missing():
    got = decode_sentence(nmea("GPVTG,054.7,T,034.4,M,005.5,N,,K,A"))
    assert got[SPEED] == pytest.approx(5.5 * 1.852)  # 10.186
    assert decode_sentence(nmea("GPVTG,,T,,M,,N,,K,N")) == {}


def test_gsa_known_but_empty():
    s = nmea("GNGSA,A,3,22,18,14,12,31,24,,,,,,,2.5,1.2,2.2")
    assert decode_sentence(s) == {}
    assert sentence_type(s) == "GSA"
    assert sentence_type(s) in SUPPORTED


@pytest.mark.parametrize(
    "body, kind",
    [
        ("GPGSV,6,6,21,23,05,259,", "GSV"),
        ("GNGNS,053229.438,,,,,NNNN,00,,,0.0,,0000", "GNS"),
        ("PSRFEPE,053229.438,V,,,,,", "PSRFEPE"),
        ("PSRF151,3,1833,28692,0x7EFFFFFF", "PSRF151"),
        ("GQGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,", "GQGGA"),
    ],
)
def test_unknown_types_are_empty_and_distinguishable(body, kind):
    s = nmea(body)
    assert decode_sentence(s) == {}
    assert sentence_type(s) == kind
    assert kind not in SUPPORTED


def test_unknown_type_still_needs_good_checksum():
    with pytest.raises(DecodeError, match="bad checksum"):
        decode_sentence("$GPGSV,6,6,21,23,05,259,*41")


def test_sentence_type_of_bare_address():
    assert sentence_type("$GPGGA") == "GGA"
    assert sentence_type(b"$GNRMC,1*00\r\n") == "RMC"


# --- sentence_time ------------------------------------------------------------

def test_sentence_time():
    assert sentence_time(GGA) == 12 * 3600 + 35 * 60 + 19
    assert sentence_time(RMC) == 12 * 3600 + 35 * 60 + 19
    t = sentence_time(nmea("GNRMC,053229.438,V,,,,,,,020315,,,N"))
    assert t == pytest.approx(5 * 3600 + 32 * 60 + 29.438)


def test_sentence_time_absent():
    assert sentence_time(VTG) is None
    assert sentence_time(nmea("GPGGA,,,,,,0,00,,,M,,M,,")) is None


@pytest.mark.parametrize("t", ["12a519", "1235", "123519:5", "243519", "126019", "123519.x", "12-519"])
def test_sentence_time_bad(t):
    with pytest.raises(DecodeError, match="bad time"):
        sentence_time(nmea(f"GPGGA,{t},,,,,0,00,,,M,,M,,"))


# --- framer -------------------------------------------------------------------

STREAM_SENTENCES = [
    GGA.encode(),
    RMC.encode(),
    VTG.encode(),
    b"$GNGGA,074150.799,,,,,0,00,,,M,0.0,M,,0000,*64",
    b"$PSRF151,3,1833,28692,0x7EFFFFFF*15",
]
STREAM = b"".join(s + b"\r\n" for s in STREAM_SENTENCES)


def frame_all(chunks):
    framer = NmeaFramer()
    out = []
    for c in chunks:
        out += framer.feed(c)
    return out, framer


def test_framer_whole_stream():
    out, framer = frame_all([STREAM])
    assert out == STREAM_SENTENCES
    assert (framer.frames, framer.garbage_bytes, framer.overlong, framer.pending) == (5, 0, 0, 0)


def test_framer_split_at_every_offset():
    for i in range(len(STREAM) + 1):
        assert frame_all([STREAM[:i], STREAM[i:]])[0] == STREAM_SENTENCES, i


def test_framer_byte_at_a_time():
    out, framer = frame_all([STREAM[i:i + 1] for i in range(len(STREAM))])
    assert out == STREAM_SENTENCES
    assert framer.frames == 5


def test_framer_keeps_partial_tail():
    framer = NmeaFramer()
    assert framer.feed(STREAM[:10]) == []
    assert framer.pending == 10
    assert framer.feed(STREAM[10:]) == STREAM_SENTENCES


def test_framer_lf_only_terminator():
    out, framer = frame_all([b"".join(s + b"\n" for s in STREAM_SENTENCES)])
    assert out == STREAM_SENTENCES
    assert framer.garbage_bytes == 0


def test_framer_drops_ais_and_counts_it():
    ais = b"!AIVDM,1,1,,A,13aG?N0P00PD;88MD5MTDww@2<0L,0*58\r\n"
    out, framer = frame_all([ais + STREAM + ais])
    assert out == STREAM_SENTENCES
    assert framer.garbage_bytes == 2 * (len(ais) - 2)


def test_framer_garbage_then_good_sentence():
    noise = b"\x00\xff$GPG\x13xx$$"
    out, framer = frame_all([noise + STREAM])
    assert out == STREAM_SENTENCES
    assert framer.garbage_bytes == len(noise)


def test_framer_truncated_sentence_is_cut_by_next_start():
    out, framer = frame_all([GGA.encode()[:30] + STREAM])
    assert out == STREAM_SENTENCES
    assert framer.garbage_bytes == 30


def test_framer_overlong_dropped_and_counted():
    longest = b"$" + b"A" * (MAX_SENTENCE - 1)
    too_long = b"$" + b"B" * 300
    out, framer = frame_all([longest + b"\r\n" + too_long + b"\r\n" + STREAM])
    assert out == [longest] + STREAM_SENTENCES
    assert framer.overlong == 1
    assert framer.garbage_bytes == len(too_long)
    assert framer.pending == 0


def test_framer_overlong_split_across_feeds():
    too_long = b"$" + b"B" * (MAX_SENTENCE + 5)
    out, framer = frame_all([too_long[:50], too_long[50:], b"\r\n", STREAM])
    assert out == STREAM_SENTENCES
    assert framer.overlong == 1


def is_subsequence(needles, haystack):
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(STREAM_SENTENCES) - 1), min_size=1, max_size=8),
    garbage=st.lists(st.binary(max_size=300), min_size=9, max_size=9),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
)
def test_framer_never_loses_a_sentence_after_garbage(picks, garbage, cuts):
    wanted = [STREAM_SENTENCES[i] for i in picks]
    stream = garbage[0] + b"".join(s + b"\r\n" + g for s, g in zip(wanted, garbage[1:], strict=False))
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    out, framer = frame_all([stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    assert is_subsequence(wanted, out)
    for s in out:
        assert s[:1] == b"$" and len(s) <= MAX_SENTENCE
        assert b"\r" not in s and b"\n" not in s
    # Every byte is accounted for exactly once.
    separators = stream.count(b"\r") + stream.count(b"\n")
    assert len(stream) == sum(map(len, out)) + separators + framer.garbage_bytes + framer.pending
    assert framer.frames == len(out)
    for s in out:
        with contextlib.suppress(DecodeError):
            decode_sentence(s)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_framer_random_bytes_never_raise(data):
    out, framer = frame_all([data])
    assert framer.pending <= MAX_SENTENCE
    for s in out:
        try:
            decode_sentence(s)
            sentence_type(s)
            sentence_time(s)
        except DecodeError:
            pass


# --- real captures (gpsd test logs) -------------------------------------------

# Lines of the logs that are really damaged: none; every checksum is good.
DAMAGED = {}
# Bytes outside any sentence, per file: beidou-bd.log line 78 starts with a space
# before '$GNRMC' (the framer drops it; the sentence itself is intact).
STRAY_BYTES = {"beidou-bd.log": 1, "beidou-gb.log": 0, "haicom-305N.log": 0}
SENTENCE_COUNTS = {"beidou-bd.log": 79, "beidou-gb.log": 68, "haicom-305N.log": 325}


def need_data():
    if not DATA.is_dir():
        pytest.skip(f"shared captures not found at {DATA} (checkout without ../shared/data)")


def receiver_lines(name):
    """(line_no, raw bytes) of receiver output, without the harness's '#' comments."""
    need_data()
    raw = (DATA / name).read_bytes().split(b"\n")
    return [(n, line + b"\n") for n, line in enumerate(raw, 1) if line.strip() and not line.startswith(b"#")]


@pytest.mark.parametrize("name", sorted(SENTENCE_COUNTS))
def test_real_capture_frames_and_decodes(name):
    framer = NmeaFramer()
    decoded = 0
    for n, line in receiver_lines(name):
        frames = framer.feed(line)
        assert len(frames) == 1, (name, n)
        assert frames[0] == line.strip()
        if (name, n) in DAMAGED:
            with pytest.raises(DecodeError):
                decode_sentence(frames[0])
            continue
        decode_sentence(frames[0])
        sentence_time(frames[0])
        decoded += 1
    assert framer.frames == SENTENCE_COUNTS[name]
    assert decoded == SENTENCE_COUNTS[name]
    assert framer.garbage_bytes == STRAY_BYTES[name]
    assert (framer.overlong, framer.pending) == (0, 0)


@pytest.mark.parametrize("name", sorted(SENTENCE_COUNTS))
def test_real_capture_as_one_stream(name):
    need_data()
    stream = b"".join(line for _, line in receiver_lines(name))
    for i in (1, 7, 64):
        out, framer = frame_all([stream[k:k + i] for k in range(0, len(stream), i)])
        assert len(out) == SENTENCE_COUNTS[name]


def decoded_by_type(name):
    out = []
    for _, line in receiver_lines(name):
        s = line.strip()
        out.append((sentence_type(s), sentence_time(s), decode_sentence(s)))
    return out


def test_beidou_gb_known_values():
    rows = decoded_by_type("beidou-gb.log")
    ggas = [(t, d) for kind, t, d in rows if kind == "GGA"]
    assert len(ggas) == 5
    # Three no-fix epochs first: no position.
    assert all(LAT not in d and d[FIX] == 0.0 for _, d in ggas[:3])
    t, first = ggas[3]
    assert t == pytest.approx(5 * 3600 + 32 * 60 + 32.438)
    # 3114.8789 N 12135.2442 E is 31 deg 14.88 min N, 121 deg 35.24 min E: Shanghai.
    assert first[LAT] == pytest.approx(31 + 14.8789 / 60)  # 31.24798
    assert first[LON] == pytest.approx(121 + 35.2442 / 60)  # 121.58740
    assert first[ALT] == 153.8
    assert first[SATS] == 6.0
    assert first[HDOP] == 1.2
    assert first[FIX] == 1.0
    rmcs = [d for kind, _, d in rows if kind == "RMC"]
    assert [LAT in d for d in rmcs] == [False, False, False, True, True]
    assert rmcs[3][SPEED] == pytest.approx(0.26 * 1.852)
    assert rmcs[3][HEADING] == 167.42
    kinds = {kind for kind, _, _ in rows}
    assert kinds - set(SUPPORTED) == {"GSV", "GNS", "PSRFEPE"}


def test_beidou_bd_fix_with_quirk():
    rows = decoded_by_type("beidou-bd.log")
    fixes = [d for kind, _, d in rows if kind == "GGA" and LAT in d]
    assert len(fixes) == 5
    assert fixes[0][LAT] == pytest.approx(31 + 14.8770 / 60)
    assert fixes[0][LON] == pytest.approx(121 + 35.2463 / 60)


def test_haicom_southern_hemisphere_and_motion():
    rows = decoded_by_type("haicom-305N.log")
    fixes = [d for kind, _, d in rows if kind == "GGA" and LAT in d]
    assert fixes
    # 27 S 153 E (Brisbane): latitude negative, longitude positive.
    assert all(-27.3 < d[LAT] < -27.1 and 153.0 < d[LON] < 153.1 for d in fixes)
    vtgs = [d for kind, _, d in rows if kind == "VTG"]
    assert len(vtgs) == 73
    assert max(d[SPEED] for d in vtgs) > 0.0


# --- Values the checksum vouches for but physics does not ------------------------------

# (sentence body, signal refused, words of the reason). The checksum is right every time.
IMPOSSIBLE = [
    ("GPRMC,123519,A,4807.038,N,01131.000,E,-12.4,084.4,230394,003.1,W", SPEED, "-22.96"),
    ("GPRMC,123519,A,4807.038,N,01131.000,E,99892.0,084.4,230394,003.1,W", SPEED, "185000"),
    ("GPVTG,054.7,T,034.4,M,-12.4,N,-23.0,K", SPEED, "-23 km/h"),
    ("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,-370.0,230394,003.1,W", HEADING, "-370"),
    ("GPVTG,360.0,T,034.4,M,005.5,N,010.2,K", HEADING, "360"),
    ("GPGGA,123519,4807.038,N,01131.000,E,1,-3,0.9,545.4,M,46.9,M,,", SATS, "-3"),
    ("GPGGA,123519,4807.038,N,01131.000,E,1,08,-5.0,545.4,M,46.9,M,,", HDOP, "-5"),
    ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,-99999.9,M,46.9,M,,", ALT, "-99999.9 m"),
    ("GPGGA,123519,4807.038,N,01131.000,E,1,100,0.9,545.4,M,46.9,M,,", SATS, "100"),
]


@pytest.mark.parametrize("body,signal,words", IMPOSSIBLE)
def test_impossible_values_are_refused_with_the_reason(body, signal, words):
    """``decode`` shows what the agent's kernel would refuse, and why; the rest of the
    sentence still decodes."""
    from agent.cli.decode import UART_LIMITS, _catalogue_rows, believed

    got = believed(_catalogue_rows(decode_sentence(nmea(body))), *UART_LIMITS)
    assert signal not in got["signals"]
    assert got["refused"][signal].startswith("out of range: ") and words in got["refused"][signal]
    assert got["signals"], "the good values of the sentence are kept"


@pytest.mark.parametrize("body,signal,words", IMPOSSIBLE)
def test_the_kernel_refuses_them_and_counts_them_per_source(kernel_cls, body, signal, words):
    from agent.fusion import spec as kp
    from agent.signals import BY_NAME, ID_SPACE, limits

    k = kernel_cls(ID_SPACE, 1.0)
    k.set_limits(*limits(ID_SPACE, {}))
    k.source = 3
    decoded = decode_sentence(nmea(body))
    k.feed_values([BY_NAME[n].id for n in decoded], [100.0] * len(decoded), list(decoded.values()))
    seen = {sid for sid, _v, _t in k.latest()}
    assert BY_NAME[signal].id not in seen
    assert {BY_NAME[n].id for n in decoded} - {BY_NAME[signal].id} <= seen
    assert k.refusals(3) == [(BY_NAME[signal].id, 1, 0)] and k.counters()["refused"] == 1
    assert k.refusals(0) == []
    assert kp.REFUSAL_NAMES[0] == "range"


def test_a_valid_sentence_still_decodes_whole():
    from agent.cli.decode import UART_LIMITS, _catalogue_rows, believed

    for sentence in (GGA, RMC, VTG):
        got = believed(_catalogue_rows(decode_sentence(sentence)), *UART_LIMITS)
        assert "refused" not in got and got["signals"] == decode_sentence(sentence)
