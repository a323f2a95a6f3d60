"""Signed commands end to end, all real: ``ebike-agent command`` tooling -> mosquitto
(MQTT 5, message expiry) -> the agent (verifier, journal, interlock) -> protocol writes
on the simulator's ptys, which obeys them; results back on ``cmd/result`` and in the
cloud's database. The simulator's manifest is the ground truth of what the vehicle did.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.fleet.signing import generate_key_pair, sign_command
from agent.fleet.subscriber import Subscriber, publish_once
from devtools.broker import Mosquitto
from tests import test_e2e as e2e
from tests.helpers import log_has, spawn, stop, wait_for
from tests.test_commands import resign_with
from tests.test_e2e_sources import status_now

LOCKED = "Vehicle.LEV.Locked"
SPEED = "Vehicle.Speed"


class Fleet:
    """The fleet side: a signing key, and the results the device sends back."""

    def __init__(self, tmp: Path, broker: Mosquitto, device: str) -> None:
        self.broker = broker
        self.device = device
        self.private, public = generate_key_pair()
        self.public_path = tmp / "fleet.pub.pem"
        self.public_path.write_bytes(public)
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.sub = Subscriber(f"fleet-{uuid.uuid4().hex[:8]}", broker.host, broker.port,
                              f"ebike/v1/{device}/cmd/result", self._on_result)
        self.sub.connect()
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        wait_for("the fleet to subscribe to results", lambda: self.sub.connected, 10)

    def _loop(self) -> None:
        while self.running:
            self.sub.loop(0.05)

    def _on_result(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.results.append(cbor2.loads(payload))

    def envelope(self, name: str, args: dict[str, Any] | None = None, cid: str | None = None, ttl: int = 120,
                 **over: Any) -> tuple[str, bytes]:
        cid = cid or uuid.uuid4().hex
        now = int(time.time())
        fields = {"device": self.device, "iat": now, "exp": now + ttl, "kid": "fleet", "key": self.private} | over
        return cid, sign_command(fields["key"], fields["kid"], fields["device"], name, args or {}, fields["iat"],
                                   fields["exp"], cid)

    def publish(self, payload: bytes, expiry: int = 120) -> None:
        publish_once(self.broker.host, self.broker.port, f"ebike/v1/{self.device}/cmd", payload, expiry)

    def send(self, name: str, args: dict[str, Any] | None = None, ttl: int = 120, **over: Any) -> str:
        cid, env = self.envelope(name, args, ttl=ttl, **over)
        self.publish(env, expiry=ttl)
        return cid

    def statuses(self, cid: str | None) -> list[str]:
        with self.lock:
            return [r["status"] for r in self.results if r["id"] == cid]

    def count(self, status: str) -> int:
        with self.lock:
            return sum(r["status"] == status for r in self.results)

    def result(self, cid: str | None, status: str) -> dict[str, Any]:
        with self.lock:
            return next(r for r in self.results if r["id"] == cid and r["status"] == status)

    def wait(self, cid: str, status: str, timeout: float) -> dict[str, Any]:
        wait_for(f"command {cid} to be {status} (so far {self.statuses(cid)})", lambda: status in self.statuses(cid),
                 timeout, interval=0.05)
        return self.result(cid, status)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sub.close()


def agent_config(tmp: Path, broker: Mosquitto, device: str, fleet: Fleet, uarts: dict[str, str],
                 commands: str = "", stationary_s: float = 0.5, sim_speed: float = 1.0) -> Path:
    """test_e2e's SLCAN (Bafang) and NMEA sources, ``uarts`` (name -> protocol) beside
    them, and the fleet's key trusted."""
    sources = "".join(f"""
[[sources]]
name = "{name}"
kind = "uart"
port = "{tmp / name}"
protocol = "{proto}"
baudrate = 9600
{"poll_interval = 0.5" if proto == "jbd" else ""}
""" for name, proto in uarts.items())
    return e2e.agent_config(tmp, broker, device, sources, sim_speed=sim_speed, extra=f"""
[commands]
keys = {{ fleet = "{fleet.public_path}" }}
revoked = ["fleet-old"]
clock_skew = 5.0
stationary_s = {stationary_s}
{commands}
""")


def start_sim(tmp: Path, scenario: str, duration: float, speed: float, uarts: dict[str, str], seed: int = 3,
              extra: tuple[str, ...] = ()) -> Any:
    """The simulator's ptys: can, gps, and one per UART source (``--kt``, ``--jbd``);
    ``extra``: more simulator flags (``--fault-at``)."""
    flags = [arg for name, proto in uarts.items() for arg in (f"--{proto.split('-')[0]}", str(tmp / name))]
    sim = spawn(["firmware_sim", "--slcan", str(tmp / "can"), "--nmea", str(tmp / "gps"), *flags, *extra,
                 "--scenario", scenario, "--duration", str(duration), "--speed", str(speed), "--seed", str(seed),
                 "--manifest", str(tmp / "manifest.jsonl"), "--wait-open", "60", "--linger", "5"], tmp / "sim.log")
    wait_for("the simulator's ptys", lambda: log_has(tmp / "sim.log", "ready"), 20)
    return sim


def manifest(tmp: Path) -> list[dict[str, Any]]:
    out = []
    for line in (tmp / "manifest.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # the line being written when we read
    return out


def commands_obeyed(tmp: Path) -> list[dict[str, Any]]:
    return [r for r in manifest(tmp) if r["type"] == "command"]


def agent_status(tmp: Path) -> dict[str, Any]:
    return status_now(tmp / "control.sock") or {}


def moving(tmp: Path, above: float) -> bool:
    speed = (agent_status(tmp).get("commands") or {}).get("speed_kmh")
    return speed is not None and speed > above


@pytest.fixture
def parts() -> Iterator[list[Any]]:
    """Processes (stopped) and fleets (closed) of a test, whatever happens."""
    started: list[Any] = []
    yield started
    for part in reversed(started):
        if isinstance(part, Fleet):
            part.close()
        else:
            stop(part)


@pytest.mark.e2e
def test_speed_limit_and_lock_during_a_ride(tmp_path: Path, mosquitto: Mosquitto, parts: list[Any]) -> None:
    """``set_speed_limit 20`` caps the simulated speed from when it runs (the interlock
    holds it back while the vehicle goes faster); a ``lock`` sent while the vehicle rides
    is deferred, runs at the next stop, and the motor gives no more assistance; each
    result arrives on ``cmd/result``."""
    device = "cmd-ride-1"
    uarts = {"kt": "kt-lcd3", "bms": "jbd"}
    fleet = Fleet(tmp_path, mosquitto, device)
    parts.append(fleet)
    sim = start_sim(tmp_path, "commute", 220, 4, uarts)
    parts.append(sim)
    agent = spawn(["agent", "run", "--config", str(agent_config(tmp_path, mosquitto, device, fleet, uarts,
                                                                sim_speed=4))],
                  tmp_path / "agent.log")
    parts.append(agent)
    wait_for("the vehicle to ride faster than 20 km/h", lambda: moving(tmp_path, 20.5), 60, interval=0.1)

    limit = fleet.send("set_speed_limit", {"kmh": 20})
    fleet.wait(limit, "executed", 60)
    [obeyed] = commands_obeyed(tmp_path)
    assert obeyed["speed_limit_kmh"] == 20.0
    limited_from = obeyed["t"]

    wait_for("the vehicle to ride again", lambda: moving(tmp_path, 10), 60, interval=0.1)
    lock = fleet.send("lock")
    fleet.wait(lock, "deferred", 10)
    fleet.wait(lock, "executed", 60)
    assert "kt" in fleet.result(lock, "executed")["reason"] and "bms" in fleet.result(lock, "executed")["reason"]
    wait_for("the ride to end", lambda: sim.poll() is not None, 120)

    records = manifest(tmp_path)
    truth = [r for r in records if r["type"] == "truth"]
    locked_at = next(r["t"] for r in records if r["type"] == "frame" and r.get("values", {}).get(LOCKED) == 1)
    at_lock = max((r for r in truth if r["t"] <= locked_at), key=lambda r: r["t"])
    assert at_lock["speed_kmh"] < 1.0, f"locked at {at_lock['speed_kmh']} km/h"
    before = [r for r in truth if r["t"] < limited_from]
    capped = [r for r in truth if limited_from + 3 <= r["t"] < locked_at]
    after = [r for r in truth if r["t"] > locked_at + 1]
    assert max(r["speed_kmh"] for r in before) > 20.5, "the ride never went above the new limit anyway"
    assert capped and max(r["speed_kmh"] for r in capped) <= 20.0 + 1.2, "the speed limit did not hold"
    assert any(r["motor_i"] > 1.0 for r in before + capped), "the motor never assisted before the lock"
    assert after and all(r["motor_i"] < 0.05 for r in after), "the motor still assisted after the lock"
    # Sent above 20.5 km/h it is deferred, unless the rider was already braking for a stop.
    assert fleet.statuses(limit) in (["accepted", "deferred", "executed"], ["accepted", "executed"])
    assert fleet.statuses(lock) == ["accepted", "deferred", "executed"]


def wait_connected(tmp: Path, timeout: float = 30) -> None:
    wait_for("the agent to connect", lambda: (agent_status(tmp).get("uplink") or {}).get("connected"), timeout,
             interval=0.05)


def wait_speed_known(tmp: Path, timeout: float = 20) -> None:
    """Until the agent knows the speed, the interlock defers every speed limit."""
    wait_for("the agent to know the speed", lambda: (agent_status(tmp).get("commands") or {}).get(
        "speed_kmh") is not None, timeout, interval=0.02)


@pytest.mark.e2e
def test_attacks_are_rejected_with_their_reason_and_nothing_runs(tmp_path: Path, mosquitto: Mosquitto,
                                                                 parts: list[Any]) -> None:
    """The attack table through the broker and a running agent: each answered
    ``rejected`` with its reason and none reaches the vehicle (each is a speed limit of
    its own, so one obeyed would show in the simulator's manifest); the replay of an
    executed command is refused also after an agent restart; every result is in the
    cloud's database too."""
    device = "cmd-attack-1"
    fleet = Fleet(tmp_path, mosquitto, device)
    parts.append(fleet)
    consumer = spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", str(tmp_path / "cloud.sqlite"),
                      "--client-id", f"attack-ingest-{uuid.uuid4().hex[:6]}"], tmp_path / "ingest.log")
    parts.append(consumer)
    wait_for("the consumer to subscribe", lambda: log_has(tmp_path / "ingest.log", "subscribed to"), 20)
    parts.append(start_sim(tmp_path, "park", 600, 1, {}))
    config = agent_config(tmp_path, mosquitto, device, fleet, {})
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    parts.append(agent)
    wait_connected(tmp_path)
    wait_speed_known(tmp_path)

    good_id, good = fleet.envelope("set_speed_limit", {"kmh": 15})
    fleet.publish(good)
    fleet.wait(good_id, "executed", 30)
    now = int(time.time())
    stranger = generate_key_pair()[0]
    attacks: list[tuple[str, str | None, bytes]] = [
        ("bad_signature", *fleet.envelope("set_speed_limit", {"kmh": 16}, key=stranger)),
        ("unknown_key", *fleet.envelope("set_speed_limit", {"kmh": 17}, key=stranger, kid="stranger")),
        ("revoked_key", *fleet.envelope("set_speed_limit", {"kmh": 18}, key=stranger, kid="fleet-old")),
        ("wrong_device", *fleet.envelope("set_speed_limit", {"kmh": 19}, device="cmd-attack-2")),
        ("expired", *fleet.envelope("set_speed_limit", {"kmh": 21}, iat=now - 600, exp=now - 300)),
        ("not_yet_valid", *fleet.envelope("set_speed_limit", {"kmh": 22}, iat=now + 600, exp=now + 900)),
        ("replayed", good_id, good),
        ("bad_signature", good_id, resign_with(good, args={"kmh": 23.0, "allow_above_legal": False})),
        ("unknown_command", *fleet.envelope("self_destruct")),
        ("bad_arguments", *fleet.envelope("set_speed_limit", {"kmh": 30})),
        ("malformed", None, b"\xd2\x84\x40\xa0\xff"),
        ("too_large", None, fleet.envelope("set_speed_limit", {"kmh": 24, "pad": "x" * 5000})[1]),
    ]
    for _reason, _cid, envelope in attacks:
        fleet.publish(envelope)
    wait_for("every attack answered", lambda: fleet.count("rejected") == len(attacks), 30)
    for reason, cid, _env in attacks:
        assert any(r["reason"] == reason and r["status"] == "rejected" for r in fleet.results if r["id"] == cid), \
            (reason, cid, [r for r in fleet.results if r["id"] == cid])
    assert fleet.statuses(good_id) == ["accepted", "executed", "rejected", "rejected"]

    assert stop(agent) == 0, (tmp_path / "agent.log").read_text()
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent2.log")
    parts.append(agent)
    wait_connected(tmp_path)
    fleet.publish(good)
    wait_for("the replay after a restart to be refused", lambda: fleet.statuses(good_id).count("rejected") == 3, 30)
    assert [r["reason"] for r in fleet.results if r["id"] == good_id][-1] == "replayed"
    assert [round(r["speed_limit_kmh"], 2) for r in commands_obeyed(tmp_path)] == [15.0], \
        "an attack reached the vehicle"
    assert "x" * 100 not in (tmp_path / "agent.log").read_text(), "a payload went into the log"

    def in_cloud() -> list[tuple[str | None, str]]:
        with sqlite3.connect(tmp_path / "cloud.sqlite") as db:
            rows = db.execute("SELECT body FROM records WHERE device=? AND kind='res' ORDER BY seq", (device,))
            return [(r["r"]["id"], r["r"]["status"]) for r in (cbor2.loads(body) for (body,) in rows)]

    with fleet.lock:
        sent = sorted(((r["id"] or ""), r["status"]) for r in fleet.results)
    wait_for("every result in the cloud's database", lambda: sorted(((i or ""), s) for i, s in in_cloud()) == sent, 30)


@pytest.mark.e2e
def test_a_stale_command_never_reaches_a_vehicle_that_was_offline(tmp_path: Path, mosquitto: Mosquitto,
                                                                  parts: list[Any]) -> None:
    """The agent's session outlives it on the broker, so a command sent while it is
    offline is delivered when it is back, unless its MQTT 5 message expiry ran out
    first: then the broker drops it, although the command itself (exp plus the
    agent's clock skew) would still pass the verifier and run."""
    device = "cmd-offline-1"
    fleet = Fleet(tmp_path, mosquitto, device)
    parts.append(fleet)
    parts.append(start_sim(tmp_path, "park", 600, 1, {}))
    config = agent_config(tmp_path, mosquitto, device, fleet, {})
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    wait_connected(tmp_path)
    assert stop(agent) == 0
    stale_id, stale = fleet.envelope("set_speed_limit", {"kmh": 12}, ttl=2)
    fleet.publish(stale, expiry=1)
    fresh = fleet.send("set_speed_limit", {"kmh": 14}, ttl=120)
    time.sleep(2.5)
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent2.log")
    parts.append(agent)
    fleet.wait(fresh, "executed", 30)
    time.sleep(1.0)
    assert fleet.statuses(stale_id) == [], "the broker delivered an expired command"
    assert agent_status(tmp_path)["uplink"]["commands_received"] == 1
    assert [round(r["speed_limit_kmh"], 2) for r in commands_obeyed(tmp_path)] == [14.0]


@pytest.mark.e2e
def test_set_config_applies_a_healthy_patch_and_rolls_back_a_breaking_one(tmp_path: Path, mosquitto: Mosquitto,
                                                                          parts: list[Any]) -> None:
    """A patch that fails the schema is refused and changes nothing; a good one is in
    place after a restart and reported executed once the agent is healthy on it; one
    that leaves a source dead, and one with which the agent cannot even start, are
    rolled back to the file before them and reported failed, with the reason."""
    from agent.config import read_raw

    device = "cmd-config-1"
    fleet = Fleet(tmp_path, mosquitto, device)
    parts.append(fleet)
    parts.append(start_sim(tmp_path, "park", 900, 1, {}))
    config = agent_config(tmp_path, mosquitto, device, fleet, {}, commands="config_trial_s = 4.0")
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    parts.append(agent)
    wait_connected(tmp_path)
    original = config.read_bytes()

    invalid = fleet.send("set_config", {"patch": {"outbox": {"commit_interval": -1.0}}})
    reason = fleet.wait(invalid, "failed", 20)["reason"]
    assert reason.startswith("not applied:") and "outbox.commit_interval" in reason
    assert config.read_bytes() == original

    good = fleet.send("set_config", {"patch": {"outbox": {"commit_interval": 0.25}}})
    assert fleet.wait(good, "executed", 30)["reason"] == "healthy on the new configuration"
    assert read_raw(str(config))["outbox"]["commit_interval"] == 0.25
    assert agent.poll() is None and log_has(tmp_path / "agent.log", "restarting on trial")
    healthy = config.read_bytes()

    sources = read_raw(str(config))["sources"]
    dead_gnss = [dict(sources[0], port=str(tmp_path / "no-such-gps")), sources[1]]
    dead = fleet.send("set_config", {"patch": {"sources": dead_gnss}})
    assert fleet.wait(dead, "failed", 40)["reason"] == "rolled back: source gnss is not open within 4 s"
    assert config.read_bytes() == healthy

    no_dbc = [sources[0], dict(sources[1], protocol="dbc:" + str(tmp_path / "missing.dbc"))]
    wait_connected(tmp_path)
    broken = fleet.send("set_config", {"patch": {"sources": no_dbc}})
    reason = fleet.wait(broken, "failed", 40)["reason"]
    assert reason.startswith("rolled back: the agent did not start:") and "missing.dbc" in reason, reason
    assert config.read_bytes() == healthy
    wait_connected(tmp_path)
    wait_for("the agent healthy again", lambda: all(s["open"] for s in agent_status(tmp_path)["sources"]), 20)
    assert agent.poll() is None
    assert not (tmp_path / "agent.toml.trial").exists()


KILLS = int(os.environ.get("EBIKE_COMMAND_KILLS", "50"))


@pytest.mark.e2e
def test_sigkill_while_commands_run_never_runs_one_twice(tmp_path: Path, mosquitto: Mosquitto,
                                                         parts: list[Any]) -> None:
    """SIGKILL the agent KILLS times at random moments while it handles bursts of
    commands (some published while it is down, delivered on its return), restarting it
    each time. Each command is a speed limit of its own value, so the simulator's
    manifest counts how often each reached the vehicle: never twice; and every command
    ends executed (reached the vehicle once) or failed as cut off (at most once)."""
    rng = random.Random(20261122)
    device = "cmd-kill-1"
    fleet = Fleet(tmp_path, mosquitto, device)
    parts.append(fleet)
    parts.append(start_sim(tmp_path, "park", 3600, 1, {}))
    config = agent_config(tmp_path, mosquitto, device, fleet, {})
    sent: dict[str, int] = {}
    outbox = tmp_path / "outbox.sqlite"

    def burst(n: int) -> None:
        """``n`` commands at once, through the fleet's open connection (no connect each)."""
        for _ in range(n):
            centi = 500 + len(sent)  # 5.00 km/h, 5.01, ...: one value per command
            cid, env = fleet.envelope("set_speed_limit", {"kmh": centi / 100}, ttl=600)
            sent[cid] = centi
            fleet.sub.publish(f"ebike/v1/{device}/cmd", env)

    def states() -> dict[str, str]:
        with sqlite3.connect(outbox) as db:
            return dict(db.execute("SELECT id, state FROM command_journal").fetchall())

    def all_ended() -> bool:
        ended = states()
        return all(ended.get(cid) in ("executed", "failed") for cid in sent)

    # How long this machine takes to handle a burst: the kills fall inside that window,
    # whatever the machine's speed.
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent-calibrate.log")
    parts.append(agent)
    wait_connected(tmp_path)
    wait_speed_known(tmp_path)
    began = time.monotonic()
    burst(8)
    wait_for("the calibration burst to end", all_ended, 60, interval=0.005)
    window = time.monotonic() - began
    assert stop(agent) == 0
    mid_way = 0
    for kill in range(KILLS):
        log = tmp_path / f"agent{kill}.log"
        agent = spawn(["agent", "run", "--config", str(config)], log)
        parts.append(agent)
        wait_connected(tmp_path)
        wait_speed_known(tmp_path)
        burst(8)
        # A random moment: verifying, journalling, writing to the bus, reporting.
        time.sleep(rng.uniform(0.0, window))
        assert agent.poll() is None, log.read_text()
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        # Caught mid-way: some command of the burst was on its way, waiting, or running.
        mid_way += not all_ended()
        if kill % 5 == 0:
            burst(2)  # waits in the broker's session for the next start
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent-final.log")
    parts.append(agent)
    wait_connected(tmp_path)
    wait_for("every command to end", all_ended, 60)
    assert stop(agent) == 0
    final = states()
    obeyed: dict[int, int] = {}
    for rec in commands_obeyed(tmp_path):
        centi = round(rec["speed_limit_kmh"] * 100)
        obeyed[centi] = obeyed.get(centi, 0) + 1
    twice = {centi: n for centi, n in obeyed.items() if n > 1}
    assert not twice, f"commands reached the vehicle more than once: {twice}"
    for cid, centi in sent.items():
        if final[cid] == "executed":
            assert obeyed.get(centi) == 1, f"{cid} ({centi / 100} km/h) reported executed but never obeyed"
    with sqlite3.connect(outbox) as db:
        reasons = [r for (r,) in db.execute("SELECT reason FROM command_journal WHERE state='failed'")]
    assert all(r.startswith("interrupted") for r in reasons), reasons
    assert sum(s == "executed" for s in final.values()) > len(sent) / 2, "too few commands ran to say anything"
    assert mid_way >= KILLS // 4, f"only {mid_way} of {KILLS} kills caught commands being handled"


def cli_send(fleet: Fleet, key: Path, name: str, *args: str) -> list[dict[str, Any]]:
    """``ebike-agent command send --wait``: the results it printed (after its own line)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "agent", "command", "send", "--broker", fleet.broker.address,
                          "--key", str(key), "--kid", "fleet", "--device", fleet.device, "--wait", "30", name, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert "topic" in lines[0]
    return lines[1:]


@pytest.mark.e2e
def test_ping_diagnostics_reporting_snapshot_and_restart(tmp_path: Path, mosquitto: Mosquitto,
                                                         parts: list[Any]) -> None:
    """The commands that do not move the vehicle, sent with ``ebike-agent command send
    --wait`` as an operator would: each printed as it goes and executed; diagnostics
    carry status, alarms, log and the configuration without its password; set_reporting
    takes the speed out of the live windows at once and keeps it out after
    restart_agent; snapshot sends the ring buffer."""
    from agent.config import read_raw
    from agent.signals import signal_id

    device = "cmd-other-1"
    fleet = Fleet(tmp_path, mosquitto, device)
    parts.append(fleet)
    key = tmp_path / "fleet.key.pem"
    key.write_bytes(fleet.private)
    db = tmp_path / "cloud.sqlite"
    parts.append(spawn(["agent", "ingest", "--broker", mosquitto.address, "--db", str(db),
                        "--client-id", f"other-ingest-{uuid.uuid4().hex[:6]}"], tmp_path / "ingest.log"))
    wait_for("the consumer to subscribe", lambda: log_has(tmp_path / "ingest.log", "subscribed to"), 20)
    parts.append(start_sim(tmp_path, "park", 900, 1, {}))
    config = agent_config(tmp_path, mosquitto, device, fleet, {})
    config.write_text(config.read_text().replace("[broker]\n", '[broker]\nusername = "bike"\npassword = "s3cret"\n'))
    agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    parts.append(agent)
    wait_connected(tmp_path)

    assert [(r["status"], r["reason"]) for r in cli_send(fleet, key, "ping")] == [("accepted", ""),
                                                                                 ("executed", "pong")]
    diag = cli_send(fleet, key, "diagnostics")[-1]
    assert diag["status"] == "executed"
    bundle = diag["data"]
    assert bundle["status"]["device_id"] == device and bundle["status"]["health"]
    assert bundle["config"]["broker"]["password"] == "<redacted>" and bundle["config"]["broker"]["username"] == "bike"
    assert "s3cret" not in json.dumps(bundle) and any("up: kernel" in line for line in bundle["log"])
    assert isinstance(bundle["alarms"], list)

    speed = signal_id("Vehicle.Speed")

    def speed_rows(after_ms: int) -> int:
        with sqlite3.connect(db) as c:
            return int(c.execute("SELECT count(*) FROM window_signals WHERE device=? AND signal=? AND dur_ms=1000 "
                                 "AND t_ms > ?", (device, speed, after_ms)).fetchone()[0])

    def live_windows(after_ms: int) -> int:
        with sqlite3.connect(db) as c:
            return int(c.execute("SELECT count(DISTINCT seq) FROM window_signals WHERE device=? AND dur_ms=1000 "
                                 "AND t_ms > ?", (device, after_ms)).fetchone()[0])

    wait_for("a live window with the speed in the cloud", lambda: speed_rows(0) > 0, 20)
    policy = json.dumps({"signals": {"Vehicle.Speed": {"mode": "change", "deadband": 0.5}}})
    done = cli_send(fleet, key, "set_reporting", "--args-json", policy)[-1]
    assert done["status"] == "executed"
    assert read_raw(str(config))["reporting"] == {"Vehicle.Speed": {"mode": "change", "deadband": 0.5}}
    changed_at = done["t"]["executed"]

    wait_for("live windows after set_reporting", lambda: live_windows(changed_at + 1000) >= 3, 20)
    assert speed_rows(changed_at + 1000) == 0

    snap = cli_send(fleet, key, "snapshot")[-1]
    assert snap["status"] == "executed" and snap["reason"].split()[0].isdigit() and int(snap["reason"].split()[0]) > 0

    def snapshots() -> list[dict[str, Any]]:
        with sqlite3.connect(db) as c:
            return [cbor2.loads(b) for (b,) in c.execute("SELECT body FROM records WHERE device=? AND kind='snap'",
                                                         (device,))]

    wait_for("the snapshot in the cloud", lambda: any(s["code"] == 0 and s["s"] for s in snapshots()), 20)

    restarted = cli_send(fleet, key, "restart_agent")[-1]
    assert (restarted["status"], restarted["reason"]) == ("executed", "restarting")
    wait_for("the agent to restart", lambda: log_has(tmp_path / "agent.log", "; restarting"), 20)
    wait_connected(tmp_path)
    assert agent.poll() is None, "restart_agent ended the process instead of restarting it"
    assert (tmp_path / "agent.log").read_text().count("up: kernel") == 2
    back_at = int(time.time() * 1000)
    wait_for("live windows after the restart", lambda: live_windows(back_at + 1000) >= 3, 30)
    assert speed_rows(back_at) == 0, "the reporting policy did not survive the restart"
