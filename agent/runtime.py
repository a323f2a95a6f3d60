"""Wires the data path: sources -> decode -> fusion kernel -> outbox -> uplink.

One thread runs it all around a selector: a read of a port is parsed into a batch
and handed to the kernel in one call; closed windows become records, committed to
the outbox in groups; the uplink leases rows and deletes them once the cloud (or, with
ack = "broker", the broker) has acknowledged them.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import selectors
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent import config as config_file
from agent.config import CAN_KINDS, REPORT_MODES, Config, SourceConfig
from agent.control import trial
from agent.control.executor import Executor, Outcome
from agent.control.server import ControlServer
from agent.dbc.compile import CompiledDbc, compile_isolated, profile_path
from agent.errors import ConfigError, DecodeError, SourceError, SourceUnavailableError, StoreError
from agent.fusion import motion
from agent.fusion._kernel_py import (
    A_STORAGE_FAILED,
    ALARM_NAMES,
    MOTION_STILL,
    OUT_ALARM,
    OUT_CHANGE,
    OUT_SNAPSHOT,
    OUT_WINDOW,
    PERSISTENT,
    REFUSAL_NAMES,
    WIN_LIVE,
)
from agent.fusion.kernel import BUILD, Kernel
from agent.protocols import bafang, jbd, kt, protocol
from agent.signals import BY_ID, BY_NAME, ID_SPACE, limits
from agent.sources import make_source
from agent.sources.base import Source
from agent.sources.candump import line_time
from agent.store.lock import OutboxLock
from agent.store.memory import Storage
from agent.store.outbox import LANE_ALARM, LANE_EVENT, LANE_HISTORY, LANE_LIVE, Outbox
from agent.uplink import wire
from agent.uplink.commands import Command, ReplayCache
from agent.uplink.mqtt import Uplink

log = logging.getLogger(__name__)

MAX_TEXT_LINE = 4096
# After this long without bytes, a framer waiting on a false start's length gives up.
QUIET_LINE = 0.2
TICK = 0.1
DRAIN_TIMEOUT = 5.0
# While data streams in, a turn of the loop lasts at least this long: each read then
# brings a few ms of frames for one kernel call, instead of a turn per burst of bytes
# (the loop's own cost, not the decoding, is what a saturated bus makes expensive).
# Well inside what a tty buffers (4 KiB is 18 ms of a saturated bus as SLCAN text;
# 10 ms of a 115200-baud UART is 115 bytes).
MIN_BUSY_TURN = 0.01
# How often the kernel's counters (trip, energy, SoH) are saved; a power cut loses at
# most this much of them.
STATE_SAVE_S = 10.0
# Commands verified per turn of the loop (each costs a signature check and an fsync).
COMMANDS_PER_TURN = 16
# How often the interlock looks at the vehicle's speed while commands wait.
STILL_CHECK = 0.1
# Log lines and alarm events a diagnostics bundle carries.
RECENT_LOG_LINES = 200
RECENT_ALARMS = 50
SECRET_KEYS = ("password",)


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


def dbc_for(protocol: str) -> str:
    """The DBC behind a CAN protocol name: ``bafang-can`` or ``dbc:<path>``."""
    return profile_path("bafang" if protocol == "bafang-can" else protocol[len("dbc:"):])


class UartHandler:
    """A UART protocol stream (NMEA, JBD, Daly, Ninebot, KT, Sur-Ron): framer, decoder,
    catalogue samples into the kernel; polled protocols also get their requests sent."""

    def __init__(self, cfg: SourceConfig, slot: int) -> None:
        self.proto = protocol(cfg.protocol)
        self.framer = self.proto.framer()
        self.poller = self.proto.poller(cfg.poll_interval, cfg.poll_timeout) if cfg.poll_interval > 0 else None
        self.slot = slot
        self.ok = 0
        self.not_understood = 0
        self.bad: dict[str, int] = {}
        self.checksum_errors = 0
        self.last_data = time.monotonic()

    def feed(self, data: bytes, now: float, kernel: Any) -> list[Any]:
        self.last_data = time.monotonic()
        return self._frames(self.framer.feed(data), now, kernel)

    def _frames(self, frames: list[bytes], now: float, kernel: Any) -> list[Any]:
        ids: list[int] = []
        values: list[float] = []
        good = 0
        for frame in frames:
            if self.poller is not None:
                self.poller.answered(frame)
            if not self.proto.understood(frame):
                self.not_understood += 1
                continue
            try:
                decoded = self.proto.decode(frame)
            except DecodeError as e:
                reason = e.reason.split(":")[0]
                self.bad[reason] = self.bad.get(reason, 0) + 1
                continue
            self.ok += 1
            good += 1
            for name, value in decoded.items():
                ids.append(BY_NAME[name].id)
                values.append(value)
        # The source's health slot: good frames, and the framer's checksum refusals.
        kernel.note_frames(self.slot, [now] * good)
        checksum = self.framer.bad.get("checksum", 0)
        if checksum != self.checksum_errors:
            kernel.note_errors(self.slot, checksum - self.checksum_errors, 0)
            self.checksum_errors = checksum
        return kernel.feed_values(ids, [now] * len(ids), values)  # type: ignore[no-any-return]

    def tick(self, source: Source, now: float, kernel: Any) -> list[Any]:
        """A quiet line gives up a false start held in the framer; a due poll is sent."""
        mono = time.monotonic()
        closed: list[Any] = []
        flush = getattr(self.framer, "flush", None)
        if flush is not None and self.framer.pending and mono - self.last_data >= QUIET_LINE:
            closed = self._frames(flush(), now, kernel)
        if self.poller is not None and source.is_open:
            request = self.poller.due(mono)
            if request is not None:
                try:
                    source.write(request)
                except SourceUnavailableError as e:
                    log.warning("source %s: poll not sent: %s", source.name, e)
        return closed

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.proto.name, "frames": self.ok, "not_understood": self.not_understood,
                               "bad_frames": dict(self.framer.bad), "bad_content": dict(self.bad),
                               "garbage_bytes": self.framer.garbage_bytes}
        if self.poller is not None:
            out["poll"] = self.poller.stats()
        return out


class CanTextHandler:
    """SLCAN or candump text straight into the kernel, one call per read; the kernel
    parses the complete lines and the handler keeps the unfinished one."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.tail = b""
        self.overlong = 0
        self.t_offset: float | None = None
        self.log_pass = 0
        self.last_line_time: float | None = None

    def feed(self, data: bytes, now: float, kernel: Any, log_pass: int = 0) -> list[Any]:
        """``log_pass`` counts the passes of a looped log (a read never mixes two)."""
        buf = self.tail + data
        if self.fmt == "slcan":
            consumed, closed = kernel.feed_slcan(buf, now)
        else:
            first = line_time(buf)
            if self.t_offset is None:
                # A replayed log keeps its own timing, shifted so its first line is now.
                self.t_offset = now - (first or now)
            elif log_pass != self.log_pass and first is not None and self.last_line_time is not None:
                # The log starts over: its timestamps go back; carry on where the last pass ended.
                self.t_offset += self.last_line_time - first
            self.log_pass = log_pass
            self.last_line_time = line_time(buf[buf.rfind(b"\n", 0, len(buf) - 1) + 1:]) or self.last_line_time
            consumed, closed = kernel.feed_candump(buf, self.t_offset)
        self.tail = buf[consumed:]
        if len(self.tail) > MAX_TEXT_LINE:
            self.overlong += 1
            self.tail = b""
        return closed  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return {"format": self.fmt, "overlong_lines": self.overlong}


class PackedHandler:
    """SocketCAN / python-can ``struct can_frame`` records into the kernel, one call per read."""

    def feed(self, data: bytes, now: float, kernel: Any) -> list[Any]:
        return kernel.feed_packed(data, now)  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return {"format": "packed"}


Handler = UartHandler | CanTextHandler | PackedHandler


def _handler(cfg: SourceConfig, source: Source, index: int, kernel: Any) -> Handler:
    """The source's decode path; CAN messages count towards the health of the source
    (the kernel's tables are shared), a UART source gets a health slot of its own."""
    if source.frame_format in ("slcan", "candump", "packed"):
        kernel.set_can_source(index)
        return CanTextHandler(source.frame_format) if source.frame_format != "packed" else PackedHandler()
    return UartHandler(cfg, kernel.health_slot(index))


def make_kernel(cfg: Config, dbc: CompiledDbc | None) -> Any:
    """The fusion kernel as the configuration sets it up: windows, tunables, alarms,
    reporting policy, CAN tables."""
    kernel = Kernel(dbc.id_space if dbc else ID_SPACE, cfg.windows.live, cfg.windows.history,
                    cfg.windows.ring_samples)
    kernel.set_params(cfg.fusion)
    kernel.set_limits(*limits(kernel.id_space))
    kernel.set_alarms(cfg.alarms)
    for sid, mode, deadband in cfg.reporting:
        kernel.set_policy(sid, mode, deadband)
    if dbc is not None:
        kernel.set_can_tables(*dbc.kernel_tables())
    return kernel


def _one_dbc(cfg: Config) -> CompiledDbc | None:
    """The kernel holds one set of CAN tables: every CAN source must share its DBC."""
    paths = {dbc_for(s.protocol) for s in cfg.sources if s.kind in CAN_KINDS}
    if len(paths) > 1:
        raise ConfigError(cfg.path, "sources", "all CAN sources must use the same DBC for now")
    return compile_isolated(paths.pop()) if paths else None


def send_batches(outbox: Outbox | Storage, uplink: Uplink, device_id: str, max_records: int,
                 newest_live_first: bool = False, deflate: bool = False) -> None:
    """Fill the uplink's window with batches leased from the outbox, each sized to what the
    broker takes; rows of a batch paho refuses go back to the outbox."""
    first = newest_live_first
    while uplink.can_send():
        batch = outbox.lease(max_records, uplink.batch_bytes() - wire.batch_overhead(device_id),
                             newest_live_first=first, overhead=wire.RECORD_OVERHEAD)
        first = False
        if not batch:
            return
        seqs = [seq for seq, _ in batch]
        if not uplink.publish(seqs, wire.encode_batch(device_id, batch, deflate)):
            outbox.release(seqs)
            return


class Runtime:
    """The agent: owns every part of the path and the loop that drives them."""

    def __init__(self, cfg: Config) -> None:
        # Before any port, socket or file: a second agent on this outbox stops here.
        self.lock = OutboxLock(cfg.outbox.path)
        self.cfg = cfg
        self.started = time.time()
        self.boot_id = uuid.uuid4().hex
        self.dbc = _one_dbc(cfg)
        self.kernel = make_kernel(cfg, self.dbc)
        self.outbox = Storage(cfg.outbox.path, int(cfg.outbox.quota_mb * 1024 * 1024),
                              gap_body=lambda runs, why: wire.gap_record(runs, why, time.time()))
        self.storage_failed = bool(self.outbox.failed)
        self.kernel.set_condition(A_STORAGE_FAILED, float(self.storage_failed))
        self.saved_state: list[float] = []
        self._restore_kernel_state()
        self.state_saved = time.monotonic()
        self.uplink = Uplink(cfg.device_id, cfg.broker, cfg.topic_prefix,
                             birth=self._state(True), death=self._state(False), commands=cfg.commands.enabled,
                             ack_keys=dict(cfg.commands.ack_keys), revoked=cfg.commands.revoked)
        self.sources = [make_source(s) for s in cfg.sources]
        self.handlers = [_handler(c, s, i, self.kernel)
                         for i, (c, s) in enumerate(zip(cfg.sources, self.sources, strict=True))]
        self.selector = selectors.DefaultSelector()
        self.control = ControlServer(cfg.control_socket, self.status)
        self.pending: list[tuple[int, float, bytes]] = []
        self.urgent = False
        self.busy = False
        self.last_commit = time.monotonic()
        self.records = 0
        self.leased_since_connect = 0
        self.stopping = False
        self.rate_mark = (time.monotonic(), 0)
        self.frame_rate = 0.0
        self.restart = False
        self.recent_log = RecentLog(RECENT_LOG_LINES)
        self.recent_alarms: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_ALARMS)
        logging.getLogger().addHandler(self.recent_log)
        self.speed: float | None = None
        self.motion: tuple[Any, ...] = ()
        self.still_since: float | None = None
        self.still_checked = -STILL_CHECK
        self.trial: tuple[Command, float] | None = None
        self.replay: ReplayCache | None = None
        self.executor: Executor | None = None
        self._start_commands()

    def _start_commands(self) -> None:
        """The replay cache and the command journal live in the outbox's file: while it
        cannot be written, no command is taken (each waits, unacknowledged, in the broker's
        session), since none could be kept from running twice."""
        if not self.cfg.commands.enabled or self.executor is not None:
            return
        if self.outbox.failed:
            log.error("commands are not taken while the outbox cannot be written (%s)", self.outbox.failed)
            return
        try:
            self.replay = ReplayCache(self.cfg.outbox.path)
        except StoreError as e:
            log.error("commands are not taken: %s", e)
            return
        self.executor = Executor(self.cfg.commands, self.cfg.device_id, self.replay, self, self._result)
        for cmd in self.executor.resume(time.time()):
            self._resume_trial(cmd)

    def _stop_commands(self, why: str) -> None:
        log.error("commands are not taken until the command journal can be written again: %s", why)
        self.executor = None
        if self.replay is not None:
            self.replay.close()
            self.replay = None

    def _watch_storage(self) -> None:
        """``storage_failed`` follows the outbox; back on the file, commands resume."""
        if self.outbox.retry():
            self._start_commands()
        failed = bool(self.outbox.failed)
        if failed != self.storage_failed:
            self.storage_failed = failed
            self.kernel.set_condition(A_STORAGE_FAILED, float(failed))
            if failed:
                self._stop_commands(self.outbox.failed)

    def _restore_kernel_state(self) -> None:
        """Trip, energy counters and the measured SoH carry on across restarts."""
        saved = self.outbox.load_state()
        if not saved:
            return
        try:
            self.kernel.restore([saved[name] for name in PERSISTENT])
            self.saved_state = list(self.kernel.persistent())
        except (KeyError, ValueError) as e:
            log.warning("kernel state in %s not restored, counting from zero: %s", self.cfg.outbox.path, e)
            return
        log.info("kernel state restored: trip %.3f km, energy out %.1f Wh", saved["trip_km"], saved["energy_out_wh"])

    def _save_kernel_state(self) -> None:
        """Only when something moved: a parked vehicle costs no fsync every STATE_SAVE_S."""
        self.state_saved = time.monotonic()
        values = list(self.kernel.persistent())
        if values != self.saved_state and self.outbox.save_state(dict(zip(PERSISTENT, values, strict=True))):
            self.saved_state = values

    def _state(self, online: bool) -> bytes:
        return wire.state_message(online, self.boot_id, __version__, BUILD)

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run until SIGTERM/SIGINT (or ``until()``), then flush and drain what can be sent."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.control.start(self.selector)
        self.uplink.start()
        log.info("agent %s up: kernel %s, %d sources", self.cfg.device_id, BUILD, len(self.sources))
        try:
            while not self.stopping and not until():
                started = time.monotonic()
                self.busy = False
                self.step(TICK)
                rest = MIN_BUSY_TURN - (time.monotonic() - started)
                if self.busy and rest > 0:
                    time.sleep(rest)
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def step(self, timeout: float) -> None:
        """One turn: (re)open sources, read what is ready, close windows, commit, send."""
        for i, src in enumerate(self.sources):
            if not src.is_open and src.poll_open():
                self.selector.register(src.fileno(), selectors.EVENT_READ, i)
            due = src.next_due() if src.is_open else None
            if due is not None:
                timeout = min(timeout, max(0.0, due - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            if key.data == "control":
                self.control.handle(key.fileobj)
                continue
            self._read(key.data, key.fd)
        now = time.time()
        for i, (src, handler) in enumerate(zip(self.sources, self.handlers, strict=True)):
            if isinstance(handler, UartHandler):
                self.kernel.source = i
                self._records(handler.tick(src, now, self.kernel), now)
        self._records(self.kernel.close_due(now), now)
        self._commit(force=self.urgent)
        self._watch_storage()
        self._send()
        self._commands(time.time())
        if time.monotonic() - self.state_saved >= STATE_SAVE_S:
            self._save_kernel_state()
        self._rate()

    def _read(self, i: int, fd: int) -> None:
        src = self.sources[i]
        data = src.read()
        if not src.is_open:
            self.selector.unregister(fd)
        if data:
            self.busy = True
            now = time.time()
            handler = self.handlers[i]
            self.kernel.source = i
            if isinstance(handler, CanTextHandler):
                closed = handler.feed(data, now, self.kernel, getattr(src, "read_pass", 0))
            else:
                closed = handler.feed(data, now, self.kernel)
            self._records(closed, now)

    def _records(self, outputs: list[Any], now: float) -> None:
        """Kernel outputs become outbox records in their lanes; an alarm makes the next
        commit immediate (alarms are never left in the group-commit window)."""
        changes = []
        for out in outputs:
            kind = out[0]
            if kind == OUT_WINDOW:
                _, which, start, length, rows = out
                lane = LANE_LIVE if which == WIN_LIVE else LANE_HISTORY
                self.pending.append((lane, start, wire.window_record(start, length, rows)))
            elif kind == OUT_CHANGE:
                changes.append(out[1:])
            elif kind == OUT_ALARM:
                _, t, code, inst, level, raised, value, thr = out
                name = ALARM_NAMES[code]
                log.warning("alarm %s%s level %d %s: value %g, threshold %g", name,
                            f" (source {self.cfg.sources[inst].name})" if inst >= 0 else "", level,
                            "raised" if raised else "cleared", value, thr)
                self.pending.append((LANE_ALARM, t, wire.alarm_record(t, code, name, inst, level, bool(raised),
                                                                        value, thr)))
                self.recent_alarms.append({"t": t, "name": name, "instance": inst, "level": level,
                                           "raised": bool(raised), "value": value, "threshold": thr})
                self.urgent = True
            elif kind == OUT_SNAPSHOT:
                _, t, code, inst, start, end, ids, times, values = out
                log.info("event snapshot for alarm %s: %d samples", ALARM_NAMES.get(code, "request"), len(ids))
                for body in wire.snapshot_records(t, code, inst, start, end, ids, times, values):
                    self.pending.append((LANE_EVENT, t, body))
        if changes:
            self.pending.append((LANE_LIVE, now, wire.change_record(changes)))

    def _commit(self, force: bool) -> None:
        mono = time.monotonic()
        if self.pending and (force or mono - self.last_commit >= self.cfg.outbox.commit_interval):
            self.records += len(self.outbox.append(self.pending))
            self.pending = []
            self.urgent = False
            self.last_commit = mono

    def _send(self) -> None:
        acked, failed = self.uplink.poll()
        self.outbox.ack(acked)
        self.outbox.release(failed)
        # The first batch after each (re)connect: alarms and the vehicle as it is now.
        fresh = self.uplink.connects != self.leased_since_connect
        self.leased_since_connect = self.uplink.connects
        send_batches(self.outbox, self.uplink, self.cfg.device_id, self.cfg.broker.max_batch_records, fresh,
                     self.cfg.broker.deflate)

    # -- commands ------------------------------------------------------------------

    def _commands(self, now: float) -> None:
        """Commands received, what waits on the interlock, and a configuration on trial."""
        if self.executor is None:
            return
        try:
            for envelope, token in self.uplink.take_commands(COMMANDS_PER_TURN):
                self.executor.receive(envelope, now)
                self.uplink.command_done(token)
            if self.executor.pending:
                self.executor.step(now)
        except StoreError as e:
            self._stop_commands(str(e))
            return
        if self.trial is not None:
            self._judge_trial(now)
        if self.urgent:
            self._commit(force=True)

    def _result(self, message: bytes, now: float) -> None:
        """A command result: on ``cmd/result`` at once, and into the outbox (alarm lane,
        committed this turn) so it reaches the cloud even if that publish does not."""
        self.pending.append((LANE_ALARM, now, wire.result_record(now, message)))
        self.urgent = True
        self.uplink.publish_result(message)

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

    def act(self, cmd: Command, now: float) -> Outcome | None:
        """Run a verified command; None when it goes on across a restart (set_config)."""
        if cmd.name == "ping":
            return Outcome("executed", "pong")
        if cmd.name in ("lock", "unlock"):
            return self._lock(cmd.name == "lock")
        if cmd.name == "set_speed_limit":
            return self._speed_limit(cmd.args["kmh"])
        if cmd.name == "set_reporting":
            return self._set_reporting(cmd.args["signals"])
        if cmd.name == "snapshot":
            out = self.kernel.snapshot(now)
            self._records([out], now)
            return Outcome("executed", f"{len(out[6])} samples from {out[4]:.3f} to {out[5]:.3f}")
        if cmd.name == "diagnostics":
            return Outcome("executed", "", self._diagnostics())
        if cmd.name == "restart_agent":
            self.restart = True
            self.stopping = True
            return Outcome("executed", "restarting")
        if cmd.name == "set_config":
            return self._set_config(cmd)
        return Outcome("failed", f"no action for {cmd.name!r}")

    def _write_to(self, protocols: tuple[str, ...], what: str,
                  send: Callable[[Source], None]) -> Outcome:
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

    def _lock(self, locked: bool) -> Outcome:
        """KT controllers take the display's lock bit; a JBD pack opens its discharge switch."""
        level = self.cfg.commands.kt_assist_level

        def send(src: Source) -> None:
            if src.cfg.protocol == "jbd":
                src.write(jbd.mos_control_request(charge_off=False, discharge_off=locked))
            else:
                src.write(kt.display_frame(level, locked=locked))

        return self._write_to(("kt-lcd3", "jbd"), "lock" if locked else "unlock", send)

    def _speed_limit(self, kmh: float) -> Outcome:
        can_id, data = bafang.speed_limit_write(kmh)
        return self._write_to(("bafang-can",), "limit the speed of", lambda src: src.send_frame(can_id, data))

    def _set_reporting(self, signals: dict[str, dict[str, Any]]) -> Outcome:
        """Kept in the configuration file first (so it survives a restart), then applied."""
        try:
            text = config_file.render_config(self.cfg.path, config_file.merged(config_file.read_raw(self.cfg.path),
                                                                               {"reporting": signals}))
            config_file.install_config(self.cfg.path, text)
        except ConfigError as e:
            return Outcome("failed", str(e))
        for name, policy in signals.items():
            self.kernel.set_policy(BY_NAME[name].id, REPORT_MODES[policy["mode"]], policy["deadband"])
        return Outcome("executed", f"{len(signals)} signals")

    def _diagnostics(self) -> dict[str, Any]:
        try:
            settings: Any = redacted(config_file.read_raw(self.cfg.path))
        except ConfigError as e:
            settings = str(e)
        return {"status": self.status(), "config": settings, "alarms": list(self.recent_alarms),
                "log": list(self.recent_log.lines)}

    def _set_config(self, cmd: Command) -> Outcome | None:
        """Validate the patched file, mark the trial, put the file in place, restart: the
        agent that comes up judges the trial (``_resume_trial``)."""
        path = self.cfg.path
        try:
            text = config_file.render_config(path, config_file.merged(config_file.read_raw(path), cmd.args["patch"]))
            trial.begin(path, cmd.id, hashlib.sha256(text).hexdigest())
            config_file.install_config(path, text)
        except ConfigError as e:
            trial.end(path)
            return Outcome("failed", f"not applied: {e}")
        log.warning("command %s: new configuration in place; restarting on trial for %g s", cmd.id,
                    self.cfg.commands.config_trial_s)
        self.restart = True
        self.stopping = True
        return None

    def _resume_trial(self, cmd: Command) -> None:
        """A set_config was running when the agent (re)started: this start is its trial,
        unless the marker says it never got its file in place or could not start."""
        assert self.executor is not None
        now = time.time()
        marker = trial.read(self.cfg.path)
        if marker is not None and marker["id"] == cmd.id and marker["failed"]:
            trial.end(self.cfg.path)
            self.executor.finish(cmd, Outcome("failed", f"rolled back: {marker['failed']}"), now)
        elif marker is None or marker["id"] != cmd.id or marker["sha256"] != trial.file_hash(self.cfg.path):
            trial.end(self.cfg.path)
            self.executor.finish(cmd, Outcome("failed", "interrupted before the new configuration was in place"), now)
        else:
            self.trial = (cmd, now + self.cfg.commands.config_trial_s)

    def _judge_trial(self, now: float) -> None:
        """Healthy within config_trial_s: executed. Otherwise the previous file goes back
        and the agent restarts on it."""
        assert self.trial is not None and self.executor is not None
        cmd, deadline = self.trial
        why = self.unhealthy(now)
        if not why:
            self.trial = None
            trial.end(self.cfg.path)
            self.executor.finish(cmd, Outcome("executed", "healthy on the new configuration"), now)
        elif now >= deadline:
            self.trial = None
            log.error("command %s: new configuration not healthy after %g s (%s): rolling back", cmd.id,
                      self.cfg.commands.config_trial_s, why)
            config_file.roll_back(self.cfg.path)
            trial.end(self.cfg.path)
            self.executor.finish(cmd, Outcome("failed", f"rolled back: {why} within "
                                                        f"{self.cfg.commands.config_trial_s:g} s"), now)
            self.restart = True
            self.stopping = True

    def unhealthy(self, now: float) -> str:
        """Why the agent is not doing its job, or '': connected, and every source open and
        heard from (and not timed out)."""
        heard = {src for _slot, src, frames, _p, _n, out, _c, _k, _age in self.kernel.health(now) if frames and not out}
        for i, (c, src) in enumerate(zip(self.cfg.sources, self.sources, strict=True)):
            if not src.is_open:
                return f"source {c.name} is not open"
            if i not in heard:
                return f"no data from source {c.name}"
        return "" if self.uplink.connected else "not connected to the broker"

    def _rate(self) -> None:
        mono = time.monotonic()
        mark_t, mark_frames = self.rate_mark
        if mono - mark_t >= 1.0:
            frames = self.kernel.frames + sum(h.ok for h in self.handlers if isinstance(h, UartHandler))
            self.frame_rate = (frames - mark_frames) / (mono - mark_t)
            self.rate_mark = (mono, frames)

    def shutdown(self) -> None:
        """Close the open window, commit it, give the uplink a moment to deliver, stop."""
        now = time.time()
        self._records(self.kernel.flush(), now)
        self._commit(force=True)
        self._save_kernel_state()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and self.outbox.stats()["records"] and self.uplink.connected:
            self._send()
            time.sleep(0.02)
        self._send()
        self.uplink.stop(self._state(False))
        for src in self.sources:
            src.close()
        self.control.close()
        self.outbox.close()
        if self.replay is not None:
            self.replay.close()
        self.lock.close()
        log.info("agent stopped: %d records committed%s", self.records, "; restarting" if self.restart else "")
        logging.getLogger().removeHandler(self.recent_log)

    def _refused(self, source: int) -> dict[str, dict[str, int]]:
        """Values of a source refused (out of range, or too fast), by signal and reason."""
        out = {}
        for sid, by_range, by_rate in self.kernel.refusals(source):
            name = self.dbc.signal_name(sid) if self.dbc is not None else BY_ID[sid].name
            out[name] = {reason: n for reason, n in zip(REFUSAL_NAMES, (by_range, by_rate), strict=True) if n}
        return out

    def status(self) -> dict[str, Any]:
        now = time.time()
        still_s = self.stationary_for(now)
        return {
            "device_id": self.cfg.device_id, "version": __version__, "kernel": BUILD, "pid": os.getpid(),
            "uptime": time.time() - self.started, "frames_per_s": self.frame_rate,
            "records_committed": self.records, "records_pending": len(self.pending),
            "fusion": self.kernel.counters(),
            "alarms": [{"name": ALARM_NAMES[code], "code": code, "level": level, "since": since, "value": value,
                        "source": self.cfg.sources[inst].name if inst >= 0 else None}
                       for code, inst, level, since, value in self.kernel.alarms()],
            "health": [{"slot": slot, "source": self.cfg.sources[src].name, "frames": frames, "period_s": period,
                        "timeouts": timeouts, "timed_out": bool(out), "checksum_errors": checksum,
                        "counter_errors": counter, "age_s": age}
                       for slot, src, frames, period, timeouts, out, checksum, counter, age in self.kernel.health(now)],
            "sources": [dict(s.status(), protocol=c.protocol, decode=h.status(), refused=self._refused(i))
                        for i, (c, s, h) in enumerate(zip(self.cfg.sources, self.sources, self.handlers,
                                                          strict=True))],
            "motion": motion.to_json(self.motion, still_s),
            "outbox": self.outbox.stats(), "uplink": self.uplink.status(),
            "commands": None if self.executor is None else dict(
                self.executor.status(), speed_kmh=self.speed, stationary_s=still_s,
                config_trial=self.trial[0].id if self.trial else None),
        }
