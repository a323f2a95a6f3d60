"""The SocketCAN source. Where the kernel has AF_CAN and a CAN interface (vcan0 in a VM,
can0 on the vehicle) a real round trip runs; where not, it is skipped with the reason,
and the mapping of "no AF_CAN" / "no such interface" to a retried SourceUnavailableError
is tested everywhere with a stand-in socket module."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import SourceConfig
from agent.errors import SourceError, SourceUnavailableError
from agent.sources import make_source
from agent.sources import socketcan as sc
from agent.sources.base import CAN_EFF_FLAG, CAN_RTR_FLAG, PACKED_FRAME

ARPHRD_CAN = 280


def cfg(ifname: str) -> SourceConfig:
    return SourceConfig(name="can", kind="socketcan", port=ifname, protocol="bafang-can")


def af_can_problem() -> str | None:
    """Why this kernel/Python cannot open a CAN_RAW socket, or None if it can."""
    if not hasattr(socket, "AF_CAN"):
        return "this Python was built without socket.AF_CAN"
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except OSError as e:
        return f"this kernel has no AF_CAN: socket(AF_CAN, SOCK_RAW, CAN_RAW) failed with {e}"
    return None


def can_interface() -> str | None:
    """An up CAN interface (type ARPHRD_CAN), vcan first."""
    found = []
    for dev in sorted(Path("/sys/class/net").iterdir()):
        try:
            if int((dev / "type").read_text()) == ARPHRD_CAN and int((dev / "flags").read_text(), 16) & 1:
                found.append(dev.name)
        except (OSError, ValueError):
            continue
    found.sort(key=lambda n: not n.startswith("vcan"))
    return found[0] if found else None


# --- everywhere: the failure modes, with a stand-in socket module -------------


class FakeSocketModule:
    """socket as seen by sc.open_can_socket, failing the way a given kernel does."""

    AF_CAN = 29
    SOCK_RAW = socket.SOCK_RAW
    CAN_RAW = 1

    def __init__(self, create_errno: int | None = None, bind_errno: int | None = None) -> None:
        self.create_errno = create_errno
        self.bind_errno = bind_errno
        self.closed = 0

    def socket(self, *args: Any) -> Any:
        if self.create_errno is not None:
            raise OSError(self.create_errno, os.strerror(self.create_errno))
        module = self

        class Sock:
            def setsockopt(self, *a: Any) -> None:
                pass

            def bind(self, addr: tuple[str]) -> None:
                if module.bind_errno is not None:
                    raise OSError(module.bind_errno, os.strerror(module.bind_errno))

            def setblocking(self, flag: bool) -> None:
                pass

            def close(self) -> None:
                module.closed += 1

        return Sock()


def test_no_af_can_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """socket(AF_CAN) failing with EAFNOSUPPORT (this kernel) is 'no AF_CAN', retried."""
    monkeypatch.setattr(sc, "socket", FakeSocketModule(create_errno=errno.EAFNOSUPPORT))
    src = make_source(cfg("can0"))
    assert src.frame_format == "packed"
    now = 100.0
    assert src.poll_open(now) is False
    assert not src.is_open and not src.finished and src.open_failures == 1
    assert src.last_error.startswith("this kernel has no AF_CAN")
    assert src.next_attempt == now + 0.5, "retried with backoff like any absent device"
    with pytest.raises(SourceUnavailableError, match="this kernel has no AF_CAN"):
        sc.open_can_socket("can0")


def test_python_without_af_can_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoCan:
        pass

    monkeypatch.setattr(sc, "socket", NoCan())
    with pytest.raises(SourceUnavailableError, match="this kernel has no AF_CAN.*built without"):
        sc.open_can_socket("can0")


def test_absent_interface_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSocketModule(bind_errno=errno.ENODEV)
    monkeypatch.setattr(sc, "socket", fake)
    src = make_source(cfg("can7"))
    assert src.poll_open(0.0) is False
    assert src.last_error == "no such interface can7"
    assert fake.closed == 1, "the socket of a failed bind is closed"


def test_real_kernel_failure_is_one_of_the_two_reasons() -> None:
    """On whatever kernel runs this: opening an interface that does not exist fails as
    'no AF_CAN' or as 'no such interface', never with a raw OSError."""
    with pytest.raises(SourceUnavailableError) as info:
        sc.open_can_socket("nocan9")
    reason = str(info.value)
    assert reason.startswith("this kernel has no AF_CAN") or reason == "no such interface nocan9"
    if af_can_problem():
        assert reason.startswith("this kernel has no AF_CAN")


def test_write_wants_whole_records() -> None:
    src = sc.SocketcanSource(cfg("can0"))
    with pytest.raises(SourceUnavailableError, match="not open"):
        src.write(PACKED_FRAME.pack(0x123, 1, b"\x01"))
    src.sock = object()  # type: ignore[assignment]
    with pytest.raises(SourceError, match="16-byte"):
        src.write(b"\x00" * 15)


class QueueSocket:
    """A drained CAN_RAW socket: recv_into hands out queued records, then EAGAIN or an error."""

    def __init__(self, records: list[bytes], then: OSError | None = None) -> None:
        self.records = records
        self.then = then
        self.closed = False

    def recv_into(self, buf: memoryview, size: int) -> int:
        if not self.records:
            raise self.then or BlockingIOError(errno.EAGAIN, "again")
        rec = self.records.pop(0)
        buf[:len(rec)] = rec
        return len(rec)

    def close(self) -> None:
        self.closed = True


def records(n: int) -> list[bytes]:
    return [PACKED_FRAME.pack((i & 0x7FF) if i % 2 else (i | CAN_EFF_FLAG), 4, struct.pack("<I", i)) for i in range(n)]


def test_read_drains_up_to_max_frames_per_wake_up() -> None:
    """One read returns every record waiting, concatenated, but at most MAX_FRAMES."""
    src = sc.SocketcanSource(cfg("can0"))
    want = records(sc.MAX_FRAMES + 10)
    src.sock = QueueSocket(list(want))  # type: ignore[assignment]
    src.is_open = True
    first = src.read()
    assert first == b"".join(want[:sc.MAX_FRAMES])
    assert src.read() == b"".join(want[sc.MAX_FRAMES:])
    assert src.read() == b""
    assert src.frames == len(want) and src.bytes_read == 16 * len(want)


def test_interface_going_away_closes_for_a_retry() -> None:
    """ENETDOWN/ENODEV after the frames already drained: those are kept, the next read
    reports the loss and the base class schedules a reopen."""
    src = sc.SocketcanSource(cfg("can0"))
    sock = QueueSocket(records(3), then=OSError(errno.ENODEV, "No such device"))
    src.sock = sock  # type: ignore[assignment]
    src.is_open = True
    assert src.read() == b"".join(records(3))
    assert src.is_open
    assert src.read() == b""
    assert not src.is_open and sock.closed and src.disconnects == 1
    assert src.last_error.startswith("can0 lost:")


# --- where the kernel allows: a real interface ---------------------------------


@pytest.fixture
def iface() -> str:
    problem = af_can_problem()
    if problem:
        pytest.skip(problem)
    name = can_interface()
    if name is None:
        pytest.skip("AF_CAN works but no CAN interface is up (ip link add vcan0 type vcan; ip link set vcan0 up)")
    return name


def test_round_trip_on_a_real_interface(iface: str) -> None:
    """Frames sent by another CAN_RAW socket arrive as packed records, and the source's
    own write reaches another socket."""
    src = make_source(cfg(iface))
    assert src.poll_open()
    peer = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    peer.bind((iface,))
    peer.settimeout(2)
    try:
        sent = [PACKED_FRAME.pack(0x123, 2, b"\xaa\xbb"),
                PACKED_FRAME.pack(0x02F83201 | CAN_EFF_FLAG, 8, bytes(range(8))),
                PACKED_FRAME.pack(0x7FF | CAN_RTR_FLAG, 0, b"")]
        for frame in sent:
            peer.send(frame)
        got = b""
        deadline = time.monotonic() + 2
        while len(got) < 48 and time.monotonic() < deadline:
            select.select([src.fileno()], [], [], 0.2)
            got += src.read()
        assert got == b"".join(sent)
        src.write(PACKED_FRAME.pack(0x321, 1, b"\x55"))
        can_id, dlc, data = PACKED_FRAME.unpack(peer.recv(16))
        assert (can_id, dlc, data[:1]) == (0x321, 1, b"\x55")
    finally:
        peer.close()
        src.close()


def test_read_is_bounded_per_wake_up(iface: str) -> None:
    src = make_source(cfg(iface))
    assert src.poll_open()
    peer = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    peer.bind((iface,))
    try:
        sent = 0
        for i in range(sc.MAX_FRAMES + 100):
            try:
                peer.send(PACKED_FRAME.pack(i & 0x7FF, 4, struct.pack("<I", i)))
                sent += 1
            except OSError:
                break
        time.sleep(0.2)
        first = src.read()
        assert first and len(first) <= sc.MAX_FRAMES * 16 and len(first) % 16 == 0
        assert sent > sc.MAX_FRAMES
    finally:
        peer.close()
        src.close()
