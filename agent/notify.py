"""The service manager's side channel: sd_notify(3) over ``$NOTIFY_SOCKET``, written
out (one datagram per message, as systemd's own sd_notify does) rather than a
libsystemd binding, so nothing is needed on the unit beyond the standard library.

- ``READY=1`` once the outbox is open and every source has been tried: systemd's
  ``Type=notify`` start is done (a source that is not there yet is retried, and
  ``STATUS=`` says so; it does not hold the start up);
- ``WATCHDOG=1`` from the main loop, at most every half of ``$WATCHDOG_USEC``: a loop
  that hangs stops the pings and systemd kills and restarts the agent; a slow one
  (a long commit on a worn card) still pings between its turns;
- ``STATUS=...`` a line ``systemctl status`` shows, when it changes and at most every
  STATUS_EVERY_S;
- ``STOPPING=1`` when the agent begins to stop.

Without ``$NOTIFY_SOCKET`` (run by hand, in tests, under another supervisor) every
call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0


class Notifier:
    """One agent's messages to its service manager."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is given with a leading "@" (systemd's convention).
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock: socket.socket | None = None
        if self.address:
            # Non-blocking: a manager that stops reading (its queue holds 10 datagrams by
            # default) must cost a lost ping, never a hung loop.
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping twice per period, as sd_watchdog_enabled(3) advises.
        self.ping_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self.last_ping = 0.0
        self.status = ""
        self.status_at = 0.0
        self.ready = False
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, message: str) -> None:
        """One datagram; a manager that went away is logged once, never fatal."""
        if self.sock is None:
            return
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                log.warning("service manager: cannot notify %s: %s", self.address.replace("\0", "@"), e)

    def ready_now(self, status: Callable[[], str]) -> None:
        """The start is done (said once; later calls cost a test)."""
        if not self.ready and self.sock is not None:
            self.ready = True
            self.status, self.status_at = status(), time.monotonic()
            self.send(f"READY=1\nSTATUS={self.status}")

    def alive(self, status: Callable[[], str]) -> None:
        """Once a turn of the main loop: the watchdog ping when due; every
        STATUS_EVERY_S, the status line (made only then) if it changed."""
        if self.sock is None:
            return
        mono = time.monotonic()
        if self.ping_every and mono - self.last_ping >= self.ping_every:
            self.last_ping = mono
            self.send("WATCHDOG=1")
        if mono - self.status_at >= STATUS_EVERY_S:
            self.status_at = mono
            line = status()
            if line != self.status:
                self.status = line
                self.send(f"STATUS={line}")

    def stopping(self, status: str) -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
