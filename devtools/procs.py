"""Child processes for the tests and ``make run``: started in their own session (so a
terminal's Ctrl-C reaches only us), stopped by pid, every wait bounded."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None,
          wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``python -m <args>`` from the repo, stdout and stderr to ``log``; run by ``wrapper``
    (e.g. valgrind and its options) when given."""
    out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([*wrapper, sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})})
    finally:
        out.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def log_has(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text(errors="replace")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM and wait; SIGKILL the whole group if it will not go (returns -9 then)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        return -9


def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> list[str]:
    """The simulator's stdout lines up to its ``ready`` line (it prints its pty paths
    first); kills it and fails if that does not come in time."""
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append(line.decode())
                if line == b"ready":
                    return lines
    proc.kill()
    stderr = proc.stderr.read() if proc.stderr is not None else b""
    raise AssertionError(f"no ready line; got {lines!r}, stderr {stderr!r}")


def start_sim(args: list[str]) -> subprocess.Popen[bytes]:
    """``python -m firmware_sim ARGS`` from the repo, its stdout and stderr piped."""
    return subprocess.Popen([sys.executable, "-m", "firmware_sim", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill the simulator if it is still running, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def open_raw(path: Path) -> int:
    """A pty opened as a serial port would be: raw, non-blocking, not our terminal."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    return fd
