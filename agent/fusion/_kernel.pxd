# Types for compiling _kernel_py.py with Cython (the aiohttp trick): setup.py builds
# that file as the extension agent.fusion._kernel, and this augmenting .pxd gives it
# C types, so one source serves both the compiled and the pure kernel. Each part is
# built the same way from its own pair (_frames_py.py and _frames.pxd as
# agent.fusion._frames, ...). A .pxd cimports the parts' types and factories, its .py
# imports the same names from the pure modules; parts call each other through the
# types' vtables, and a name the .pxd declares cdef is a C global set at import.
import cython

from agent.fusion._alarms cimport Alarms, new_alarms
from agent.fusion._battery cimport Battery, new_battery
from agent.fusion._frames cimport Frames, Health, _le, new_frames, new_health
from agent.fusion._speed cimport Speed, new_speed
from agent.fusion._state cimport State, new_state
from agent.fusion._tables cimport Tables, new_tables

cdef int A_SOC_JUMP, A_WHEEL_IMPLAUSIBLE, FUSION_ID_SPACE, MAX_TICKS_PER_CALL, P_CAPTURE_BEFORE
cdef int P_RISE_WINDOW, P_TICK, TEMP_HISTORY


@cython.final
cdef class Kernel:
    cdef Frames fr
    cdef Tables tb
    cdef State st
    cdef Health hs
    cdef Speed sp
    cdef Battery bat
    cdef Alarms al
    cdef double[::1] params
    cdef public Py_ssize_t id_space
    cdef public double window
    cdef public double history
    cdef public double tick
    cdef int started
    cdef long long tick_index
    cdef double next_tick
    cdef double f_last
    cdef public long long ticks

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, sid=int, t=double)
    cpdef list feed_values(self, list ids, list times, list values)

    @cython.locals(i=Py_ssize_t)
    cpdef list feed_frames(self, list keys, list datas, list times)

    cpdef list feed_packed(self, const unsigned char[::1] buf, double t)

    @cython.locals(consumed=Py_ssize_t)
    cpdef tuple feed_slcan(self, const unsigned char[::1] buf, double t)

    @cython.locals(consumed=Py_ssize_t)
    cpdef tuple feed_candump(self, const unsigned char[::1] buf, double t_offset)

    cdef int _release(self) except -1

    cpdef list close_due(self, double now)

    cpdef list flush(self)

    cdef int _advance(self, double t) except -1

    cdef int _start(self, double t) except -1

    cdef void _skip_to(self, double t) noexcept

    @cython.locals(n=int)
    cdef int _due(self, double t) except -1

    @cython.locals(dt=double, moving=int, km=double)
    cdef int _step(self, double t) except -1

    @cython.locals(m=int, size=Py_ssize_t)
    cpdef object decode_frame(self, long long key, const unsigned char[::1] data)
