"""A throwaway PostgreSQL cluster for tests and the fleet bench: ``initdb`` in a temporary
directory, the server on 127.0.0.1 and a free port, its Unix socket in that directory,
started and stopped by pid. Nothing here touches a system cluster.

PostgreSQL refuses to run as root: as root, the cluster belongs to the Debian package's
``postgres`` user (else ``nobody``), which owns the directory and runs initdb and the
server; as anyone else, to that user. Debian keeps the server binaries out of PATH, in
/usr/lib/postgresql/<major>/bin: the newest major there is used.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from devtools.broker import free_port

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SUPERUSER = "ebike"


class PostgresMissing(RuntimeError):
    """PostgreSQL's server is not installed; the message says how to get it."""


def bindir() -> str:
    """The directory of ``initdb`` and ``postgres``: the newest Debian major, else PATH."""
    def major(path: str) -> float:
        try:
            return float(path.rstrip("/").split("/")[-2])
        except ValueError:
            return 0.0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/"), key=major)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise PostgresMissing("PostgreSQL is not installed: run 'sudo apt-get install postgresql' "
                              "(make test does it itself when run as root)")
    return os.path.dirname(initdb)


def _owner() -> pwd.struct_passwd:
    """Who runs the cluster: ourselves, or as root an unprivileged user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresMissing("no unprivileged user to run PostgreSQL as (neither 'postgres' nor 'nobody')")


class Postgres:
    """One cluster in its own directory; ``start`` makes it on first use, ``kill`` and
    ``start`` again are a crash and a restart with the data kept."""

    def __init__(self, workdir: str | None = None) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="ebike-pg-")
        self.data = os.path.join(self.workdir, "data")
        self.log_path = os.path.join(self.workdir, "postgres.log")
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = _owner()

    def _as_owner(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        os.chmod(self.workdir, 0o700)
        os.chown(self.workdir, self.user.pw_uid, self.user.pw_gid)
        proc = subprocess.run([os.path.join(bindir(), "initdb"), "-D", self.data, "-U", SUPERUSER, "-A", "trust",
                               "-E", "UTF8", "--locale=C", "--no-sync"], capture_output=True, text=True, timeout=120,
                              cwd=self.workdir, **self._as_owner())  # type: ignore[call-overload]
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}): {proc.stderr[-1500:]}")

    def start(self) -> Postgres:
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            self._initdb()
        for _attempt in range(3):
            self.port = self.port or free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(  # type: ignore[call-overload]
                    [os.path.join(bindir(), "postgres"), "-D", self.data, "-p", str(self.port),
                     "-c", f"listen_addresses={self.host}", "-c", f"unix_socket_directories={self.workdir}"],
                    stdout=log, stderr=log, start_new_session=True, cwd=self.workdir, **self._as_owner())
            if self._wait_ready():
                return self
            self.kill()
            self.port = 0
        raise RuntimeError(f"PostgreSQL did not start; see {self.log_path}")

    def _wait_ready(self) -> bool:
        """Ready = accepting connections (pg_isready), not merely listening: a restarted
        cluster replays its WAL first."""
        deadline = time.monotonic() + START_TIMEOUT
        isready = os.path.join(bindir(), "pg_isready")
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            ok = subprocess.run([isready, "-q", "-h", self.host, "-p", str(self.port), "-U", SUPERUSER],
                                timeout=10).returncode == 0
            if ok:
                return True
            time.sleep(0.1)
        return False

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/postgres"

    def psql(self, sql: str, dsn: str | None = None) -> str:
        """``sql`` through psql (unaligned, tuples only), on ``dsn`` (default the cluster's
        ``postgres`` database): for tests and checks."""
        proc = subprocess.run([os.path.join(bindir(), "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-d", dsn or self.dsn, "-c", sql], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def stop(self) -> None:
        """A fast shutdown (SIGINT: sessions ended, a checkpoint written)."""
        self._end(signal.SIGINT)

    def kill(self) -> None:
        """A crash (SIGKILL to the postmaster and its backends): the next start recovers."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        if sig == signal.SIGKILL:
            # The backends are the postmaster's children in its process group: none may
            # hold the shared memory a restart needs.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def remove(self) -> None:
        """Stop and delete the cluster."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
