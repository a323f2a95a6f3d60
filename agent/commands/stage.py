"""The command stage of the agent's loop: envelopes from the uplink in, results out.

It opens the journal in the outbox's file and runs the executor over the vehicle's
actions. While that file cannot be written no command is taken (each waits,
unacknowledged, in the broker's session), since none could be kept from running twice.
It also carries a set_config across its restart: the agent that comes up on the new
configuration is its trial, executed once healthy, rolled back if not healthy in time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import config as config_file
from agent.commands import trial
from agent.commands.actions import VehicleActions
from agent.commands.envelope import Command
from agent.commands.executor import Executor, Outcome
from agent.commands.journal import ReplayCache
from agent.config import Config
from agent.errors import StoreError

log = logging.getLogger(__name__)

# Commands verified per turn of the loop (each costs a signature check and an fsync).
COMMANDS_PER_TURN = 16


class Inbox(Protocol):
    """What the stage needs of the uplink: the command queue and the results topic."""

    connected: bool

    def take_commands(self, most: int) -> list[tuple[bytes, Any]]: ...

    def command_done(self, token: Any) -> None: ...

    def publish_result(self, payload: bytes) -> None: ...


class CommandStage:
    """The journal, the executor and a configuration on trial; ``keep`` puts a result
    message into the outbox, as well as on ``cmd/result`` at once."""

    def __init__(self, cfg: Config, inbox: Inbox, actions: VehicleActions,
                 keep: Callable[[bytes, float], None]) -> None:
        self.cfg = cfg
        self.inbox = inbox
        self.actions = actions
        self.keep = keep
        self.replay: ReplayCache | None = None
        self.executor: Executor | None = None
        self.trial: tuple[Command, float] | None = None

    def start(self, storage_failed: str) -> None:
        """Open the journal and finish what it left open; not while the outbox's file
        cannot be written (``storage_failed`` says why)."""
        if not self.cfg.commands.enabled or self.executor is not None:
            return
        if storage_failed:
            log.error("commands are not taken while the outbox cannot be written (%s)", storage_failed)
            return
        try:
            self.replay = ReplayCache(self.cfg.outbox.path)
        except StoreError as e:
            log.error("commands are not taken: %s", e)
            return
        self.executor = Executor(self.cfg.commands, self.cfg.device_id, self.replay, self.actions, self._emit)
        for cmd in self.executor.resume(time.time()):
            self._resume_trial(cmd)

    def stop(self, why: str) -> None:
        if self.executor is None:
            return
        log.error("commands are not taken until the command journal can be written again: %s", why)
        self.executor = None
        self.close()

    def close(self) -> None:
        if self.replay is not None:
            self.replay.close()
            self.replay = None

    def step(self, now: float) -> None:
        """Commands received, what waits on the interlock, and a configuration on trial."""
        if self.executor is None:
            return
        try:
            for envelope, token in self.inbox.take_commands(COMMANDS_PER_TURN):
                self.executor.receive(envelope, now)
                self.inbox.command_done(token)
            if self.executor.pending:
                self.executor.step(now)
        except StoreError as e:
            self.stop(str(e))
            return
        if self.trial is not None:
            self._judge_trial(now)

    def _emit(self, message: bytes, now: float) -> None:
        """A command result: on ``cmd/result`` at once, and into the outbox so it reaches
        the cloud even if that publish does not."""
        self.keep(message, now)
        self.inbox.publish_result(message)

    def _resume_trial(self, cmd: Command) -> None:
        """A set_config was running when the agent (re)started: this start is its trial,
        unless the marker says it never got its file in place or could not start."""
        assert self.executor is not None
        now = time.time()
        path = self.cfg.path
        marker = trial.read(path)
        if marker is not None and marker["id"] == cmd.id and marker["failed"]:
            trial.end(path)
            self.executor.finish(cmd, Outcome("failed", f"rolled back: {marker['failed']}"), now)
        elif marker is None or marker["id"] != cmd.id or marker["sha256"] != trial.file_hash(path):
            trial.end(path)
            self.executor.finish(cmd, Outcome("failed", "interrupted before the new configuration was in place"), now)
        else:
            self.trial = (cmd, now + self.cfg.commands.config_trial_s)

    def _judge_trial(self, now: float) -> None:
        """Healthy within config_trial_s: executed. Otherwise the previous file goes back
        and the agent restarts on it."""
        assert self.trial is not None and self.executor is not None
        cmd, deadline = self.trial
        trial_s = self.cfg.commands.config_trial_s
        why = self.actions.unhealthy(now, self.inbox.connected)
        if not why:
            self.trial = None
            trial.end(self.cfg.path)
            self.executor.finish(cmd, Outcome("executed", "healthy on the new configuration"), now)
        elif now >= deadline:
            self.trial = None
            log.error("command %s: new configuration not healthy after %g s (%s): rolling back", cmd.id, trial_s, why)
            config_file.roll_back(self.cfg.path)
            trial.end(self.cfg.path)
            self.executor.finish(cmd, Outcome("failed", f"rolled back: {why} within {trial_s:g} s"), now)
            self.actions.restart()

    def status(self, still_s: float) -> dict[str, Any] | None:
        if self.executor is None:
            return None
        return dict(self.executor.status(), speed_kmh=self.actions.speed, stationary_s=still_s,
                    config_trial=self.trial[0].id if self.trial else None)
