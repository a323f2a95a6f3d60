"""``make bench``'s fleet section: 1,000 virtual devices (devtools/fleet.py) at one live
window a second through mosquitto into PostgreSQL, with 1, 2 and 4 consumers of one
shared subscription, everything on this machine (broker, generator, consumers and the
database share its cores). Per run: records stored per second, the ack latency p50/p99,
records lost or stored twice, and the CPU each part took, from which the number of
devices one consumer carries is projected (its CPU share at this load, scaled to a core).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from devtools import fleet
from devtools.broker import Mosquitto
from devtools.postgres import Postgres
from devtools.procs import REPO, log_has, spawn, stop, wait_for

P99_GOAL_S = 1.0
# A generator this late (p99 of its publishes against its schedule) no longer offers the
# load asked: the machine, not the consumer, is then the limit.
GENERATOR_LATE_S = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: set[int] | None = None, family: int | None = None) -> float:
    """CPU seconds (user + system) of processes ``pids``, or of ``family`` and its
    children: PostgreSQL's backends, each in a session of its own, come and go under its
    postmaster (whose ended children's time it counts as its children's)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        pid, ppid = int(entry), int(fields[1])
        if (pids is not None and pid in pids) or (family is not None and family in (pid, ppid)):
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            if pid == family:
                total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def _one(broker: Mosquitto, pg: Postgres, consumers: int, devices: int, rate: float, seconds: float,
         workdir: Path) -> dict[str, Any]:
    """One run on a fresh database: ``consumers`` in one group, the generator's report
    and the CPU seconds of each part over the run."""
    name = f"fleet_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}")
    url = pg.dsn.rsplit("/", 1)[0] + "/" + name
    init = subprocess.run([sys.executable, "-m", "agent", "ingest", "--init", "--db", url],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    if init.returncode != 0:
        raise RuntimeError(f"ingest --init failed: {init.stderr.strip()}")
    procs = []
    logs = [workdir / f"consumer-{consumers}-{i}.log" for i in range(consumers)]
    try:
        for log in logs:
            procs.append(spawn(["agent", "ingest", "--broker", broker.address, "--db", url, "--group", "fleet"], log))
        for log in logs:
            wait_for("a consumer to subscribe", lambda log=log: log_has(log, "subscribed to"), 30)
        assert pg.proc is not None and broker.proc is not None
        own = {p.pid for p in procs}
        before = (_cpu_s(own), _cpu_s(family=pg.proc.pid), _cpu_s({broker.proc.pid}), time.process_time())
        start = time.monotonic()
        report = fleet.run(broker.host, broker.port, devices=devices, rate=rate, duration=seconds, db=url)
        wall = time.monotonic() - start
        after = (_cpu_s(own), _cpu_s(family=pg.proc.pid), _cpu_s({broker.proc.pid}), time.process_time())
    finally:
        for proc in procs:
            stop(proc)
    cpu = [(b - a) / wall * 100 for a, b in zip(before, after, strict=True)]
    pg.psql("VACUUM ANALYZE", url)
    empty = int(pg.psql("SELECT pg_database_size('template1')").strip())
    size = int(pg.psql("SELECT pg_database_size(current_database())", url).strip())
    return {**report, "consumers": consumers, "wall_s": round(wall, 1),
            "db_bytes_per_record": round((size - empty) / max(1, report["records_sent"]), 1),
            "cpu_pct_consumers": round(cpu[0], 1), "cpu_pct_postgres": round(cpu[1], 1),
            "cpu_pct_broker": round(cpu[2], 1), "cpu_pct_generator": round(cpu[3], 1)}


def _carried(run: dict[str, Any]) -> bool:
    """A run one consumer carried: all stored once, acked, p99 within the goal."""
    return bool(run["lost"] == 0 and run["stored_twice"] == 0 and run["unacked"] == 0
                and run["ack_latency_p99_s"] is not None and run["ack_latency_p99_s"] <= P99_GOAL_S)


def measure(devices: int = 1000, rate: float = 1.0, seconds: float = 60.0,
            consumer_counts: tuple[int, ...] = (1, 2, 4), ramp: tuple[int, ...] = (1500, 2000, 2500, 3000),
            ramp_seconds: float = 30.0) -> dict[str, Any]:
    """The runs, one per consumer count, on one broker and one cluster; then one
    consumer against more and more devices (``ramp``) until it no longer carries them or
    the generator, sharing this machine, falls behind its own schedule (then the
    machine, not the consumer, is the limit, and the ramp says so)."""
    with tempfile.TemporaryDirectory(prefix="ebike-fleet-") as tmp:
        os.makedirs(os.path.join(tmp, "broker"))
        # Nagle off, as a tuned production broker has it (EMQX does by default): otherwise
        # every ack waits for a delayed TCP ACK, ~40 ms of the latency measured.
        broker = Mosquitto(os.path.join(tmp, "broker"), extra_config="set_tcp_nodelay true\n").start()
        pg = Postgres().start()
        try:
            runs = [_one(broker, pg, n, devices, rate, seconds, Path(tmp)) for n in consumer_counts]
            steps: list[dict[str, Any]] = []
            for n in ramp:
                steps.append(_one(broker, pg, 1, n, rate, ramp_seconds, Path(tmp)))
                if not _carried(steps[-1]) or steps[-1]["behind_p99_s"] > GENERATOR_LATE_S:
                    break
        finally:
            pg.remove()
            broker.stop()
    return {"devices": devices, "rate": rate, "seconds": seconds, "runs": runs, "ramp": steps,
            "ramp_seconds": ramp_seconds}


def summary(fig: dict[str, Any]) -> dict[str, Any]:
    """The bench-results.json keys: per consumer count the stored rate and the ack
    latencies; loss and duplicates over every run; the devices one consumer carries."""
    out: dict[str, Any] = {}
    for run in fig["runs"]:
        n = run["consumers"]
        out[f"fleet_records_per_s_{n}_consumers"] = run["acked_per_s"]
        out[f"fleet_ack_p50_s_{n}_consumers"] = run["ack_latency_p50_s"]
        out[f"fleet_ack_p99_s_{n}_consumers"] = run["ack_latency_p99_s"]
    out["fleet_lost"] = sum(run["lost"] for run in fig["runs"])
    out["fleet_stored_twice"] = sum(run["stored_twice"] for run in fig["runs"])
    one = next(run for run in fig["runs"] if run["consumers"] == 1)
    per_device_cpu = one["cpu_pct_consumers"] / fig["devices"]
    out["fleet_devices_per_consumer_core"] = round(100 / per_device_cpu) if per_device_cpu > 0 else None
    carried = [run["devices"] for run in [one, *fig["ramp"]] if _carried(run)]
    out["fleet_devices_per_consumer"] = max(carried, default=0)
    return out


def report(fig: dict[str, Any]) -> None:
    print(f"\nfleet: {fig['devices']:,} devices x {fig['rate']:g} live window/s, {fig['seconds']:g} s, mosquitto + "
          f"PostgreSQL + generator + consumers on this machine")
    print(f"  {'consumers':>9} {'stored/s':>9} {'ack p50':>8} {'ack p99':>8} {'lost':>5} {'twice':>5} {'unacked':>7}"
          f" {'resends':>7}   CPU % of a core: consumers, PostgreSQL, broker, generator")
    for run in fig["runs"]:
        print(f"  {run['consumers']:>9} {run['acked_per_s']:>9,.0f} {run['ack_latency_p50_s']:>7.3f}s "
              f"{run['ack_latency_p99_s']:>7.3f}s {run['lost']:>5} {run['stored_twice']:>5} {run['unacked']:>7}"
              f" {run['resends']:>7}   {run['cpu_pct_consumers']:.0f}, {run['cpu_pct_postgres']:.0f}, "
              f"{run['cpu_pct_broker']:.0f}, {run['cpu_pct_generator']:.0f}")
    one = next(run for run in fig["runs"] if run["consumers"] == 1)
    print(f"  PostgreSQL on disk: {one['db_bytes_per_record']:.0f} bytes per live window record (21 signals; "
          f"tables and indexes, after VACUUM, less an empty database)")
    print(f"  one consumer, more devices ({fig['ramp_seconds']:g} s each):")
    for run in fig["ramp"]:
        print(f"  {run['devices']:>9,} devices: stored {run['acked_per_s']:,.0f}/s, ack p50 "
              f"{run['ack_latency_p50_s']:.3f} s, p99 {run['ack_latency_p99_s']:.3f} s, lost {run['lost']}, twice "
              f"{run['stored_twice']}, unacked {run['unacked']}; CPU consumer {run['cpu_pct_consumers']:.0f} %, "
              f"PostgreSQL {run['cpu_pct_postgres']:.0f} %, broker {run['cpu_pct_broker']:.0f} %, generator "
              f"{run['cpu_pct_generator']:.0f} % (late p99 {run['behind_p99_s']:.3f} s)")
    s = summary(fig)
    last = fig["ramp"][-1] if fig["ramp"] else None
    limit = ("none reached" if last is None or (_carried(last) and last["behind_p99_s"] <= GENERATOR_LATE_S)
             else "the consumer" if not _carried(last) and last["behind_p99_s"] <= GENERATOR_LATE_S
             else "this machine (the generator fell behind its schedule)")
    print(f"fleet_devices_per_consumer: {s['fleet_devices_per_consumer']:,} carried (p99 <= {P99_GOAL_S:g} s, no loss, "
          f"no duplicate; limit: {limit}); fleet_devices_per_consumer_core: {s['fleet_devices_per_consumer_core']:,} "
          f"(its CPU share at {fig['devices']:,} devices, scaled to a whole core)")
