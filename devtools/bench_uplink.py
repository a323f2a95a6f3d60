"""Uplink figures for ``make bench``, through a real local mosquitto with cloud acks.

- ``drain_24h_backlog_s``: a vehicle back in coverage after a day offline: its outbox
  holds 24 h of a ride's 1 s live windows and 60 s history windows (40 signals each);
  the time until the consumer (``ebike-agent ingest``, its own process) has stored and
  acknowledged every record and the outbox is empty. The agent side is driven the way
  the runtime drives it (lease, send, poll, ack every 5 ms).
- ``reconnect_to_first_live_s``: the broker is SIGKILLed mid-stream and comes back on
  the same port after OUTAGE_S with that whole backlog still waiting; the time from the
  broker accepting connections again to the consumer storing the first live window
  committed during the outage. It includes the rest of the agent's reconnect backoff
  (1 s doubling to 120 s, with jitter), so it depends on the outage's length; the
  consumer (in this process here) resubscribes at once, as a cloud consumer would.
- ``reconnect_connack_to_first_live_s``: the part of that after the agent's CONNACK.

Each is the median over ``rounds``. Run alone: ``python -m devtools.bench_uplink``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agent import wire
from agent.config import BrokerConfig
from agent.fleet.ingest import Ingest, ack_for
from agent.fleet.subscriber import Subscriber
from agent.signals import SIGNALS
from agent.store.outbox import LANE_HISTORY, LANE_LIVE, Outbox
from agent.uplink.mqtt import Uplink
from agent.uplink.pump import Pump
from devtools import broker as brokers
from devtools.procs import log_has, spawn, stop, wait_for

DAY_S = 24 * 3600
HISTORY_S = 60
N_SIGNALS = 40
OUTAGE_S = 5.0
TICK = 0.005
DRAIN_TIMEOUT = 600.0


def ride(seconds: int, seed: int, start: float = 1.7e9) -> list[tuple[int, float, bytes]]:
    """``seconds`` of 1 s live windows and 60 s history windows of 40 signals sampled at
    10 Hz, values wandering like a ride's (a random walk per signal, rounded as sensors
    report, each window's spread around its move)."""
    rng = random.Random(seed)
    ids = [s.id for s in SIGNALS[:N_SIGNALS]]
    level = [rng.uniform(0, 100) for _ in ids]
    records: list[tuple[int, float, bytes]] = []
    minute: list[list[tuple[float, float, float, float]]] = [[] for _ in ids]
    for sec in range(seconds):
        rows = []
        for i, sid in enumerate(ids):
            step = rng.gauss(0, 1.0)
            spread = abs(rng.gauss(0, 0.3))
            lo, hi = sorted((level[i], level[i] + step))
            window = (round(lo - spread, 1), round(hi + spread, 1), round(level[i] + step / 2, 2),
                      round(level[i] + step, 1))
            level[i] += step
            minute[i].append(window)
            rows.append((sid, 10, *window, 0.0))
        records.append((LANE_LIVE, start + sec, wire.window_record(start + sec, 1.0, rows)))
        if (sec + 1) % HISTORY_S == 0:
            rows = [(sid, 10 * len(w), min(x[0] for x in w), max(x[1] for x in w),
                     round(sum(x[2] for x in w) / len(w), 2), w[-1][3], 0.0)
                    for sid, w in zip(ids, minute, strict=True)]
            t0 = start + sec + 1 - HISTORY_S
            records.append((LANE_HISTORY, t0, wire.window_record(t0, float(HISTORY_S), rows)))
            minute = [[] for _ in ids]
    return records


class Vehicle:
    """The agent's outbox and uplink, and the runtime's send stage between them (after
    each (re)connect the first batch carries the newest live window)."""

    def __init__(self, workdir: Path, host: str, port: int) -> None:
        self.device = f"bench-{uuid.uuid4().hex[:8]}"
        self.cfg = BrokerConfig(host=host, port=port, keepalive=10)
        self.outbox = Outbox(str(workdir / f"{self.device}.sqlite"), 1 << 30)
        state = wire.state_message(True, uuid.uuid4().hex, "bench", "py")
        self.uplink = Uplink(self.device, self.cfg, f"ebike/v1/{self.device}/", birth=state, death=state)
        self.pump = Pump(self.outbox, self.uplink, self.device, self.cfg)

    def load(self, records: list[tuple[int, float, bytes]]) -> int:
        for i in range(0, len(records), 1000):
            self.outbox.append(records[i:i + 1000])
        return len(records)

    def run_until(self, what: str, done: Callable[[], bool], timeout: float,
                  also: Callable[[], object] = lambda: None) -> float:
        """Step (and ``also``) until ``done``; the time it took."""
        started = time.monotonic()

        def turn() -> bool:
            self.pump.turn()
            also()
            return done()

        wait_for(what, turn, timeout, interval=TICK)
        return time.monotonic() - started

    def close(self) -> None:
        self.uplink.client.loop_stop()
        self.uplink.client.disconnect()
        self.outbox.close()


def drain_once(workdir: Path, backlog: list[tuple[int, float, bytes]]) -> float:
    """Seconds from the first send to an empty outbox, every record acknowledged by the cloud."""
    with brokers.Mosquitto(str(workdir)) as mqtt:
        log = workdir / "ingest.log"
        consumer = spawn(["agent", "ingest", "--broker", mqtt.address, "--db", str(workdir / "cloud.sqlite"),
                          "--client-id", f"bench-ingest-{uuid.uuid4().hex[:6]}"], log)
        vehicle = Vehicle(workdir, mqtt.host, mqtt.port)
        try:
            wait_for("the consumer to subscribe", lambda: log_has(log, "subscribed to"), 30)
            total = vehicle.load(backlog)
            vehicle.uplink.start()  # the clock runs from here, the (loopback) connect included
            return vehicle.run_until("the backlog to drain", lambda: vehicle.outbox.acked >= total, DRAIN_TIMEOUT)
        finally:
            vehicle.close()
            stop(consumer)


def reconnect_once(workdir: Path, backlog: list[tuple[int, float, bytes]], seed: int) -> tuple[float, float]:
    """(broker ready -> first live window stored, CONNACK -> that window stored), in seconds."""
    mqtt = brokers.Mosquitto(str(workdir)).start()
    vehicle = Vehicle(workdir, mqtt.host, mqtt.port)
    cloud = Ingest(str(workdir / "cloud.sqlite"))
    arrived: list[int] = []

    def on_message(topic: str, payload: bytes) -> None:
        stored = cloud.handle(topic, payload)
        arrived.extend(stored)
        if stored:
            sub.publish(*ack_for(topic, stored, payload))

    sub = Subscriber(f"bench-cloud-{uuid.uuid4().hex[:6]}", mqtt.host, mqtt.port,
                     f"ebike/v1/{vehicle.device}/telemetry", on_message)
    port = mqtt.port
    live = ride(int(OUTAGE_S), seed, start=1.8e9)
    try:
        sub.connect()
        vehicle.uplink.start()
        vehicle.run_until("connected", lambda: vehicle.uplink.connected, 30, also=lambda: sub.loop(TICK))
        assert mqtt.proc is not None
        mqtt.proc.kill()
        mqtt.proc.wait(5)
        vehicle.load(backlog)
        for window in live:  # live windows keep coming, once a second
            vehicle.load([window])
            vehicle.run_until("a second of the outage", _after(time.monotonic() + 1.0), 2)
        newest = vehicle.outbox.stats()["last_seq"]
        connects = vehicle.uplink.connects
        real_free_port = brokers.free_port
        brokers.free_port = lambda: port
        try:
            mqtt.start()
        finally:
            brokers.free_port = real_free_port
        back = time.monotonic()
        sub.loop(TICK)  # resubscribes at once
        connack: list[float] = []

        def consume() -> None:
            """Notes the CONNACK the vehicle's step just saw, then runs the consumer."""
            if vehicle.uplink.connects != connects and not connack:
                connack.append(time.monotonic())
            sub.loop(TICK)

        took = vehicle.run_until("the first live window", lambda: any(seq >= newest for seq in arrived), 300,
                                 also=consume)
        return took, back + took - connack[0]
    finally:
        sub.close()
        cloud.close()
        vehicle.close()
        mqtt.stop()


def _after(t: float) -> Callable[[], bool]:
    return lambda: time.monotonic() >= t


def measure(rounds: int, backlog_s: int = DAY_S) -> dict[str, float]:
    """Medians over ``rounds`` of the figures in the module docstring (on a backlog of
    ``backlog_s`` of riding: a day, or less for ``make bench``'s smoke run)."""
    backlog = ride(backlog_s, seed=24)
    drains: list[float] = []
    reconnects: list[tuple[float, float]] = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="ebike-bench-uplink-") as tmp:
            drains.append(drain_once(Path(tmp), backlog))
        with tempfile.TemporaryDirectory(prefix="ebike-bench-uplink-") as tmp:
            reconnects.append(reconnect_once(Path(tmp), backlog, seed=r))
    return {
        "drain_24h_backlog_s": statistics.median(drains),
        "reconnect_to_first_live_s": statistics.median(r for r, _ in reconnects),
        "reconnect_connack_to_first_live_s": statistics.median(c for _, c in reconnects),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.bench_uplink", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
