"""Runs verified cloud commands: each at most once, in order, and only when it is safe.

A command arrives on ``cmd`` and goes through the Verifier (agent/commands/verifier.py),
which commits its id and a journal entry (``accepted``) before anything else. Each
later step is committed to the journal before the next one starts:

- ``deferred``: it changes how the vehicle behaves and the vehicle is not standing
  still (the interlock); it runs when the vehicle has stood still long enough, or
  ``expired`` if that does not happen before the command's ``exp``.
- ``running``: committed before the command acts. An entry found ``running`` after a
  restart was cut off mid-way; it is reported ``failed`` and never run again, because
  whether the vehicle got the write cannot be known (set_config, whose trial spans a
  restart on purpose, is the exception: agent/commands/stage.py finishes its trial).
- ``executed`` or ``failed``, with a reason.

Every status change is reported: a ``cmd/result`` message, also kept in the outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.commands.catalogue import AT_ONCE, NOT_FASTER, spec
from agent.commands.envelope import Command, result_message
from agent.commands.journal import ReplayCache
from agent.commands.verifier import Verifier
from agent.config import CommandsConfig
from agent.errors import AgentError, CommandRejected, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What running a command came to."""

    status: str  # "executed" or "failed"
    reason: str = ""
    data: dict[str, Any] | None = None


class Vehicle(Protocol):
    """What the executor needs of the agent around it."""

    def speed_kmh(self, now: float) -> float | None:
        """The current (fused) speed, None if unknown or stale."""

    def stationary_for(self, now: float) -> float:
        """Seconds the vehicle has stood still (0 while moving or when unknown)."""

    def motion_words(self, now: float) -> str:
        """What each source able to see motion says, and the decision, in words."""

    def act(self, cmd: Command, now: float) -> Outcome | None:
        """Run the command; None when it goes on across a restart (set_config)."""


class Executor:
    """Verifies, journals, defers and runs commands; ``emit`` gets each result message."""

    def __init__(self, cfg: CommandsConfig, device_id: str, replay: ReplayCache, vehicle: Vehicle,
                 emit: Callable[[bytes, float], None]) -> None:
        self.cfg = cfg
        self.replay = replay
        self.vehicle = vehicle
        self.emit = emit
        self.verifier = Verifier(device_id, dict(cfg.keys), cfg.revoked, cfg.clock_skew, replay)
        self.pending: list[Command] = []
        self.deferred: set[str] = set()
        self.counts: dict[str, int] = {}

    def resume(self, now: float) -> list[Command]:
        """After a start: finish what the journal left open. Returns the commands that were
        running across the restart on purpose (a set_config on trial) for the caller."""
        spanning = []
        for cmd, state in self.replay.open_entries():
            if state == "running" and spec(cmd.name).spans_restart:
                spanning.append(cmd)
            elif state == "running":
                self._report(cmd.id, "failed", "interrupted: the agent stopped while it ran; not run again", now)
            else:
                self.pending.append(cmd)
                if state == "deferred":
                    self.deferred.add(cmd.id)
        return spanning

    def receive(self, payload: bytes, now: float) -> None:
        """One envelope from ``cmd``: rejected (with its reason) or accepted and queued
        for the next ``step``."""
        try:
            cmd = self.verifier.verify(payload, now)
        except CommandRejected as e:
            self._count("rejected")
            self.emit(result_message(e.command_id, "rejected", e.reason, {"received": now, "rejected": now}), now)
            return
        except StoreError as e:
            # The id could not be made durable, so the command must not run.
            log.error("command not accepted: %s", e)
            self._count("failed")
            self.emit(result_message(None, "failed", f"replay cache: {e}", {"received": now, "failed": now}), now)
            return
        log.info("command %s (%s) accepted", cmd.id, cmd.name)
        self._count("accepted")
        self.emit(result_message(cmd.id, "accepted", "", {"received": now, "accepted": now}), now)
        if len(self.pending) >= self.cfg.max_pending:
            self._report(cmd.id, "failed", f"{len(self.pending)} commands already waiting", now)
            return
        self.pending.append(cmd)

    def step(self, now: float) -> None:
        """Run, defer or expire what waits, in order of arrival."""
        blocked = False
        for cmd in list(self.pending):
            if now > cmd.expires_at + self.cfg.clock_skew:
                self.pending.remove(cmd)
                self._report(cmd.id, "expired", "the vehicle did not stand still before the command expired"
                             if cmd.id in self.deferred else "expired before it could run", now)
                continue
            in_order = spec(cmd.name).in_order
            if in_order and blocked:
                continue
            why = self._interlock(cmd, now)
            if why:
                blocked = blocked or in_order
                if cmd.id not in self.deferred:
                    self.deferred.add(cmd.id)
                    self._report(cmd.id, "deferred", why, now)
                continue
            self.pending.remove(cmd)
            self._run(cmd, now)

    def _interlock(self, cmd: Command, now: float) -> str:
        """Why ``cmd`` must wait for the vehicle to stand still, or ''."""
        rule = spec(cmd.name).interlock
        if rule == AT_ONCE:
            return ""
        if rule == NOT_FASTER:
            speed = self.vehicle.speed_kmh(now)
            if speed is not None and speed <= cmd.args["kmh"]:
                return ""
        if self.vehicle.stationary_for(now) >= self.cfg.stationary_s:
            return ""
        return (f"waiting for the vehicle to stand still for {self.cfg.stationary_s:g} s: "
                f"{self.vehicle.motion_words(now)}")

    def _run(self, cmd: Command, now: float) -> None:
        self.replay.set_state(cmd.id, "running", "", now)
        self.deferred.discard(cmd.id)
        try:
            outcome = self.vehicle.act(cmd, now)
        except AgentError as e:
            outcome = Outcome("failed", str(e))
        if outcome is None:
            return
        log.info("command %s (%s) %s: %s", cmd.id, cmd.name, outcome.status, outcome.reason)
        self._report(cmd.id, outcome.status, outcome.reason, now, outcome.data)

    def finish(self, cmd: Command, outcome: Outcome, now: float) -> None:
        """Close a command the caller ran itself (a set_config trial)."""
        self._report(cmd.id, outcome.status, outcome.reason, now, outcome.data)

    def _report(self, command_id: str, status: str, reason: str, now: float,
                data: dict[str, Any] | None = None) -> None:
        times = self.replay.set_state(command_id, status, reason, now)
        self._count(status)
        self.emit(result_message(command_id, status, reason, times, data), now)

    def _count(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1

    def status(self) -> dict[str, Any]:
        return {"results": dict(self.counts), "rejected": {k: v for k, v in self.verifier.rejected.items() if v},
                "waiting": [c.id for c in self.pending], "deferred": sorted(self.deferred)}
