"""Alarms and event capture.

Owns the alarm table (``ALARMS``' shape, per-cell thresholds scaled to the pack), the
values of the special alarms that are not a threshold on one signal, each alarm's
debounce and hysteresis (one instance per source for ``PER_SOURCE`` alarms), each
source's rate of refused values, and the snapshots of the ring buffer around a level >= 2
alarm or on request. Imports agent.fusion.spec; reads the state and the health
(agent.fusion._state_py, _frames_py) it is given.
"""

import math
from array import array

from agent.fusion.spec import (
    A_CELL_OVER_VOLTAGE,
    A_COMM_LOST,
    A_DATA_QUALITY,
    A_GNSS_LOST,
    A_OVER_CHARGE,
    A_STORAGE_FAILED,
    A_THEFT,
    A_WHEEL_IMPLAUSIBLE,
    ABOVE,
    BELOW,
    MAX_ALARM_CODE,
    MAX_SOURCES,
    OUT_ALARM,
    OUT_SNAPSHOT,
    P_CAPTURE_AFTER,
    P_CAPTURE_BEFORE,
    P_CELLS,
    P_FULL_SOC,
    P_QUALITY_TAU,
    P_TICK,
    P_WHEEL_CHECK_MIN,
    PER_CELL,
    PER_SOURCE,
    S_CELL_MAX,
    S_FUSED_SPEED,
    S_GNSS_SPEED,
    S_LOCKED,
    S_PACK_I,
    S_SOC,
    S_SPEED,
    SPECIAL,
    _filled,
    _zeros,
)


class Alarms:
    """The alarm table and its state, judged once per fusion step."""

    def __init__(self, st, params):
        self.st = st
        self.params = params
        self.q_prev = _zeros("q", MAX_SOURCES)
        self.q_rate = _zeros("d", MAX_SOURCES)
        self.snapshots = 0
        self.snapshots_truncated = 0
        # 0: every alarm judged in full at every step (the reference the tests hold the
        # skipping against).
        self.incremental = 1

    def set_alarms(self, rows):
        """See ``Kernel.set_alarms``."""
        n = len(rows)
        for r in rows:
            if r[0] < 1 or r[0] > MAX_ALARM_CODE or r[2] < 1 or r[2] > 3:
                raise ValueError("alarm %r: code or level out of range" % (r[1],))
            if r[3] != SPECIAL and (r[3] < 0 or r[3] >= self.st.id_space):
                raise ValueError("alarm %r: signal outside the id space" % (r[1],))
            if r[4] != ABOVE and r[4] != BELOW:
                raise ValueError("alarm %r: direction must be ABOVE or BELOW" % (r[1],))
            if r[7] < 0.0 or r[8] < 0.0:
                raise ValueError("alarm %r: delays must be >= 0" % (r[1],))
            if (r[4] == ABOVE and r[6] > r[5]) or (r[4] == BELOW and r[6] < r[5]):
                raise ValueError("alarm %r: the clear threshold must lie on the safe side" % (r[1],))
        self.alarm_rows = rows
        self.n_alarms = n
        scale = self.params[P_CELLS]
        self.a_code = array("i", [r[0] for r in rows])
        self.a_level = array("i", [r[2] for r in rows])
        self.a_sid = array("i", [r[3] for r in rows])
        self.a_dir = array("i", [r[4] for r in rows])
        self.a_thr = array("d", [r[5] * (scale if r[9] == PER_CELL else 1.0) for r in rows])
        self.a_clr = array("d", [r[6] * (scale if r[9] == PER_CELL else 1.0) for r in rows])
        self.a_on = array("d", [r[7] for r in rows])
        self.a_off = array("d", [r[8] for r in rows])
        # State: rows first, then a block of one instance per source for each alarm of
        # PER_SOURCE (``a_block``: the row's block, -1 for the others).
        self.a_block = array("i", [PER_SOURCE.index(r[0]) if r[0] in PER_SOURCE else -1 for r in rows])
        size = n + len(PER_SOURCE) * MAX_SOURCES
        self.a_active = _zeros("b", size)
        self.a_since = _filled("d", -1.0, size)
        self.a_raised_t = _zeros("d", size)
        self.a_value = _zeros("d", size)
        # 1 while an instance is at rest: not active and below, or active and above, its
        # threshold, with no delay running, judged on ``a_value``: the same value again
        # would change nothing.
        self.a_quiet = _zeros("b", size)
        self.spec_value = _zeros("d", MAX_ALARM_CODE + 1)
        self.spec_ok = _zeros("b", MAX_ALARM_CODE + 1)
        self.a_row = array("i", [-1] * (MAX_ALARM_CODE + 1))
        for a in range(n):
            if self.a_row[rows[a][0]] >= 0:
                raise ValueError("alarm code %d given twice" % rows[a][0])
            self.a_row[rows[a][0]] = a
        self.cap_pending = 0
        self.cap_t = 0.0
        self.cap_code = 0
        self.cap_instance = -1

    def set_condition(self, code, value):
        """See ``Kernel.set_condition``."""
        if code != A_STORAGE_FAILED:
            raise ValueError("alarm %d is not set from outside the kernel" % code)
        self.special(code, value)

    def special(self, code, value):
        """The value of special alarm ``code``, judged with the next fusion step."""
        self.spec_ok[code] = 1
        self.spec_value[code] = value
        return 0

    def alarms(self):
        """See ``Kernel.alarms``."""
        out = []
        for a in range(self.n_alarms):
            if self.a_block[a] >= 0:
                for s in range(MAX_SOURCES):
                    i = self.n_alarms + self.a_block[a] * MAX_SOURCES + s
                    if self.a_active[i]:
                        out.append((self.a_code[a], s, self.a_level[a], self.a_raised_t[i], self.a_value[i]))
            elif self.a_active[a]:
                out.append((self.a_code[a], -1, self.a_level[a], self.a_raised_t[a], self.a_value[a]))
        return out

    def active(self, code):
        """Whether alarm ``code`` (one instance) is raised."""
        a = self.a_row[code]
        return a >= 0 and self.a_active[a] == 1

    def quality(self):
        """Each source's rate of refused values, decaying with quality_tau_s (nothing to do
        on a bus that never sent an unbelievable value)."""
        if self.st.refused == 0:
            return 0
        tau = self.params[P_QUALITY_TAU]
        decay = math.exp(-self.params[P_TICK] / tau)
        for s in range(MAX_SOURCES):
            new = self.st.src_refused[s] - self.q_prev[s]
            self.q_prev[s] = self.st.src_refused[s]
            self.q_rate[s] = self.q_rate[s] * decay + new / tau
        return 0

    def specials(self, t, gnss, gnss_seen):
        """Values of the alarms that are not a threshold on one signal (``gnss``: a GNSS
        fix now; ``gnss_seen``: there ever was one)."""
        st = self.st
        speed = -1.0
        if st.fresh(S_FUSED_SPEED, t):
            speed = st.w_last[S_FUSED_SPEED]
        elif gnss and st.fresh(S_GNSS_SPEED, t):
            speed = st.w_last[S_GNSS_SPEED]
        locked = st.seen[S_LOCKED] and st.w_last[S_LOCKED] >= 0.5
        self.spec_ok[A_THEFT] = 1 if speed >= 0.0 else 0
        self.spec_value[A_THEFT] = speed if locked else 0.0
        self.spec_ok[A_GNSS_LOST] = gnss_seen
        self.spec_value[A_GNSS_LOST] = 1.0 if gnss else 0.0
        self.spec_ok[A_WHEEL_IMPLAUSIBLE] = 0
        if st.seen[S_SPEED] and gnss and st.fresh(S_GNSS_SPEED, t):
            g = st.w_last[S_GNSS_SPEED]
            w = st.w_last[S_SPEED] if st.fresh(S_SPEED, t) else 0.0
            top = w if w > g else g
            if top > self.params[P_WHEEL_CHECK_MIN]:
                self.spec_ok[A_WHEEL_IMPLAUSIBLE] = 1
                self.spec_value[A_WHEEL_IMPLAUSIBLE] = abs(w - g) / top
        self.spec_ok[A_OVER_CHARGE] = 0
        if st.fresh(S_PACK_I, t):
            full = st.fresh(S_SOC, t) and st.w_last[S_SOC] >= self.params[P_FULL_SOC]
            a = self.a_row[A_CELL_OVER_VOLTAGE]
            if a >= 0 and st.fresh(S_CELL_MAX, t) and st.w_last[S_CELL_MAX] > self.a_thr[a]:
                full = True
            self.spec_ok[A_OVER_CHARGE] = 1
            self.spec_value[A_OVER_CHARGE] = st.w_last[S_PACK_I] if full else 0.0

    def judge(self, t, health):
        """Debounce every alarm on its value at fusion step ``t``; then hand over a
        capture whose time after its alarm is up."""
        for a in range(self.n_alarms):
            code = self.a_code[a]
            sid = self.a_sid[a]
            if self.a_block[a] >= 0:
                # Only the sources that can have an instance: those with a health slot
                # heard from, those with a refused value.
                base = self.n_alarms + self.a_block[a] * MAX_SOURCES
                if code == A_COMM_LOST:
                    for s in range(health.src_top):
                        if health.src_seen[s] > 0:
                            self._debounce(a, base + s, s, t, 1.0 if health.src_live[s] == 0 else 0.0)
                elif code == A_DATA_QUALITY and self.st.refused > 0:
                    for s in range(MAX_SOURCES):
                        if self.st.src_refused[s] > 0:
                            self._debounce(a, base + s, s, t, self.q_rate[s])
            elif sid == SPECIAL:
                if self.spec_ok[code]:
                    self._debounce(a, a, -1, t, self.spec_value[code])
                else:
                    self.a_since[a] = -1.0
            elif self.st.fresh(sid, t):
                self._debounce(a, a, -1, t, self.st.w_last[sid])
            else:
                self.a_since[a] = -1.0
        if self.cap_pending and t >= self.cap_t + self.params[P_CAPTURE_AFTER]:
            self.capture()
        return 0

    def _debounce(self, a, i, instance, t, value):
        """Raise once the value has been beyond the threshold for the raise delay; clear
        once it has been back beyond the clear threshold for the clear delay (``i``: the
        state of row ``a``, or of one of its instances). An instance at rest given the
        value it was judged on is not judged again: only a new value or a running delay
        can move it (the caller's ``a_since = -1`` for an input gone keeps it at rest)."""
        if self.a_quiet[i] and value == self.a_value[i] and self.incremental:
            self.a_value[i] = value  # the same number, but keep the sign of a zero
            return 0
        up = self.a_dir[a] == ABOVE
        self.a_value[i] = value
        if self.a_active[i]:
            cross = value < self.a_clr[a] if up else value > self.a_clr[a]
            delay = self.a_off[a]
        else:
            cross = value > self.a_thr[a] if up else value < self.a_thr[a]
            delay = self.a_on[a]
        if not cross:
            self.a_since[i] = -1.0
            self.a_quiet[i] = 1
            return 0
        self.a_quiet[i] = 0
        if self.a_since[i] < 0.0:
            self.a_since[i] = t
        if t - self.a_since[i] < delay:
            return 0
        self.a_since[i] = -1.0
        level = self.a_level[a]
        if self.a_active[i]:
            self.a_active[i] = 0
            self.st.closed.append((OUT_ALARM, t, self.a_code[a], instance, level, 0, value, self.a_clr[a]))
            return 0
        self.a_active[i] = 1
        self.a_raised_t[i] = t
        self.st.closed.append((OUT_ALARM, t, self.a_code[a], instance, level, 1, value, self.a_thr[a]))
        if level >= 2 and not self.cap_pending:
            self.cap_pending = 1
            self.cap_t = t
            self.cap_code = self.a_code[a]
            self.cap_instance = instance
        return 0

    def capture(self):
        """Hand over the pending event snapshot."""
        self.cap_pending = 0
        t = self.cap_t
        self.st.closed.append(self.ring_slice(t, self.cap_code, self.cap_instance,
                                              t - self.params[P_CAPTURE_BEFORE], t + self.params[P_CAPTURE_AFTER]))
        return 0

    def ring_slice(self, t, code, instance, lo, hi):
        """Samples of the ring from ``lo`` to ``hi`` in arrival order (the ring is walked
        back from the newest until a sample is a second older than ``lo``)."""
        st = self.st
        self.snapshots += 1
        ids = []
        times = []
        values = []
        size = st.ring_mask + 1
        stop = st.r_head - size if st.r_head > size else 0
        j = st.r_head - 1
        while j >= stop:
            r = j & st.ring_mask
            rt = st.r_t[r]
            if rt < lo - 1.0:
                break
            if lo <= rt <= hi:
                ids.append(st.r_sid[r])
                times.append(rt)
                values.append(st.r_v[r])
            j -= 1
        if j < stop and st.r_head > size:
            # The ring had already dropped the start of the span: too small for this load.
            self.snapshots_truncated += 1
        ids.reverse()
        times.reverse()
        values.reverse()
        return (OUT_SNAPSHOT, t, code, instance, lo, hi, ids, times, values)


def new_alarms(st, params):
    """No alarm table yet: ``set_alarms`` installs one (see
    agent.fusion._frames_py.new_frames)."""
    return Alarms(st, params)
