"""One agent per outbox: an exclusive ``flock`` taken before any port, socket or file of
the agent's is touched, so a second ``ebike-agent run`` (by hand, beside systemd's)
changes nothing.

The lock is on ``<outbox>.lock``, a file kept for good (its inode is what is locked, so
it is never removed). Where that file cannot be made (a read-only filesystem, a
directory the agent may not write) the outbox's directory itself is locked, exclusively;
an agent holding the lock file also holds the directory shared, so the two kinds exclude
each other and agents of other outboxes in the same directory do not. The kernel
releases a ``flock`` when its holder dies, so a crashed agent leaves nothing stale.
"""

from __future__ import annotations

import errno
import fcntl
import os

from agent.errors import AlreadyRunning, StoreError

# errno values that mean "this file cannot be made here", not "something is broken".
_CANNOT_CREATE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC)


def _holder(fd: int) -> int:
    """The pid holding a flock on ``fd``'s inode, from /proc/locks (0 if not found)."""
    st = os.fstat(fd)
    try:
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF"; waiters are marked "->".
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        dev, _, ino = fields[5].rpartition(":")
        major, _, minor = dev.partition(":")
        if int(ino) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
            return int(fields[4])
    return 0


class OutboxLock:
    """Held for the agent's life; ``close`` (or the process's end) lets it go."""

    def __init__(self, outbox: str) -> None:
        self.outbox = outbox
        self.fds: list[int] = []
        directory = os.path.dirname(os.path.abspath(outbox))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            if not os.path.isdir(directory):
                raise StoreError(f"cannot make the outbox's directory {directory}: {os.strerror(e.errno or 0)}") from e
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise StoreError(f"cannot open the outbox's directory {directory}: {os.strerror(e.errno or 0)}") from e
        self.fds.append(dir_fd)
        file_fd = self._lock_file(outbox + ".lock")
        try:
            if file_fd is None:
                self._take(dir_fd, fcntl.LOCK_EX)
            else:
                self.fds.append(file_fd)
                self._take(dir_fd, fcntl.LOCK_SH)
                self._take(file_fd, fcntl.LOCK_EX)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _lock_file(path: str) -> int | None:
        """The lock file, made if need be; None where it cannot be (the directory is then
        the lock). Opened read-only: a flock needs no more, and a file open for writing
        would keep an administrator from remounting the filesystem read-only."""
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in _CANNOT_CREATE:
                raise StoreError(f"cannot open the lock file {path}: {os.strerror(e.errno or 0)}") from e
        return None

    def _take(self, fd: int, how: int) -> None:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError as e:
            pid = _holder(fd)
            who = f"pid {pid}" if pid else "pid unknown"
            raise AlreadyRunning(f"another ebike-agent ({who}) is running with {self.outbox}") from e

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
