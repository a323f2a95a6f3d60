"""The vehicle's latest state and its windows, and the decode loop that feeds them.

Owns every signal's latest value (time, source, learned period), the live and history
window aggregates and where they end, each signal's reporting policy, the ring of recent
samples, and the count of values not believed. ``frame`` takes a CAN frame from its
bits to samples within this module: ``_decode`` and ``_sample`` stay together, and the
per-frame path calls nothing across modules. Imports agent.fusion.spec; reads the tables
(agent.fusion._tables_py) it is given.
"""

from array import array

from agent.fusion.spec import (
    DERIVED_DECIMALS,
    INF,
    MAX_SOURCES,
    OUT_CHANGE,
    OUT_RAW,
    OUT_WINDOW,
    P_RATE_MIN,
    P_RATE_SCALE,
    P_STALE_MIN,
    P_STALE_PERIODS,
    REFUSED_RANGE,
    REFUSED_RATE,
    REPORT_ALL,
    REPORT_CHANGE,
    REPORT_RAW,
    REPORT_WINDOW,
    SRC_FUSION,
    WIN_HISTORY,
    WIN_LIVE,
    _check_source,
    _filled,
    _zeros,
)

_M8 = 0x00FF00FF00FF00FF
_M16 = 0x0000FFFF0000FFFF
_M32 = 0x00000000FFFFFFFF
# Beyond this a value is left as it is (its steps would not fit a double's mantissa).
_QUANTISE_LIMIT = 4.0e15


def _learn(p, dt):
    """Running estimate of a period from one more interval; a gap counts as at most four
    periods, so an outage does not teach it that the signal is slow."""
    if p == 0.0:
        return dt
    if dt > 4.0 * p:
        dt = 4.0 * p
    return p + 0.125 * (dt - p)


def _quantise(x, scale):
    """``x`` rounded half away from zero to whole 1/``scale`` steps, computed as k / scale:
    the very double a reading of that resolution decodes to."""
    k = x * scale
    if k >= _QUANTISE_LIMIT or k <= -_QUANTISE_LIMIT or k != k:
        return x
    if k >= 0.0:
        n = int(k + 0.5)  # a C integer in the compiled kernel: no Python int made here
        return float(n) / scale
    n = int(-k + 0.5)
    return -float(n) / scale


def _bswap64(x):
    """The frame read big-endian, from the frame read little-endian (zero-padded to 8)."""
    x = ((x & _M8) << 8) | ((x >> 8) & _M8)
    x = ((x & _M16) << 16) | ((x >> 16) & _M16)
    return ((x & _M32) << 32) | (x >> 32)


class State:
    """Latest values, windows and ring, fed by ``frame``, ``offer`` and ``put``."""

    def __init__(self, tables, window, history, ring, params):
        self.tb = tables
        n = self.tb.id_space
        self.id_space = n
        self.window = float(window)
        self.win_len = array("d", [float(window), float(history)])
        self.win_index = array("q", [-1, -1])
        self.seen = _zeros("b", n)
        # Per-window aggregates of both sets: set k of signal s lives at k * id_space + s.
        self.w_min = _zeros("d", 2 * n)
        self.w_max = _zeros("d", 2 * n)
        self.w_sum = _zeros("d", 2 * n)
        self.w_count = _zeros("i", 2 * n)
        self.touched = _zeros("i", 2 * n)
        self.n_touched = _zeros("i", 2)
        # The last value, its time and source are never reset when a window closes:
        # they are the signal's latest state.
        self.w_last = _zeros("d", n)
        self.w_last_time = _zeros("d", n)
        self.sig_src = _zeros("b", n)
        self.sig_period = _zeros("d", n)
        self.policy = array("b", [REPORT_WINDOW] * n)
        self.q_scale = _zeros("d", n)
        for sid, decimals in DERIVED_DECIMALS:
            self.q_scale[sid] = 10.0 ** decimals
        self.deadband = _zeros("d", n)
        self.reported = _zeros("b", n)
        self.reported_value = _zeros("d", n)
        # What was refused: each signal's newest refusal, counts per (source, reason,
        # signal) and per source.
        self.bad_t = _filled("d", -INF, n)
        self.ref_count = _zeros("i", 2 * MAX_SOURCES * n)
        self.src_refused = _zeros("q", MAX_SOURCES)
        self.refused = 0
        self.source = 0
        # Before the first sample every time is due: it opens the windows.
        self.next_event = -1.0e300
        self.live_start = 0.0
        self.ring_mask = ring - 1
        self.r_sid = _zeros("i", ring)
        self.r_t = _zeros("d", ring)
        self.r_v = _zeros("d", ring)
        self.r_head = 0
        # The raw lane: how many signals and sources are reported raw, the ring position up to
        # which their samples were handed over (_drain_raw), and the sources reported raw.
        self.n_raw = 0
        self.raw_tail = 0
        self.src_raw = _zeros("b", MAX_SOURCES)
        self.frames = 0
        self.samples = 0
        self.unknown = 0
        self.truncated = 0
        self.no_value = 0
        self.late = 0
        self.ext_lo = 0.0
        self.ext_hi = 0.0
        self.params = params
        self.closed = []

    # Frames and values -----------------------------------------------------------------

    def due(self, t):
        """Whether the clock must run before a sample at ``t``: a fusion step or a window's
        end is due by then. A sample from before the open live window is counted late."""
        if t >= self.next_event:
            return True
        if t < self.live_start:
            self.late += 1
        return False

    def frame(self, m, le, size, t):
        """A CAN frame of message row ``m`` (-1: not in the DBC), its payload ``le`` of
        ``size`` bytes, at ``t``: its signals sampled; ``m``, or -1 if it was not decoded."""
        if m < 0:
            self.unknown += 1
        elif size < self.tb.msg_len[m] or size > 8:
            self.truncated += 1
            m = -1
        else:
            self.frames += 1
            self._decode(self.tb, m, le, t, None)
        return m

    def decode_frame(self, m, le, size):
        """See ``Kernel.decode_frame`` (message row ``m``, its payload ``le`` of ``size``
        bytes)."""
        if size < self.tb.msg_len[m] or size > 8:
            raise ValueError("frame has %d bytes, the message needs %d to 8" % (size, self.tb.msg_len[m]))
        out = []  # type: list
        self._decode(self.tb, m, le, 0.0, out)
        return out

    def _decode(self, tb, m, le, t, out):
        """The signals of message row ``m`` (payload ``le``) through tables ``tb``: into
        ``out`` as ``(signal_id, value)`` for a tool, else sampled at ``t``."""
        be = _bswap64(le)
        first = tb.msg_first[m]
        for s in range(first, first + tb.msg_count[m]):
            # _raw() written out: this is the hottest line of the agent.
            raw = ((be if tb.sig_big_endian[s] else le) >> tb.sig_shift[s]) & tb.sig_mask[s]
            if tb.row_raw_lo[s] <= raw <= tb.row_raw_hi[s] and out is None:
                # A believable raw value of a plain row (see the tables' row limits):
                # _value written out.
                self._sample(tb.sig_id[s], t, float(raw) * tb.sig_factor[s] + tb.sig_offset[s])
            else:
                self._row_slow(tb, s, raw, le, be, t, out)

    def _value(self, tb, s, raw):
        """The physical value of raw bits of row ``s``."""
        if tb.sig_signed[s] and (raw >> (tb.sig_length[s] - 1)) & 1:
            return -float((~raw & tb.sig_mask[s]) + 1) * tb.sig_factor[s] + tb.sig_offset[s]
        return float(raw) * tb.sig_factor[s] + tb.sig_offset[s]

    def _row_slow(self, tb, s, raw, le, be, t, out):
        """A row the decode loop's one test did not pass: multiplexed, "no value", signed
        or rated, out of the row's range, or decoded for a tool (into ``out``)."""
        if tb.row_raw_lo[s] <= tb.row_raw_hi[s] and out is None:
            # A plain row (it has a raw span): its raw is "no value" or out of range.
            if tb.sig_has_na[s] and raw == tb.sig_na[s]:
                self.no_value += 1
            else:
                self._refuse(tb.sig_id[s], t, REFUSED_RANGE)
            return 0
        mux = tb.sig_mux_row[s]
        if mux >= 0 and self._raw(tb, mux, le, be) != tb.sig_mux_value[s]:
            return 0
        if tb.sig_has_na[s] and raw == tb.sig_na[s]:
            self.no_value += 1
            return 0
        value = self._value(tb, s, raw)
        if out is not None:
            out.append((tb.sig_id[s], value))
        elif self._accept(tb.sig_id[s], t, value, tb.row_lo[s], tb.row_hi[s]):
            self._sample(tb.sig_id[s], t, value)
        return 0

    def _raw(self, tb, s, le, be):
        if tb.sig_big_endian[s]:
            return (be >> tb.sig_shift[s]) & tb.sig_mask[s]
        return (le >> tb.sig_shift[s]) & tb.sig_mask[s]

    def offer(self, sid, t, value):
        """An already-decoded sample of signal ``sid``, taken if believed."""
        if self._accept(sid, t, value, self.tb.lim_lo[sid], self.tb.lim_hi[sid]):
            self._sample(sid, t, value)
        return 0

    # Range and rate --------------------------------------------------------------------

    def _accept(self, sid, t, value, lo, hi):
        """Whether a decoded value is believed: inside ``[lo, hi]`` (its signal's range, or
        a CAN row's) and, where the signal has a rate, no further from the last value
        believed than that allows."""
        if not lo <= value <= hi:  # a NaN fails too
            self._refuse(sid, t, REFUSED_RANGE)
            return False
        return self.tb.lim_rate[sid] == 0.0 or self._rate_ok(sid, t, value)

    def _rate_ok(self, sid, t, value):
        """The rate half of _accept (the decode loop tests a row's raw span itself), against
        the last value believed from the same source: two sources of one signal may
        disagree by more than it can change (a controller and a display both reporting the
        motor's temperature, each with its own sensor)."""
        if not self.seen[sid] or self.sig_src[sid] != self.source:
            return True
        dt = t - self.w_last_time[sid]
        if dt < self.params[P_RATE_MIN]:
            dt = self.params[P_RATE_MIN]
        if abs(value - self.w_last[sid]) > self.tb.lim_rate[sid] * self.params[P_RATE_SCALE] * dt:
            self._refuse(sid, t, REFUSED_RATE)
            return False
        return True

    def _refuse(self, sid, t, reason):
        self.refused += 1
        if t > self.bad_t[sid]:
            self.bad_t[sid] = t
        s = self.source
        if 0 <= s < MAX_SOURCES:
            self.ref_count[(2 * s + reason) * self.id_space + sid] += 1
            self.src_refused[s] += 1
        return 0

    def refusals(self, source):
        """See ``Kernel.refusals``."""
        _check_source(source)
        n = self.id_space
        out = []
        for sid in range(n):
            by_range = self.ref_count[(2 * source + REFUSED_RANGE) * n + sid]
            by_rate = self.ref_count[(2 * source + REFUSED_RATE) * n + sid]
            if by_range or by_rate:
                out.append((sid, by_range, by_rate))
        return out

    # Samples and windows ---------------------------------------------------------------

    def _sample(self, sid, t, value):
        # The byte-array stores come last: in C a char store may alias anything, and
        # every field read after one would be read again.
        seen = self.seen[sid]
        if seen:
            dt = t - self.w_last_time[sid]
            if dt > 0.0:
                self.sig_period[sid] = _learn(self.sig_period[sid], dt)
        self.samples += 1
        if self.w_count[sid] == 0:
            self.touched[self.n_touched[WIN_LIVE]] = sid
            self.n_touched[WIN_LIVE] += 1
            self.w_min[sid] = value
            self.w_max[sid] = value
            self.w_sum[sid] = value
        else:
            # Stored either way: no branch on the value to mispredict.
            self.w_min[sid] = value if value < self.w_min[sid] else self.w_min[sid]
            self.w_max[sid] = value if value > self.w_max[sid] else self.w_max[sid]
            self.w_sum[sid] += value
        self.w_count[sid] += 1
        self.w_last[sid] = value
        self.w_last_time[sid] = t
        r = self.r_head & self.ring_mask
        self.r_sid[r] = sid
        self.r_t[r] = t
        self.r_v[r] = value
        self.r_head += 1
        if self.policy[sid] & REPORT_CHANGE:
            self._change(sid, t, value)
        self.sig_src[sid] = self.source
        if not seen:
            self.seen[sid] = 1
        return 0

    def _change(self, sid, t, value):
        """A sample of a signal reported on change: a change record if it moved beyond its
        deadband (apart from ``_sample``, which is then small enough to inline)."""
        if not self.reported[sid] or abs(value - self.reported_value[sid]) > self.deadband[sid]:
            self.reported[sid] = 1
            self.reported_value[sid] = value
            self.closed.append((OUT_CHANGE, sid, t, value))
        return 0

    def put(self, sid, t, value):
        """A derived sample: it goes where a decoded one goes, stamped as the fusion's."""
        src = self.source
        self.source = SRC_FUSION
        if self.q_scale[sid] > 0.0:
            value = _quantise(value, self.q_scale[sid])
        self._sample(sid, t, value)
        self.source = src
        return 0

    def fresh(self, sid, t):
        """Whether signal ``sid`` was heard within ``stale_periods`` of its learned period
        (and ``stale_min_s``) before ``t``."""
        if not self.seen[sid]:
            return False
        limit = self.params[P_STALE_PERIODS] * self.sig_period[sid]
        if limit < self.params[P_STALE_MIN]:
            limit = self.params[P_STALE_MIN]
        return t - self.w_last_time[sid] <= limit

    def extremes(self, first, count, t):
        """Lowest and highest of the fresh signals ``first`` .. ``first + count - 1`` into
        ``ext_lo`` and ``ext_hi``; how many were fresh."""
        n = 0
        for k in range(count):
            if self.fresh(first + k, t):
                v = self.w_last[first + k]
                if n == 0 or v < self.ext_lo:
                    self.ext_lo = v
                if n == 0 or v > self.ext_hi:
                    self.ext_hi = v
                n += 1
        return n

    def set_policy(self, sid, mode, deadband):
        """See ``Kernel.set_policy``."""
        if sid < 0 or sid >= self.id_space:
            raise ValueError("signal id out of the kernel's id space")
        if mode < 1 or mode > REPORT_ALL or deadband < 0.0:
            raise ValueError("mode must be 1-%d and the deadband >= 0" % REPORT_ALL)
        self._count_raw(self.policy[sid] & REPORT_RAW, mode & REPORT_RAW)
        self.policy[sid] = mode
        self.deadband[sid] = deadband
        self.reported[sid] = 0

    def set_source_raw(self, source, on):
        """See ``Kernel.set_source_raw``."""
        _check_source(source)
        self._count_raw(self.src_raw[source], on)
        self.src_raw[source] = 1 if on else 0

    def _count_raw(self, was, now):
        """One more or one fewer signal or source reported raw; the first one starts the
        raw lane at the ring's head, not in its past."""
        if now and not was:
            if self.n_raw == 0:
                self.raw_tail = self.r_head
            self.n_raw += 1
        elif was and not now:
            self.n_raw -= 1
        return 0

    def open_windows(self, t):
        """The windows around the first sample's time ``t`` are the open ones."""
        for k in range(2):
            self.win_index[k] = int(t // self.win_len[k])
        self.live_start = self.win_index[WIN_LIVE] * self.window
        return 0

    def close_until(self, t):
        """Close the windows that ended by ``t``."""
        for k in range(2):
            w = int(t // self.win_len[k])
            if w > self.win_index[k]:
                self._close(k, w)
        self.live_start = self.win_index[WIN_LIVE] * self.window
        return 0

    def plan(self, next_tick):
        """The clock runs next at the fusion step ``next_tick`` or at a window's end,
        whichever comes first: from then on ``decode`` hands back to the caller."""
        e = next_tick
        for k in range(2):
            end = (self.win_index[k] + 1) * self.win_len[k]
            if end < e:
                e = end
        self.next_event = e

    def flush_windows(self):
        """Close the open windows whatever the time (at shutdown)."""
        for k in range(2):
            if self.n_touched[k] > 0:
                self._close(k, self.win_index[k] + 1)
        return 0

    def _close(self, k, next_index):
        c = self.n_touched[k]
        if c > 0:
            base = k * self.id_space
            rows = []
            # A number equal to one already in the rows is handed out as the same object
            # (most rows share the last time of the row before, a steady signal's minimum
            # is its maximum): each new one is an allocation of the compiled kernel. Not
            # a zero, whose sign equality does not see.
            lt_prev = 0.0
            lt_obj = None
            for j in range(c):
                i = self.touched[base + j]
                sid = i - base
                n = self.w_count[i]
                if k == WIN_HISTORY or self.policy[sid] & REPORT_WINDOW:
                    lt = self.w_last_time[sid]
                    if lt_obj is None or lt != lt_prev or lt == 0.0:
                        lt_prev = lt
                        lt_obj = lt
                    lo = self.w_min[i]
                    lo_obj = lo
                    hi = self.w_max[i]
                    hi_obj = lo_obj if hi == lo and lo != 0.0 else hi
                    mean = self.w_sum[i] / n
                    mean_obj = lo_obj if mean == lo and lo != 0.0 else mean
                    last = self.w_last[sid]
                    last_obj = lo_obj if last == lo and lo != 0.0 else last
                    rows.append((sid, n, lo_obj, hi_obj, mean_obj, last_obj, lt_obj))
                if k == WIN_LIVE:
                    self._merge(sid)
                self.w_count[i] = 0
            self.n_touched[k] = 0
            if len(rows) > 0:
                self.closed.append((OUT_WINDOW, k, self.win_index[k] * self.win_len[k], self.win_len[k], rows))
        self._drain_raw(k)
        self.win_index[k] = next_index

    def _drain_raw(self, k):
        """At a live window's close (``k``), the raw signals' samples the ring took since
        the last drain, as one OUT_RAW (see agent/fusion/spec.py), with the count of
        samples overwritten unread if the ring went round meanwhile."""
        if k != WIN_LIVE or self.n_raw == 0:
            return 0
        size = self.ring_mask + 1
        tail = self.raw_tail
        lost = 0
        if self.r_head - tail > size:
            lost = self.r_head - tail - size
            tail = self.r_head - size
        ids = []
        times = []
        values = []
        while tail < self.r_head:
            r = tail & self.ring_mask
            sid = self.r_sid[r]
            src = self.sig_src[sid]
            if self.policy[sid] & REPORT_RAW or (0 <= src < MAX_SOURCES and self.src_raw[src]):
                ids.append(sid)
                times.append(self.r_t[r])
                values.append(self.r_v[r])
            tail += 1
        self.raw_tail = tail
        if len(ids) > 0 or lost > 0:
            self.closed.append((OUT_RAW, self.win_index[k] * self.window, self.window, lost, ids, times, values))
        return 0

    def _merge(self, sid):
        """Fold a closing live window's aggregate of ``sid`` into the open history window:
        samples are aggregated once, history costs nothing per sample."""
        h = self.id_space + sid
        if self.w_count[h] == 0:
            self.touched[self.id_space + self.n_touched[WIN_HISTORY]] = h
            self.n_touched[WIN_HISTORY] += 1
            self.w_min[h] = self.w_min[sid]
            self.w_max[h] = self.w_max[sid]
            self.w_sum[h] = self.w_sum[sid]
        else:
            if self.w_min[sid] < self.w_min[h]:
                self.w_min[h] = self.w_min[sid]
            if self.w_max[sid] > self.w_max[h]:
                self.w_max[h] = self.w_max[sid]
            self.w_sum[h] += self.w_sum[sid]
        self.w_count[h] += self.w_count[sid]

    def take_closed(self):
        """The outputs since the last call."""
        out = self.closed
        self.closed = []
        return out

    def latest(self):
        """See ``Kernel.latest``."""
        out = []
        for sid in range(self.id_space):
            if self.seen[sid]:
                out.append((sid, self.w_last[sid], self.w_last_time[sid]))
        return out

    def state(self, now):
        """See ``Kernel.state``."""
        out = []
        for sid in range(self.id_space):
            if self.seen[sid]:
                out.append((sid, self.w_last[sid], self.w_last_time[sid], self.sig_src[sid],
                            not self.fresh(sid, now)))
        return out


def new_state(tables, window, history, ring, params):
    """An empty state decoding through ``tables`` (see agent.fusion._frames_py.new_frames)."""
    return State(tables, window, history, ring, params)
