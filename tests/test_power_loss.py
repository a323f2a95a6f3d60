"""Power loss, not just a crash: a killed process keeps what the kernel cached, a power
cut does not. The outbox lives on devtools/lossyfs.py, a FUSE filesystem that holds
every write not yet fsynced in memory and loses it when it is cut; a writer appends with
the runtime's commit pattern (telemetry in group commits, alarms one by one at once,
acknowledged rows deleted) and prints what each call returned; the power goes at a
random moment, the filesystem is mounted again from what was durable, and then:

- the database opens and passes ``PRAGMA integrity_check``;
- every record whose append returned (every alarm, every telemetry group) is there,
  with its body, and every acknowledged deletion stayed deleted;
- what telemetry is lost is at most the one group being committed at the cut (plus
  what was still in the writer's memory, under one group-commit interval): a record
  not reported is either absent or part of that last group, whole;
- sequence numbers are never reused, across every cut.

Half the cuts are torn (a random part of the unsynced blocks reaches the disk, as a
disk with a volatile cache may leave it). ``make test`` cuts 5 times; ``make soak``
sets EBIKE_POWER_LOSSES=50. Run directly, this module is that writer.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.store.outbox import LANE_ALARM, LANE_LIVE, Outbox
from tests.helpers import log_has, spawn, wait_for

LOSSES = int(os.environ.get("EBIKE_POWER_LOSSES", "5"))
COMMIT_INTERVAL = 0.05
GROUP = 8
WRITER_LIMIT = 60.0


def fuse_unavailable() -> str:
    """Why FUSE cannot be used on this machine, or "" when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: the kernel's fuse module is not loaded or not passed into this container"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3; devtools/ensure-system.sh build installs it)"
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (pip install -e '.[dev]'; it builds against libfuse3-dev)"
    return ""


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[Any]:
    """A lossyfs mount in tmp_path/mnt over tmp_path/disk; skipped, saying why, where
    FUSE cannot be used."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        from devtools.lossyfs import LossyMount
    except ImportError as e:
        pytest.skip(f"pyfuse3 does not import: {e}")
    mount = LossyMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lossyfs.log")
    try:
        mount.start()
    except OSError as e:
        pytest.skip(f"FUSE mounts are not allowed here: {e}")
    yield mount
    mount.stop()


def test_lossyfs_keeps_what_was_fsynced_and_only_that(lossy: Any) -> None:
    """File bytes survive the cut only if the file was fsynced after them; a name only if
    the directory was fsynced after it was made, removed or renamed."""
    mnt = lossy.mountpoint
    with open(mnt / "synced", "wb", buffering=0) as f:
        f.write(b"durable")
        os.fsync(f.fileno())
        f.write(b" and not")
    with open(mnt / "datasynced", "wb", buffering=0) as f:
        f.write(b"fdatasync too")
        os.fdatasync(f.fileno())
    (mnt / "doomed").write_bytes(b"its name was made durable, its removal was not")
    dirfd = os.open(mnt, os.O_RDONLY)
    try:
        os.fsync(dirfd)
        (mnt / "doomed").unlink()
        os.replace(mnt / "datasynced", mnt / "renamed")
        with open(mnt / "nameless", "wb", buffering=0) as f:
            f.write(b"bytes fsynced, name never")
            os.fsync(f.fileno())
    finally:
        os.close(dirfd)
    assert (mnt / "synced").read_bytes() == b"durable and not"
    lossy.cut()
    lossy.start()
    assert sorted(os.listdir(mnt)) == ["datasynced", "doomed", "synced"]
    assert (mnt / "synced").read_bytes() == b"durable"
    assert (mnt / "datasynced").read_bytes() == b"fdatasync too"
    assert (mnt / "doomed").read_bytes() == b"", "bytes never fsynced survived"

    big = os.urandom(64 * 1024)
    with open(mnt / "synced", "r+b", buffering=0) as f:
        f.write(big)
        os.fsync(f.fileno())
        f.seek(0)
        f.write(b"\0" * len(big))
    lossy.cut(torn=True)
    lossy.start()
    torn = (mnt / "synced").read_bytes()
    assert len(torn) == len(big)
    blocks = [torn[i:i + 4096] for i in range(0, len(big), 4096)]
    assert all(b in (big[i * 4096:(i + 1) * 4096], bytes(4096)) for i, b in enumerate(blocks)), \
        "a torn cut left bytes that were never written"


def test_sqlite_locks_work_through_lossyfs(lossy: Any) -> None:
    """SQLite's POSIX locks hold between processes on the mount (the kernel keeps them),
    so a second process cannot write while the outbox's transaction is open."""
    path = str(lossy.mountpoint / "locks.sqlite")
    box = Outbox(path, 1 << 30)
    try:
        box.db.execute("BEGIN IMMEDIATE")
        other = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys\n"
             "db = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n"
             "try:\n    db.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError as e:\n    print(e)\n",
             path], capture_output=True, text=True, timeout=60)
        box.db.execute("COMMIT")
    finally:
        box.close()
    assert other.stdout.strip() == "database is locked", other


def telemetry(run: int, group: int, item: int) -> bytes:
    return f"run {run} group {group} item {item} ".encode() * 20


def run_writer(path: str, run: int, seed: int) -> None:
    """The runtime's commit pattern on an Outbox, saying on stdout what each call returned:
    ``seal G`` before a group commit, ``live G FIRST LAST NEWEST_T`` after it, ``alarm SEQ``,
    ``acked SEQ...``. Checkpoints every 50 pages, so cuts also land in checkpoints and
    WAL restarts."""
    rng = random.Random(seed)
    box = Outbox(path, 1 << 30)
    box.db.execute("PRAGMA wal_autocheckpoint=50")
    pending: list[tuple[int, float, bytes]] = []
    group = 0
    deadline = time.monotonic() + WRITER_LIMIT
    next_commit = time.monotonic() + COMMIT_INTERVAL
    print("open", flush=True)
    while time.monotonic() < deadline:
        pending.append((LANE_LIVE, time.time(), telemetry(run, group, len(pending))))
        if rng.random() < 0.05:
            (seq,) = box.append([(LANE_ALARM, time.time(), f"run {run} alarm".encode())])
            print(f"alarm {seq}", flush=True)
        if time.monotonic() >= next_commit or len(pending) >= GROUP:
            print(f"seal {group}", flush=True)
            seqs = box.append(pending)
            print(f"live {group} {seqs[0]} {seqs[-1]} {pending[-1][1]}", flush=True)
            pending = []
            group += 1
            next_commit = time.monotonic() + COMMIT_INTERVAL
        if rng.random() < 0.02:
            rows = box.lease(rng.randint(1, 20), 1 << 20)
            box.ack([seq for seq, _ in rows])
            print("acked " + " ".join(str(seq) for seq, _ in rows), flush=True)
        time.sleep(COMMIT_INTERVAL / GROUP)


class Reported:
    """What the writers said they stored, over every run: seq -> body (None once acked)."""

    def __init__(self) -> None:
        self.bodies: dict[int, bytes | None] = {}

    def read_run(self, log: Path, run: int) -> tuple[int, float]:
        """Fold one run's lines in; returns the last group sealed (-1 if none) and the
        time of the newest telemetry reported committed (0 if none)."""
        sealed, newest = -1, 0.0
        for line in log.read_text().splitlines():
            word, *args = line.split()
            if word == "seal":
                sealed = int(args[0])
            elif word == "live":
                group, first, last = (int(a) for a in args[:3])
                self._add({seq: telemetry(run, group, seq - first) for seq in range(first, last + 1)})
                newest = float(args[3])
            elif word == "alarm":
                self._add({int(args[0]): f"run {run} alarm".encode()})
            elif word == "acked":
                self.bodies.update((int(seq), None) for seq in args)
        return sealed, newest

    def _add(self, records: dict[int, bytes]) -> None:
        reused = records.keys() & self.bodies.keys()
        assert not reused, f"sequence numbers {sorted(reused)} were used twice"
        self.bodies.update(records)


def check_after_the_cut(db_path: Path, reported: Reported, run: int, sealed: int) -> float:
    """The checks of the module docstring on the file as the cut left it; returns the time
    of the newest telemetry on it."""
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows: dict[int, bytes] = dict(db.execute("SELECT seq, body FROM records").fetchall())
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        (newest,) = db.execute("SELECT coalesce(max(t), 0) FROM records WHERE lane=?", (LANE_LIVE,)).fetchone()
    finally:
        db.close()
    last = max(reported.bodies, default=0)
    assert next_seq > last, "the sequence counter went back: numbers will be reused"
    for seq, body in reported.bodies.items():
        if body is None:
            assert seq not in rows, f"acknowledged record {seq} came back"
        else:
            assert rows.get(seq) == body, f"record {seq} was reported committed and is lost or changed"
    unreported = {seq: body for seq, body in rows.items() if seq not in reported.bodies}
    assert all(seq > last for seq in unreported), "a record on disk has a number below the last reported"
    groups = {int(m.group(1)) for body in unreported.values()
              if (m := re.match(rf"run {run} group (\d+) ".encode(), body))}
    assert groups <= {sealed}, f"groups {groups} on disk unreported: only the one sealed at the cut may be"
    if groups:
        first = min(unreported)
        assert unreported == {seq: telemetry(run, sealed, seq - first) for seq in unreported}, \
            "the group being committed at the cut is on disk only in part"
    # That group made it: from now on it is stored like the reported ones.
    reported.bodies.update(unreported)
    return float(newest)


@pytest.mark.e2e
def test_power_loss_at_random_moments(lossy: Any, tmp_path: Path) -> None:
    rng = random.Random(20261122)
    db_path = lossy.mountpoint / "outbox.sqlite"
    reported = Reported()
    lost: list[float] = []
    for run in range(LOSSES):
        log = tmp_path / f"writer{run}.log"
        writer = spawn(["tests.test_power_loss", "--writer", str(db_path), "--run", str(run),
                        "--seed", str(rng.randrange(1 << 30))], log)
        try:
            wait_for("the writer to open the outbox",
                     lambda log=log, writer=writer: log_has(log, "open") or writer.poll() is not None, 30)
            opened_at = time.time()
            time.sleep(rng.uniform(0.0, 1.0))
            assert writer.poll() is None, log.read_text()
            writer.send_signal(signal.SIGSTOP)  # the instant the power goes
            cut_at = time.time()
            lossy.cut(torn=run % 2 == 1)
        finally:
            writer.kill()
            writer.wait(10)
        lossy.start(seed=run)
        sealed, newest_reported = reported.read_run(log, run)
        newest = check_after_the_cut(db_path, reported, run, sealed)
        lost.append(cut_at - max(newest, newest_reported, opened_at))
    box = Outbox(str(db_path), 1 << 30)
    try:
        assert not box.moved_aside, "the outbox was found corrupt"
        assert box.stats()["last_seq"] >= max(reported.bodies)
    finally:
        box.close()
    assert len(reported.bodies) > 10 * LOSSES, "too few records to say anything"
    print(f"{LOSSES} power cuts, {len(reported.bodies)} records reported; telemetry lost per cut: "
          f"at most {max(lost):.3f} s (group commits every {COMMIT_INTERVAL} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the power-loss test's writer")
    parser.add_argument("--writer", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    ns = parser.parse_args()
    run_writer(ns.writer, ns.run, ns.seed)
