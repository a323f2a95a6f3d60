"""Storage that fails is told apart from a corrupt file, and the agent's records go on
from memory meanwhile: a read-only bind mount (what a worn SD card becomes), a
directory the agent may not write, a missing directory, against a file SQLite itself
calls malformed. Real files and real mounts: the tests run as root (as CI does)."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from agent.control.server import ControlServer
from agent.errors import AgentError, AlreadyRunning, StorageUnwritable
from agent.store import memory
from agent.store.lock import OutboxLock
from agent.store.memory import MemoryQueue, Storage
from agent.store.outbox import LANE_ALARM, LANE_EVENT, LANE_HISTORY, LANE_LIVE, Outbox
from tests.test_power_loss import lossy  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
BIG = 1 << 40
NOBODY = 65534


def gap(runs: list[tuple[int, int]], why: str) -> bytes:
    return cbor2.dumps({"why": why, "runs": runs})


class ReadOnlyMount:
    """``directory`` bind-mounted on itself, switchable between read-only and read-write
    (``mount -o remount,bind,ro``: a filesystem that refuses writes, as a worn card does)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)

    def read_only(self, on: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,bind,{'ro' if on else 'rw'}", str(self.directory)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.directory)], check=True)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[ReadOnlyMount]:
    if os.geteuid() != 0:
        pytest.fail("these tests mount filesystems: run them as root (CI does)")
    m = ReadOnlyMount(tmp_path / "store")
    try:
        yield m
    finally:
        m.close()


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_read_only_filesystem_is_named_and_nothing_is_moved_aside(mount: ReadOnlyMount) -> None:
    path = mount.directory / "outbox.sqlite"
    box = Outbox(str(path), BIG)
    assert box.append([(LANE_LIVE, 1.0, b"a")]) == [1]
    box.close()
    before = siblings(mount.directory)
    mount.read_only(True)
    with pytest.raises(StorageUnwritable) as caught:
        Outbox(str(path), BIG)
    assert caught.value.cause.startswith("read-only filesystem")
    assert siblings(mount.directory) == before, "a healthy file on a read-only filesystem was touched"


def test_missing_directory_that_cannot_be_made_is_named(mount: ReadOnlyMount) -> None:
    mount.read_only(True)
    with pytest.raises(StorageUnwritable) as caught:
        Outbox(str(mount.directory / "sub" / "outbox.sqlite"), BIG)
    assert "does not exist" in caught.value.cause


def test_a_malformed_file_is_still_moved_aside(tmp_path: Path) -> None:
    """SQLite's own verdict (not a database) is the only reason to move a file aside."""
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not an SQLite database, just bytes" * 100)
    box = Outbox(str(path), BIG)
    assert box.moved_aside and Path(box.moved_aside).exists()
    assert box.append([(LANE_LIVE, 1.0, b"a")])
    box.close()


def test_permission_denied_is_named_for_a_user_who_may_not_write(shared_dir: Path) -> None:
    """As a non-root user (root writes anywhere): a directory it may not write."""
    store = shared_dir / "store"
    store.mkdir()
    box = Outbox(str(store / "outbox.sqlite"), BIG)
    box.close()
    before = siblings(store)
    script = textwrap.dedent(f"""
        from agent.errors import StorageUnwritable
        from agent.store.outbox import Outbox
        try:
            Outbox({str(store / "outbox.sqlite")!r}, 1 << 40)
        except StorageUnwritable as e:
            print(e.cause)
    """)
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.startswith("permission denied"), out.stdout + out.stderr
    assert siblings(store) == before


def test_memory_queue_keeps_alarms_and_live_and_bounds_itself() -> None:
    q = MemoryQueue(100, gap, limit=1000)
    seqs = q.append([(LANE_LIVE, 1.0, b"l" * 100), (LANE_HISTORY, 1.0, b"h"), (LANE_EVENT, 1.0, b"e"),
                     (LANE_ALARM, 1.0, b"a" * 100)])
    assert seqs == [100, 101] and q.not_kept == 2
    q.append([(LANE_LIVE, float(i), b"x" * 100) for i in range(2, 12)])
    assert q.size <= 1000 and q.dropped > 0
    kinds = {row[0] for row in q.rows.values()}
    assert LANE_ALARM in kinds, "alarms go last"
    announced = [cbor2.loads(row[2]) for row in q.rows.values() if row[2].startswith(b"\xa2")]
    assert announced and announced[0]["why"] == "memory-full"
    dropped = {s for first, last in announced[0]["runs"] for s in range(first, last + 1)}
    assert 100 in dropped and 101 not in dropped and not dropped & set(q.rows)


def test_memory_queue_lease_order_and_ack() -> None:
    q = MemoryQueue(1, None)
    q.append([(LANE_LIVE, 1.0, b"l1"), (LANE_ALARM, 2.0, b"a1"), (LANE_LIVE, 3.0, b"l2")])
    assert [s for s, _ in q.lease(10, BIG)] == [2, 1, 3]
    q.release_all()
    assert [s for s, _ in q.lease(10, BIG, newest_live_first=True)] == [2, 3, 1]
    assert q.lease(10, BIG) == []
    q.ack([1, 2])
    q.release_all()
    assert q.lease(10, BIG) == [(3, b"l2")]


def test_storage_runs_from_memory_and_back_with_nothing_lost(request: pytest.FixtureRequest,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem turns read-only under a running outbox (lossyfs refuses writes with
    EROFS, as a worn card's filesystem does): records go on from memory, numbered on from
    the file; once writable again, what is unacknowledged moves into the file under the
    same numbers and numbering goes on above them."""
    monkeypatch.setattr(memory, "RETRY_S", 0.0)
    fs = request.getfixturevalue("lossy")
    path = str(fs.mountpoint / "outbox.sqlite")
    store = Storage(path, BIG, gap)
    assert store.append([(LANE_LIVE, 1.0, b"d1"), (LANE_LIVE, 2.0, b"d2")]) == [1, 2]
    fs.read_only(True)
    assert store.append([(LANE_LIVE, 3.0, b"m3"), (LANE_HISTORY, 3.0, b"h"), (LANE_ALARM, 3.5, b"m4")]) == [3, 4]
    assert store.failed.startswith("read-only filesystem")
    stats = store.stats()
    assert stats["storage_failed"]["memory_only"] and stats["not_kept"] == 1
    assert not store.retry(), "the file cannot be back while read-only"
    sent = store.lease(1, BIG)
    assert [s for s, _ in sent] == [4]
    store.ack([4])
    assert store.append([(LANE_LIVE, 4.0, b"m5")]) == [5]
    assert store.lease(1, BIG) == [(3, b"m3")]
    fs.read_only(False)
    assert store.retry() and store.failed == ""
    assert store.stats()["storage_failed"] is None
    assert store.append([(LANE_LIVE, 5.0, b"d6")]) == [6]
    assert [s for s, _ in store.lease(100, BIG)] == [1, 2, 5, 6], "3 is in flight: not sent twice"
    store.ack([3])
    store.release_all()
    assert store.lease(100, BIG) == [(1, b"d1"), (2, b"d2"), (5, b"m5"), (6, b"d6")]
    store.close()


def test_storage_starts_from_memory_on_a_read_only_filesystem(mount: ReadOnlyMount) -> None:
    path = str(mount.directory / "outbox.sqlite")
    box = Outbox(path, BIG)
    box.append([(LANE_LIVE, 1.0, b"a")] * 7)
    box.close()
    mount.read_only(True)
    store = Storage(path, BIG, gap)
    assert store.failed.startswith("read-only filesystem")
    assert store.append([(LANE_LIVE, 2.0, b"m")]) == [8], "numbering goes on from the file it could read"
    assert store.load_state() == {} and not store.save_state({"trip_km": 1.0})
    store.close()


def test_memory_numbers_never_collide_when_the_file_cannot_be_read(mount: ReadOnlyMount) -> None:
    mount.read_only(True)
    store = Storage(str(mount.directory / "outbox.sqlite"), BIG, gap)
    (seq,) = store.append([(LANE_LIVE, 1.0, b"m")])
    assert seq >= (time.time_ns() // 1000) - 60_000_000
    store.close()


def test_outbox_lock_refuses_a_second_holder_and_names_the_pid(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.sqlite")
    first = OutboxLock(path)
    with pytest.raises(AlreadyRunning, match=rf"another ebike-agent \(pid {os.getpid()}\) is running with {path}"):
        OutboxLock(path)
    other = OutboxLock(str(tmp_path / "other.sqlite"))  # another outbox in the same directory
    first.close()
    OutboxLock(path).close()
    other.close()


def test_outbox_lock_on_a_read_only_filesystem_excludes_the_file_holder(mount: ReadOnlyMount) -> None:
    """Without a lock file (none can be made) the directory is the lock; an agent with
    the lock file holds the directory shared, so each excludes the other."""
    path = str(mount.directory / "outbox.sqlite")
    mount.read_only(True)
    on_dir = OutboxLock(path)
    assert len(on_dir.fds) == 1
    with pytest.raises(AlreadyRunning):
        OutboxLock(path)
    on_dir.close()
    mount.read_only(False)
    on_file = OutboxLock(path)
    mount.read_only(True)
    with pytest.raises(AlreadyRunning):
        OutboxLock(path)
    on_file.close()


def test_control_socket_start_removes_only_a_dead_agents_socket(tmp_path: Path) -> None:
    """A socket nobody answers on is a dead agent's: removed. One that answers belongs to
    a live agent, and a path that is not a socket at all is someone's file: both kept."""
    path = tmp_path / "control.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    with pytest.raises(AlreadyRunning, match="serving the control socket"):
        ControlServer(str(path), {}).start(selectors.DefaultSelector())
    live.close()  # a killed agent: the socket file stays, nothing listens
    server = ControlServer(str(path), {})
    server.start(selectors.DefaultSelector())
    server.close()
    path.write_text("not a socket")
    with pytest.raises(AgentError, match="exists and is not a socket"):
        ControlServer(str(path), {}).start(selectors.DefaultSelector())
    assert path.read_text() == "not a socket"
