"""The agent under a service manager (agent/notify.py): sd_notify(3) datagrams on
``$NOTIFY_SOCKET``, received here by a listener standing in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.fleet.subscriber import Subscriber, wait_until
from agent.notify import Notifier
from agent.runtime import TEST_HOOKS
from tests.helpers import log_has, spawn, stop, wait_for
from tests.workshop import DEVICE, Workshop


class Manager:
    """A datagram socket where the agent's messages arrive, each with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.got: list[tuple[float, str]] = []

    def take(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.got
            self.got.append((time.monotonic(), data.decode()))

    def messages(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.take() if m.startswith(prefix)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    yield m
    m.close()


def test_without_a_manager_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready_now(lambda: pytest.fail("no status is made for nobody"))
    n.alive(lambda: pytest.fail("no status is made for nobody"))
    n.stopping("bye")


def test_watchdog_interval_is_half_the_period_and_only_for_this_process(manager: Manager) -> None:
    path = str(manager.path)
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"}).ping_every == 2.0
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).ping_every == 0.0
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                     "WATCHDOG_PID": str(os.getpid())}).ping_every == 2.0
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "soon"}).ping_every == 0.0
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    n.ready_now(lambda: "starting")
    n.ready_now(lambda: pytest.fail("READY is said once"))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        n.alive(lambda: "running")
        time.sleep(0.01)
    assert [m for _, m in manager.messages("READY")] == ["READY=1\nSTATUS=starting"]
    pings = [t for t, _ in manager.messages("WATCHDOG=1")]
    assert 8 <= len(pings) <= 11  # every 0.1 s over 1 s
    n.stopping("stopping")
    assert manager.messages("STOPPING") == [manager.got[-1]]


def test_an_abstract_socket_and_a_manager_that_went_away(tmp_path: Path) -> None:
    name = f"ebike-notify-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready_now(lambda: "up")
        assert listener.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        listener.close()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    gone.ready_now(lambda: "up")
    gone.send("WATCHDOG=1")
    assert gone.failures == 2  # counted, logged once, never raised


def test_a_manager_that_stops_reading_never_blocks_the_sender(manager: Manager) -> None:
    """Its queue full (net.unix.max_dgram_qlen, 10 by default), sends fail at once."""
    n = Notifier({"NOTIFY_SOCKET": str(manager.path)})
    t0 = time.monotonic()
    for _ in range(200):
        n.send("WATCHDOG=1")
    assert time.monotonic() - t0 < 1.0
    assert n.failures > 0
    assert len(manager.messages("WATCHDOG=1")) == 200 - n.failures


@pytest.mark.e2e
def test_the_agent_says_ready_pings_from_its_loop_and_says_stopping(workshop_down: Workshop,
                                                                     manager: Manager) -> None:
    """READY once its sources are tried, WATCHDOG twice per period from its loop (and
    none while the loop is frozen), a STATUS line, STOPPING on SIGTERM."""
    bench = workshop_down
    bench.start_agent(env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "1000000"})
    ready = wait_for("READY=1", lambda: manager.messages("READY=1"), 10)
    assert len(ready) == 1 and "STATUS=" in ready[0][1] and "records waiting" in ready[0][1]
    wait_for("pings for 2 s", lambda: len(manager.messages("WATCHDOG=1")) >= 4, 10)
    pings = [t for t, _ in manager.messages("WATCHDOG=1")]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 0.8, gaps  # WatchdogSec=1 would never fire
    assert bench.agent is not None
    os.kill(bench.agent.pid, signal.SIGSTOP)  # a hung loop: no pings
    time.sleep(1.5)
    before = len(manager.messages("WATCHDOG=1"))
    time.sleep(1.0)
    assert len(manager.messages("WATCHDOG=1")) == before
    os.kill(bench.agent.pid, signal.SIGCONT)
    wait_for("pings again", lambda: len(manager.messages("WATCHDOG=1")) > before, 5)
    status = wait_for("a STATUS line", lambda: [m for _, m in manager.take() if "frames/s" in m], 15)
    assert "gnss up, can0 up, bms up" in status[-1], status
    t0 = time.monotonic()
    assert bench.stop_agent() == 0
    assert time.monotonic() - t0 < 2.0  # everything acknowledged: nothing to wait for
    stopping = manager.messages("STOPPING=1")
    assert len(stopping) == 1 and "stopping" in stopping[0][1]


@pytest.mark.e2e
def test_a_stuck_main_loop_stops_the_pings_while_the_process_lives(workshop_down: Workshop,
                                                                   manager: Manager) -> None:
    """The test hook hangs the main loop alone (the uplink's network thread goes on, unlike
    under SIGSTOP): the pings stop for two watchdog periods while the process lives, so
    they come from the loop and systemd would kill it. Without the hook's variable,
    SIGUSR2 keeps its default action and ends the process."""
    bench = workshop_down
    bench.start_agent(env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "1000000", TEST_HOOKS: "1"})
    wait_for("pings", lambda: len(manager.messages("WATCHDOG=1")) >= 3, 10)
    assert bench.agent is not None
    os.kill(bench.agent.pid, signal.SIGUSR2)
    wait_for("the stall", lambda: log_has(bench.log, "main loop is stalled"), 5)
    before = len(manager.messages("WATCHDOG=1"))
    time.sleep(2.0)  # WatchdogSec=1: two periods
    assert len(manager.messages("WATCHDOG=1")) == before
    assert bench.agent.poll() is None
    assert bench.stop_agent() == 0  # SIGTERM ends the stall, and the stop is the usual one
    bench.agent = spawn(["agent", "run", "--config", str(bench.config)], bench.tmp / "plain.log",
                        env={"NOTIFY_SOCKET": str(manager.path)})
    wait_for("READY=1 again", lambda: len(manager.messages("READY=1")) == 2, 15)
    os.kill(bench.agent.pid, signal.SIGUSR2)
    assert bench.agent.wait(5) == -signal.SIGUSR2
    bench.agent = None


def _outbox_counts(db: Path) -> tuple[int, int]:
    """(records ever committed, records the file holds)."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        (held,) = c.execute("SELECT count(*) FROM records").fetchone()
    return int(next_seq) - 1, int(held)


@pytest.mark.e2e
def test_sigterm_with_a_cloud_that_never_acks_exits_within_2_s_and_keeps_everything(workshop_down: Workshop,
                                                                                   manager: Manager) -> None:
    """The worst stop: connected, a backlog in flight, no consumer to acknowledge it. The
    agent still exits within 2 s of SIGTERM, every record it committed still in the
    outbox (none is deleted before the cloud has it), its last state published."""
    bench = workshop_down
    stop(bench.consumer)
    bench.start_agent(env={"NOTIFY_SOCKET": str(manager.path)})
    wait_for("a backlog of 10 records", lambda: _outbox_counts(bench.outbox)[1] >= 10, 30, interval=0.2)
    t0 = time.monotonic()
    assert bench.stop_agent() == 0
    took = time.monotonic() - t0
    assert took < 2.0, took
    committed, held = _outbox_counts(bench.outbox)
    assert held == committed, (committed, held)  # nothing acknowledged, nothing gone
    assert _retained_state(bench)["online"] is False


def _retained_state(bench: Workshop) -> dict[str, Any]:
    """The device's retained ``state`` message, as a new subscriber gets it."""
    got: list[bytes] = []
    sub = Subscriber("state-reader", bench.broker.host, bench.broker.port, f"ebike/v1/{DEVICE}/state",
                     lambda topic, payload: got.append(payload), persistent=False)
    sub.connect()
    try:
        assert wait_until(lambda: bool(got), 5, sub.loop), "no retained state"
    finally:
        sub.close()
    state: dict[str, Any] = cbor2.loads(got[0])
    return state
