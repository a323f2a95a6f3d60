"""Wires the data path and drives it: one thread, one selector, one turn at a time.

A turn (``Runtime.step``) runs the stages in the order the data flows:

    read      sources' ready bytes -> feed (agent/feed.py): one kernel call per read
    close     feeds' ticks and the kernel's due windows -> recorder (agent/store/recorder.py)
    commit    recorder -> outbox, in groups; alarms and command results at once
    send      pump (agent/uplink/pump.py): acks in, leased batches out
    commands  uplink's cmd queue -> command stage (agent/commands/): verify, journal, act

and beside them the technicians' control socket, served from the same selector. The
uplink deletes rows once the cloud (or, with ack = "broker", the broker) has them.
"""

from __future__ import annotations

import base64
import logging
import os
import selectors
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import __version__, config, update, wire
from agent.commands.actions import VehicleActions
from agent.commands.stage import CommandStage
from agent.config import Config
from agent.control.server import ControlServer
from agent.diagnostics import Diagnostics
from agent.errors import AgentError
from agent.feed import make_feed, make_kernel, one_dbc
from agent.fusion import motion
from agent.fusion.kernel import BUILD
from agent.fusion.spec import A_STORAGE_FAILED, ALARM_NAMES, REFUSAL_NAMES
from agent.notify import Notifier
from agent.power import open_input
from agent.signals import BY_ID
from agent.sources import make_source
from agent.store.lock import OutboxLock
from agent.store.memory import Storage
from agent.store.outbox import LANE_ALARM
from agent.store.recorder import Recorder
from agent.uplink.budget import Budget
from agent.uplink.mqtt import Uplink
from agent.uplink.pump import Pump

log = logging.getLogger(__name__)

TICK = 0.1
# From SIGTERM to exit: the outbox committed, what can be sent sent, the last state
# published, within STOP_WITHIN (systemd's TimeoutStopSec and a power-loss input's hold-up
# time leave little more); STATE_RESERVE of it is kept for the last state message.
STOP_WITHIN = 1.5
STATE_RESERVE = 0.5
# While data streams in, a turn of the loop lasts at least MIN_BUSY_TURN: each read then
# brings a few ms of frames for one kernel call, instead of a turn per burst of bytes
# (the loop's own cost, not the decoding, is what a saturated bus makes expensive).
# Well inside what a tty buffers (4 KiB is 18 ms of a saturated bus as SLCAN text;
# 10 ms of a 115200-baud UART is 115 bytes). On a slower stream the turn grows, up to
# MAX_BUSY_TURN, while the busiest source's bytes in one turn stay within READ_AHEAD
# (a quarter of a tty's buffer): a commute's 64 CAN frames/s then cost 20 turns a
# second, not 60 (the loop's cost per turn is most of what a commute costs).
MIN_BUSY_TURN = 0.01
MAX_BUSY_TURN = 0.05
READ_AHEAD = 1024
# With this set to 1, SIGUSR2 hangs the main loop (Runtime._stall): tests prove that a hung
# loop stops the watchdog pings. Unset, SIGUSR2 keeps its default action.
TEST_HOOKS = "EBIKE_AGENT_TEST_HOOKS"


def busy_turn(bytes_per_s: float) -> float:
    """How long a busy turn lasts when the busiest source streams ``bytes_per_s``."""
    if bytes_per_s <= 0:
        return MAX_BUSY_TURN
    return min(MAX_BUSY_TURN, max(MIN_BUSY_TURN, READ_AHEAD / bytes_per_s))


class Runtime:
    """The agent: builds the stages, turns the loop, and stops them in order."""

    def __init__(self, cfg: Config) -> None:
        # Before any port, socket or file: a second agent on this outbox stops here.
        self.lock = OutboxLock(cfg.outbox.path)
        self.cfg = cfg
        self.power = open_input(cfg.power, cfg.path)
        self.started = time.time()
        self.boot_id = uuid.uuid4().hex
        self.stopping = False
        self.restart = False  # with stopping: ``ebike-agent run`` starts the agent again
        self.busy = False
        self.busy_turn = MIN_BUSY_TURN
        self.rate_mark = (time.monotonic(), 0)
        self.frame_rate = 0.0
        self.dbc = one_dbc(cfg)
        self.kernel = make_kernel(cfg, self.dbc)
        self.outbox = Storage(cfg.outbox.path, int(cfg.outbox.quota_mb * 1024 * 1024),
                              gap_body=lambda runs, why: wire.gap_record(runs, why, time.time()))
        self.storage_failed = bool(self.outbox.failed)
        self.kernel.set_condition(A_STORAGE_FAILED, float(self.storage_failed))
        self.recorder = Recorder(cfg, self.kernel, self.outbox, self.dbc.decimals() if self.dbc else None)
        self._report_rollback()
        self.uplink = Uplink(cfg.device_id, cfg.broker, cfg.topic_prefix,
                             birth=self._state(True), death=self._state(False), commands=cfg.commands.enabled,
                             ack_keys=dict(cfg.commands.ack_keys), revoked=cfg.commands.revoked)
        self.pump = Pump(self.outbox, self.uplink, cfg.device_id, cfg.broker)
        self.budget = self._budget()
        self.sources = [make_source(s) for s in cfg.sources]
        self.read_bytes = [0] * len(self.sources)  # per source since the last _rate
        self.feeds = [make_feed(c, s, i, self.kernel) for i, (c, s) in enumerate(zip(cfg.sources, self.sources,
                                                                                           strict=True))]
        self.selector = selectors.DefaultSelector()
        self.diagnostics = Diagnostics(cfg, self.sources, self.feeds, self.kernel, self.dbc)
        self.control = ControlServer(cfg.control_socket, {
            "status": lambda r: {"status": self.status()}, "live": self._live, "alarms": self._alarms,
            "tap": self.diagnostics.take, "sync": self._sync, "purge": self._purge, "reload": self._reload,
            "log": lambda r: {"lines": list(self.actions.recent_log.lines)},
            "recent": lambda r: {"records": [[lane, t, base64.b64encode(body).decode()]
                                             for lane, t, body in self.recorder.recent]}})
        self.actions = VehicleActions(cfg, self.sources, self.kernel, status=self.status, record=self.recorder.add,
                                      recent_alarms=self.recorder.recent_alarms, restart=self._restart)
        self.commands = CommandStage(cfg, self.uplink, self.actions, keep=self.recorder.result)
        self.commands.start(self.outbox.failed)
        self.notifier = Notifier()

    def _budget(self) -> Budget:
        """The data budget: it counts what the uplink sends and what the recorder stores,
        its count kept with the kernel's counters, its level merging the recorder's windows
        and, last, switching its raw lane off."""
        budget = Budget(self.cfg.uplink.budget_mb_per_month, self.cfg.broker.keepalive,
                        self.cfg.broker.ack == "cloud", len(self.uplink.topic_ack.encode()),
                        coarsen=self.recorder.coarsen, set_raw_enabled=self.recorder.set_raw_enabled)
        self.recorder.on_stored = budget.stored
        self.recorder.more_state = budget.state
        self.uplink.budget = budget
        budget.start(self.recorder.saved_state, time.time())
        return budget

    def _report_rollback(self) -> None:
        """A rolled-back upgrade (packaging/update-guard's note) goes to the cloud as an
        alarm-lane record: committed first, the note removed after (kept while the outbox
        is in memory only, so a power cut cannot lose the report)."""
        note = update.failed_update(self.cfg.outbox.path, __version__)
        if note is None:
            return
        self.outbox.append([(LANE_ALARM, *note)])
        if not self.storage_failed:
            update.reported(self.cfg.outbox.path)

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run until SIGTERM/SIGINT (or ``until()``), then flush and drain what can be sent."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if os.environ.get(TEST_HOOKS) == "1":
            signal.signal(signal.SIGUSR2, self._stall)
        self.control.start(self.selector)
        self.power.register(self.selector)
        self.uplink.start()
        log.info("agent %s up: kernel %s, %d sources", self.cfg.device_id, BUILD, len(self.sources))
        try:
            while not self.stopping and not until():
                started = time.monotonic()
                self.busy = False
                self.step(TICK)
                if self.power.lost(time.monotonic()):
                    self.stopping = True
                # The first turn has tried every source: the start is done.
                self.notifier.ready_now(self.summary)
                self.notifier.alive(self.summary)
                rest = self.busy_turn - (time.monotonic() - started)
                if self.busy and rest > 0:
                    time.sleep(rest)
        finally:
            self.shutdown()

    def step(self, timeout: float) -> None:
        """One turn: read what is ready, close windows, commit, send, take commands."""
        for key, _ in self.selector.select(self._open_sources(timeout)):
            if key.data == "control":
                self.control.handle(key.fileobj)
            elif key.data is self.power:
                self.power.read()
            else:
                self._read(key.data, key.fd)
        now = time.time()
        for src, feed in zip(self.sources, self.feeds, strict=True):
            self.recorder.add(feed.tick(src, now), now)
        self.recorder.add(self.kernel.close_due(now), now)
        self.recorder.commit()
        self._watch_storage()
        self.pump.turn()
        self.budget.idle(now, self.uplink.connected)
        self.budget.step(now)
        self.commands.step(time.time())
        self.recorder.commit()  # the commands' results go out this turn
        self.recorder.save_state_when_due()
        self._rate()

    def _open_sources(self, timeout: float) -> float:
        """(Re)open what is closed; the select timeout, cut short by a replay's next line."""
        for i, src in enumerate(self.sources):
            if not src.is_open and src.poll_open():
                self.selector.register(src.fileno(), selectors.EVENT_READ, i)
            due = src.next_due() if src.is_open else None
            if due is not None:
                timeout = min(timeout, max(0.0, due - time.monotonic()))
        return timeout

    def _read(self, i: int, fd: int) -> None:
        src = self.sources[i]
        data = src.read()
        if not src.is_open:
            self.selector.unregister(fd)
        if data:
            self.busy = True
            self.read_bytes[i] += len(data)
            now = time.time()
            self.diagnostics.read(i, now, data)
            self.recorder.add(self.feeds[i].feed(data, now, src), now)

    def _watch_storage(self) -> None:
        """``storage_failed`` follows the outbox; back on the file, commands resume."""
        if self.outbox.retry():
            self.commands.start(self.outbox.failed)
        failed = bool(self.outbox.failed)
        if failed != self.storage_failed:
            self.storage_failed = failed
            self.kernel.set_condition(A_STORAGE_FAILED, float(failed))
            if failed:
                self.commands.stop(self.outbox.failed)

    def _rate(self) -> None:
        mono = time.monotonic()
        mark_t, mark_frames = self.rate_mark
        if mono - mark_t >= 1.0:
            frames = self.kernel.frames + sum(f.frames_outside_kernel() for f in self.feeds)
            self.frame_rate = (frames - mark_frames) / (mono - mark_t)
            self.busy_turn = busy_turn(max(self.read_bytes, default=0) / (mono - mark_t))
            self.read_bytes = [0] * len(self.sources)
            self.rate_mark = (mono, frames)
            self.diagnostics.tick(mono, self.uplink.window.records_acked)

    def _restart(self) -> None:
        """Stop the loop; ``ebike-agent run`` then starts the agent again."""
        self.restart = self.stopping = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _stall(self, signum: int, frame: Any) -> None:
        """The test hook (TEST_HOOKS): the main loop hangs here, the process alive, until
        SIGTERM or SIGINT; the uplink's network thread goes on."""
        log.warning("test hook: the main loop is stalled (SIGUSR2) until SIGTERM")
        while not self.stopping:
            time.sleep(0.05)

    def _state(self, online: bool) -> bytes:
        """The retained birth / last-will message on ``state``."""
        return wire.state_message(online, self.boot_id, __version__, BUILD)

    def shutdown(self) -> None:
        """Stop every stage, downstream of the data last, so what is in flight lands:

        ====  ===========================  ==============================================
        step  stage                        what it flushes or releases
        ====  ===========================  ==============================================
        1     kernel -> recorder           the open windows (``kernel.flush``) as records
        2     recorder -> outbox           every pending record, committed; the kernel's
                                           counters saved
        3     pump -> uplink               sending while connected, then the ``state``
                                           offline message: all within STOP_WITHIN
        4     sources, power-loss input    ports, buses and logs closed; the input's
                                           file descriptor or GPIO line released
        5     control socket               closed, its file removed
        6     outbox, command journal      their SQLite connections closed
        7     outbox lock                  released last: no other agent before this one
                                           is done with the file
        8     recent log                   the diagnostics log handler removed
        9     service manager              its socket closed (STOPPING=1 was sent first)
        ====  ===========================  ==============================================
        """
        deadline = time.monotonic() + STOP_WITHIN
        self.notifier.stopping(f"stopping: committing {len(self.recorder.pending)} pending records")
        now = time.time()
        self.recorder.add(self.kernel.flush(), now)
        self.recorder.flush()
        self.recorder.commit(force=True)
        self.budget.snapshot(time.time())
        self.recorder.save_state()
        self.pump.drain(max(0.0, deadline - STATE_RESERVE - time.monotonic()))
        self.uplink.stop(self._state(False), timeout=max(0.1, deadline - time.monotonic()))
        for src in self.sources:
            src.close()
        self.power.close()
        self.control.close()
        self.outbox.close()
        self.commands.close()
        self.lock.close()
        log.info("agent stopped: %d records committed%s", self.recorder.records,
                 "; restarting" if self.restart else "")
        self.actions.close()
        self.notifier.close()

    def summary(self) -> str:
        """One line for ``systemctl status`` (STATUS=): rate, sources, backlog, broker."""
        sources = ", ".join(f"{s.name} {'up' if s.is_open else 'DOWN'}" for s in self.sources)
        records = self.outbox.stats()["records"]
        broker = "broker connected" if self.uplink.connected else "broker NOT connected"
        memory = "; OUTBOX IN MEMORY ONLY" if self.storage_failed else ""
        return f"{self.frame_rate:.0f} frames/s; {sources}; {records} records waiting; {broker}{memory}"

    def status(self) -> dict[str, Any]:
        """What ``ebike-agent status`` shows and the diagnostics bundle carries (docs/control.md)."""
        now = time.time()
        still_s = self.actions.stationary_for(now)
        diag = self.diagnostics
        outbox = self.outbox.stats()
        return {
            "device_id": self.cfg.device_id, "version": __version__, "kernel": BUILD, "pid": os.getpid(),
            "started_at": self.started, "uptime": now - self.started, "frames_per_s": self.frame_rate,
            "records_committed": self.recorder.records, "records_pending": len(self.recorder.pending),
            "fusion": self.kernel.counters(), "alarms": self._active_alarms(), "health": diag.health(now),
            "sources": [dict(s.status(), protocol=c.protocol, decode=f.status(), refused=self._refused(i), **more)
                        for i, (c, s, f, more) in enumerate(zip(self.cfg.sources, self.sources, self.feeds,
                                                                diag.sources_status(now, now - self.started),
                                                                strict=True))],
            "motion": motion.to_json(self.actions.motion, still_s),
            "outbox": outbox, "uplink": dict(self.uplink.status(), **diag.drain(outbox["records"])),
            "clock": diag.clock(), "commands": self.commands.status(still_s), "budget": self.budget.status(now),
            "raw": self.recorder.raw_status(),
        }

    def _active_alarms(self) -> list[dict[str, Any]]:
        names = [c.name for c in self.cfg.sources]
        return [{"name": ALARM_NAMES[code], "code": code, "level": level, "since": since, "value": value,
                 "source": names[inst] if inst >= 0 else None}
                for code, inst, level, since, value in self.kernel.alarms()]

    def _live(self, request: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        return {"live": dict(self.diagnostics.live(now), alarms=self._active_alarms(),
                             motion=motion.to_json(self.actions.motion, self.actions.stationary_for(now)))}

    def _alarms(self, request: dict[str, Any]) -> dict[str, Any]:
        names = [c.name for c in self.cfg.sources]
        recent = [dict(r, source=names[r["instance"]] if r["instance"] >= 0 else None)
                  for r in self.recorder.recent_alarms]
        return {"active": self._active_alarms(), "recent": recent}

    def _sync(self, request: dict[str, Any]) -> dict[str, Any]:
        """Everything pending committed now, and the broker tried again soon."""
        self.recorder.commit(force=True)
        self.uplink.retry_soon()
        return {"outbox": self.outbox.stats(), "uplink": self.uplink.status()}

    def _purge(self, request: dict[str, Any]) -> dict[str, Any]:
        lane = request.get("lane")
        if not isinstance(lane, str):
            raise AgentError("purge: name the lane (live, history, event, alarm)")
        self.recorder.commit(force=True)
        return {"purged": self.outbox.purge(lane)}

    def _reload(self, request: dict[str, Any]) -> dict[str, Any]:
        """Restart on the configuration file, once it is known to load: a file that
        would not would leave the vehicle without its agent."""
        config.load(self.cfg.path)
        self._restart()
        return {"reloading": True}

    def _refused(self, source: int) -> dict[str, dict[str, int]]:
        """Values of a source refused (out of range, or too fast), by signal and reason."""
        out = {}
        for sid, by_range, by_rate in self.kernel.refusals(source):
            name = self.dbc.signal_name(sid) if self.dbc is not None else BY_ID[sid].name
            out[name] = {reason: n for reason, n in zip(REFUSAL_NAMES, (by_range, by_rate), strict=True) if n}
        return out

