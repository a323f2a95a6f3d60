"""The python-can source over python-can's ``virtual`` interface: messages sent on one
virtual bus arrive from the source as packed ``struct can_frame`` records, woken through
the notifier's pipe the way the runtime's selector waits. And without python-can, only
this source fails, saying how to install it."""

from __future__ import annotations

import importlib
import select
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.config import SourceConfig
from agent.errors import SourceError
from agent.sources import make_source
from agent.sources.base import CAN_EFF_FLAG, CAN_ERR_FLAG, CAN_RTR_FLAG, PACKED_FRAME, Source


def cfg(channel: str, interface: str = "virtual") -> SourceConfig:
    return SourceConfig(name="pcan", kind="python-can", port="", protocol="bafang-can", interface=interface,
                        channel=channel)


def test_missing_python_can_fails_only_this_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: with ``can`` unimportable, make_source says ``pip install .[can]``."""
    monkeypatch.setitem(sys.modules, "can", None)
    monkeypatch.delitem(sys.modules, "agent.sources.pythoncan", raising=False)
    with pytest.raises(SourceError, match=r"pip install \.\[can\]"):
        make_source(cfg("x"))
    monkeypatch.undo()
    importlib.invalidate_caches()


can = pytest.importorskip("can", minversion="4.3",
                          reason="python-can is not installed (pip install .[can]); the virtual-bus tests need it")


@pytest.fixture
def channel() -> str:
    return f"ebike-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sender(channel: str) -> Iterator[Any]:
    bus = can.Bus(interface="virtual", channel=channel)
    yield bus
    bus.shutdown()


def read_records(src: Source, n: int, timeout: float = 3.0) -> bytes:
    """Wait on fileno() like the runtime, read until ``n`` records have come."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < 16 * n and time.monotonic() < deadline:
        if select.select([src.fileno()], [], [], 0.2)[0]:
            got += src.read()
    return got


def test_virtual_bus_round_trip(channel: str, sender: Any) -> None:
    src = make_source(cfg(channel))
    assert src.frame_format == "packed" and src.where == f"virtual:{channel}"
    assert src.poll_open()
    try:
        assert not select.select([src.fileno()], [], [], 0.05)[0], "nothing sent, nothing readable"
        sender.send(can.Message(arbitration_id=0x123, is_extended_id=False, data=b"\xaa\xbb"))
        sender.send(can.Message(arbitration_id=0x02F83201, is_extended_id=True, data=bytes(range(8))))
        sender.send(can.Message(arbitration_id=0x7FF, is_extended_id=False, is_remote_frame=True, dlc=4))
        sender.send(can.Message(arbitration_id=0x004, is_error_frame=True, dlc=8, data=bytes(8)))
        sender.send(can.Message(arbitration_id=0x100, is_fd=True, data=bytes(12)))  # dropped: FD is off
        sender.send(can.Message(arbitration_id=0x1FFFFFFF, is_extended_id=True, data=b""))
        got = read_records(src, 5)
        assert got == b"".join([
            PACKED_FRAME.pack(0x123, 2, b"\xaa\xbb"),
            PACKED_FRAME.pack(0x02F83201 | CAN_EFF_FLAG, 8, bytes(range(8))),
            PACKED_FRAME.pack(0x7FF | CAN_RTR_FLAG, 4, b""),
            PACKED_FRAME.pack(0x004 | CAN_EFF_FLAG | CAN_ERR_FLAG, 8, bytes(8)),
            PACKED_FRAME.pack(0x1FFFFFFF | CAN_EFF_FLAG, 0, b""),
        ])
        status = src.status()
        assert status["frames"] == 5 and status["fd_dropped"] == 1
        assert not select.select([src.fileno()], [], [], 0.05)[0], "all read: the pipe is drained"
    finally:
        src.close()
    assert not src.is_open


def test_write_reaches_the_other_bus(channel: str, sender: Any) -> None:
    src = make_source(cfg(channel))
    assert src.poll_open()
    try:
        src.write(PACKED_FRAME.pack(0x02F83200 | CAN_EFF_FLAG, 3, b"\x01\x02\x03")
                  + PACKED_FRAME.pack(0x321, 0, b""))
        first = sender.recv(2)
        second = sender.recv(2)
        assert (first.arbitration_id, first.is_extended_id, bytes(first.data)) == (0x02F83200, True, b"\x01\x02\x03")
        assert (second.arbitration_id, second.is_extended_id, second.dlc) == (0x321, False, 0)
        with pytest.raises(SourceError, match="16-byte"):
            src.write(b"\x00" * 17)
    finally:
        src.close()


def test_many_messages_come_in_bounded_reads(channel: str, sender: Any) -> None:
    from agent.sources.pythoncan import MAX_FRAMES

    src = make_source(cfg(channel))
    assert src.poll_open()
    try:
        n = MAX_FRAMES * 2 + 7
        for i in range(n):
            sender.send(can.Message(arbitration_id=i & 0x7FF, is_extended_id=False, data=i.to_bytes(4, "little")))
        deadline = time.monotonic() + 5
        reads = []
        while sum(len(r) for r in reads) < 16 * n and time.monotonic() < deadline:
            if select.select([src.fileno()], [], [], 0.2)[0]:
                reads.append(src.read())
        assert all(len(r) <= 16 * MAX_FRAMES for r in reads)
        data = b"".join(reads)
        assert [int.from_bytes(PACKED_FRAME.unpack_from(data, k)[2][:4], "little") for k in range(0, len(data), 16)
                ] == list(range(n))
    finally:
        src.close()


def test_reopen_after_close(channel: str, sender: Any) -> None:
    src = make_source(cfg(channel))
    assert src.poll_open()
    src.close()
    assert src.poll_open()
    try:
        sender.send(can.Message(arbitration_id=0x10, is_extended_id=False, data=b"\x01"))
        assert read_records(src, 1) == PACKED_FRAME.pack(0x10, 1, b"\x01")
    finally:
        src.close()


def test_unknown_interface_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="python-can has no interface 'nosuchbus'"):
        make_source(cfg("x", interface="nosuchbus"))
