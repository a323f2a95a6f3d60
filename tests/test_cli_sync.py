"""``ebike-agent sync``: the backlog followed out to the cloud, or the reason it is not
leaving. Against the workshop's agent (real ptys, real broker, the reference consumer
acknowledging), and the verdicts from reply dicts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.sync import drained, uplink_words
from agent.control.client import request
from devtools.broker import Mosquitto
from tests.helpers import REPO, log_has, spawn, stop, wait_for
from tests.test_config import run_agent
from tests.workshop import Workshop


def pause_cloud(bench: Workshop) -> None:
    """The bench's consumer stopped: its session stays on the broker, which keeps the
    batches for it, and none is acknowledged; records pile up in the outbox."""
    stop(bench.consumer)


def resume_cloud(bench: Workshop) -> None:
    """The consumer back, on its own session: it takes what the broker kept and
    acknowledges from there on."""
    log = bench.tmp / "ingest-resumed.log"
    bench.consumer = spawn(["agent", "ingest", "--broker", bench.broker.address, "--db",
                            str(bench.tmp / "cloud.sqlite"), "--client-id", f"workshop-{bench.tmp.name}"], log)
    wait_for("the consumer to subscribe again", lambda: log_has(log, "subscribed to"), 20)


def waiting(bench: Workshop) -> int:
    return int(bench.status()["outbox"]["records"])  # type: ignore[index]


def test_drained_means_no_record_of_the_backlog_is_left() -> None:
    """New records made meanwhile do not hold the sync up; one old record left does."""
    assert drained({"records": 0, "first_seq": None}, 100)
    assert drained({"records": 7, "first_seq": 101}, 100)
    assert not drained({"records": 7, "first_seq": 100}, 100)
    assert not drained({"records": 7}, 100)  # an agent that does not say its first record


def test_uplink_words_name_the_reason() -> None:
    now = 1_700_000_000.0
    down = {"connected": False, "last_error": "connection refused (is the broker running on 127.0.0.1:1?)",
            "last_error_age_s": 4.0}
    assert uplink_words(down, now).startswith("uplink not connected to the broker; last error (")
    assert "connection refused" in uplink_words(down, now)
    assert "consumer running" in uplink_words({"connected": True, "last_error": None, "ack": "cloud"}, now)
    assert "still connecting" in uplink_words({"connected": False, "last_error": None}, now)


def test_sync_without_an_agent_exits_3(tmp_path: Path) -> None:
    out = run_agent("sync", "--socket", str(tmp_path / "none.sock"), "--timeout", "2")
    assert out.returncode == 3, out.stderr
    assert "no agent answering" in out.stderr


def test_sync_rejects_a_timeout_that_is_not_positive(tmp_path: Path) -> None:
    out = run_agent("sync", "--socket", str(tmp_path / "none.sock"), "--timeout", "0")
    assert out.returncode == 2 and "--timeout: must be positive" in out.stderr


def test_sync_follows_the_backlog_out_once_the_cloud_acknowledges(workshop: Workshop) -> None:
    """Records pile up while the cloud does not acknowledge; ``sync`` started then
    follows them out once it does: exit 0, not one record of the backlog left."""
    bench = workshop
    pause_cloud(bench)
    wait_for("a backlog in the outbox", lambda: waiting(bench) >= 8, 30, interval=0.2)
    started = time.monotonic()
    sync = subprocess.Popen([sys.executable, "-m", "agent", "sync", "--json", "--timeout", "60", "--config",
                             str(bench.config)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        assert sync.poll() is None, "sync ended while nothing was acknowledged"
        resume_cloud(bench)
        out, err = sync.communicate(timeout=90)
    finally:
        if sync.poll() is None:
            sync.kill()
            sync.wait(10)
    assert sync.returncode == 0, out + err
    report = json.loads(out)
    assert report["drained"] is True and report["backlog"] >= 8
    assert report["acknowledged"] == report["backlog"] and 1.5 <= report["seconds"] <= time.monotonic() - started
    text = bench.cli("sync", "--config", str(bench.config), timeout=90)
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.startswith("sync: done in ") and "records is acknowledged" in text.stdout


@pytest.fixture
def own_broker_bench(tmp_path: Path) -> Iterator[Workshop]:
    """The bench with its agent running, on a broker of its own (``bench.broker``) that
    the test may stop."""
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(str(tmp_path / "broker"))
    broker.start()
    bench = Workshop(tmp_path, broker)
    try:
        bench.start_agent()
        yield bench
    finally:
        bench.close()
        broker.stop()
        bench.broker.stop()


def broker_gone(bench: Workshop, records: int) -> None:
    """The bench's broker stopped, and ``records`` records waiting that are not in flight."""
    bench.broker.stop()

    def piled() -> bool:
        st: dict[str, Any] = request(str(bench.socket))["status"]
        return not st["uplink"]["connected"] and st["outbox"]["records"] - st["outbox"]["in_flight"] >= records

    wait_for(f"{records} records waiting, the broker gone", piled, 30, interval=0.2)


def test_sync_times_out_naming_the_uplinks_error(own_broker_bench: Workshop) -> None:
    """The broker gone: ``sync`` gives up at its timeout, exit 1, and says why in words."""
    bench = own_broker_bench
    broker_gone(bench, 3)
    started = time.monotonic()
    out = bench.cli("sync", "--timeout", "3", "--config", str(bench.config))
    took = time.monotonic() - started
    assert out.returncode == 1, out.stdout + out.stderr
    assert "records still waiting after 3 s" in out.stdout
    assert "uplink not connected to the broker; last error" in out.stdout
    assert "refused" in out.stdout, out.stdout
    assert out.stderr == ""
    assert took < 15
    as_json = bench.cli("sync", "--json", "--timeout", "1", "--config", str(bench.config))
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["drained"] is False and report["waiting"] > 0 and report["uplink"]["last_error"]
