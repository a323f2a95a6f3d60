"""candump -L log lines: every form, round trips, and the real Bafang captures."""

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DecodeError
from agent.protocols.candump import (
    ERROR,
    EXTENDED,
    FD,
    FD_BRS,
    FD_ESI,
    FD_FLAGS_SHIFT,
    FD_LENGTHS,
    REMOTE,
    RTR_DLC_SHIFT,
    format_candump_line,
    parse_candump_line,
    read_candump,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bafang_can"

T = "(1787223597.463853)"


def parse(frame: str, tail: str = ""):
    return parse_candump_line(f"{T} can0 {frame}{tail}")


# --- forms ------------------------------------------------------------------

def test_standard_id():
    t, iface, can_id, flags, data = parse("123#DEADBEEF")
    assert t == 1787223597.463853
    assert iface == "can0"
    assert (can_id, flags, data) == (0x123, 0, b"\xde\xad\xbe\xef")


def test_extended_id_from_real_log():
    frame = parse_candump_line("(1787223557.079009) can0 041A6401#0B0062179E02 R")
    assert frame == (1787223557.079009, "can0", 0x041A6401, EXTENDED, bytes.fromhex("0B0062179E02"))


def test_extended_id_with_leading_zeros_stays_extended():
    assert parse("00000123#")[2:] == (0x123, EXTENDED, b"")


def test_empty_data():
    assert parse("03216401#")[2:] == (0x03216401, EXTENDED, b"")
    assert parse("7FF#")[2:] == (0x7FF, 0, b"")


@pytest.mark.parametrize("tail", ["", " R", " T", "  T  ", "\tR\n", " R\r\n"])
def test_direction_field_optional(tail):
    assert parse("123#11", tail)[2:] == (0x123, 0, b"\x11")


def test_lower_case_hex_accepted():
    assert parse("1a3#deadbeef")[2:] == (0x1A3, 0, b"\xde\xad\xbe\xef")


def test_dot_separators():
    assert parse("123#11.22.33")[4] == b"\x11\x22\x33"
    assert parse("123#1122.33")[4] == b"\x11\x22\x33"


def test_remote_frames():
    assert parse("123#R")[2:] == (0x123, REMOTE, b"")
    can_id, flags, data = parse("12345678#R5")[2:]
    assert (can_id, data) == (0x12345678, b"")
    assert flags & (EXTENDED | REMOTE) == EXTENDED | REMOTE
    assert flags >> RTR_DLC_SHIFT & 0xF == 5
    assert parse("123#R0")[3] == REMOTE


def test_fd_frames():
    can_id, flags, data = parse("123##1112233")[2:]
    assert (can_id, data) == (0x123, b"\x11\x22\x33")
    assert flags == FD | FD_BRS
    _, flags, data = parse("12345678##3" + "AB" * 64)[2:]
    assert flags == EXTENDED | FD | FD_BRS | FD_ESI
    assert data == b"\xab" * 64
    assert parse("123##0")[3:] == (FD, b"")
    assert parse("123##4.11.22")[3:] == (FD | 4 << FD_FLAGS_SHIFT, b"\x11\x22")


@pytest.mark.parametrize("n", FD_LENGTHS)
def test_fd_valid_lengths(n):
    assert len(parse("123##1" + "00" * n)[4]) == n


@pytest.mark.parametrize("n", [9, 10, 11, 13, 33, 63, 65])
def test_fd_invalid_lengths(n):
    with pytest.raises(DecodeError, match=f"{n} bytes is not a valid CAN FD length"):
        parse("123##1" + "00" * n)


def test_error_frames():
    frame = parse_candump_line("(1787223597.716007) can0 20000080#0000000000000001")
    assert frame == (1787223597.716007, "can0", 0x080, ERROR, bytes.fromhex("0000000000000001"))
    assert parse("200003FF#")[2:4] == (0x3FF, ERROR)
    assert parse("20000000#")[2:4] == (0, ERROR)


def test_blank_lines():
    assert parse_candump_line("") is None
    assert parse_candump_line("   \n") is None
    assert parse_candump_line(b"\r\n") is None


def test_bytes_line():
    assert parse_candump_line(b"(1.5) vcan0 123#01\n") == (1.5, "vcan0", 0x123, 0, b"\x01")


@pytest.mark.parametrize(
    "line, reason",
    [
        # ids
        (T + " can0 2F830100#04D40F R", "id wider than 29 bits: 2F830100"),
        (T + " can0 28308000# R", "id wider than 29 bits: 28308000"),
        (T + " can0 A0000080#00", "id wider than 29 bits: A0000080"),
        (T + " can0 60000080#00", "id wider than 29 bits: 60000080"),
        (T + " can0 20000400#00", "id wider than 29 bits: 20000400"),
        (T + " can0 80000123#00", "id wider than 29 bits: 80000123"),
        (T + " can0 40000123#00", "id wider than 29 bits: 40000123"),
        (T + " can0 800#00", "11-bit id 800 above 7FF"),
        (T + " can0 1234#00", "id '1234' must have 3 or 8 hex digits"),
        (T + " can0 12#00", "id '12' must have 3 or 8 hex digits"),
        (T + " can0 #00", "id '' is not hex"),
        (T + " can0 12G#00", "id '12G' is not hex"),
        (T + " can0 0x1#00", "id '0x1' is not hex"),
        (T + " can0 12345678", "no '#' in frame"),
        # data
        (T + " can0 123#123", "odd number of hex digits in data '123'"),
        (T + " can0 123#1.122", "odd number of hex digits"),
        (T + " can0 123#11ZZ", "data '11ZZ' is not hex"),
        (T + " can0 123#+1", "data '\\+1' is not hex"),
        (T + " can0 123#" + "00" * 9, "classic CAN data longer than 8 bytes: 9"),
        (T + " can0 20000080#" + "00" * 9, "classic CAN data longer than 8 bytes: 9"),
        (T + " can0 123#R9", "bad remote frame DLC '9'"),
        (T + " can0 123#R10", "bad remote frame DLC '10'"),
        (T + " can0 123#RX", "bad remote frame DLC 'X'"),
        (T + " can0 123##", "lacks its flags digit"),
        (T + " can0 123##G00", "lacks its flags digit"),
        (T + " can0 20000080#R", "error frame .* cannot be remote"),
        (T + " can0 20000080##100", "error frame .* cannot be CAN FD"),
        # timestamp and fields
        ("(abc.def) can0 123#00", "bad timestamp"),
        ("1787223597.463853 can0 123#00", "bad timestamp"),
        ("(1787223597) can0 123#00", "bad timestamp"),
        ("(1787223597.) can0 123#00", "bad timestamp"),
        ("(.463853) can0 123#00", "bad timestamp"),
        ("(-1.5) can0 123#00", "bad timestamp"),
        ("(1.5e3) can0 123#00", "bad timestamp"),
        ("(1787223597.463853 can0 123#00", "bad timestamp"),
        (T + " can0", "got 2 fields"),
        (T, "got 1 fields"),
        (T + " can0 123#00 X", "direction field must be R or T, got 'X'"),
        (T + " can0 123#00 R extra", "unexpected fields after the frame: 'extra'"),
    ],
)
def test_damaged_lines(line, reason):
    with pytest.raises(DecodeError, match=reason):
        parse_candump_line(line)


def test_non_ascii_line():
    with pytest.raises(DecodeError, match="non-ASCII"):
        parse_candump_line(b"(1.5) can\xff 123#00")


# --- format ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "frame, text",
    [
        ((1.5, "can0", 0x123, 0, b"\xde\xad"), "(1.500000) can0 123#DEAD"),
        ((1.5, "can0", 0x1, 0, b""), "(1.500000) can0 001#"),
        ((1787223597.463853, "can0", 0x041A6401, EXTENDED, b"\x0b\x00"), "(1787223597.463853) can0 041A6401#0B00"),
        ((0.000001, "vcan1", 0x80, ERROR, bytes(8)), "(0.000001) vcan1 20000080#0000000000000000"),
        ((2.0, "can0", 0x123, REMOTE, b""), "(2.000000) can0 123#R"),
        ((2.0, "can0", 0x1F, EXTENDED | REMOTE | 8 << RTR_DLC_SHIFT, b""), "(2.000000) can0 0000001F#R8"),
        ((2.0, "can0", 0x123, FD | FD_BRS, b"\x11\x22"), "(2.000000) can0 123##11122"),
        ((2.0, "can0", 0x123, FD, b""), "(2.000000) can0 123##0"),
    ],
)
def test_format(frame, text):
    assert format_candump_line(frame) == text
    assert parse_candump_line(text) == frame


times = st.builds(
    lambda sec, usec: float(f"{sec}.{usec:06d}"),
    st.integers(0, 2**32 - 1),
    st.integers(0, 999_999),
)
ifaces = st.sampled_from(["can0", "can1", "vcan0", "slcan0", "any"])


@st.composite
def frames(draw):
    t = draw(times)
    iface = draw(ifaces)
    kind = draw(st.sampled_from(["classic", "err", "rtr", "fd"]))
    extended = draw(st.booleans())
    can_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    flags = EXTENDED if extended else 0
    if kind == "classic":
        return (t, iface, can_id, flags, draw(st.binary(max_size=8)))
    if kind == "err":
        return (t, iface, draw(st.integers(0, 0x3FF)), ERROR, draw(st.binary(max_size=8)))
    if kind == "rtr":
        return (t, iface, can_id, flags | REMOTE | draw(st.integers(0, 8)) << RTR_DLC_SHIFT, b"")
    size = draw(st.sampled_from(FD_LENGTHS))
    fd_flags = draw(st.integers(0, 15)) << FD_FLAGS_SHIFT
    return (t, iface, can_id, flags | FD | fd_flags, draw(st.binary(min_size=size, max_size=size)))


@settings(max_examples=500)
@given(frames(), st.sampled_from(["", " R", " T"]))
def test_round_trip(frame, direction):
    text = format_candump_line(frame)
    assert parse_candump_line(text + direction) == frame
    assert format_candump_line(parse_candump_line(text)) == text


@settings(max_examples=300)
@given(frames())
def test_round_trip_with_separators(frame):
    text = format_candump_line(frame)
    ident, _, body = text.partition("#")
    prefix = body[:2] if body.startswith("#") else ""
    rest = body[len(prefix):]
    if rest.startswith("R"):
        return
    dotted = ".".join(rest[i:i + 2] for i in range(0, len(rest), 2))
    assert parse_candump_line(ident + "#" + prefix + dotted) == frame


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_arbitrary_text_returns_or_raises_decode_error(line):
    with contextlib.suppress(DecodeError):
        parse_candump_line(line)


# --- read_candump -----------------------------------------------------------------

def test_read_candump_keeps_going():
    lines = [
        "(1.000000) can0 123#01\n",
        "\n",
        "(1.000001) can0 2F830100#04D40F R\n",
        "(1.000002) can0 123#02 R\n",
    ]
    got = list(read_candump(lines))
    assert [n for n, _ in got] == [1, 3, 4]
    assert got[0][1] == (1.0, "can0", 0x123, 0, b"\x01")
    assert isinstance(got[1][1], DecodeError)
    assert got[1][1].reason == "id wider than 29 bits: 2F830100"
    assert got[2][1][4] == b"\x02"


def test_read_candump_empty():
    assert list(read_candump([])) == []


# --- real captures (larssonwassen/bafang-can test data) -----------------------------

LINE_COUNTS = {
    "bench-repaired-excerpt.log": 120,
    "display-interaction-excerpt.log": 99,
    "ride-above-cutoff-excerpt.log": 493,
    "ride-bus-errors-excerpt.log": 450,
    "ride-coasting-excerpt.log": 493,
}
# The deliberately damaged lines: bit 29 (error flag) set together with id bits
# outside the error-class field, i.e. a 29-bit id with extra high bits.
DAMAGED = {
    "display-interaction-excerpt.log": {
        49: "id wider than 29 bits: 2F830100",
        82: "id wider than 29 bits: 28308000",
    },
}
ERROR_FRAME_LINES = [45, 197, 219, 241, 326, 344, 364, 399]


def read_capture(name):
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"shared captures not found at {DATA} (checkout without ../shared/data)")
    with path.open() as fh:
        text = fh.read()
    return text.splitlines(), list(read_candump(text.splitlines(keepends=True)))


@pytest.mark.parametrize("name", sorted(LINE_COUNTS))
def test_real_capture_parses(name):
    lines, results = read_capture(name)
    assert len(lines) == LINE_COUNTS[name]
    assert [n for n, _ in results] == list(range(1, len(lines) + 1))
    failures = {n: r.reason for n, r in results if isinstance(r, DecodeError)}
    assert failures == DAMAGED.get(name, {})
    for n, frame in results:
        if isinstance(frame, DecodeError):
            continue
        t, iface, can_id, flags, data = frame
        assert iface == "can0"
        # Bafang is 29-bit only; error frames are the one exception.
        assert flags in (EXTENDED, ERROR), n
        # The writer's own text comes back, less the direction field.
        original = lines[n - 1]
        assert format_candump_line(frame) == (original[:-2] if original.endswith(" R") else original)


def test_real_capture_error_frames():
    _, results = read_capture("ride-bus-errors-excerpt.log")
    errors = [(n, f) for n, f in results if f[3] & ERROR]
    assert [n for n, _ in errors] == ERROR_FRAME_LINES
    for _, (_, _, can_id, flags, data) in errors:
        assert flags == ERROR
        assert can_id == 0x080  # CAN_ERR_BUSERROR
        assert len(data) == 8


@pytest.mark.parametrize("name", sorted(set(LINE_COUNTS) - {"ride-bus-errors-excerpt.log"}))
def test_real_capture_other_files_have_no_error_frames(name):
    _, results = read_capture(name)
    assert not [n for n, f in results if not isinstance(f, DecodeError) and f[3] & ERROR]
