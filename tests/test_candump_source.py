"""The candump replay source: pacing in real and scaled time, pass-through of every byte,
loop and end of log, driven the way the runtime drives it (select on ``fileno()`` with
the timeout shortened to ``next_due()``)."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import pytest

from agent.config import SourceConfig
from agent.sources import make_source
from agent.sources.base import Source
from agent.sources.candump import MAX_LINES, CandumpSource, line_time

# Log times (s) of the lines below; with replay_speed 10 the log's 1.2 s take 0.12 s.
LOG_TIMES = [1700000000.000000, 1700000000.010000, 1700000000.250500, 1700000000.251000,
             1700000000.600000, 1700000001.200000]
FRAMES = ["02F83201#6C091F05840D40FF", "123#", "7FF#0011223344556677", "02F83200#55",
          "1F3#R", "02F83203#A00F1C000108"]
SCALED_TOLERANCE = 0.08  # how late a line may arrive on a loaded CI machine


def log_lines(direction: bool) -> list[bytes]:
    lines = []
    for i, (t, frame) in enumerate(zip(LOG_TIMES, FRAMES, strict=True)):
        tail = (" R" if i % 2 else " T") if direction else ""
        lines.append(f"({t:.6f}) can0 {frame}{tail}\n".encode())
    return lines


def cfg(path: Path, speed: float = 1.0, loop: bool = False) -> SourceConfig:
    return SourceConfig(name="replay", kind="candump", port=str(path), protocol="bafang-can",
                        replay_speed=speed, loop=loop)


def pump(src: Source, until: float, stop_after: int | None = None) -> list[tuple[float, bytes]]:
    """Run a runtime-like selector loop until ``until`` (monotonic) or the source finishes:
    returns (arrival time, line) for every line read."""
    got: list[tuple[float, bytes]] = []
    while time.monotonic() < until and src.is_open:
        due = src.next_due()
        timeout = max(0.0, min(until, due if due is not None else until) - time.monotonic())
        ready, _, _ = select.select([src.fileno()], [], [], timeout)
        if not ready:
            continue
        data = src.read()
        now = time.monotonic()
        got += [(now, line) for line in data.splitlines(keepends=True)]
        if stop_after is not None and len(got) >= stop_after:
            break
    return got


def opened(path: Path, speed: float = 1.0, loop: bool = False) -> CandumpSource:
    src = make_source(cfg(path, speed, loop))
    assert isinstance(src, CandumpSource) and src.frame_format == "candump"
    assert src.poll_open()
    return src


@pytest.mark.parametrize("direction", [False, True], ids=["plain", "direction"])
def test_scaled_replay_paces_each_line(tmp_path: Path, direction: bool) -> None:
    """replay_speed 10: each line arrives no earlier than (t - t0) / 10 after the open and
    within a tolerance after it, in order, byte-identical; then the source finishes."""
    lines = log_lines(direction)
    path = tmp_path / "ride.log"
    path.write_bytes(b"".join(lines))
    src = opened(path, speed=10)
    got = pump(src, time.monotonic() + 3)
    assert [line for _, line in got] == lines
    for (arrived, _), t in zip(got, LOG_TIMES, strict=True):
        due = src.started + (t - LOG_TIMES[0]) / 10
        assert arrived >= due, f"line due at +{due - src.started:.3f} s came early"
        late = arrived - due
        assert late < SCALED_TOLERANCE, f"line due at +{due - src.started:.3f} s came {late:.3f} s late"
    assert src.finished and not src.is_open
    assert src.status()["finished"] and src.status()["lines"] == len(lines)
    assert "end of log" in src.last_error


def test_real_time_replay(tmp_path: Path) -> None:
    """replay_speed 1 (the default): the log's own time, here 0.3 s across three lines."""
    path = tmp_path / "ride.log"
    path.write_bytes(b"(10.000000) can0 123#01\n(10.150000) can0 123#02\n(10.300000) can0 123#03\n")
    src = opened(path)
    got = pump(src, time.monotonic() + 3)
    offsets = [arrived - src.started for arrived, _ in got]
    assert [line[-3:-1] for _, line in got] == [b"01", b"02", b"03"]
    for off, want in zip(offsets, [0.0, 0.15, 0.3], strict=True):
        assert want <= off < want + SCALED_TOLERANCE


def test_nothing_is_readable_before_it_is_due(tmp_path: Path) -> None:
    """Between lines the fd is not readable, and next_due() says when the next line is due."""
    path = tmp_path / "ride.log"
    path.write_bytes(b"(0.000000) can0 123#01\n(5.000000) can0 123#02\n")
    src = opened(path)
    try:
        assert select.select([src.fileno()], [], [], 0.5)[0], "the first line is due at the open"
        assert src.read() == b"(0.000000) can0 123#01\n"
        due = src.next_due()
        assert due is not None and abs(due - (src.started + 5.0)) < 1e-6
        assert not select.select([src.fileno()], [], [], 0.1)[0]
        assert src.read() == b"" and src.is_open and not src.finished
    finally:
        src.close()
    assert src.next_due() is None


def test_as_fast_as_possible_is_bounded_per_read(tmp_path: Path) -> None:
    """replay_speed 0: every line is due at once, but one read returns at most MAX_LINES,
    leaving the fd readable for the rest."""
    lines = [f"({1000 + i * 3600:.6f}) vcan0 {i % 0x800:03X}#{i & 0xFF:02X}\n".encode() for i in range(12000)]
    path = tmp_path / "big.log"
    path.write_bytes(b"".join(lines))
    src = opened(path, speed=0)
    started = time.monotonic()
    first = src.read()
    assert first.count(b"\n") == MAX_LINES
    assert select.select([src.fileno()], [], [], 0)[0], "more lines are due: the fd must stay readable"
    rest = b"".join(line for _, line in pump(src, time.monotonic() + 10))
    assert time.monotonic() - started < 5, "hours of log time must not be waited out"
    assert first + rest == b"".join(lines)
    assert src.finished and src.lines == 12000


def test_malformed_lines_pass_through_with_the_previous_time(tmp_path: Path) -> None:
    """A damaged line is not the source's business (the kernel counts it): it passes
    through, timed like the line before it. A last line without newline gets one."""
    body = (b"(0.000000) can0 123#01\n"
            b"garbage without a timestamp\n"
            b"(abc) can0 123#02\n"
            b"(0.100000) can0 123#XYZ\n"
            b"\n"
            b"(inf) can0 123#03\n"
            b"(0.200000) can0 123#04")
    path = tmp_path / "bad.log"
    path.write_bytes(body)
    src = opened(path, speed=1)
    got = pump(src, time.monotonic() + 3)
    assert b"".join(line for _, line in got) == body + b"\n"
    by_line = {line: arrived - src.started for arrived, line in got}
    assert by_line[b"garbage without a timestamp\n"] < 0.05
    assert 0.1 <= by_line[b"(inf) can0 123#03\n"] < 0.1 + SCALED_TOLERANCE
    assert by_line[b"(0.200000) can0 123#04\n"] >= 0.2
    assert src.bad_timestamps == 4


def test_loop_restarts_the_log(tmp_path: Path) -> None:
    """With loop the log plays again, paced the same, and the source never finishes."""
    lines = log_lines(direction=True)
    path = tmp_path / "ride.log"
    path.write_bytes(b"".join(lines))
    src = opened(path, speed=10, loop=True)
    try:
        got = pump(src, time.monotonic() + 3, stop_after=3 * len(lines))
        # The next pass starts when the last one ended, so its first line may come along.
        assert [line for _, line in got] == (lines * 4)[:len(got)] and len(got) >= 3 * len(lines)
        span = (LOG_TIMES[-1] - LOG_TIMES[0]) / 10
        second_pass_last = got[2 * len(lines) - 1][0] - src.started
        assert 2 * span <= second_pass_last < 2 * span + SCALED_TOLERANCE
        assert src.is_open and not src.finished and src.passes >= 3
    finally:
        src.close()


def test_end_of_log_is_final(tmp_path: Path) -> None:
    """Without loop the source ends for good: closed, finished, and never reopened."""
    path = tmp_path / "ride.log"
    path.write_bytes(b"(1.0) can0 123#01\n")
    src = opened(path, speed=0)
    assert src.read() == b"(1.0) can0 123#01\n"
    assert src.finished and not src.is_open and src.disconnects == 0
    assert src.poll_open(time.monotonic() + 3600) is False
    assert src.opens == 1 and src.open_failures == 0
    assert src.read() == b"", "a closed source reads nothing"


def test_empty_log_finishes(tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_bytes(b"")
    for loop in (False, True):
        src = opened(path, speed=1, loop=loop)
        assert select.select([src.fileno()], [], [], 0.5)[0], "the end must wake the loop"
        assert src.read() == b""
        assert src.finished and not src.is_open


def test_missing_log_is_retried(tmp_path: Path) -> None:
    """A log that is not there (yet) is an unavailable source, retried with backoff."""
    src = make_source(cfg(tmp_path / "later.log"))
    assert src.poll_open() is False and not src.finished
    assert src.open_failures == 1 and "cannot open" in src.last_error
    (tmp_path / "later.log").write_bytes(b"(1.0) can0 123#01\n")
    assert src.poll_open(src.next_attempt)
    src.close()


def test_close_releases_the_pipe(tmp_path: Path) -> None:
    path = tmp_path / "ride.log"
    path.write_bytes(b"(1.0) can0 123#01\n(9.0) can0 123#02\n")
    src = opened(path)
    fd = src.fileno()
    src.close()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize(("line", "t"), [
    (b"(1700000000.123456) can0 123#00\n", 1700000000.123456),
    (b"  (2.5) can0 123#00 R\n", 2.5),
    (b"(12) x", 12.0),
    (b"(nan) can0 1#", None),
    (b"(1.0 can0 123#00\n", None),
    (b"1.0) can0 123#00\n", None),
    (b"", None),
])
def test_line_time(line: bytes, t: float | None) -> None:
    assert line_time(line) == t


def test_looped_replay_keeps_the_timeline_going(tmp_path: Path) -> None:
    """Each pass of a looped log starts where the last ended: no sample is late, and the
    windows keep moving forward instead of falling back to the log's first second."""
    from agent.dbc.compile import compile_dbc, profile_path
    from agent.feed import CanTextFeed
    from agent.fusion.kernel import Kernel

    log = tmp_path / "loop.log"
    log.write_text("".join(f"({1000 + i * 0.5:.6f}) can0 02F83201#{i:02X}00000000000000\n" for i in range(8)))
    src = CandumpSource(SourceConfig(name="log", kind="candump", port=str(log), protocol="bafang-can",
                                     replay_speed=0.0, loop=True))
    dbc = compile_dbc(profile_path("bafang"))
    kernel = Kernel(dbc.id_space, 1.0)
    kernel.set_can_tables(*dbc.kernel_tables())
    feed = CanTextFeed("candump", kernel)
    assert src.poll_open()
    starts: list[float] = []
    deadline = time.monotonic() + 5
    while src.passes < 4 and time.monotonic() < deadline:
        data = src.read()
        if data:
            starts += [c[0] for c in feed.feed(data, time.time(), src)]
    src.close()
    assert src.passes >= 4
    assert kernel.counters()["late"] == 0
    assert starts == sorted(starts) and len(starts) >= 3 * 3
