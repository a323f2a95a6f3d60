"""The fusion kernel: the one source of truth for both builds, composed of its parts.

setup.py compiles this file and each part with Cython (types come from the ``.pxd`` of
each), so the compiled and the pure kernel cannot drift apart. They must also run under
MicroPython: no dataclasses, enum or typing here, only ``array``, ``math`` and plain
classes.

Python calls the kernel once per read of a port, with every frame of that read, in
the form the port delivers it: SLCAN text, candump text, packed ``struct can_frame``
records, already-split frames or decoded samples. The kernel parses, decodes through
the compiled DBC tables and updates preallocated arrays; every ``tick`` seconds of
sample time it runs the fusion step (derived signals, alarms, source health, event
capture). Each call hands back only what Python must act on, as the tuples
agent/fusion/spec.py describes (``OUT_*``).

A decoded value is believed only inside its signal's range and rate (``set_limits``):
one outside is not sampled, fused or reported, only counted per source, signal and
reason (``refusals``); a source that keeps sending such values raises ``data_quality``.
``motion`` is the fail-safe stationary decision that guards commands acting on the
vehicle: every fresh source able to see motion must agree that it is still.

The parts, each a module of its own (its docstring says what it owns): ``_frames_py``
parses a read, finds each frame's message, counts its arrival for the message's health
and hands it to ``_state_py``, which decodes it through the DBC tables and limits of
``_tables_py`` into the latest state, the windows and the ring; ``_speed_py`` and
``_battery_py`` derive the fused signals; ``_alarms_py`` judges the alarms and captures
events. ``Kernel`` owns one of each, runs the fusion clock and keeps the public API.
Imports agent.fusion.spec and every part.
"""

from array import array

from agent.fusion._alarms_py import new_alarms
from agent.fusion._battery_py import new_battery
from agent.fusion._frames_py import _le, new_frames, new_health
from agent.fusion._speed_py import new_speed
from agent.fusion._state_py import new_state
from agent.fusion._tables_py import new_tables
from agent.fusion.spec import (
    A_SOC_JUMP,
    A_WHEEL_IMPLAUSIBLE,
    ALARMS,
    FUSION_ID_SPACE,
    MAX_TICKS_PER_CALL,
    OCV_CURVE,
    P_CAPTURE_BEFORE,
    P_RISE_WINDOW,
    P_TICK,
    PARAMS,
    PERSISTENT,
    TEMP_HISTORY,
)


class Kernel:
    """Vehicle state, windows, fused signals, alarms and event capture, fed in batches."""

    def __init__(self, id_space, window, history=60.0, ring=1 << 17):
        if window <= 0 or history <= 0:
            raise ValueError("windows must be > 0 s")
        if id_space < FUSION_ID_SPACE:
            raise ValueError("id space must cover the catalogue ids the fusion uses")
        ratio = history / window
        if abs(ratio - round(ratio)) > 1e-9 * ratio:
            raise ValueError("the history window must be a whole number of live windows")
        if ring < 16 or ring & (ring - 1):
            raise ValueError("ring size must be a power of two >= 16")
        self.id_space = id_space
        self.window = float(window)
        self.history = float(history)
        self.params = array("d", [p[1] for p in PARAMS])
        self.tick = self.params[P_TICK]
        self.started = 0
        self.tick_index = 0
        self.next_tick = 0.0
        self.f_last = -1.0
        self.ticks = 0
        # The parts: tables, state, health slots, frame parsers, speed, battery, alarms.
        self.tb = new_tables(id_space)
        self.st = new_state(self.tb, window, history, ring, self.params)
        self.hs = new_health(self.params)
        self.fr = new_frames(self.st, self.hs)
        self.sp = new_speed(self.st, self.params)
        self.bat = new_battery(self.st, self.params)
        self.al = new_alarms(self.st, self.params)
        self.set_ocv(OCV_CURVE)
        self.set_alarms(ALARMS)

    @property
    def source(self):
        """The index the agent gave the port it feeds next (refusals and ``state`` name it)."""
        return self.st.source

    @source.setter
    def source(self, value):
        self.st.source = value

    @property
    def incremental(self):
        """Whether a fusion step skips the work its inputs did not change (the default);
        False judges everything at every step, the reference the tests compare it with."""
        return self.al.incremental == 1

    @incremental.setter
    def incremental(self, value):
        self.al.incremental = 1 if value else 0

    @property
    def frames(self):
        """CAN frames decoded so far."""
        return self.st.frames

    # Set-up -----------------------------------------------------------------------------

    def set_params(self, values):
        """Tunables in ``PARAMS`` order (see there for units and defaults)."""
        if len(values) != len(PARAMS):
            raise ValueError("expected %d parameters, got %d" % (len(PARAMS), len(values)))
        for i in range(len(PARAMS)):
            if not values[i] > 0.0:
                raise ValueError("parameter %s must be > 0" % PARAMS[i][0])
        if values[P_RISE_WINDOW] >= TEMP_HISTORY - 1 or values[P_RISE_WINDOW] < 1.0:
            raise ValueError("temp_rise_window_s must be 1-%d s" % (TEMP_HISTORY - 2))
        for i in range(len(PARAMS)):
            self.params[i] = float(values[i])
        self.tick = self.params[P_TICK]
        self.set_alarms(self.al.alarm_rows)

    def set_ocv(self, curve):
        """The pack's open-circuit cell voltage curve, ``((soc %, volts), ...)`` rising."""
        self.bat.set_ocv(curve)

    def set_alarms(self, rows):
        """Install the alarm table (``ALARMS``' shape); per-cell thresholds are scaled by
        the ``cells`` parameter here, so a table can be given once for any pack."""
        self.al.set_alarms(rows)

    def set_policy(self, sid, mode, deadband):
        """How signal ``sid`` is reported live: ``REPORT_WINDOW`` (a row in every live
        window it was sampled in), ``REPORT_CHANGE`` (a change record as soon as it moves
        more than ``deadband`` from the last one reported), ``REPORT_RAW`` (every sample,
        as OUT_RAW at each live window's close), or any sum of them; history windows
        always carry every signal."""
        self.st.set_policy(sid, mode, deadband)

    def set_source_raw(self, source, on):
        """Every sample of the signals last heard from source ``source`` goes raw (OUT_RAW)
        while ``on``, whatever their own policy; a signal two sources report follows the
        one it was last heard from."""
        self.st.set_source_raw(source, on)

    def set_can_tables(self, msg_index, msg_len, msg_first, msg_count, big_endian, shift,
                       length, signed, factor, offset, sig_id, no_value, mux_row, mux_value, row_min, row_max):
        """Install the flat tables of a compiled DBC (see agent/dbc/compile.py).

        ``msg_index`` maps a message key (id | 0x80000000 for 29-bit ids) to its row;
        the kernel turns it into an open-addressing table it can probe without Python.
        A signal with ``mux_row[s] >= 0`` is present only when the multiplexer signal in
        that row has the raw value ``mux_value[s]``. ``row_min``/``row_max``: the DBC's
        own range of each row, which narrows its signal's limits for that row's values.
        Each message gets a health slot (its row).
        """
        self.fr.index({}, 0)  # no message is known while the tables change
        self.tb.install(msg_len, msg_first, msg_count, big_endian, shift, length, signed, factor, offset, sig_id,
                        no_value, mux_row, mux_value, row_min, row_max)
        self.fr.index(msg_index, len(msg_len))
        self.hs.size(len(msg_len))

    def set_limits(self, lo, hi, rate):
        """What is believed of each signal id: a value in ``[lo, hi]`` that moved at most
        ``rate`` per second (0: any) from the last one believed. The agent gives the
        catalogue's ranges, narrowed by a DBC's own (agent/signals.py)."""
        self.tb.set_limits(lo, hi, rate)

    def set_can_source(self, source):
        """The source whose health the CAN messages count towards."""
        self.hs.set_can_source(source)

    def health_slot(self, source):
        """A new health slot for messages of a UART source (CAN messages have theirs)."""
        return self.hs.health_slot(source)

    def set_condition(self, code, value):
        """The value of a special alarm that the agent, not the fusion, observes
        (``storage_failed``); judged with the next fusion step like any other."""
        self.al.set_condition(code, value)

    def restore(self, values):
        """Take back what ``persistent`` gave before a restart; ValueError if it cannot be
        that (the agent then starts from zero, and says so)."""
        if len(values) != len(PERSISTENT):
            raise ValueError("expected %d values" % len(PERSISTENT))
        for k in range(len(values)):
            v = values[k]
            if not v == v or v > 1e15 or v < -1e15:
                raise ValueError("%s is not a finite number" % PERSISTENT[k])
            if k < 4 and v < 0.0:
                raise ValueError("%s cannot be negative" % PERSISTENT[k])
        if not (values[6] == -1.0 or 0.0 < values[6] <= 150.0):
            raise ValueError("soh_pct must be -1 (not measured) or 0-150")
        self.sp.trip_km = values[0]
        self.bat.e_out = values[1]
        self.bat.e_regen = values[2]
        self.bat.e_charged = values[3]
        self.bat.cons_wh = values[4]
        self.bat.cons_km = values[5]
        self.bat.soh = values[6]

    # Feeding ----------------------------------------------------------------------------

    def note_frames(self, slot, times):
        """Good frames of a UART health slot, one call per read."""
        self.hs.note_frames(slot, times)

    def note_errors(self, slot, checksum, counter):
        """Frames of a health slot refused for a bad checksum or rolling counter."""
        self.hs.note_errors(slot, checksum, counter)

    def feed_values(self, ids, times, values):
        """Record already-decoded samples (NMEA, UART protocols, the agent's own)."""
        n = len(ids)
        for i in range(n):
            sid = ids[i]
            if sid < 0 or sid >= self.id_space:
                self.st.unknown += 1
                continue
            t = times[i]
            self._advance(t)
            self.st.offer(sid, t, values[i])
        return self.st.take_closed()

    def feed_frames(self, keys, datas, times):
        """Decode a batch of already-split CAN frames (key = id | 0x80000000 for 29-bit ids)."""
        i = self.fr.split(keys, datas, times, 0)
        while self.fr.held:
            self._release()
            i = self.fr.split(keys, datas, times, i)
        return self.st.take_closed()

    def feed_packed(self, buf, t):
        """Decode Linux ``struct can_frame`` records (16 bytes each, little-endian id), as a
        SocketCAN read delivers them, all stamped ``t``."""
        self._advance(t)
        self.fr.packed(buf, t)
        return self.st.take_closed()

    def feed_slcan(self, buf, t):
        """Decode the complete SLCAN lines in ``buf`` (each ends in CR; a lone BEL is the
        adapter refusing a command). Returns ``(consumed, closed)``: the caller keeps
        ``buf[consumed:]``, an unfinished line, for the next read."""
        self._advance(t)
        consumed = self.fr.slcan(buf, t)
        return consumed, self.st.take_closed()

    def feed_candump(self, buf, t_offset):
        """Decode the complete ``candump -L`` lines in ``buf``, each stamped with its own
        time plus ``t_offset``. Returns ``(consumed, closed)`` as ``feed_slcan`` does."""
        consumed = self.fr.candump(buf, 0, t_offset)
        while self.fr.held:
            self._release()
            consumed = self.fr.candump(buf, consumed, t_offset)
        return consumed, self.st.take_closed()

    def _release(self):
        """The frame a parser held back: run the clock to its time, then decode it."""
        self._advance(self.fr.t)
        return self.fr.release()

    def close_due(self, now):
        """Run what is due by ``now`` (fusion steps, window ends), so a quiet bus still
        reports and a silent source is noticed."""
        if self.started and now >= self.st.next_event:
            self._due(now)
        return self.st.take_closed()

    def flush(self):
        """Close the open windows whatever the time and hand over a pending capture, at
        shutdown."""
        self.st.flush_windows()
        if self.al.cap_pending:
            self.al.capture()
        return self.st.take_closed()

    # The fusion clock -------------------------------------------------------------------

    def _advance(self, t):
        if self.st.due(t):
            if self.started:
                self._due(t)
            else:
                self._start(t)
        return 0

    def _start(self, t):
        self.started = 1
        self.st.open_windows(t)
        self._skip_to(t)
        self.st.plan(self.next_tick)
        return 0

    def _skip_to(self, t):
        # The first step after t (t // tick can round down across a step, as 1.0 // 0.1 does).
        self.tick_index = int(t // self.tick)
        self.next_tick = (self.tick_index + 1) * self.tick
        if self.next_tick <= t:
            self.tick_index += 1
            self.next_tick = (self.tick_index + 1) * self.tick

    def _due(self, t):
        n = 0
        while self.next_tick <= t and n < MAX_TICKS_PER_CALL:
            self.st.close_until(self.next_tick)
            self._step(self.next_tick)
            self.tick_index += 1
            self.next_tick = (self.tick_index + 1) * self.tick
            n += 1
        if self.next_tick <= t:
            # A long silence: the steps nobody could use are skipped, the phase kept.
            self._skip_to(t)
        self.st.close_until(t)
        self.st.plan(self.next_tick)
        return 0

    def _step(self, t):
        self.ticks += 1
        dt = t - self.f_last if self.f_last >= 0.0 else 0.0
        if dt > 5.0 * self.tick:
            dt = 0.0  # nothing is integrated across a gap in the data
        self.f_last = t
        self.hs.step(t)
        self.al.quality()
        self.sp.track(t)
        moving = self.sp.speed(t, dt, self.al.active(A_WHEEL_IMPLAUSIBLE))
        self.sp.position(t, dt, moving)
        km = self.sp.distance(t, dt, moving)
        self.bat.step(t, dt, moving, km)
        if self.bat.soc_jump >= 0.0:
            self.al.special(A_SOC_JUMP, self.bat.soc_jump)
            self.bat.soc_jump = -1.0
        self.bat.pack(t)
        self.al.specials(t, self.sp.fix, self.sp.gnss_seen)
        self.al.judge(t, self.hs)
        return 0

    # Reading ----------------------------------------------------------------------------

    def decode_frame(self, key, data):
        """Signals of one frame as ``[(signal_id, value)]``, None if the DBC lacks the
        message, for tools that show frames one by one; the state is not touched."""
        m = self.fr.message(key)
        if m < 0:
            return None
        size = len(data)
        return self.st.decode_frame(m, _le(data, 0, size) if size <= 8 else 0, size)

    def snapshot(self, now):
        """The ring buffer's last ``capture_before_s`` seconds up to ``now``, on request."""
        return self.al.ring_slice(now, 0, -1, now - self.params[P_CAPTURE_BEFORE], now)

    def latest(self):
        """``(signal_id, value, time)`` of every signal seen so far."""
        return self.st.latest()

    def state(self, now):
        """``(signal_id, value, time, source, stale)`` of every signal seen so far; source
        is the index the agent gave the feeding port, ``SRC_FUSION`` for derived ones."""
        return self.st.state(now)

    def persistent(self):
        """The values of ``PERSISTENT``, to be kept across a restart."""
        b = self.bat
        return [self.sp.trip_km, b.e_out, b.e_regen, b.e_charged, b.cons_wh, b.cons_km, b.soh]

    def alarms(self):
        """Active alarms: ``(code, instance, level, raised_at, value)``."""
        return self.al.alarms()

    def health(self, now):
        """Per message slot: ``(slot, source, frames, learned period, timeouts, timed out,
        checksum errors, counter errors, seconds since heard)``; unseen slots left out."""
        return self.hs.health(now)

    def counters(self):
        """Counters for status and health reporting."""
        st = self.st
        fr = self.fr
        return {"frames": st.frames, "samples": st.samples, "refused": st.refused, "unknown": st.unknown,
                "truncated": st.truncated, "no_value": st.no_value, "late": st.late,
                "bad_lines": fr.bad_lines, "remote_frames": fr.remote_frames,
                "error_frames": fr.error_frames, "fd_frames": fr.fd_frames,
                "adapter_errors": fr.adapter_errors, "ticks": self.ticks,
                "snapshots": self.al.snapshots, "snapshots_truncated": self.al.snapshots_truncated}

    def refusals(self, source):
        """Values of ``source`` refused so far: ``(signal_id, out of range, too fast)``
        for each signal with any."""
        return self.st.refusals(source)

    def motion(self, now, still_kmh):
        """The stationary decision, fail-safe: ``(verdict, wheel vote, wheel km/h, GNSS
        vote, GNSS km/h, motor vote, motor A, pedal vote, cadence rpm, top km/h)``.

        Each input votes ``VOTE_STILL`` or ``VOTE_MOVING`` only while it is fresh and
        believed (GNSS also needs a valid fix and a position that moves with its speed);
        otherwise it abstains and says why. The vehicle is ``MOTION_STILL`` only when a
        speed source (wheel or GNSS) votes still and no input votes moving: when inputs
        disagree it is moving, and with no speed source it is ``MOTION_UNKNOWN``. ``top``
        is the highest speed any voting speed source or the fused speed gives (-1: none).
        """
        return self.sp.motion(now, still_kmh)
