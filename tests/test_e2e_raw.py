"""The raw lane end to end, all real: a candump log built here by hand (PROTOCOLS.md:
02F83201 carries Vehicle.Speed as u16 LE in 0.01 km/h) replayed by ``python -m agent
run``, its SQLite outbox, mosquitto and the reference consumer (``python -m agent
ingest``), which stores every raw sample. Every believed speed sample must come back
bit for bit at 0.01 km/h, with its own time to the ms, none lost or doubled; values the
kernel does not believe never do.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fusion.spec import S_FUSED_SPEED
from agent.signals import signal_id
from devtools.broker import Mosquitto
from tests.helpers import consumer as reference_consumer
from tests.helpers import consumer_report, spawn, stop, wait_for
from tests.test_e2e_sources import source, source_status, status_cli, stop_and_collect, write_config

pytestmark = pytest.mark.e2e

SPEED = signal_id("Vehicle.Speed")
T0_MS = 1_700_000_000_000


@pytest.fixture
def consumer(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Path]:
    with reference_consumer(mosquitto.address, tmp_path, "e2e-raw") as db:
        yield db
    report = consumer_report(tmp_path)
    assert report["bad_batches"] == 0 and report["gaps"] == {} and report["raw_lost"] == {}, report


def speed_log(rng: random.Random, n: int) -> tuple[str, list[tuple[int, int]], int]:
    """A candump log of ``n`` speed frames at irregular whole-ms times (one 20 s silence),
    speeds walking by 0.00-0.50 km/h and often held; some frames read 200.00 km/h, which
    no signal range believes. Returns the log, the believed (ms, 0.01 km/h) samples and
    how many frames were not believable."""
    lines, believed, refused = [], [], 0
    ms, speed = T0_MS, 2000
    for i in range(n):
        ms += rng.choice((1, 10, 50, 100, 100, 250)) + (20_000 if i == n // 2 else 0)
        speed = max(0, speed + rng.choice((0, 0, 0, 1, -1, 7, -13, 50)))
        value = speed
        if rng.random() < 0.03:
            value, refused = 20000, refused + 1
        else:
            believed.append((ms, speed))
        data = bytes([value & 0xFF, value >> 8, 0xF4, 0x01, 0xC0, 0x12, 0x41, 0xFF])
        lines.append(f"({ms // 1000}.{ms % 1000:03d}000) can0 02F83201#{data.hex().upper()}\n")
    return "".join(lines), believed, refused


def test_every_sample_comes_back_through_broker_and_ingest(tmp_path: Path, mosquitto: Mosquitto,
                                                           consumer: Path) -> None:
    text, believed, refused = speed_log(random.Random(18), 1500)
    assert refused > 0
    capture = tmp_path / "ride.log"
    capture.write_text(text)
    device = "e2e-raw"
    sock, log = tmp_path / "control.sock", tmp_path / "agent.log"
    config = write_config(tmp_path, mosquitto, device, source(capture, "candump", "bafang-can", "replay_speed = 0\n",
                                                              name="replay"), live=0.5)
    # Speed every sample beside its windows; the fused speed (a derived signal, 2 decimals)
    # every sample alone; 5 s records, so the ride spans several.
    config.write_text(config.read_text() + '\n[reporting]\n"Vehicle.Speed" = {mode = "window", raw = true}\n'
                                           '"Vehicle.LEV.Fused.Speed" = {mode = "raw"}\nraw_block_s = 5\n')
    agent = spawn(["agent", "run", "--config", str(config)], log)
    try:
        wait_for("the replay to finish", lambda: source_status(sock).get("finished"), 20)
        st = status_cli(sock)
        assert st["raw"]["enabled"] and st["raw"]["lost"] == 0
        stop_and_collect(agent, log, tmp_path / "outbox.sqlite", consumer, device)
    finally:
        stop(agent)

    with sqlite3.connect(consumer) as c:
        speeds = c.execute("SELECT t_ms, value FROM raw_samples WHERE device=? AND signal=? ORDER BY seq, rowid",
                           (device, SPEED)).fetchall()
        fused = [v for (v,) in c.execute("SELECT value FROM raw_samples WHERE device=? AND signal=?",
                                         (device, S_FUSED_SPEED))]
        records = c.execute("SELECT count(*) FROM records WHERE device=? AND kind='raw'", (device,)).fetchone()[0]
        signals = {s for (s,) in c.execute("SELECT DISTINCT signal FROM raw_samples WHERE device=?", (device,))}
    assert signals == {SPEED, S_FUSED_SPEED}, "only the signals set to raw"
    assert records >= 3
    # Values: bit for bit the frame's steps of 0.01 km/h (the double a decoder of that
    # resolution gives), in the order they came, none lost or doubled, no refused one.
    assert [v.hex() for _t, v in speeds] == [(k / 100).hex() for _ms, k in believed]
    # Times: the replay shifts the log to start now (by an arbitrary offset), so each
    # comes back as the log's ms plus one whole-ms offset (two neighbouring ones if the
    # offset lies on a half ms).
    offsets = {t - ms for (t, _v), (ms, _k) in zip(speeds, believed, strict=True)}
    assert max(offsets) - min(offsets) <= 1 and len(offsets) <= 2, offsets
    assert fused and all(v == round(v * 100) / 100 for v in fused), "derived samples on their 0.01 grid"
