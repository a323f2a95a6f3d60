# Types for compiling _alarms_py.py with Cython as agent.fusion._alarms (see _kernel.pxd).
import cython
from libc cimport math  # the .py's math.exp, .cos... become the C functions, not module lookups

from agent.fusion._frames cimport Health
from agent.fusion._state cimport State

cdef int A_CELL_OVER_VOLTAGE, A_COMM_LOST, A_DATA_QUALITY, A_GNSS_LOST, A_OVER_CHARGE, A_STORAGE_FAILED
cdef int A_THEFT, A_WHEEL_IMPLAUSIBLE, ABOVE, BELOW, MAX_ALARM_CODE, MAX_SOURCES, OUT_ALARM, OUT_SNAPSHOT
cdef int P_CAPTURE_AFTER, P_CAPTURE_BEFORE, P_CELLS, P_FULL_SOC, P_QUALITY_TAU, P_TICK, P_WHEEL_CHECK_MIN
cdef int PER_CELL, S_CELL_MAX, S_FUSED_SPEED, S_GNSS_SPEED, S_LOCKED, S_PACK_I, S_SOC, S_SPEED, SPECIAL


@cython.final
cdef class Alarms:
    cdef State st
    cdef double[::1] params
    cdef long long[::1] q_prev
    cdef double[::1] q_rate
    cdef long long snapshots
    cdef long long snapshots_truncated
    cdef public bint incremental
    cdef object alarm_rows
    cdef int n_alarms
    cdef int[::1] a_code
    cdef int[::1] a_level
    cdef int[::1] a_sid
    cdef int[::1] a_dir
    cdef double[::1] a_thr
    cdef double[::1] a_clr
    cdef double[::1] a_on
    cdef double[::1] a_off
    cdef int[::1] a_block
    cdef signed char[::1] a_active
    cdef double[::1] a_since
    cdef double[::1] a_raised_t
    cdef double[::1] a_value
    cdef signed char[::1] a_quiet
    cdef double[::1] spec_value
    cdef signed char[::1] spec_ok
    cdef int[::1] a_row
    cdef int cap_pending
    cdef double cap_t
    cdef int cap_code
    cdef int cap_instance

    cdef int special(self, int code, double value) except -1

    @cython.locals(a=int)
    cdef bint active(self, int code) noexcept

    @cython.locals(tau=double, decay=double, s=int, new=cython.longlong)
    cdef int quality(self) except -1

    @cython.locals(st=State, locked=bint, full=bint, speed=double, g=double, w=double, top=double, a=int)
    cdef void specials(self, double t, bint gnss, int gnss_seen) noexcept

    @cython.locals(a=int, code=int, sid=int, s=int, base=int)
    cdef int judge(self, double t, Health health) except -1

    @cython.locals(up=bint, cross=bint, delay=double, level=int)
    cdef int _debounce(self, int a, int i, int instance, double t, double value) except -1

    @cython.locals(t=double)
    cdef int capture(self) except -1

    @cython.locals(st=State, ids=list, times=list, values=list, size=cython.longlong, stop=cython.longlong,
                   j=cython.longlong, r=Py_ssize_t, rt=double)
    cdef tuple ring_slice(self, double t, int code, int instance, double lo, double hi)


cpdef Alarms new_alarms(State st, double[::1] params)
