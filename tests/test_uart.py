"""UART framing (data bits, parity, stop bits) from the config reaches pyserial, checked on
a real pseudo-terminal."""

from __future__ import annotations

import os
import termios
import time

import pytest
import serial

from agent.config import SourceConfig
from agent.sources import make_source
from agent.sources.uart import UartSource


@pytest.mark.parametrize(("bytesize", "parity", "stopbits", "baudrate"), [
    (8, "N", 1.0, 115200),
    (7, "E", 2.0, 9600),
    (7, "O", 1.0, 4800),
    (5, "N", 1.5, 1200),
    (6, "N", 2.0, 19200),
])
def test_framing_reaches_the_tty(bytesize: int, parity: str, stopbits: float, baudrate: int) -> None:
    master, slave = os.openpty()
    try:
        cfg = SourceConfig(name="bms", kind="uart", port=os.ttyname(slave), protocol="jbd", baudrate=baudrate,
                           bytesize=bytesize, parity=parity, stopbits=stopbits)
        src = make_source(cfg)
        assert isinstance(src, UartSource) and src.frame_format == "bytes"
        assert src.poll_open(), src.last_error
        try:
            port = src.port
            assert port is not None
            assert (port.bytesize, port.parity, port.stopbits, port.baudrate) == (bytesize, parity, stopbits, baudrate)
            # What pyserial handed to tcsetattr. (Linux's pty driver then forces CS8 and no
            # parity on a pty, so the tty's own flags can only confirm the stop bits.)
            cflag = termios.tcgetattr(port.fileno())[2]
            assert bool(cflag & termios.CSTOPB) == (stopbits != 1.0)  # POSIX has no 1.5: pyserial sets 2
            os.write(master, b"\xdd\xa5")
            got = b""
            for _ in range(100):
                got += src.read()
                if len(got) >= 2:
                    break
                time.sleep(0.01)
            assert got == b"\xdd\xa5"
        finally:
            src.close()
    finally:
        os.close(master)
        os.close(slave)


def test_mark_and_space_parity_reach_pyserial() -> None:
    """Mark/space parity (CMSPAR) go through pyserial's constants unchanged."""
    assert serial.PARITY_MARK == "M" and serial.PARITY_SPACE == "S"
    master, slave = os.openpty()
    try:
        for parity in ("M", "S"):
            cfg = SourceConfig(name="x", kind="uart", port=os.ttyname(slave), protocol="nmea", parity=parity)
            src = make_source(cfg)
            assert src.poll_open(), src.last_error
            assert isinstance(src, UartSource) and src.port is not None and src.port.parity == parity
            src.close()
    finally:
        os.close(master)
        os.close(slave)
