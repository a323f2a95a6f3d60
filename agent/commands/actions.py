"""What each command does, on the vehicle and in the agent: the executor's ``Vehicle``.

``VehicleActions`` is handed what it acts on (the configuration, the sources, the
kernel) and callables for what belongs to the runtime (the status, the records, a
restart), so nothing here imports the runtime. ``ACTIONS`` has one entry per name of
agent/commands/catalogue.py (a test holds them equal).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from agent import config as config_file
from agent.commands import trial
from agent.commands.envelope import Command
from agent.commands.executor import Outcome
from agent.config import REPORT_MODES, Config
from agent.errors import ConfigError, SourceError
from agent.fusion import motion
from agent.fusion.kernel import KernelApi
from agent.fusion.spec import MOTION_STILL, REPORT_RAW
from agent.protocols import bafang, jbd, kt
from agent.signals import BY_NAME
from agent.sources.base import Source

log = logging.getLogger(__name__)

# How often the interlock looks at the vehicle's speed while commands wait.
STILL_CHECK = 0.1
# Log lines a diagnostics bundle carries.
RECENT_LOG_LINES = 200
SECRET_KEYS = ("password",)

Action = Callable[["VehicleActions", Command, float], Outcome | None]


class RecentLog(logging.Handler):
    """The agent's last log lines, for the diagnostics bundle."""

    def __init__(self, lines: int) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record)[:500])


def redacted(data: Any) -> Any:
    """A configuration document with its secrets replaced, for diagnostics."""
    if isinstance(data, dict):
        return {k: "<redacted>" if k in SECRET_KEYS and v else redacted(v) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data


class VehicleActions:
    """The speed and stillness the interlock asks for, and one action per command."""

    def __init__(self, cfg: Config, sources: Sequence[Source], kernel: KernelApi, *,
                 status: Callable[[], dict[str, Any]], record: Callable[[list[Any], float], None],
                 recent_alarms: Iterable[dict[str, Any]], restart: Callable[[], None]) -> None:
        """``record`` takes kernel outputs (a snapshot) to the outbox; ``restart`` stops
        the agent to start it again."""
        self.cfg = cfg
        self.sources = sources
        self.kernel = kernel
        self.status = status
        self.record = record
        self.recent_alarms = recent_alarms
        self.restart = restart
        self.recent_log = RecentLog(RECENT_LOG_LINES)
        logging.getLogger().addHandler(self.recent_log)
        self.speed: float | None = None
        self.motion: tuple[Any, ...] = ()
        self.still_since: float | None = None
        self.still_checked = -STILL_CHECK

    def close(self) -> None:
        logging.getLogger().removeHandler(self.recent_log)

    # -- what the interlock asks ---------------------------------------------------

    def speed_kmh(self, now: float) -> float | None:
        self._watch_speed(now)
        return self.speed

    def stationary_for(self, now: float) -> float:
        """Seconds the kernel's stationary decision has said still; moving, disagreeing
        or unknown sources count as moving (a lock must never be applied on a guess)."""
        self._watch_speed(now)
        return 0.0 if self.still_since is None else now - self.still_since

    def motion_words(self, now: float) -> str:
        self._watch_speed(now)
        return motion.words(self.motion)

    def _watch_speed(self, now: float) -> None:
        """The stationary decision and the highest believable speed, asked of the kernel
        at most every STILL_CHECK."""
        if now - self.still_checked < STILL_CHECK:
            return
        self.still_checked = now
        self.motion = self.kernel.motion(now, self.cfg.commands.stationary_kmh)
        self.speed = self.motion[9] if self.motion[9] >= 0.0 else None
        if self.motion[0] != MOTION_STILL:
            self.still_since = None
        elif self.still_since is None:
            self.still_since = now

    def unhealthy(self, now: float, connected: bool) -> str:
        """Why the agent is not doing its job, or '': connected, and every source open and
        heard from (and not timed out)."""
        heard = {src for _slot, src, frames, _p, _n, out, _c, _k, _age in self.kernel.health(now) if frames and not out}
        for i, (c, src) in enumerate(zip(self.cfg.sources, self.sources, strict=True)):
            if not src.is_open:
                return f"source {c.name} is not open"
            if i not in heard:
                return f"no data from source {c.name}"
        return "" if connected else "not connected to the broker"

    # -- the actions -----------------------------------------------------------------

    def act(self, cmd: Command, now: float) -> Outcome | None:
        """Run a verified command; None when it goes on across a restart (set_config)."""
        action = self.ACTIONS.get(cmd.name)
        if action is None:
            return Outcome("failed", f"no action for {cmd.name!r}")
        return action(self, cmd, now)

    def _ping(self, cmd: Command, now: float) -> Outcome:
        return Outcome("executed", "pong")

    def _lock(self, cmd: Command, now: float) -> Outcome:
        """KT controllers take the display's lock bit; a JBD pack opens its discharge switch."""
        locked = cmd.name == "lock"
        level = self.cfg.commands.kt_assist_level

        def send(src: Source) -> None:
            if src.cfg.protocol == "jbd":
                src.write(jbd.mos_control_request(charge_off=False, discharge_off=locked))
            else:
                src.write(kt.display_frame(level, locked=locked))

        return self._write_to(("kt-lcd3", "jbd"), cmd.name, send)

    def _speed_limit(self, cmd: Command, now: float) -> Outcome:
        can_id, data = bafang.speed_limit_write(cmd.args["kmh"])
        return self._write_to(("bafang-can",), "limit the speed of", lambda src: src.send_frame(can_id, data))

    def _write_to(self, protocols: tuple[str, ...], what: str, send: Callable[[Source], None]) -> Outcome:
        """Send to every source speaking one of ``protocols``; failed unless all took it."""
        # A candump log is a replay of some bus, not this vehicle's: never a target.
        targets = [(c, s) for c, s in zip(self.cfg.sources, self.sources, strict=True)
                   if c.protocol in protocols and c.kind != "candump"]
        if not targets:
            return Outcome("failed", f"no source can {what} this vehicle (needs {' or '.join(protocols)})")
        done, errors = [], []
        for c, src in targets:
            try:
                send(src)
                done.append(c.name)
            except (SourceError, ValueError) as e:
                errors.append(f"{c.name}: {e}")
        if errors:
            return Outcome("failed", "; ".join(errors) + (f" (sent on {', '.join(done)})" if done else ""))
        return Outcome("executed", f"sent on {', '.join(done)}")

    def _set_reporting(self, cmd: Command, now: float) -> Outcome:
        """Kept in the configuration file first (so it survives a restart), then applied."""
        signals: dict[str, dict[str, Any]] = cmd.args.get("signals", {})
        patch: dict[str, Any] = dict(signals)
        if "raw_sources" in cmd.args:
            patch["raw_sources"] = cmd.args["raw_sources"]
        try:
            config_file.install_config(self.cfg.path, self._patched({"reporting": patch}))
        except ConfigError as e:
            return Outcome("failed", str(e))
        for name, policy in signals.items():
            mode = REPORT_MODES[policy["mode"]] | (REPORT_RAW if policy.get("raw") else 0)
            self.kernel.set_policy(BY_NAME[name].id, mode, policy["deadband"])
        if "raw_sources" in cmd.args:
            for i, src in enumerate(self.cfg.sources):
                self.kernel.set_source_raw(i, src.name in cmd.args["raw_sources"])
        return Outcome("executed", f"{len(signals)} signals" + (
            f", raw sources {', '.join(cmd.args['raw_sources']) or 'none'}" if "raw_sources" in cmd.args else ""))

    def _snapshot(self, cmd: Command, now: float) -> Outcome:
        out = self.kernel.snapshot(now)
        self.record([out], now)
        return Outcome("executed", f"{len(out[6])} samples from {out[4]:.3f} to {out[5]:.3f}")

    def _diagnostics(self, cmd: Command, now: float) -> Outcome:
        try:
            settings: Any = redacted(config_file.read_raw(self.cfg.path))
        except ConfigError as e:
            settings = str(e)
        return Outcome("executed", "", {"status": self.status(), "config": settings,
                                        "alarms": list(self.recent_alarms), "log": list(self.recent_log.lines)})

    def _restart_agent(self, cmd: Command, now: float) -> Outcome:
        self.restart()
        return Outcome("executed", "restarting")

    def _set_config(self, cmd: Command, now: float) -> Outcome | None:
        """Validate the patched file, mark the trial, put the file in place, restart: the
        agent that comes up judges the trial (agent/commands/stage.py)."""
        path = self.cfg.path
        try:
            text = self._patched(cmd.args["patch"])
            trial.begin(path, cmd.id, hashlib.sha256(text).hexdigest())
            config_file.install_config(path, text)
        except ConfigError as e:
            trial.end(path)
            return Outcome("failed", f"not applied: {e}")
        log.warning("command %s: new configuration in place; restarting on trial for %g s", cmd.id,
                    self.cfg.commands.config_trial_s)
        self.restart()
        return None

    def _patched(self, patch: dict[str, Any]) -> bytes:
        """The configuration file with ``patch`` merged in, checked against the schema."""
        path = self.cfg.path
        return config_file.render_config(path, config_file.merged(config_file.read_raw(path), patch))

    ACTIONS: ClassVar[dict[str, Action]] = {
        "ping": _ping,
        "lock": _lock,
        "unlock": _lock,
        "set_speed_limit": _speed_limit,
        "snapshot": _snapshot,
        "diagnostics": _diagnostics,
        "restart_agent": _restart_agent,
        "set_reporting": _set_reporting,
        "set_config": _set_config,
    }
