"""``ebike-agent buffer stats|export|purge``: the outbox seen and handled by a technician,
with the workshop's agent running and stopped (real ptys, real broker, the reference
consumer), on real SQLite files; and the purge itself on the outbox and the memory
queue."""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import wire
from agent.cli.buffer import describe
from agent.control.client import request
from agent.errors import StoreError
from agent.store.lock import OutboxLock
from agent.store.memory import MemoryQueue, Storage
from agent.store.outbox import LANE_ALARM, LANE_EVENT, LANE_HISTORY, LANE_LIVE, LANES, Outbox, seq_runs
from devtools.broker import Mosquitto
from tests.helpers import stop, wait_for
from tests.test_cli_sync import broker_gone, own_broker_bench, pause_cloud, resume_cloud  # noqa: F401 - a fixture
from tests.test_config import run_agent
from tests.workshop import DEVICE, Workshop

BIG = 1 << 40
NAMES = {number: name for name, number in LANES.items()}


def request_status(bench: Workshop) -> dict[str, Any]:
    status: dict[str, Any] = request(str(bench.socket))["status"]
    return status


def gap_body(runs: list[tuple[int, int]], why: str) -> bytes:
    return wire.gap_record(runs, why, time.time())


def rows(outbox: Path) -> dict[int, tuple[str, dict[str, Any]]]:
    """``seq -> (lane, record)`` of every record the file holds, read as a reader does."""
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
    try:
        return {seq: (NAMES[lane], cbor2.loads(body)) for seq, lane, body in db.execute(
            "SELECT seq, lane, body FROM records")}
    finally:
        db.close()


def lane_seqs(held: dict[int, tuple[str, dict[str, Any]]], lane: str) -> set[int]:
    return {seq for seq, (name, _) in held.items() if name == lane}


def purge_gaps(held: dict[int, tuple[str, dict[str, Any]]]) -> list[int]:
    """The sequence numbers the file's "purged" gap records announce."""
    return sorted(s for lane, rec in held.values() if rec["k"] == wire.KIND_GAP and rec["why"] == "purged"
                  for first, last in rec["runs"] for s in range(first, last + 1))


def piled_up(bench: Workshop, records: int) -> None:
    """The cloud paused until the outbox holds ``records`` live records (in flight: sent,
    and not acknowledged); the other lanes' come and go with the ride."""
    pause_cloud(bench)
    wait_for(f"{records} live records in the outbox", lambda: len(lane_seqs(rows(bench.outbox), "live")) >= records,
             40, interval=0.2)


def offline_config(tmp: Path) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text('device_id = "b1"\ncontrol_socket = "control.sock"\n'
                   '[[sources]]\nname = "g"\nkind = "uart"\nport = "/dev/null"\nprotocol = "nmea"\n'
                   '[outbox]\npath = "outbox.sqlite"\n')
    return cfg


def test_describe_words_each_kind_of_record() -> None:
    """The CSV's detail column: a record's content as a technician reads it."""
    t = 1_700_000_000.0
    window = cbor2.loads(wire.window_record(t, 1.0, [(1, 10, 12.3, 15.1, 13.5, 14.0, 0)]))
    assert describe(window) == ("window", f"{_clock(t)} +1 s: Vehicle.Speed n=10 min=12.3 max=15.1 mean=13.5 "
                                          "last=14")
    change = cbor2.loads(wire.change_record([(14, t, 80.0)]))
    assert describe(change) == ("change", f"Vehicle.Powertrain.TractionBattery.StateOfCharge.Current=80 at "
                                          f"{_clock(t)}")
    alarm = cbor2.loads(wire.alarm_record(t, 2, "battery_high_temperature", -1, 2, True, 56.2, 55.0))
    assert describe(alarm) == ("alarm", "battery_high_temperature raised, level 2: value 56.2, threshold 55")
    snap, = wire.snapshot_records(t, 2, -1, t - 10, t, [1, 1, 14], [t - 9, t - 8, t - 8], [1.0, 2.0, 3.0])
    kind, detail = describe(cbor2.loads(snap))
    assert kind == "snapshot" and detail.startswith("battery_high_temperature part 1 of 1, ")
    assert detail.endswith(": 3 samples of Vehicle.Speed, Vehicle.Powertrain.TractionBattery.StateOfCharge.Current")
    assert describe(cbor2.loads(wire.gap_record([(1, 3), (7, 7)], "quota", t))) == \
        ("gap", "records 1-3, 7 dropped (quota)")
    assert describe(cbor2.loads(wire.gap_record([(9, 9)], "purged", t))) == ("gap", "record 9 dropped (purged)")
    result = cbor2.loads(wire.result_record(t, cbor2.dumps({"id": "c-1", "status": "executed", "reason": "",
                                                           "t": {"received": t}})))
    assert describe(result) == ("result", "command c-1 executed: ")


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + ".000"


def test_outbox_purge_deletes_one_lane_but_what_is_in_flight_and_announces_it(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path / "outbox.sqlite"), BIG, gap_body=gap_body)
    plan = [LANE_LIVE, LANE_HISTORY, LANE_LIVE, LANE_ALARM, LANE_LIVE, LANE_EVENT, LANE_LIVE]
    box.append([(lane, float(i), wire.change_record([(1, float(i), float(i))])) for i, lane in enumerate(plan)])
    in_flight = {seq for seq, _ in box.lease(1, BIG)}  # the alarm goes first, then the oldest live
    in_flight |= {seq for seq, _ in box.lease(1, BIG)}
    assert in_flight == {4, 1}
    gone = box.purge(LANE_LIVE)
    box.close()
    assert gone == [3, 5, 7]
    held = rows(tmp_path / "outbox.sqlite")
    assert sorted(held) == [1, 2, 4, 6, 8], "only the live records not in flight go"
    lane, gap = held[8]
    assert lane == "alarm" and gap["k"] == wire.KIND_GAP and gap["why"] == "purged"
    assert gap["runs"] == [list(r) for r in seq_runs(gone)]


def test_alarm_lane_purge_keeps_the_gap_records(tmp_path: Path) -> None:
    """A gap record explains earlier drops to the cloud: purging the alarm lane keeps it."""
    store = Storage(str(tmp_path / "outbox.sqlite"), BIG, gap_body)
    store.append([(LANE_ALARM, 1.0, wire.alarm_record(1.0, 2, "battery_high_temperature", -1, 2, True, 56, 55)),
                  (LANE_ALARM, 2.0, wire.gap_record([(1, 1)], "quota", 2.0)),
                  (LANE_LIVE, 3.0, wire.change_record([(1, 3.0, 3.0)]))])
    assert store.purge("alarm") == 1
    try:
        store.purge("alerts")
        raise AssertionError("an unknown lane was purged")
    except StoreError as e:
        assert "no lane 'alerts'" in str(e)
    store.close()
    held = rows(tmp_path / "outbox.sqlite")
    assert sorted(held) == [2, 3, 4] and purge_gaps(held) == [1]


def test_memory_queue_purge(tmp_path: Path) -> None:
    """Running from memory (its directory cannot be made), the purge works on the queue."""
    store = Storage(f"/proc/{tmp_path.name}/outbox.sqlite", BIG, gap_body)
    assert store.memory is not None
    seqs = store.append([(LANE_LIVE, float(i), b"x" * 200) for i in range(5)]
                        + [(LANE_ALARM, 9.0, wire.alarm_record(9.0, 2, "battery_high_temperature", -1, 2, True,
                                                               56, 55))])
    leased = [seq for seq, _ in store.lease(2, BIG)]
    assert leased == [seqs[-1], seqs[0]]
    before = store.stats()
    assert store.purge("live") == 4
    after = store.stats()
    assert after["depth"]["live"] == 1 and after["depth"]["alarm"] == 2
    assert after["bytes"] < before["bytes"] and after["first_seq"] == seqs[0]
    gap = cbor2.loads(store.memory.rows[max(store.memory.rows)][2])
    assert gap["why"] == "purged" and gap["runs"] == [[seqs[1], seqs[4]]]
    queue = MemoryQueue(1, None)
    queue.append([(LANE_LIVE, 1.0, b"a")])
    assert queue.purge(LANE_LIVE) == [1] and not queue.rows  # no encoder: nothing to announce


def test_purge_refuses_while_an_unanswering_agent_holds_the_lock(tmp_path: Path) -> None:
    """The outbox's lock held and no agent on the socket (one starting, or hung): the
    file is not touched."""
    box = Outbox(str(tmp_path / "outbox.sqlite"), BIG, gap_body=gap_body)
    box.append([(LANE_LIVE, 1.0, wire.change_record([(1, 1.0, 1.0)])),
                (LANE_HISTORY, 2.0, wire.change_record([(1, 2.0, 2.0)]))])
    box.close()
    cfg = offline_config(tmp_path)
    lock = OutboxLock(str(tmp_path / "outbox.sqlite"))
    try:
        out = run_agent("buffer", "purge", "--lane", "live", "--yes", "--config", str(cfg))
    finally:
        lock.close()
    assert out.returncode == 1 and "but no agent answers on" in out.stderr, out.stderr
    assert sorted(rows(tmp_path / "outbox.sqlite")) == [1, 2]
    done = run_agent("buffer", "purge", "--lane", "live", "--yes", "--json", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"lane": "live", "purged": 1, "by": "file"}


def test_buffer_on_a_missing_outbox_is_a_clear_error(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    out = run_agent("buffer", "export", "-o", str(tmp_path / "x.csv"), "--config", str(cfg))
    assert out.returncode == 1 and out.stderr == f"error: no outbox at {tmp_path / 'outbox.sqlite'} " \
                                                 f"(outbox.path of {cfg}): nothing to export\n"
    assert not (tmp_path / "x.csv").exists()
    purge = run_agent("buffer", "purge", "--lane", "live", "--config", str(cfg))
    assert purge.returncode == 1 and "no agent running and no outbox" in purge.stderr


def test_buffer_stats_and_export_with_the_agent_running_then_stopped(workshop: Workshop) -> None:
    bench = workshop
    piled_up(bench, 5)
    cfg = ("--config", str(bench.config))
    text = bench.cli("buffer", "stats", *cfg)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("agent: running (up ") and f"): its outbox {bench.outbox}\n" in text.stdout
    lines = text.stdout.splitlines()
    assert lines[1].split() == ["lane", "records", "oldest"]
    assert [line.split()[0] for line in lines[2:3 + len(LANES)]] == [*LANES, "total"]
    assert "ago" in lines[3] and all(len(line) <= 80 for line in lines[1:])
    stats = json.loads(bench.cli("buffer", "stats", "--json", *cfg).stdout)
    assert stats["source"] == "agent" and stats["oldest_by_lane"]["live"] <= time.time()

    # CSV, the agent running: the rows are those of one moment between the two looks.
    before = set(rows(bench.outbox))
    out = bench.cli("buffer", "export", "-o", str(bench.tmp / "all.csv"), "--json", *cfg)
    after = set(rows(bench.outbox))
    assert out.returncode == 0, out.stderr
    with open(bench.tmp / "all.csv", newline="") as f:
        table = list(csv.DictReader(f))
    exported = {int(r["seq"]) for r in table}
    assert json.loads(out.stdout)["records"] == len(table) == len(exported)
    assert before <= exported <= after, "the export is not the outbox of one moment"
    assert {r["lane"] for r in table} <= set(LANES) and "window" in {r["kind"] for r in table}
    assert all(r["time"][:4] == time.strftime("%Y") for r in table)

    # CBOR, one lane: a sequence of maps, read back item by item.
    out = bench.cli("buffer", "export", "-o", str(bench.tmp / "live.cbor"), "--format", "cbor", "--lane", "live",
                    *cfg)
    assert out.returncode == 0, out.stderr
    items = read_cbor_sequence(bench.tmp / "live.cbor")
    assert out.stdout == f"{len(items)} live records of {bench.outbox} written to {bench.tmp / 'live.cbor'} (cbor)\n"
    assert len(items) >= 5 and {i["lane"] for i in items} == {"live"}
    assert all(i["body"]["k"] in (wire.KIND_WINDOW, wire.KIND_CHANGE) for i in items)

    bench.stop_agent()
    held = rows(bench.outbox)
    text = bench.cli("buffer", "stats", *cfg)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"agent: not running (no answer on {bench.socket}): read-only from {bench.outbox}")
    stats = json.loads(bench.cli("buffer", "stats", "--json", *cfg).stdout)
    assert stats["source"] == "file" and stats["records"] == len(held)
    out = bench.cli("buffer", "export", "-o", str(bench.tmp / "stopped.cbor"), "--format", "cbor", *cfg)
    assert out.returncode == 0, out.stderr
    assert [i["seq"] for i in read_cbor_sequence(bench.tmp / "stopped.cbor")] == sorted(held)


def read_cbor_sequence(path: Path) -> list[dict[str, Any]]:
    size = path.stat().st_size
    items = []
    with open(path, "rb") as f:
        decoder = cbor2.CBORDecoder(f)
        while f.tell() < size:
            items.append(decoder.decode())
    return items


def test_purge_by_the_running_agent(request: pytest.FixtureRequest) -> None:
    """Refused without --yes (exit 2, the count said, nothing deleted); with it, the
    running agent deletes the live lane's records but those in flight, no other lane's,
    and the cloud is told their numbers in a gap record."""
    bench: Workshop = request.getfixturevalue("own_broker_bench")
    broker_gone(bench, 6)

    def live_waiting() -> bool:  # broker_gone counts every lane: the purge takes the live one
        outbox = request_status(bench)["outbox"]
        return bool(outbox["depth"]["live"] >= 6 and outbox["in_flight"] == 0)

    wait_for("6 live records waiting, none in flight", live_waiting, 30, interval=0.2)
    cfg = ("--config", str(bench.config))
    before = rows(bench.outbox)
    refused = bench.cli("buffer", "purge", "--lane", "live", *cfg)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "purge would delete up to " in refused.stderr and " live records waiting in " in refused.stderr
    count = int(refused.stderr.split("purge would delete up to ")[1].split()[0].replace(",", ""))
    assert count >= len(lane_seqs(before, "live"))
    assert lane_seqs(before, "live") <= set(rows(bench.outbox)), "a refused purge deleted records"

    before = rows(bench.outbox)
    out = bench.cli("buffer", "purge", "--lane", "live", "--yes", "--json", *cfg)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["by"] == "agent" and reply["purged"] >= 6
    after = rows(bench.outbox)
    purged = purge_gaps(after)
    assert len(purged) == reply["purged"]
    assert not set(purged) & set(after), "an announced record is still there"
    assert set(purged) <= lane_seqs(before, "live") | set(range(max(before) + 1, max(after) + 1))
    others = {seq for seq, (lane, _) in before.items() if lane != "live"}
    assert others <= set(after), "a record of another lane went"

    # A broker again (the agent restarted on its port), and the cloud behind it: it gets
    # the gap record, and the purged numbers are explained, not missing.
    bench.stop_agent()
    stop(bench.consumer)
    old_port = bench.broker.port
    bench.broker = Mosquitto(str(bench.tmp / "broker"))
    bench.broker.start()
    bench.config.write_text(bench.config.read_text().replace(f"port = {old_port}\n", f"port = {bench.broker.port}\n"))
    resume_cloud(bench)
    bench.start_agent()
    cloud = bench.tmp / "cloud.sqlite"
    wait_for("the cloud to store the purge's gap", lambda: announced(cloud, "purged") == purged, 30, interval=0.2)


def announced(cloud: Path, why: str) -> list[int]:
    db = sqlite3.connect(f"file:{cloud}?mode=ro", uri=True, timeout=5)
    try:
        return sorted(s for first, last in db.execute(
            "SELECT first, last FROM announced_gaps WHERE device=? AND why=?", (DEVICE, why))
                      for s in range(first, last + 1))
    finally:
        db.close()


def test_purge_with_the_agent_stopped(workshop: Workshop) -> None:
    """No agent: the purge is done on the file under the outbox's lock; every live record
    goes (nothing is in flight), the gap record announces them, the others stay."""
    bench = workshop
    piled_up(bench, 4)
    bench.stop_agent()
    cfg = ("--config", str(bench.config))
    before = rows(bench.outbox)
    live = lane_seqs(before, "live")
    refused = bench.cli("buffer", "purge", "--lane", "live", *cfg)
    assert refused.returncode == 2
    assert f"purge would delete up to {len(live):,} live records waiting in {bench.outbox}" in refused.stderr
    assert rows(bench.outbox) == before
    out = bench.cli("buffer", "purge", "--lane", "live", "--yes", *cfg)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"purged {len(live):,} live records from {bench.outbox} (agent not running); announced "
                          f"to the cloud as a gap\n")
    after = rows(bench.outbox)
    assert purge_gaps(after) == sorted(live)
    assert set(after) == set(before) - live | {max(after)} and max(after) > max(before)
    # Started again, the agent sends the gap record with the rest.
    bench.start_agent()
    resume_cloud(bench)
    wait_for("the cloud to store the purge's gap", lambda: announced(bench.tmp / "cloud.sqlite", "purged") ==
             sorted(live), 30, interval=0.2)
