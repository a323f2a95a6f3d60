"""The command executor on a real journal (SQLite) with a fake vehicle: the order of
results, the interlock, expiry, queue order, and what a restart finds in the journal.
End to end, through mosquitto and the simulator: tests/test_e2e_commands.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.commands.actions import VehicleActions
from agent.commands.catalogue import CATALOGUE, check_arguments
from agent.commands.envelope import Command
from agent.commands.executor import Executor, Outcome
from agent.commands.journal import ReplayCache
from agent.config import CommandsConfig
from agent.errors import SourceError
from agent.fleet.signing import generate_key_pair, sign_command

DEVICE = "bike-exec"
NOW = 1_800_000_000.0
KEY = generate_key_pair()


class FakeVehicle:
    """Speed and stillness set by the test; records what it was asked to do."""

    def __init__(self) -> None:
        self.speed: float | None = 20.0
        self.still = 0.0
        self.done: list[tuple[str, dict[str, Any]]] = []
        self.fail_with: Exception | None = None

    def speed_kmh(self, now: float) -> float | None:
        return self.speed

    def stationary_for(self, now: float) -> float:
        return self.still

    def motion_words(self, now: float) -> str:
        return f"wheel {self.speed} km/h: moving"

    def act(self, cmd: Command, now: float) -> Outcome | None:
        if self.fail_with is not None:
            raise self.fail_with
        self.done.append((cmd.name, cmd.args))
        return Outcome("executed", "ok")


class Rig:
    def __init__(self, path: str, **cfg: Any) -> None:
        self.path = path
        self.cfg = CommandsConfig(keys=(("fleet", KEY[1].decode()),), stationary_s=3.0, **cfg)
        self.vehicle = FakeVehicle()
        self.results: list[dict[str, Any]] = []
        self.replay = ReplayCache(path)
        self.ex = self._executor()

    def _executor(self) -> Executor:
        return Executor(self.cfg, DEVICE, self.replay, self.vehicle, lambda m, t: self.results.append(cbor2.loads(m)))

    def send(self, name: str, args: dict[str, Any] | None = None, cid: str | None = None, now: float = NOW,
             ttl: int = 60) -> None:
        env = sign_command(KEY[0], "fleet", DEVICE, name, check_arguments(name, args or {}), int(NOW),
                             int(NOW) + ttl, cid)
        self.ex.receive(env, now)
        self.ex.step(now)

    def statuses(self, cid: str) -> list[str]:
        return [r["status"] for r in self.results if r["id"] == cid]

    def restart(self) -> list[Command]:
        self.replay.close()
        self.replay = ReplayCache(self.path)
        self.ex = self._executor()
        return self.ex.resume(NOW + 1)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(str(tmp_path / "outbox.sqlite"))
    yield r
    r.replay.close()


def test_a_command_is_accepted_then_executed_with_its_times(rig: Rig) -> None:
    rig.send("ping", cid="p1", now=NOW + 0.5)
    assert rig.statuses("p1") == ["accepted", "executed"]
    ms = int((NOW + 0.5) * 1000)
    assert rig.results[-1]["t"] == {"received": ms, "accepted": ms, "executed": ms}
    assert rig.vehicle.done == [("ping", {})]
    assert rig.replay.state_of("p1") == "executed"


def test_lock_waits_for_the_vehicle_to_stand_still(rig: Rig) -> None:
    rig.send("lock", cid="l1")
    assert rig.statuses("l1") == ["accepted", "deferred"] and rig.vehicle.done == []
    assert "stand still" in rig.results[-1]["reason"]
    rig.vehicle.still = 2.9
    rig.ex.step(NOW + 5)
    assert rig.vehicle.done == [] and rig.statuses("l1") == ["accepted", "deferred"]  # deferred is said once
    rig.vehicle.still = 3.0
    rig.ex.step(NOW + 6)
    assert rig.vehicle.done == [("lock", {})] and rig.statuses("l1") == ["accepted", "deferred", "executed"]
    rig.ex.step(NOW + 7)
    assert len(rig.vehicle.done) == 1


def test_a_deferred_command_expires_if_the_vehicle_never_stops(rig: Rig) -> None:
    rig.send("lock", cid="l2", ttl=30)
    rig.ex.step(NOW + 30 + rig.cfg.clock_skew + 1)
    assert rig.statuses("l2") == ["accepted", "deferred", "expired"]
    assert "stand still" in rig.results[-1]["reason"]
    rig.vehicle.still = 100
    rig.ex.step(NOW + 200)
    assert rig.vehicle.done == []
    assert rig.replay.state_of("l2") == "expired"


def test_vehicle_commands_keep_their_order_others_do_not_wait(rig: Rig) -> None:
    rig.send("lock", cid="a")
    rig.send("unlock", cid="b")
    rig.send("ping", cid="c")
    assert rig.vehicle.done == [("ping", {})], "the unlock overtook the deferred lock, or the ping waited"
    rig.vehicle.still = 10
    rig.ex.step(NOW + 1)
    assert [name for name, _ in rig.vehicle.done] == ["ping", "lock", "unlock"]


@pytest.mark.parametrize("speed, kmh, runs", [(18.0, 20, True), (20.0, 20, True), (22.0, 20, False),
                                              (None, 20, False)])
def test_speed_limit_below_the_current_speed_waits(rig: Rig, speed: float | None, kmh: float, runs: bool) -> None:
    """A limit at or above the current speed changes nothing at once; below it (or with
    the speed unknown) it waits for the vehicle to stand still."""
    rig.vehicle.speed = speed
    rig.send("set_speed_limit", {"kmh": kmh}, cid="s")
    assert bool(rig.vehicle.done) == runs
    assert rig.statuses("s")[-1] == ("executed" if runs else "deferred")


def test_a_failing_action_is_reported_failed(rig: Rig) -> None:
    rig.vehicle.fail_with = SourceError("kt: port gone")
    rig.send("unlock", cid="u")
    assert rig.statuses("u") == ["accepted", "failed"] and rig.results[-1]["reason"] == "kt: port gone"


def test_rejections_are_answered_and_nothing_runs(rig: Rig) -> None:
    rig.ex.receive(b"\xa0not a command", NOW)
    stranger = generate_key_pair()
    rig.ex.receive(sign_command(stranger[0], "fleet", DEVICE, "lock", {}, int(NOW), int(NOW) + 60, "x1"), NOW)
    assert [(r["id"], r["status"], r["reason"]) for r in rig.results] == [
        (None, "rejected", "malformed"), ("x1", "rejected", "bad_signature")]
    assert rig.vehicle.done == [] and rig.ex.status()["rejected"] == {"malformed": 1, "bad_signature": 1}


def test_too_many_waiting_commands_fail_the_newest(tmp_path: Path) -> None:
    rig = Rig(str(tmp_path / "o.sqlite"), max_pending=2)
    try:
        for i in range(3):
            rig.send("lock", cid=f"q{i}")
        assert rig.statuses("q2") == ["accepted", "failed"] and len(rig.ex.pending) == 2
    finally:
        rig.replay.close()


def test_a_restart_resumes_waiting_commands_and_never_reruns_a_cut_one(rig: Rig) -> None:
    rig.send("lock", cid="waiting")                      # deferred
    rig.send("ping", cid="done")                         # executed
    rig.send("unlock", cid="cut")                        # waits behind the lock...
    rig.replay.set_state("cut", "running", "", NOW)      # ...as if it had started when the power went
    assert rig.restart() == []
    assert rig.statuses("cut")[-1] == "failed" and "not run again" in rig.results[-1]["reason"]
    assert [cmd.id for cmd in rig.ex.pending] == ["waiting"] and rig.ex.status()["deferred"] == ["waiting"]
    rig.vehicle.still = 10
    rig.ex.step(NOW + 2)
    assert [name for name, _ in rig.vehicle.done] == ["ping", "lock"]
    rig.restart()
    rig.ex.step(NOW + 3)
    assert [name for name, _ in rig.vehicle.done] == ["ping", "lock"], "a finished command ran again"


def test_a_set_config_on_trial_is_handed_back_after_a_restart(rig: Rig) -> None:
    rig.vehicle.done.clear()
    rig.send("set_config", {"patch": {"windows": {"live": 2.0}}}, cid="cfg")
    rig.replay.set_state("cfg", "running", "", NOW)  # as the runtime leaves it when it restarts into the trial
    spanning = rig.restart()
    assert [cmd.id for cmd in spanning] == ["cfg"] and rig.statuses("cfg")[-1] == "executed"
    rig.ex.finish(spanning[0], Outcome("failed", "rolled back"), NOW + 2)
    assert rig.replay.state_of("cfg") == "failed"


def test_the_journal_is_pruned_with_the_replay_cache(rig: Rig) -> None:
    rig.send("ping", cid="old", ttl=10)
    rig.send("ping", cid="new", now=NOW + 100, ttl=1000)
    assert rig.replay.state_of("old") is None and rig.replay.state_of("new") == "executed"


def test_every_command_in_the_catalogue_has_an_action_and_no_other() -> None:
    """Command names are listed once, in the catalogue; the vehicle's actions follow it."""
    assert set(VehicleActions.ACTIONS) == set(CATALOGUE)
