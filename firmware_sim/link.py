"""Pseudo-terminals that look like an SLCAN USB-CAN adapter and UART devices.

A :class:`UartBus` (GNSS receiver, BMS, controller) is one generic byte-stream bus;
the SLCAN adapter is the CAN bus.

CPython only. Each port is an ``os.openpty()`` pair: the simulator writes to the
master, the agent opens the slave through a symlink at a path it chose. Writes are
non-blocking; what the kernel cannot take waits in a bounded queue and, past the
bound, whole frames are dropped and counted, like a real adapter that overflows
when the host stops reading.
"""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import struct
import termios
import tty
from collections import deque
from collections.abc import Callable

from firmware_sim.encoders.bafang import slcan_frame
from firmware_sim.scenario import edit_line

DEFAULT_QUEUE_LIMIT = 32 * 1024

# Lawicel Sn codes -> bit/s.
SLCAN_BITRATES = {
    "0": 10000, "1": 20000, "2": 50000, "3": 100000, "4": 125000,
    "5": 250000, "6": 500000, "7": 800000, "8": 1000000,
}
OK = b"\r"
ERROR = b"\x07"
_HEXDIGITS = frozenset("0123456789ABCDEFabcdef")


def _is_hex(s: str) -> bool:
    """True if ``s`` is non-empty and all hex digits (frame ids and data are hex)."""
    return bool(s) and all(c in _HEXDIGITS for c in s)


class LinkError(Exception):
    """A port could not be set up (bad path, existing file); the CLI reports it."""


def make_link(link_path: str, target: str) -> None:
    """Point ``link_path`` at ``target``; replace a stale symlink but never a real file."""
    if os.path.islink(link_path):
        os.unlink(link_path)
    elif os.path.exists(link_path):
        raise LinkError(f"{link_path} exists and is not a symlink; not replacing it")
    parent = os.path.dirname(os.path.abspath(link_path))
    if not os.path.isdir(parent):
        raise LinkError(f"directory {parent} does not exist")
    os.symlink(target, link_path)


class PtyPort:
    """One pty with a symlink, a non-blocking master and a bounded output queue."""

    def __init__(self, link_path: str, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        """Open the pty and link it; the slave stays open here so the pty never hangs up."""
        self.master, self.slave = os.openpty()
        try:
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            self.tty_name = os.ttyname(self.slave)
            make_link(link_path, self.tty_name)
        except (OSError, LinkError):
            os.close(self.master)
            os.close(self.slave)
            raise
        self.link_path = link_path
        self.queue_limit = queue_limit
        self._queue: deque[tuple[memoryview, Callable[[], None] | None]] = deque()
        self.pending_bytes = 0
        self.dropped = 0
        self.closed = False

    @property
    def has_pending(self) -> bool:
        """Whether bytes wait for the kernel (the loop then watches for writability)."""
        return bool(self._queue)

    def send(self, data: bytes, on_done: Callable[[], None] | None = None,
             droppable: bool = True) -> bool:
        """Write ``data`` now or queue it; False if it was dropped for lack of room.

        ``on_done`` runs when the last byte has gone to the kernel, so the caller can
        record delivery at the true moment. Command replies pass ``droppable=False``.
        """
        if self.closed:
            return False
        view = memoryview(data)
        if not self._queue:
            view = view[self._write(view):]
            if not len(view):
                if on_done is not None:
                    on_done()
                return True
            droppable = False       # part of it is on the wire: the rest must follow
        if droppable and self.pending_bytes + len(view) > self.queue_limit:
            self.dropped += 1
            return False
        self._queue.append((view, on_done))
        self.pending_bytes += len(view)
        return True

    def _write(self, view: memoryview) -> int:
        """Bytes the kernel took (0 when its buffer is full)."""
        try:
            return os.write(self.master, view)
        except BlockingIOError:
            return 0

    def flush(self) -> None:
        """Hand queued bytes to the kernel until it is full or the queue is empty."""
        while self._queue:
            view, on_done = self._queue[0]
            n = self._write(view)
            self.pending_bytes -= n
            if n < len(view):
                self._queue[0] = (view[n:], on_done)
                return
            self._queue.popleft()
            if on_done is not None:
                on_done()

    def read(self) -> bytes:
        """Everything the agent has written so far (b"" if nothing)."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break
                raise
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def unread(self) -> int:
        """Bytes handed to the kernel that the host has not read yet (lost on close)."""
        if self.closed:
            return 0
        try:
            got = fcntl.ioctl(self.slave, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", got)[0])

    def close(self) -> int:
        """Close the pty and remove the link; returns frames still queued (undelivered)."""
        if self.closed:
            return 0
        self.closed = True
        lost = sum(1 for _, on_done in self._queue if on_done is not None)
        self._queue.clear()
        self.pending_bytes = 0
        try:
            if os.path.islink(self.link_path) and os.readlink(self.link_path) == self.tty_name:
                os.unlink(self.link_path)
        except OSError:
            pass
        os.close(self.master)
        os.close(self.slave)
        return lost


class SlcanAdapter:
    """Lawicel/CANable-style command interpreter on top of a :class:`PtyPort`.

    Only what an agent needs to bring the channel up is implemented; anything else
    answers BEL. ``C`` always answers OK (CANable does; it is a common reset).
    Frames reach the host only while the channel is open and set to the bus bitrate.
    """

    VERSION = b"V1013\r"
    DETAIL_VERSION = b"v1013\r"
    SERIAL = b"NA123\r"
    MAX_COMMAND = 64

    def __init__(self, port: PtyPort, bus_bitrate: int = 250000) -> None:
        """Start closed, at the power-on bitrate (S5), timestamps off."""
        self.port = port
        self.bus_bitrate = bus_bitrate
        self.bitrate = 250000
        self.is_open = False
        self.listen_only = False
        self.timestamps = False
        self.open_count = 0
        self.commands: list[str] = []
        self._buf = bytearray()
        # Called with (can_id, data) for each data frame the host transmits (T/t).
        self.on_tx: Callable[[int, bytes], None] | None = None

    @property
    def receiving(self) -> bool:
        """Whether bus frames would reach the host now."""
        return self.is_open and self.bitrate == self.bus_bitrate

    def feed(self, data: bytes) -> None:
        """Take bytes from the host; answer each CR-terminated command in order."""
        for b in data:
            if b == 0x0D:
                cmd = self._buf.decode("ascii", "replace")
                self._buf.clear()
                self.commands.append(cmd)
                self.port.send(self.handle(cmd), droppable=False)
            elif b == 0x0A:
                continue            # tolerate CR LF line endings from hosts
            elif len(self._buf) >= self.MAX_COMMAND:
                self._buf.clear()   # runaway line: discard it, as adapters do
                self.port.send(ERROR, droppable=False)
            else:
                self._buf.append(b)

    def handle(self, cmd: str) -> bytes:
        """Reply to one command (without its CR)."""
        if cmd == "":
            return OK
        op, arg = cmd[0], cmd[1:]
        if op == "S" and len(arg) == 1 and arg in SLCAN_BITRATES and not self.is_open:
            self.bitrate = SLCAN_BITRATES[arg]
            return OK
        if op in "OL" and arg == "" and not self.is_open:
            self.is_open = True
            self.listen_only = op == "L"
            self.open_count += 1
            return OK
        if op == "C" and arg == "":
            self.is_open = False
            return OK
        if op == "V" and arg == "":
            return self.VERSION
        if op == "v" and arg == "":
            return self.DETAIL_VERSION
        if op == "N" and arg == "":
            return self.SERIAL
        if op == "Z" and arg in ("0", "1") and not self.is_open:
            self.timestamps = arg == "1"
            return OK
        if op == "F" and arg == "" and self.is_open:
            return b"F00\r"
        if op in "Mm" and len(arg) == 8 and _is_hex(arg) and not self.is_open:
            return OK
        if op in "tTrR" and self.is_open and not self.listen_only and self._valid_tx(op, arg):
            # The frame goes on the simulated bus; the vehicle may obey it.
            if op in "tT" and self.on_tx is not None:
                id_len = 3 if op == "t" else 8
                self.on_tx(int(arg[:id_len], 16), bytes.fromhex(arg[id_len + 1:]))
            return b"z\r" if op in "tr" else b"Z\r"
        return ERROR

    @staticmethod
    def _valid_tx(op: str, arg: str) -> bool:
        """Whether ``arg`` is a well-formed transmit request for ``op``."""
        id_len = 3 if op in "tr" else 8
        if len(arg) < id_len + 1 or not _is_hex(arg[:id_len]) or not arg[id_len].isdigit():
            return False
        can_id = int(arg[:id_len], 16)
        if can_id > (0x7FF if id_len == 3 else 0x1FFFFFFF):
            return False
        dlc = int(arg[id_len])
        data = arg[id_len + 1:]
        if dlc > 8:
            return False
        if op in "rR":
            return data == ""
        return len(data) == 2 * dlc and (dlc == 0 or _is_hex(data))

    def frame(self, t: float, can_id: int, data: bytes,
              on_done: Callable[[], None] | None = None,
              edit: tuple[str, int, int] | None = None) -> str:
        """Offer one bus frame to the host: "sent", "dropped" or "closed".

        ``edit`` (from ``noisy-line``) corrupts its line on the serial side."""
        if not self.receiving:
            return "closed"
        stamp = int(t * 1000.0 + 0.5) if self.timestamps else None
        line = slcan_frame(can_id, data, stamp)
        if edit is not None:
            line = edit_line(line, edit)
        return "sent" if self.port.send(line, on_done) else "dropped"

    def noise(self, data: bytes, on_done: Callable[[], None] | None = None) -> str:
        """Garbage bytes on the serial line (``noisy-line``), while frames would pass too."""
        if not self.receiving:
            return "closed"
        return "sent" if self.port.send(data, on_done) else "dropped"


class UartBus:
    """One UART device on a pty: frames out (recorded when delivered), host bytes in.

    Host input goes to ``on_input(name, data)``; until that is set (the ride has not
    started) it is kept and handed over on :meth:`connect`.
    """

    def __init__(self, name: str, port: PtyPort) -> None:
        """Wrap ``port`` as the bus ``name``."""
        self.name = name
        self.port = port
        self.on_input: Callable[[str, bytes], object] | None = None
        self._early = bytearray()

    def connect(self, on_input: Callable[[str, bytes], object]) -> None:
        """Start passing host input on, beginning with what arrived before."""
        self.on_input = on_input
        if self._early:
            data = bytes(self._early)
            self._early.clear()
            on_input(self.name, data)

    def feed(self, data: bytes) -> None:
        """Host bytes from the IoLoop."""
        if self.on_input is None:
            self._early.extend(data)
        else:
            self.on_input(self.name, data)

    def send(self, payload: bytes, on_done: Callable[[], None] | None = None) -> bool:
        """Queue ``payload`` for the host; False if dropped for lack of room."""
        return self.port.send(payload, on_done)


class IoLoop:
    """Waits on all ports at once: reads host input, drains queues when writable."""

    def __init__(self) -> None:
        """An empty loop; ports join with :meth:`add`."""
        self.selector = selectors.DefaultSelector()
        self._ports: list[PtyPort] = []
        self._writing: dict[int, bool] = {}

    def add(self, port: PtyPort, on_input: Callable[[bytes], None]) -> None:
        """Watch ``port``; ``on_input`` gets what the host writes to it."""
        self.selector.register(port.master, selectors.EVENT_READ, (port, on_input))
        self._ports.append(port)
        self._writing[port.master] = False

    def remove(self, port: PtyPort) -> None:
        """Stop watching ``port`` (before it is closed, as when it is unplugged)."""
        if port in self._ports:
            self.selector.unregister(port.master)
            self._ports.remove(port)
            del self._writing[port.master]

    def poll(self, timeout: float) -> None:
        """Handle I/O that is ready, waiting at most ``timeout`` seconds for some."""
        for port in self._ports:
            want = port.has_pending
            if want != self._writing[port.master]:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
                self.selector.modify(port.master, events, self.selector.get_key(port.master).data)
                self._writing[port.master] = want
        for key, mask in self.selector.select(max(0.0, timeout)):
            port, on_input = key.data
            if mask & selectors.EVENT_READ:
                data = port.read()
                if data:
                    on_input(data)
            if mask & selectors.EVENT_WRITE:
                port.flush()

    def close(self) -> None:
        """Stop watching; the ports themselves are closed by their owner."""
        for port in self._ports:
            self.selector.unregister(port.master)
        self._ports.clear()
        self.selector.close()
