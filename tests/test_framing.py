"""The shared framer core, on a toy protocol and on every UART framer via the property
"valid frames spliced into garbage, fed in random chunks, all come out in order"."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocols import UART_PROTOCOLS, protocol
from agent.protocols.framing import Framer
from devtools.fuzz import REFERENCE, check_stream, feed_chunks, splice


class Toy:
    """``02 len data sum8 03``: start, length, checksum and trailer, like the real ones."""

    starts = (b"\x02",)
    head = 2
    max_len = 20

    def length(self, buf, s):
        return buf[s + 1] + 4 if buf[s + 1] <= 16 else 0

    def check(self, buf, s, length):
        if buf[s + length - 1] != 0x03:
            return "trailer"
        if sum(buf[s:s + length - 2]) & 0xFF != buf[s + length - 2]:
            return "checksum"
        return None


def toy(data: bytes) -> bytes:
    body = bytes([2, len(data)]) + data
    return body + bytes([sum(body) & 0xFF, 3])


A = toy(b"\x10\x20\x30")  # 02 03 10 20 30 65 03: no 02 after the start
B = toy(b"")  # 02 00 02 03


def test_toy_frame_is_what_the_rule_says():
    assert bytes.fromhex("02031020306503") == A


def test_clean_stream_and_counters():
    fr = Framer(Toy())
    assert fr.feed(A + B) == [A, B]
    assert (fr.frames, fr.bad, fr.garbage_bytes, fr.pending) == (2, {}, 0, 0)


def test_bad_frames_counted_by_reason():
    fr = Framer(Toy())
    bad_sum = A[:4] + b"\x00" + A[5:]
    bad_trailer = A[:5] + b"\x04"
    bad_length = b"\x02\x30"
    assert fr.feed(bad_sum + bad_trailer + bad_length + B) == [B]
    assert fr.bad == {"checksum": 1, "trailer": 1, "length": 1}
    assert fr.garbage_bytes == len(bad_sum) + len(bad_trailer) + len(bad_length)


def test_frame_inside_a_false_start_is_found():
    # 02 06 looks like the start of a 10-byte frame that swallows A and ends on the
    # 00 (not the 03 trailer); the search resumes one byte after it, so A is found.
    stream = b"\x02\x06" + A + b"\x00"
    fr = Framer(Toy())
    assert fr.feed(stream) == [A]
    assert fr.bad == {"trailer": 1}


def test_frame_split_at_every_byte():
    stream = b"\x99\x02" + A + B
    fr = Framer(Toy())
    out = []
    for i in range(len(stream)):
        out += fr.feed(stream[i:i + 1])
    assert out == [A, B]
    assert fr.garbage_bytes == 2


def test_waiting_is_bounded_by_max_len_and_flush_gives_up():
    # 02 10 promises 20 bytes; A follows inside that window. Nothing can come out
    # until the window is complete (or the line goes quiet and flush() is called).
    fr = Framer(Toy())
    assert fr.feed(b"\x02\x10" + A) == []
    assert fr.pending == 2 + len(A)
    assert fr.flush() == [A]
    assert fr.bad == {"truncated": 1}
    assert fr.pending == 0
    fr = Framer(Toy())
    assert fr.feed(b"\x02\x10" + A + bytes(12)) == [A]  # 20 bytes arrived: verdict, then A
    assert fr.pending == 0


def test_pending_stays_bounded_on_endless_garbage():
    fr = Framer(Toy())
    rng = random.Random(5)
    for _ in range(200):
        fr.feed(rng.randbytes(97))
        assert fr.pending < Toy.max_len
    assert fr.frames + fr.garbage_bytes + fr.pending >= 0


def test_two_byte_marker_split_across_feeds():
    fr = protocol("ninebot").framer()
    frame = bytes.fromhex("55aa0320011 00ebdff".replace(" ", ""))  # M365 "read ESC serial"
    assert fr.feed(b"\x00" + frame[:1]) == []
    assert fr.pending == 1
    assert fr.feed(frame[1:]) == [frame]


def test_every_registered_binary_protocol_has_a_reference():
    names = {n.split(":")[0] for n in REFERENCE}
    assert names == set(UART_PROTOCOLS) - {"nmea"}


def test_the_polled_flag_of_each_protocol_is_what_its_module_polls():
    """The configuration reads the flag without importing the module: they must agree."""
    assert {name: flag for name, (_module, flag) in UART_PROTOCOLS.items()} == \
        {name: protocol(name).polled for name in UART_PROTOCOLS}


# --- the property, for every framer ---------------------------------------------------

def _gap(ref):
    """Garbage: random bytes, optionally followed by a truncated or mutated frame."""
    return st.tuples(st.binary(max_size=24), st.integers(0, 2**32 - 1), st.integers(0, 3)).map(
        lambda t: t[0] + _false_start(ref, t[1], t[2]))


def _false_start(ref, seed, kind):
    if kind == 0:
        return b""
    rng = random.Random(seed)
    f = bytearray(ref.make(rng))
    if kind == 1:
        return bytes(f[:rng.randrange(1, len(f))])
    f[rng.randrange(len(f))] ^= 1 + rng.randrange(255)
    return bytes(f) if kind == 2 else bytes(f[:2])


@pytest.mark.parametrize("name", sorted(REFERENCE))
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_spliced_frames_all_found_in_order(name, data):
    ref = REFERENCE[name]
    seeds = data.draw(st.lists(st.integers(0, 2**32 - 1), max_size=5))
    frames = [ref.make(random.Random(s)) for s in seeds]
    gaps = [data.draw(_gap(ref)) for _ in range(len(frames) + 1)]
    total = sum(map(len, frames)) + sum(map(len, gaps))
    cuts = data.draw(st.lists(st.integers(0, max(total, 1)), max_size=8))
    check_stream(ref, frames, gaps, cuts)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@settings(max_examples=60, deadline=None)
@given(stream=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_chunking_never_changes_the_result(name, stream, cuts):
    ref = REFERENCE[name]
    whole = ref.framer()
    expected = whole.feed(stream) + whole.flush()
    chunked = ref.framer()
    assert feed_chunks(chunked, stream, cuts) == expected
    assert chunked.bad == whole.bad
    assert chunked.garbage_bytes == whole.garbage_bytes


def test_splice_helper():
    stream, offsets = splice([b"ab", b"c"], [b"1", b"", b"23"])
    assert (stream, offsets) == (b"1abc23", [1, 3])


def test_nmea_behind_the_common_face():
    p = protocol("nmea")
    fr = p.framer()
    gga = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
    assert fr.feed(b"xx" + gga + b"\r\n") == [gga]
    assert (fr.frames, fr.bad, fr.garbage_bytes) == (1, {}, 2)
    assert p.understood(gga) and p.decode(gga)["Vehicle.LEV.GNSS.Satellites"] == 8
