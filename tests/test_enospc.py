"""A full disk is never a crash: the outbox on a real, small filesystem (a tmpfs mounted
with size=, so ENOSPC comes from the kernel), filled to the brim by another file. It
keeps taking records by dropping the oldest, lowest-priority ones (history first, alarms
last), tells the cloud with a gap record, keeps acknowledging, and gets its ballast
back when the disk has room again. Its quota never exceeds 90 % of the free space.
The agent process itself rides on through a full disk and says so in its status.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.outbox import FREE_SHARE, LANE_ALARM, LANE_HISTORY, LANE_LIVE, Outbox
from devtools.broker import Mosquitto
from tests.helpers import spawn, stop, wait_for
from tests.test_e2e import agent_config, start_consumer_and_sim
from tests.test_e2e_sources import status_now

SIZE = 4 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs; skipped, saying why, where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True, timeout=30)


def fill(path: Path) -> int:
    """Write to ``path`` until the disk says ENOSPC; bytes written."""
    written = 0
    chunk = b"\xaa" * 65536
    with open(path, "wb", buffering=0) as f:
        for _ in range(4 * SIZE // len(chunk)):
            try:
                written += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk = chunk[:len(chunk) // 2]
                if len(chunk) < 512:
                    return written
    raise AssertionError("the disk never filled")


def free_bytes(path: Path) -> int:
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize


def test_quota_is_clamped_to_the_free_space(small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    free = free_bytes(small_disk)
    with caplog.at_level("WARNING"):
        box = Outbox(str(small_disk / "outbox.sqlite"), 256 << 20)
    try:
        assert box.quota_bytes <= FREE_SHARE * free
        assert "clamped" in caplog.text and str(small_disk) in caplog.text
        assert box.stats()["ballast_bytes"] > 0
    finally:
        box.close()


@pytest.mark.parametrize("watched", [True, False], ids=["seen-coming", "enospc"])
def test_a_full_disk_drops_by_policy_and_never_crashes(small_disk: Path, watched: bool, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Seen coming (the free space checked before each append), or, with that check off,
    met as ENOSPC inside SQLite (another file can fill the disk in the middle of an append):
    either way the append is stored, history makes room, nothing is refused."""
    announced: dict[str, list[int]] = {}

    def gap_body(runs: list[tuple[int, int]], why: str) -> bytes:
        announced.setdefault(why, []).extend(s for a, b in runs for s in range(a, b + 1))
        return f"gap {why}".encode()

    box = Outbox(str(small_disk / "outbox.sqlite"), 256 << 20, gap_body=gap_body)
    try:
        alarms = box.append([(LANE_ALARM, float(i), b"alarm %d" % i) for i in range(10)])
        history = box.append([(LANE_HISTORY, float(i), b"h" * 1000) for i in range(1000)])
        fill(small_disk / "filler")
        assert free_bytes(small_disk) < 4096, "not filled to the brim"
        if not watched:
            monkeypatch.setattr(Outbox, "_watch_the_disk", lambda self: None)
        live: list[int] = []
        for i in range(300):  # 4.2 MB of records, more than the whole disk
            seqs = box.append([(LANE_LIVE, float(i), b"L" * 1000)] * 2 + [(LANE_HISTORY, float(i), b"H" * 1000)] * 12)
            assert seqs, f"append {i} stored nothing"
            live += seqs[:2]
            history += seqs[2:]
        stats = box.stats()
        assert stats["disk_full"] == 1 and stats["disk_full_now"]
        assert stats["refused"] == 0
        assert ("released the" in caplog.text) is not watched, "the ballast is for ENOSPC only"
        rows = dict(box.db.execute("SELECT seq, lane FROM records").fetchall())
        assert all(seq in rows for seq in alarms), "an alarm was dropped while history was left"
        assert all(seq in rows for seq in live), "live rows were dropped while history was left"
        kept = [s for s in history if s in rows]
        assert kept and len(kept) < len(history)
        assert kept == history[-len(kept):], "not the oldest history went first"
        dropped = set(announced.get("disk-full", [])) | set(announced.get("quota", []))
        assert announced.get("disk-full"), "drops for the full disk were not announced"
        assert dropped == set(history) - set(kept), "dropped and announced differ"
        assert set(rows) | dropped == set(range(1, stats["last_seq"] + 1)), "a record is neither kept nor announced"
        assert stats["quota_bytes"] < stats["configured_quota_bytes"]

        rows_out = box.lease(50, 1 << 20)
        box.ack([seq for seq, _ in rows_out])
        assert box.stats()["records"] <= len(rows) - len(rows_out) + 1, "acks do not delete on a full disk"

        monkeypatch.undo()
        (small_disk / "filler").unlink()
        box.append([(LANE_LIVE, 1e9, b"room again")])
        stats = box.stats()
        assert not stats["disk_full_now"] and stats["ballast_bytes"] > 0, "the ballast did not come back"
    finally:
        box.close()
    reopened = Outbox(str(small_disk / "outbox.sqlite"), 256 << 20)
    try:
        assert not reopened.moved_aside
        assert reopened.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        reopened.close()


@pytest.mark.e2e
def test_the_agent_rides_on_through_a_full_disk_and_says_so(small_disk: Path, tmp_path: Path,
                                                             mosquitto: Mosquitto) -> None:
    """The agent process with its outbox on the small disk: filled mid-ride, the agent keeps
    running, its status says the disk is full, and once there is room again it commits and
    delivers again, every number it ever committed either delivered or announced."""
    config = agent_config(tmp_path, mosquitto, sim_speed=10)
    config.write_text(config.read_text().replace('path = "outbox.sqlite"', f'path = "{small_disk / "outbox.sqlite"}"'))
    consumer, sim = start_consumer_and_sim(tmp_path, mosquitto, "disk-full-ingest",
                                           ["--speed", "10", "--duration", "600", "--seed", "4"])
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    try:
        sock = tmp_path / "control.sock"
        wait_for("records committed", lambda: (status_now(sock) or {}).get("records_committed", 0) >= 5, 30)
        filler = small_disk / "filler"
        fill(filler)
        st = wait_for("the status to say the disk is full",
                      lambda: (s := status_now(sock)) and s["outbox"]["disk_full"] >= 1 and s, 30)
        assert agent.poll() is None and st["outbox"]["disk_full_now"] is True
        filler.unlink()
        before = st["records_committed"]
        wait_for("commits again once there is room",
                 lambda: (status_now(sock) or {}).get("records_committed", 0) > before + 5, 30)
        assert stop(agent) == 0, (tmp_path / "agent.log").read_text()
        agent = None
    finally:
        for proc in (agent, sim, consumer):
            if proc is not None:
                stop(proc)
    assert "Traceback" not in (tmp_path / "agent.log").read_text()
