"""SLCAN: the line parser on its own, and the sources on real pseudo-terminals.

The adapters are USB devices on a vibrating vehicle: lines get damaged, the adapter
refuses commands, the plug comes out and goes back in. None of that may cost a good
frame after it, or need a restart of the agent.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import SourceConfig
from agent.protocols.slcan import EXTENDED_FLAG, MAX_LINE, SlcanParser
from agent.sources import make_source
from agent.sources.base import BACKOFF_FIRST, BACKOFF_MAX, Source
from agent.sources.slcan import SlcanSource
from agent.sources.uart import UartSource
from tests.helpers import wait_for

# --- the parser ---------------------------------------------------------------


def feed_all(chunks: list[bytes]) -> tuple[SlcanParser, list[int], list[bytes]]:
    parser = SlcanParser()
    keys: list[int] = []
    datas: list[bytes] = []
    for chunk in chunks:
        k, d = parser.feed(chunk)
        keys += k
        datas += d
    return parser, keys, datas


def counters(p: SlcanParser) -> tuple[int, int, int, int]:
    return p.frames, p.remote, p.bad, p.errors


def test_standard_and_extended_frames() -> None:
    parser, keys, datas = feed_all([b"t1232AABB\rT1FFFFFFF81122334455667788\rt7FF0\rT000000000\r"])
    assert keys == [0x123, 0x1FFFFFFF | EXTENDED_FLAG, 0x7FF, 0 | EXTENDED_FLAG]
    assert datas == [b"\xaa\xbb", bytes(range(0x11, 0x99, 0x11)), b"", b""]
    assert counters(parser) == (4, 0, 0, 0)


def test_lowercase_hex_and_timestamp_suffix() -> None:
    """Adapters with timestamps on (Z1) append 4 hex digits of milliseconds."""
    parser, keys, datas = feed_all([b"t12320a0b1F3c\rT02F8320186C091F05840D40FFEA60\r"])
    assert keys == [0x123, 0x02F83201 | EXTENDED_FLAG]
    assert datas == [b"\x0a\x0b", bytes.fromhex("6C091F05840D40FF")]
    assert parser.bad == 0


def test_remote_frames_and_bel_are_counted_not_returned() -> None:
    parser, keys, _ = feed_all([b"r1230\rR123456788\r\x07t1231FF\r\x07\x07\rz\rZ\r"])
    assert keys == [0x123]
    assert counters(parser) == (1, 2, 0, 3)


@pytest.mark.parametrize("line", [
    b"t8000",            # 11-bit id above 0x7FF
    b"TFFFFFFFF0",       # 29-bit id above 0x1FFFFFFF
    b"t1239" + b"00" * 9,  # dlc 9
    b"t1232AA",          # data shorter than dlc
    b"t1232AABBCC",      # data longer than dlc, not a timestamp either
    b"t1232AABB12",      # 2-digit suffix
    b"t12",              # truncated id
    b"t",
    b"t1232AAZZ",        # not hex
    b"t 7F1AA",          # a space in the id
    b"t1_21AA",          # an underscore in the id (int() would take it)
    b"t+7F1AA",          # a sign in the id
    b"t1233AA BB",       # a space in the data (bytes.fromhex would skip it)
    b"t1232AABBzzzz",    # timestamp that is not hex
    b"hello",
    b"\xff\xfe",
])
def test_garbage_line_counted_and_next_frame_kept(line: bytes) -> None:
    """One damaged line costs exactly that line: counted as bad, next frame intact."""
    parser, keys, datas = feed_all([line + b"\rt3211EE\r"])
    assert keys == [0x321] and datas == [b"\xee"]
    assert counters(parser) == (1, 0, 1, 0)


STREAM = (b"t1232AABB\r\x07T02F8320186C091F05840D40FF1234\rgarbage\rr1230\rt8001FF\r"
          b"T1FFFFFFF0\rt7FF80011223344556677\rt0000\r")


def test_every_split_gives_the_same_result() -> None:
    """USB delivers the stream in arbitrary pieces; the pieces must not matter."""
    whole_parser, whole_keys, whole_datas = feed_all([STREAM])
    assert len(whole_keys) == 5 and whole_parser.bad == 2
    for i in range(len(STREAM) + 1):
        for j in range(i, len(STREAM) + 1, 7):
            parser, keys, datas = feed_all([STREAM[:i], STREAM[i:j], STREAM[j:]])
            assert (keys, datas) == (whole_keys, whole_datas), (i, j)
            assert counters(parser) == counters(whole_parser), (i, j)
    parser, keys, datas = feed_all([STREAM[k:k + 1] for k in range(len(STREAM))])
    assert (keys, datas, counters(parser)) == (whole_keys, whole_datas, counters(whole_parser))


@pytest.mark.parametrize("chunk", [1, 3, 64, 65, 1000])
def test_overlong_line_dropped_once(chunk: int) -> None:
    """A line that never ends (lost CR, noise) is dropped and counted once however it
    arrives, its rest is not parsed as a new line, and the frame after it survives."""
    stream = b"t1231AA" * 40 + b"\rt3211EE\r"
    assert len(stream.split(b"\r")[0]) > MAX_LINE
    parser, keys, datas = feed_all([stream[k:k + chunk] for k in range(0, len(stream), chunk)])
    assert keys == [0x321] and datas == [b"\xee"]
    assert counters(parser) == (1, 0, 1, 0)
    assert len(parser.tail) <= MAX_LINE


HEX = "0123456789abcdefABCDEF"
LINE_RE = re.compile(rb"^(t[0-9a-fA-F]{3}|T[0-9a-fA-F]{8})([0-8])([0-9a-fA-F]*)$")


def reference(line: bytes) -> tuple[int, bytes] | None:
    """An independent reading of the Lawicel frame format: the key and data, or None."""
    m = LINE_RE.match(line)
    if not m:
        return None
    ext = line[:1] == b"T"
    can_id = int(m.group(1)[1:], 16)
    dlc = int(m.group(2))
    rest = m.group(3)
    if len(rest) not in (2 * dlc, 2 * dlc + 4) or can_id > (0x1FFFFFFF if ext else 0x7FF):
        return None
    return (can_id | EXTENDED_FLAG if ext else can_id), bytes.fromhex(rest[:2 * dlc].decode())


line_chars = st.sampled_from([*HEX, "t", "T", " ", "_", "+", "-", "x", "8", "9"])
frame_like = st.builds(lambda k, body: k + body, st.sampled_from(["t", "T"]),
                       st.text(line_chars, max_size=30))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(frame_like, max_size=6))
def test_parser_matches_reference(lines: list[str]) -> None:
    """Every line the parser accepts is a well-formed frame, and every such frame is taken."""
    data = b"".join(line.encode() + b"\r" for line in lines)
    parser, keys, datas = feed_all([data])
    expected = [r for r in (reference(line.encode()) for line in lines) if r is not None]
    assert list(zip(keys, datas, strict=True)) == expected
    assert parser.frames + parser.bad == len(lines)


# --- the sources on real ptys -------------------------------------------------


class FakeAdapter:
    """The far end of a pty: a Lawicel adapter that answers CR (or BEL to ``O``)."""

    def __init__(self, link: Path, bel_on_open: bool = False) -> None:
        self.master, self.slave = os.openpty()
        tmp = link.with_name(link.name + ".new")
        os.symlink(os.ttyname(self.slave), tmp)
        os.replace(tmp, link)
        self.bel_on_open = bel_on_open
        self.commands: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buf = b""
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.05)
                if not ready:
                    continue
                data = os.read(self.master, 1024)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r" in buf:
                cmd, buf = buf.split(b"\r", 1)
                self.commands.append(cmd)
                refuse = self.bel_on_open and cmd == b"O"
                try:
                    os.write(self.master, b"\x07" if refuse else b"\r")
                except OSError:
                    return

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        """The USB adapter goes away: its tty end closes."""
        self.stop.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)

    def close(self) -> None:
        if not self.stop.is_set():
            self.unplug()


@pytest.fixture
def adapters() -> Iterator[list[FakeAdapter]]:
    made: list[FakeAdapter] = []
    yield made
    for a in made:
        a.close()


def slcan_cfg(link: Path) -> SourceConfig:
    return SourceConfig(name="can0", kind="slcan", port=str(link), protocol="bafang-can", bitrate=250000)


def read_until(src: Source, want: bytes, timeout: float = 5.0) -> bytes:
    got = b""

    def more() -> bool:
        nonlocal got
        got += src.read()
        return want in got

    wait_for(f"{want!r} from {src.name}", more, timeout, interval=0.01)
    return got


def test_slcan_open_handshake(tmp_path: Path, adapters: list[FakeAdapter]) -> None:
    """Close, set the bitrate, open: in that order, on the port the config names."""
    link = tmp_path / "can"
    adapters.append(FakeAdapter(link))
    src = make_source(slcan_cfg(link))
    assert isinstance(src, SlcanSource)
    try:
        assert src.poll_open()
        assert src.is_open and src.opens == 1
        assert adapters[0].commands == [b"C", b"S5", b"O"]
        adapters[0].send(b"t1232AABB\r")
        keys, datas = SlcanParser().feed(read_until(src, b"\r"))
        assert (keys, datas) == ([0x123], [b"\xaa\xbb"])
    finally:
        src.close()


def test_slcan_refused_open_backs_off(tmp_path: Path, adapters: list[FakeAdapter]) -> None:
    """An adapter that refuses ``O`` is retried on a doubling schedule capped at 30 s, and
    a refusal (BEL) is taken at once instead of waiting for a CR that never comes."""
    link = tmp_path / "can"
    adapters.append(FakeAdapter(link, bel_on_open=True))
    src = SlcanSource(slcan_cfg(link))
    now = 1000.0
    delays = []
    for attempt in range(10):
        started = time.monotonic()
        assert src.poll_open(now) is False
        assert time.monotonic() - started < 0.9, "a BEL reply must not wait for the reply timeout"
        assert not src.is_open and src.open_failures == attempt + 1
        assert "O refused (BEL)" in src.last_error
        delays.append(src.next_attempt - now)
        assert src.poll_open(src.next_attempt - 0.01) is False
        assert src.open_failures == attempt + 1, "retried before its backoff ran out"
        now = src.next_attempt
    expected = [min(BACKOFF_FIRST * 2**i, BACKOFF_MAX) for i in range(10)]
    assert delays == expected
    assert expected[:4] == [0.5, 1.0, 2.0, 4.0] and expected[-1] == 30.0
    assert adapters[0].commands[:3] == [b"C", b"S5", b"O"]


@pytest.mark.parametrize("kind", ["slcan", "uart"])
def test_unplug_and_replug(tmp_path: Path, adapters: list[FakeAdapter], kind: str) -> None:
    """A lost device closes the source and counts a disconnect; the same port coming back
    (udev recreates the symlink) is reopened by the running agent, no restart."""
    link = tmp_path / "dev-link"
    cfg = (slcan_cfg(link) if kind == "slcan" else
           SourceConfig(name="gnss", kind="uart", port=str(link), protocol="nmea", baudrate=9600))
    adapters.append(FakeAdapter(link))
    src = make_source(cfg)
    assert type(src) is (SlcanSource if kind == "slcan" else UartSource)
    try:
        assert src.poll_open()
        adapters[0].send(b"$first\r\n")
        assert b"$first" in read_until(src, b"\n")

        adapters[0].unplug()
        wait_for("the source to notice the unplug", lambda: src.read() == b"" and not src.is_open, 5, 0.01)
        assert src.disconnects == 1 and src.last_error
        assert src.next_attempt > 0
        assert src.poll_open(src.next_attempt + 1) is False, "nothing to open while unplugged"
        assert src.open_failures == 1

        adapters.append(FakeAdapter(link))
        assert src.poll_open(src.next_attempt + 1)
        assert src.is_open and src.opens == 2 and src.disconnects == 1
        if kind == "slcan":
            assert adapters[1].commands == [b"C", b"S5", b"O"]
        adapters[1].send(b"$second\r\n")
        assert b"$second" in read_until(src, b"\n")
    finally:
        src.close()
