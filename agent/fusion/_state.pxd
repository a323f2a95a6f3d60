# Types for compiling _state_py.py with Cython as agent.fusion._state (see _kernel.pxd).
import cython

from agent.fusion._tables cimport Tables

cdef int OUT_CHANGE, OUT_WINDOW, WIN_LIVE, WIN_HISTORY, REPORT_WINDOW, REPORT_CHANGE, SRC_FUSION, MAX_SOURCES
cdef int OUT_RAW, REPORT_RAW, REPORT_ALL
cdef int REFUSED_RANGE, REFUSED_RATE, P_RATE_MIN, P_RATE_SCALE, P_STALE_MIN, P_STALE_PERIODS
cdef unsigned long long _M8, _M16, _M32
cdef double _QUANTISE_LIMIT, INF

cpdef double _learn(double p, double dt) noexcept

@cython.locals(k=double, n=cython.longlong)
cdef double _quantise(double x, double scale) noexcept

cdef unsigned long long _bswap64(unsigned long long x) noexcept


@cython.final
cdef class State:
    cdef Tables tb
    cdef Py_ssize_t id_space
    cdef double window
    cdef double[::1] win_len
    cdef long long[::1] win_index
    cdef signed char[::1] seen
    cdef double[::1] w_min
    cdef double[::1] w_max
    cdef double[::1] w_sum
    cdef int[::1] w_count
    cdef int[::1] touched
    cdef int[::1] n_touched
    cdef double[::1] w_last
    cdef double[::1] w_last_time
    cdef signed char[::1] sig_src
    cdef double[::1] sig_period
    cdef signed char[::1] policy
    cdef double[::1] deadband
    cdef double[::1] q_scale
    cdef signed char[::1] reported
    cdef double[::1] reported_value
    cdef int source
    cdef double next_event
    cdef double live_start
    cdef long long ring_mask
    cdef int[::1] r_sid
    cdef double[::1] r_t
    cdef double[::1] r_v
    cdef long long r_head
    cdef double[::1] params
    cdef list closed
    cdef long long frames
    cdef long long samples
    cdef long long unknown
    cdef long long truncated
    cdef long long no_value
    cdef long long late
    cdef double ext_lo
    cdef double ext_hi
    # Refusals: after the fields the decode loop reads, so they keep their place.
    cdef double[::1] bad_t
    cdef int[::1] ref_count
    cdef long long[::1] src_refused
    cdef long long refused
    # The raw lane (_drain_raw): off the decode loop's path, after it.
    cdef int n_raw
    cdef long long raw_tail
    cdef signed char[::1] src_raw

    cdef bint due(self, double t) noexcept

    cdef int frame(self, int m, unsigned long long le, int size, double t) except -2

    @cython.locals(out=list)
    cpdef object decode_frame(self, int m, unsigned long long le, Py_ssize_t size)

    @cython.locals(be=cython.ulonglong, first=int, s=int, raw=cython.ulonglong)
    cdef inline int _decode(self, Tables tb, int m, unsigned long long le, double t, list out) except -1

    cdef double _value(self, Tables tb, int s, unsigned long long raw) noexcept

    @cython.locals(mux=int, value=double)
    cdef int _row_slow(self, Tables tb, int s, unsigned long long raw, unsigned long long le, unsigned long long be,
                       double t, list out) except -1

    cdef unsigned long long _raw(self, Tables tb, int s, unsigned long long le, unsigned long long be) noexcept

    cdef int offer(self, int sid, double t, double value) except -1

    cdef bint _accept(self, int sid, double t, double value, double lo, double hi) noexcept

    @cython.locals(dt=double)
    cdef bint _rate_ok(self, int sid, double t, double value) noexcept

    @cython.locals(s=int)
    cdef int _refuse(self, int sid, double t, int reason) noexcept

    @cython.locals(seen=cython.schar, dt=double, r=Py_ssize_t)
    cdef inline int _sample(self, int sid, double t, double value) except -1

    cdef int _change(self, int sid, double t, double value) except -1

    @cython.locals(src=int)
    cdef int put(self, int sid, double t, double value) except -1

    @cython.locals(limit=double)
    cdef bint fresh(self, int sid, double t) noexcept

    @cython.locals(n=int, k=int, v=double)
    cdef int extremes(self, int first, int count, double t) noexcept

    cdef int _count_raw(self, int was, int now) except -1

    @cython.locals(k=int)
    cdef int open_windows(self, double t) except -1

    @cython.locals(k=int, w=cython.longlong)
    cdef int close_until(self, double t) except -1

    @cython.locals(e=double, end=double, k=int)
    cdef void plan(self, double next_tick) noexcept

    @cython.locals(k=int)
    cdef int flush_windows(self) except -1

    @cython.locals(c=int, base=Py_ssize_t, j=int, i=int, sid=int, n=int, rows=list, lt_prev=double, lt=double,
                   lt_obj=object, lo=double, lo_obj=object, hi=double, hi_obj=object, mean=double, mean_obj=object,
                   last=double, last_obj=object)
    cdef int _close(self, int k, long long next_index) except -1

    @cython.locals(size=cython.longlong, tail=cython.longlong, lost=cython.longlong, r=Py_ssize_t, sid=int, src=int,
                   ids=list, times=list, values=list)
    cdef int _drain_raw(self, int k) except -1

    @cython.locals(h=Py_ssize_t)
    cdef void _merge(self, int sid) noexcept

    @cython.locals(out=list)
    cdef list take_closed(self)


cpdef State new_state(Tables tables, double window, double history, long long ring, double[::1] params)
