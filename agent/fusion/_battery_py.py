"""The traction battery: energy, state of charge and of health, consumption and range,
and the pack's cell and temperature extremes with the fastest temperature rise.

Owns the coulomb count (pulled to the BMS's SoC and, at rest, to the open-circuit
voltage's), the capacity measured from SoC swings, the energy counters and the Wh/km
average, and the per-sensor temperature history. A new BMS SoC reading's jump from the
one before is handed out (``soc_jump``) for the alarms to judge. Reads the latest state;
writes only derived samples. Imports agent.fusion.spec and agent.fusion._state_py.
"""

import math
from array import array

from agent.fusion.spec import (
    N_CELLS,
    N_TEMPS,
    P_CELLS,
    P_CONSUMPTION_KM,
    P_DESIGN_AH,
    P_NOMINAL_V,
    P_RESERVE,
    P_REST_A,
    P_REST_TIME,
    P_RISE_WINDOW,
    P_SOC_BMS_TAU,
    P_SOC_OCV_TAU,
    P_SOH_SWING,
    S_CELL0,
    S_CELL_MAX,
    S_CELL_MIN,
    S_CELL_SPREAD,
    S_CONSUMPTION,
    S_ENERGY_CHARGED,
    S_ENERGY_OUT,
    S_ENERGY_REGEN,
    S_FULL_AH,
    S_FUSED_RANGE,
    S_FUSED_SOC,
    S_FUSED_SOH,
    S_PACK_I,
    S_PACK_V,
    S_POWER,
    S_SOC,
    S_TEMP0,
    S_TEMP_MAX,
    S_TEMP_MIN,
    S_TEMP_RISE,
    S_TEMP_SPREAD,
    SRC_FUSION,
    TEMP_HISTORY,
    _zeros,
)

# A temperature history entry of a sensor that was not fresh then.
NO_READING = -1000.0


def _gain(dt, tau):
    return dt / tau if dt < tau else 1.0


class Battery:
    """The pack's derived signals, one fusion step at a time."""

    def __init__(self, st, params):
        self.st = st
        self.params = params
        self.e_out = 0.0
        self.e_regen = 0.0
        self.e_charged = 0.0
        self.cons_wh = 0.0
        self.cons_km = 0.0
        self.soc = -1.0
        self.rest_since = -1.0
        self.ah = 0.0
        self.soh = -1.0
        self.soh_anchor_soc = -1.0
        self.soh_anchor_ah = 0.0
        self.soc_bms_t = -1.0
        self.soc_bms_prev = -1.0
        self.soc_bms_src = 0
        self.soc_jump = -1.0
        self.temp_hist = _zeros("d", N_TEMPS * TEMP_HISTORY)
        self.temp_hist_t = _zeros("d", TEMP_HISTORY)
        self.temp_hist_n = 0
        self.temp_hist_next = -1.0

    def set_ocv(self, curve):
        """See ``Kernel.set_ocv``."""
        if len(curve) < 2:
            raise ValueError("an OCV curve needs at least two points")
        for i in range(1, len(curve)):
            if not (curve[i][0] > curve[i - 1][0] and curve[i][1] > curve[i - 1][1]):
                raise ValueError("OCV curve must rise in both SoC and voltage")
        self.ocv_soc = array("d", [p[0] for p in curve])
        self.ocv_v = array("d", [p[1] for p in curve])

    def step(self, t, dt, moving, km):
        """Energy, SoC, consumption and range after a step of ``dt`` s that covered
        ``km`` (``moving``: -1 without any speed, else whether moving)."""
        st = self.st
        if not st.fresh(S_PACK_I, t):
            self.rest_since = -1.0
            return 0
        i = st.w_last[S_PACK_I]
        if abs(i) < self.params[P_REST_A]:
            if self.rest_since < 0.0:
                self.rest_since = t
        else:
            self.rest_since = -1.0
        self.ah += i * dt / 3600.0
        cap = self._capacity()
        self._soc(t, dt, i, cap)
        if not st.fresh(S_PACK_V, t):
            return 0
        p = st.w_last[S_PACK_V] * i
        st.put(S_POWER, t, p)
        wh = p * dt / 3600.0
        if wh < 0.0:
            self.e_out -= wh
        elif moving == 1:
            self.e_regen += wh
        else:
            self.e_charged += wh
        st.put(S_ENERGY_OUT, t, self.e_out)
        st.put(S_ENERGY_REGEN, t, self.e_regen)
        st.put(S_ENERGY_CHARGED, t, self.e_charged)
        if wh < 0.0 or moving == 1:
            decay = math.exp(-km / self.params[P_CONSUMPTION_KM])
            self.cons_wh = self.cons_wh * decay - wh
            self.cons_km = self.cons_km * decay + km
        if self.cons_km >= 0.1 * self.params[P_CONSUMPTION_KM]:
            wh_km = self.cons_wh / self.cons_km
            st.put(S_CONSUMPTION, t, wh_km)
            if self.soc >= 0.0:
                usable = self.soc - self.params[P_RESERVE]
                if usable < 0.0:
                    usable = 0.0
                wh_left = usable / 100.0 * cap * self.params[P_NOMINAL_V] * self.params[P_CELLS]
                st.put(S_FUSED_RANGE, t, wh_left / (wh_km if wh_km > 1.0 else 1.0))
        return 0

    def _capacity(self):
        st = self.st
        if st.seen[S_FULL_AH] and st.w_last[S_FULL_AH] > 0.0:
            return st.w_last[S_FULL_AH]
        if self.soh > 0.0:
            return self.params[P_DESIGN_AH] * self.soh / 100.0
        return self.params[P_DESIGN_AH]

    def _soc(self, t, dt, i, cap):
        """Coulomb counting, pulled towards the BMS's own SoC and, after a rest, towards
        the SoC the open-circuit voltage says; the BMS readings also measure capacity."""
        st = self.st
        bms = st.fresh(S_SOC, t)
        rested = self.rest_since >= 0.0 and t - self.rest_since >= self.params[P_REST_TIME] \
            and st.fresh(S_PACK_V, t)
        if bms and st.w_last_time[S_SOC] > self.soc_bms_t:
            self._soc_reading(st.w_last[S_SOC], st.sig_src[S_SOC])
        if self.soc < 0.0:
            if bms:
                self.soc = st.w_last[S_SOC]
            elif rested:
                self.soc = self._ocv_soc(st.w_last[S_PACK_V] / self.params[P_CELLS])
            else:
                return 0
        else:
            self.soc += 100.0 * i * dt / 3600.0 / cap
            if bms:
                self.soc += (st.w_last[S_SOC] - self.soc) * _gain(dt, self.params[P_SOC_BMS_TAU])
            if rested:
                ocv = self._ocv_soc(st.w_last[S_PACK_V] / self.params[P_CELLS])
                self.soc += (ocv - self.soc) * _gain(dt, self.params[P_SOC_OCV_TAU])
        if self.soc < 0.0:
            self.soc = 0.0
        elif self.soc > 110.0:
            self.soc = 110.0
        st.put(S_FUSED_SOC, t, self.soc)
        if self.soh > 0.0:
            st.put(S_FUSED_SOH, t, self.soh)
        elif st.seen[S_FULL_AH] and st.w_last[S_FULL_AH] > 0.0:
            st.put(S_FUSED_SOH, t, 100.0 * st.w_last[S_FULL_AH] / self.params[P_DESIGN_AH])
        return 0

    def _soc_reading(self, reading, src):
        """A new BMS SoC reading: its jump from the last one of the same source goes to
        ``soc_jump``; a swing of ``soh_min_swing_pct`` since the anchor measures the
        capacity."""
        self.soc_bms_t = self.st.w_last_time[S_SOC]
        if src == self.soc_bms_src and self.soc_bms_prev >= 0.0:
            self.soc_jump = abs(reading - self.soc_bms_prev)
        self.soc_bms_src = src
        self.soc_bms_prev = reading
        if self.soh_anchor_soc < 0.0:
            self.soh_anchor_soc = reading
            self.soh_anchor_ah = self.ah
        elif abs(reading - self.soh_anchor_soc) >= self.params[P_SOH_SWING]:
            capacity = abs(self.ah - self.soh_anchor_ah) / (abs(reading - self.soh_anchor_soc) / 100.0)
            observed = 100.0 * capacity / self.params[P_DESIGN_AH]
            self.soh = observed if self.soh < 0.0 else self.soh + 0.3 * (observed - self.soh)
            self.soh_anchor_soc = reading
            self.soh_anchor_ah = self.ah

    def _ocv_soc(self, cell_v):
        n = len(self.ocv_v)
        if cell_v <= self.ocv_v[0]:
            return self.ocv_soc[0]
        for k in range(1, n):
            if cell_v <= self.ocv_v[k]:
                f = (cell_v - self.ocv_v[k - 1]) / (self.ocv_v[k] - self.ocv_v[k - 1])
                return self.ocv_soc[k - 1] + f * (self.ocv_soc[k] - self.ocv_soc[k - 1])
        return self.ocv_soc[n - 1]

    def pack(self, t):
        """Cell voltage and pack temperature extremes (where the BMS does not report them),
        spreads and the fastest rise."""
        st = self.st
        n = st.extremes(S_CELL0, N_CELLS, t)
        if n > 0:
            self._fill_in(S_CELL_MIN, t, st.ext_lo)
            self._fill_in(S_CELL_MAX, t, st.ext_hi)
            if n > 1:
                st.put(S_CELL_SPREAD, t, st.ext_hi - st.ext_lo)
        n = st.extremes(S_TEMP0, N_TEMPS, t)
        if n > 0:
            self._fill_in(S_TEMP_MIN, t, st.ext_lo)
            self._fill_in(S_TEMP_MAX, t, st.ext_hi)
            if n > 1:
                st.put(S_TEMP_SPREAD, t, st.ext_hi - st.ext_lo)
        self._temp_rise(t)
        return 0

    def _fill_in(self, sid, t, value):
        """A pack extreme the BMS did not report itself (a fresh one of its own wins)."""
        if self.st.sig_src[sid] == SRC_FUSION or not self.st.fresh(sid, t):
            self.st.put(sid, t, value)
        return 0

    def _temp_rise(self, t):
        """The fastest pack sensor's rise (C/min) from the reading kept about
        ``temp_rise_window_s`` ago (one is kept a second) to its reading now."""
        st = self.st
        span = int(self.params[P_RISE_WINDOW] + 0.5)
        fastest = 0.0
        n = 0
        if self.temp_hist_n > span:
            back = (self.temp_hist_n - 1 - span) % TEMP_HISTORY
            elapsed = t - self.temp_hist_t[back]
            for k in range(N_TEMPS):
                then = self.temp_hist[back * N_TEMPS + k]
                if then != NO_READING and elapsed > 0.0 and st.fresh(S_TEMP0 + k, t):
                    rate = (st.w_last[S_TEMP0 + k] - then) * 60.0 / elapsed
                    if n == 0 or rate > fastest:
                        fastest = rate
                    n += 1
        if t >= self.temp_hist_next:
            row = self.temp_hist_n % TEMP_HISTORY
            self.temp_hist_t[row] = t
            for k in range(N_TEMPS):
                fresh = st.fresh(S_TEMP0 + k, t)
                self.temp_hist[row * N_TEMPS + k] = st.w_last[S_TEMP0 + k] if fresh else NO_READING
            self.temp_hist_n += 1
            self.temp_hist_next = t + 1.0
        if n > 0:
            st.put(S_TEMP_RISE, t, fastest)
        return 0


def new_battery(st, params):
    """Nothing counted yet (see agent.fusion._frames_py.new_frames)."""
    return Battery(st, params)
