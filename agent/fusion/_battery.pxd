# Types for compiling _battery_py.py with Cython as agent.fusion._battery (see _kernel.pxd).
import cython
from libc cimport math  # the .py's math.exp, .cos... become the C functions, not module lookups

from agent.fusion._state cimport State

cdef int N_CELLS, N_TEMPS, P_CELLS, P_CONSUMPTION_KM, P_DESIGN_AH, P_NOMINAL_V, P_REST_A, P_REST_TIME
cdef int P_RESERVE, P_RISE_WINDOW, P_SOC_BMS_TAU, P_SOC_OCV_TAU, P_SOH_SWING, S_CELL0, S_CELL_MAX, S_CELL_MIN
cdef int S_CELL_SPREAD, S_CONSUMPTION, S_ENERGY_CHARGED, S_ENERGY_OUT, S_ENERGY_REGEN, S_FULL_AH
cdef int S_FUSED_RANGE, S_FUSED_SOC, S_FUSED_SOH, S_PACK_I, S_PACK_V, S_POWER, S_SOC, S_TEMP0, S_TEMP_MAX
cdef int S_TEMP_MIN, S_TEMP_RISE, S_TEMP_SPREAD, SRC_FUSION, TEMP_HISTORY
cdef double NO_READING

cdef double _gain(double dt, double tau) noexcept


@cython.final
cdef class Battery:
    cdef State st
    cdef double[::1] params
    cdef double e_out
    cdef double e_regen
    cdef double e_charged
    cdef double cons_wh
    cdef double cons_km
    cdef double soc
    cdef double rest_since
    cdef double ah
    cdef double soh
    cdef double soh_anchor_soc
    cdef double soh_anchor_ah
    cdef double soc_bms_t
    cdef double soc_bms_prev
    cdef int soc_bms_src
    cdef double soc_jump
    cdef double[::1] ocv_soc
    cdef double[::1] ocv_v
    cdef double[::1] temp_hist
    cdef double[::1] temp_hist_t
    cdef long long temp_hist_n
    cdef double temp_hist_next

    @cython.locals(st=State, i=double, cap=double, p=double, wh=double, decay=double, wh_km=double,
                   usable=double, wh_left=double)
    cdef int step(self, double t, double dt, int moving, double km) except -1

    @cython.locals(st=State)
    cdef double _capacity(self) noexcept

    @cython.locals(st=State, bms=bint, rested=bint, ocv=double)
    cdef int _soc(self, double t, double dt, double i, double cap) except -1

    @cython.locals(capacity=double, observed=double)
    cdef int _soc_reading(self, double reading, int src) except -1

    @cython.locals(n=Py_ssize_t, k=Py_ssize_t, f=double)
    cdef double _ocv_soc(self, double cell_v) noexcept

    @cython.locals(st=State, n=int)
    cdef int pack(self, double t) except -1

    cdef int _fill_in(self, int sid, double t, double value) except -1

    @cython.locals(st=State, span=int, row=Py_ssize_t, back=Py_ssize_t, fastest=double, elapsed=double,
                   then=double, rate=double, n=int, k=int, fresh=bint)
    cdef int _temp_rise(self, double t) except -1


cpdef Battery new_battery(State st, double[::1] params)
