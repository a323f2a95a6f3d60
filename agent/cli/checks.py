"""The checks ``config check`` and ``selftest`` both make, written once, so the two
commands say the same words (and the same fix) about the same fault.

- ``Check`` and ``Report``: one line per check through ``view.check``, and the
  ``--json`` list.
- The running agent: ``agent_state``, the ``agent: running (up X, pid N)`` / ``agent:
  not running (no answer on PATH)`` line, and the rule for the ports it holds
  (``agents_source``, ``held_port``): never opened a second time.
- A source's port: ``serial_open`` (opened and closed, nothing read or written),
  ``socketcan`` (looked up in /sys/class/net), ``candump_file`` (read and parsed),
  ``device_check`` (whichever of the last two applies).
- Storage: ``writable`` (a test file beside a path) and ``storage_fix``.

Each check takes ``what``, the command's own name for the line: the commands lay their
lines out differently (``config check``: one line per source; ``selftest``: a port line,
then a data line), while the detail and the fix come from here. Standard library at the
top; the serial source (pyserial) and the candump parser are imported by the check that
needs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.cli import view
from agent.control.client import request
from agent.errors import AgentUnreachable, DecodeError

if TYPE_CHECKING:
    from agent.config import SourceConfig

SERIAL_KINDS = ("uart", "slcan")
IFF_UP = 0x1
ARPHRD_CAN = 280
# (words in the error, what it is, the fix to try with {port} and {key}), first match
# wins: pyserial's errors and the agent's last_error both name the errno's words.
OPEN_FAULTS = (
    ("No such file", "no such device", "plug the adapter in, or set {key} (ls -l /dev/serial/by-id/)"),
    ("ermission", "permission denied", "add the agent's user to the dialout group (usermod -aG dialout USER)"),
    ("busy", "busy", "another program holds it (fuser -v {port}): stop it"),
    ("SLCAN", "", "is it an SLCAN (Lawicel) adapter? unplug it and plug it back"),
    ("", "", "is {port} a serial port? set {key} to a tty device (/dev/ttyUSB0, /dev/serial/by-id/...)"),
)


@dataclass(frozen=True)
class Check:
    ok: bool | None  # None: skipped, and ``detail`` says why
    what: str
    detail: str = ""
    fix: str = ""

    def as_json(self) -> dict[str, Any]:
        """The check in ``--json``: its fix only when it failed (a PASS may carry one)."""
        return {"check": self.what, "ok": self.ok, "result": "SKIP" if self.ok is None else "PASS" if self.ok
                else "FAIL", "detail": self.detail, "fix": self.fix if self.ok is False else ""}


class Report:
    """The checks in order, each printed as it is made (unless ``quiet``: ``--json``), so
    a slow check shows what came before it."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.checks: list[Check] = []

    def put(self, check: Check) -> Check:
        self.checks.append(check)
        if not self.quiet:
            view.check(check.ok, check.what, check.detail, check.fix)
        return check

    def add(self, ok: bool | None, what: str, detail: str = "", fix: str = "") -> Check:
        return self.put(Check(ok, what, detail, fix))

    @property
    def failed(self) -> int:
        return sum(1 for c in self.checks if c.ok is False)

    def as_json(self) -> list[dict[str, Any]]:
        return [c.as_json() for c in self.checks]


# --- the running agent ------------------------------------------------------------------


def agent_state(path: str) -> dict[str, Any] | None:
    """The running agent's status, or None when none answers on ``path``."""
    try:
        st: dict[str, Any] = request(path)["status"]
    except AgentUnreachable:
        return None
    return st


def agent_line(path: str, st: dict[str, Any] | None, note: str = "") -> str:
    """``agent: running (up 4 min, pid 812)`` or ``agent: not running (no answer on
    PATH)``, then ``: note``: the first line of a command that works either way."""
    if st is None:
        line = f"agent: not running (no answer on {path})"
    else:
        line = f"agent: running (up {view.age(st.get('uptime'))}, pid {st.get('pid', '?')})"
    return f"{line}: {note}" if note else line


def agents_source(st: dict[str, Any] | None, src: SourceConfig) -> dict[str, Any] | None:
    """The running agent's source on ``src``'s serial port (by the device it names, open
    now or being retried), or None. Such a port is not opened here: Linux lets a tty be
    opened twice, but two readers split its bytes and each sees garbage, closing it may
    drop the line's DTR, and a port the agent retries may be opened under it. The
    agent's status stands for it. A log file or a network interface is looked at
    without disturbing the agent, so it is never the agent's alone."""
    if st is None or src.kind not in SERIAL_KINDS:
        return None
    device = os.path.realpath(src.port)
    return next((s for s in st.get("sources", []) if s.get("kind") in SERIAL_KINDS and s.get("port")
                 and os.path.realpath(s["port"]) == device), None)


def held_port(what: str, src: SourceConfig, theirs: dict[str, Any]) -> Check:
    """A port the running agent has (``agents_source``), by its word: open, with its last
    frame; or not open, with the agent's last error and the fix for it."""
    if theirs.get("open"):
        last = theirs.get("last_frame_at")
        return Check(True, what, f"{src.port} held by the running agent, "
                                 + (f"last frame {view.when(last)}" if last else "no valid frame yet"))
    if not theirs.get("last_error"):
        return Check(None, what, f"{src.port}: the running agent has not opened it yet")
    return open_fault(what, src, theirs["last_error"], "the running agent cannot open it")


def open_fault(what: str, src: SourceConfig, error: str, note: str = "") -> Check:
    """A port that did not open, told from the error's words: what it is, and the fix."""
    words, fix = next((words, fix) for found, words, fix in OPEN_FAULTS if found in error)
    # Else the error's own words, which name the port as a rule.
    detail = f"{src.port}: {words or error}" if words or src.port not in error else error
    return Check(False, what, f"{detail}; {note}" if note else detail,
                 fix.format(port=src.port, key=f"sources.{src.name}.port"))


# --- a source's port ----------------------------------------------------------------------


def serial_open(what: str, src: SourceConfig) -> Check:
    """Open the port with pyserial as the agent does (non-blocking) and close it: nothing
    read, nothing written (an SLCAN adapter is not even greeted)."""
    from agent.errors import SourceUnavailableError
    from agent.sources.uart import UartSource  # imports pyserial

    try:
        UartSource(src).probe()
    except SourceUnavailableError as e:
        return open_fault(what, src, str(e))
    return Check(True, what, f"{src.port} opens at {src.baudrate} Bd")


def socketcan(what: str, src: SourceConfig) -> Check:
    """The interface exists (/sys/class/net/NAME), is a CAN one, and is up: read from
    sysfs, no socket bound, so a running agent's reads go on undisturbed."""
    sys_dir = f"/sys/class/net/{src.port}"
    key = f"sources.{src.name}.port"
    try:
        with open(f"{sys_dir}/type") as f:
            kind = int(f.read())
        with open(f"{sys_dir}/flags") as f:
            flags = int(f.read(), 16)
    except FileNotFoundError:
        return Check(False, what, f"no interface {src.port}",
                     f"plug the CAN adapter in (dmesg; modprobe can for the driver), or set {key} (ip -br link)")
    except (OSError, ValueError) as e:
        return Check(False, what, f"cannot read {sys_dir}: {e}", "check the interface (ip -details link)")
    if kind != ARPHRD_CAN:
        return Check(False, what, f"{src.port} is not a CAN interface (type {kind})",
                     f"set {key} to a CAN interface (ip -br link)")
    if not flags & IFF_UP:
        return Check(False, what, f"{src.port} is down", f"ip link set {src.port} up type can bitrate <the bus's>")
    return Check(True, what, f"{src.port} is up (CAN)")


def candump_file(what: str, src: SourceConfig) -> Check:
    """A candump log replayed as a source: it reads, and its lines parse."""
    from agent.protocols.candump import read_candump

    key = f"sources.{src.name}.port"
    try:
        with open(src.port, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return Check(False, what, f"{src.port}: {e.strerror or e}", f"copy the log there, or set {key} to it")
    frames = damaged = 0
    for _n, got in read_candump(lines):
        if isinstance(got, DecodeError):
            damaged += 1
        else:
            frames += 1
    return Check(frames > 0, what, f"{src.port}: {view.number(frames)} frames, {view.number(damaged)} damaged lines",
                 f"not a candump -L log? set {key} to one")


def device_check(what: str, src: SourceConfig) -> Check:
    """A source that is not a serial port: a log file, a network interface; a python-can
    bus is opened only by the agent (its driver may be exclusive), so it is skipped."""
    if src.kind == "candump":
        return candump_file(what, src)
    if src.kind == "socketcan":
        return socketcan(what, src)
    return Check(None, what, f"python-can interface {src.interface} is opened only by the agent")


# --- storage -------------------------------------------------------------------------------


def writable(what: str, path: str, key: str) -> Check:
    """A test file made, synced and removed beside ``path`` (the outbox, the control
    socket), as the agent's storage probe does; a directory not there yet must be one the
    agent can make. ``key``: the setting that moves ``path``, for the fix."""
    from agent.store.outbox import probe_write

    directory = os.path.dirname(os.path.abspath(path))
    parent = existing(directory)
    if parent != directory:
        if os.access(parent, os.W_OK):
            return Check(True, what, f"{directory} is not there yet; the agent makes it ({parent} is writable)")
        return Check(False, what, f"{directory} does not exist, and {parent} cannot be written",
                     f"mkdir -p {directory} and let the agent's user write it, or set {key}")
    cause = probe_write(path)
    if cause:
        return Check(False, what, f"a test file cannot be written: {cause}", storage_fix(cause, directory, key))
    disk = os.statvfs(directory)
    return Check(True, what, f"{directory} is writable, {disk.f_bavail * disk.f_frsize / 1e9:.1f} GB free")


def existing(directory: str) -> str:
    """``directory``, or its nearest ancestor that is there: the volume it will be on."""
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    return directory


def storage_fix(cause: str, directory: str, key: str) -> str:
    """The fix to try for a storage failure's cause (agent.store.outbox's words)."""
    if cause.startswith("read-only"):
        return (f"the filesystem is read-only (a worn SD card turns so): remount it read-write (mount -o "
                f"remount,rw), replace the card, or set {key} elsewhere")
    if cause.startswith("permission"):
        return f"let the agent's user write {directory} (chown), or set {key} elsewhere"
    if cause.startswith("no space"):
        return f"free space on that volume, or set {key} elsewhere"
    return "check the storage (dmesg: disk errors?)"
