# Types for compiling _frames_py.py with Cython as agent.fusion._frames (see _kernel.pxd).
import cython

from agent.fusion._state cimport State, _learn

cdef unsigned long long EFF_FLAG, RTR_FLAG, ERR_FLAG, EFF_MASK, ERR_CLASS_MASK
cdef Py_ssize_t PACKED_SIZE
cdef int _CR, _LF, _BEL, MAX_SOURCES, MAX_UART_SLOTS, P_HEALTH_MIN, P_HEALTH_PERIODS
cdef long long _HASH_EMPTY, _HASH_MAX
cdef unsigned long long _ONES

cdef long long _hash(long long key, long long mask) noexcept

cdef Py_ssize_t _skip_blanks(const unsigned char[::1] buf, Py_ssize_t p, Py_ssize_t end) noexcept

cdef Py_ssize_t _token_end(const unsigned char[::1] buf, Py_ssize_t p, Py_ssize_t end) noexcept

@cython.locals(v=cython.ulonglong, i=Py_ssize_t, b=cython.ulonglong)
cpdef unsigned long long _le(const unsigned char[::1] buf, Py_ssize_t off, Py_ssize_t size) noexcept



@cython.final
cdef class Health:
    cdef double[::1] params
    cdef int[::1] src_seen
    cdef int[::1] src_live
    cdef int src_top
    cdef Py_ssize_t n_msgs
    cdef Py_ssize_t n_slots
    cdef signed char[::1] m_src
    cdef signed char[::1] m_seen
    cdef double[::1] m_t
    cdef double[::1] m_period
    cdef long long[::1] m_frames
    cdef int[::1] m_timeouts
    cdef signed char[::1] m_out
    cdef int[::1] m_checksum
    cdef int[::1] m_counter

    @cython.locals(size=Py_ssize_t)
    cdef int size(self, Py_ssize_t n_msgs) except -1

    @cython.locals(dt=double)
    cdef inline int heard(self, Py_ssize_t slot, double t) except -1

    @cython.locals(s=int, m=Py_ssize_t, limit=double)
    cdef void step(self, double t) noexcept



@cython.final
cdef class Frames:
    cdef State st
    cdef Health hs
    cdef signed char[::1] hexval
    cdef long long bad_lines
    cdef long long remote_frames
    cdef long long error_frames
    cdef long long fd_frames
    cdef long long adapter_errors
    cdef bint held
    cdef long long key
    cdef unsigned long long le
    cdef int size
    cdef double t
    cdef long long[::1] h_keys
    cdef int[::1] h_vals
    cdef long long h_mask

    @cython.locals(size=cython.longlong)
    cpdef index(self, msg_index, Py_ssize_t n_msgs)

    @cython.locals(h=cython.longlong)
    cdef int message(self, long long key) noexcept

    cdef inline int _take(self, long long key, unsigned long long le, int size, double t, bint timed) except -1

    @cython.locals(m=int)
    cdef inline int _decode(self, long long key, unsigned long long le, int size, double t) except -1

    cdef int release(self) except -1

    @cython.locals(n=Py_ssize_t, data=bytes, size=Py_ssize_t)
    cdef Py_ssize_t split(self, list keys, list datas, list times, Py_ssize_t i) except -1

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, off=Py_ssize_t, raw_id=cython.ulonglong, dlc=int,
                   le=cython.ulonglong, b0=cython.ulonglong, b1=cython.ulonglong, b2=cython.ulonglong,
                   b3=cython.ulonglong, b4=cython.ulonglong, b5=cython.ulonglong, b6=cython.ulonglong,
                   b7=cython.ulonglong)
    cdef int packed(self, const unsigned char[::1] buf, double t) except -1

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, start=Py_ssize_t, c=cython.uchar)
    cdef Py_ssize_t slcan(self, const unsigned char[::1] buf, double t) except -1

    @cython.locals(c=cython.uchar, id_len=int, head=Py_ssize_t, can_id=cython.ulonglong, dlc=int,
                   size=Py_ssize_t, key=cython.longlong, k=int, le=cython.ulonglong, b=cython.ulonglong)
    cdef int _slcan_line(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end, double t) except -1

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, end=Py_ssize_t)
    cdef Py_ssize_t candump(self, const unsigned char[::1] buf, Py_ssize_t start, double t_offset) except -1

    @cython.locals(a0=Py_ssize_t, b0=Py_ssize_t, a1=Py_ssize_t, b1=Py_ssize_t, a3=Py_ssize_t, b3=Py_ssize_t,
                   p=Py_ssize_t, tail=Py_ssize_t, sec=double, id_start=Py_ssize_t, id_len=Py_ssize_t,
                   can_id=cython.ulonglong, size=int, le=cython.ulonglong, hi=int, lo=int, b=cython.ulonglong)
    cdef int _candump_line(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end,
                           double t_offset) except -1

    @cython.locals(q=Py_ssize_t, sec=double, frac=double, div=double, digits=int)
    cdef inline double _stamp(self, const unsigned char[::1] buf, Py_ssize_t a, Py_ssize_t b) noexcept

    @cython.locals(p=Py_ssize_t)
    cdef bint _hex_run(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end) noexcept

    @cython.locals(p=Py_ssize_t, size=int)
    cdef bint _hex_pairs(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end) noexcept

    @cython.locals(p=Py_ssize_t, v=cython.ulonglong)
    cdef unsigned long long _hex_number(self, const unsigned char[::1] buf, Py_ssize_t start,
                                       Py_ssize_t end) noexcept


cpdef Health new_health(double[::1] params)

cpdef Frames new_frames(State st, Health hs)
