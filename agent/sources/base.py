"""What every source shares (python-can's interface idea): reconnect with backoff,
non-blocking reads for the runtime's selector, and counters for status.

A subclass opens its device in ``_open`` and reads what is there in ``_read``; a
vanished device (unplugged USB adapter) raises SourceUnavailableError from either,
and the source comes back by itself on a later ``poll_open``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from agent.config import SourceConfig
from agent.errors import SourceUnavailableError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class Source:
    """A device the agent reads bytes from; owns its reconnect schedule and counters."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.is_open = False
        self.backoff = BACKOFF_FIRST
        self.next_attempt = 0.0
        self.opens = 0
        self.open_failures = 0
        self.disconnects = 0
        self.bytes_read = 0
        self.last_error = ""

    def fileno(self) -> int:
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError

    def _read(self) -> bytes:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def poll_open(self, now: float | None = None) -> bool:
        """Open the device if it is closed and its backoff has run out; True if it opened."""
        now = time.monotonic() if now is None else now
        if self.is_open or now < self.next_attempt:
            return False
        try:
            self._open()
        except SourceUnavailableError as e:
            self.open_failures += 1
            self._schedule_retry(now, str(e))
            return False
        self.is_open = True
        self.opens += 1
        self.backoff = BACKOFF_FIRST
        log.info("source %s: opened %s", self.name, self.cfg.port)
        return True

    def read(self) -> bytes:
        """Bytes available now (b"" if none); a lost device closes the source for a retry."""
        try:
            data = self._read()
        except SourceUnavailableError as e:
            self.disconnects += 1
            self.close()
            self._schedule_retry(time.monotonic(), str(e))
            return b""
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self._close()

    def _schedule_retry(self, now: float, reason: str) -> None:
        self.last_error = reason
        self.next_attempt = now + self.backoff
        log.warning("source %s: %s; retrying in %.1f s", self.name, reason, self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.cfg.kind, "port": self.cfg.port, "open": self.is_open,
            "opens": self.opens, "open_failures": self.open_failures, "disconnects": self.disconnects,
            "bytes": self.bytes_read, "last_error": self.last_error,
        }
