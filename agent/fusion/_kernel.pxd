# Types for compiling _kernel_py.py with Cython (the aiohttp trick): setup.py builds
# that file as the extension agent.fusion._kernel, and this augmenting .pxd gives it
# C types, so one source serves both the compiled and the pure kernel.
import cython

cdef unsigned long long EFF_FLAG, RTR_FLAG, ERR_FLAG, EFF_MASK, ERR_CLASS_MASK
cdef Py_ssize_t PACKED_SIZE
cdef int _CR, _LF, _BEL
cdef long long _HASH_EMPTY
cdef unsigned long long _M8, _M16, _M32


cdef long long _hash(long long key, long long mask) noexcept

cdef unsigned long long _bswap64(unsigned long long x) noexcept

cdef Py_ssize_t _skip_blanks(const unsigned char[::1] buf, Py_ssize_t p, Py_ssize_t end) noexcept

cdef Py_ssize_t _token_end(const unsigned char[::1] buf, Py_ssize_t p, Py_ssize_t end) noexcept

@cython.locals(v=cython.ulonglong, i=Py_ssize_t, b=cython.ulonglong)
cdef unsigned long long _le(const unsigned char[::1] buf, Py_ssize_t off, Py_ssize_t size) noexcept


@cython.final
cdef class Kernel:
    cdef public Py_ssize_t id_space
    cdef public double window
    cdef signed char[::1] seen
    cdef double[::1] w_min
    cdef double[::1] w_max
    cdef double[::1] w_sum
    cdef double[::1] w_last
    cdef double[::1] w_last_time
    cdef int[::1] w_count
    cdef int[::1] touched
    cdef Py_ssize_t n_touched
    cdef long long w_index
    cdef public long long frames
    cdef public long long samples
    cdef public long long unknown
    cdef public long long truncated
    cdef public long long no_value
    cdef public long long late
    cdef public long long bad_lines
    cdef public long long remote_frames
    cdef public long long error_frames
    cdef public long long fd_frames
    cdef public long long adapter_errors
    cdef signed char[::1] hexval
    cdef list closed
    cdef long long[::1] h_keys
    cdef int[::1] h_vals
    cdef long long h_mask
    cdef int[::1] msg_len
    cdef int[::1] msg_first
    cdef int[::1] msg_count
    cdef signed char[::1] sig_big_endian
    cdef int[::1] sig_shift
    cdef int[::1] sig_length
    cdef signed char[::1] sig_signed
    cdef double[::1] sig_factor
    cdef double[::1] sig_offset
    cdef int[::1] sig_id
    cdef unsigned long long[::1] sig_mask
    cdef signed char[::1] sig_has_na
    cdef unsigned long long[::1] sig_na
    cdef int[::1] sig_mux_row
    cdef unsigned long long[::1] sig_mux_value

    @cython.locals(h=cython.longlong)
    cdef int _message(self, long long key) noexcept

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, data=bytes, size=Py_ssize_t)
    cpdef list feed_frames(self, list keys, list datas, list times)

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, off=Py_ssize_t, raw_id=cython.ulonglong, dlc=int, k=int,
                   le=cython.ulonglong, b=cython.ulonglong)
    cpdef list feed_packed(self, const unsigned char[::1] buf, double t)

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, start=Py_ssize_t, c=cython.uchar)
    cpdef tuple feed_slcan(self, const unsigned char[::1] buf, double t)

    @cython.locals(c=cython.uchar, id_len=int, head=Py_ssize_t, can_id=cython.ulonglong, dlc=int,
                   size=Py_ssize_t, key=cython.longlong, k=int, le=cython.ulonglong, b=cython.ulonglong)
    cdef int _slcan_line(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end, double t) except -1

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, start=Py_ssize_t, end=Py_ssize_t)
    cpdef tuple feed_candump(self, const unsigned char[::1] buf, double t_offset)

    @cython.locals(a0=Py_ssize_t, b0=Py_ssize_t, a1=Py_ssize_t, b1=Py_ssize_t, a3=Py_ssize_t, b3=Py_ssize_t,
                   p=Py_ssize_t, q=Py_ssize_t, sec=double, frac=double, div=double, digits=int,
                   id_start=Py_ssize_t, id_len=Py_ssize_t, can_id=cython.ulonglong, tail=Py_ssize_t,
                   size=int, hi=int, lo=int, t=double, le=cython.ulonglong, b=cython.ulonglong)
    cdef int _candump_line(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end,
                           double t_offset) except -1

    @cython.locals(p=Py_ssize_t)
    cdef bint _hex_run(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end) noexcept

    @cython.locals(p=Py_ssize_t, size=int)
    cdef bint _hex_pairs(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t end) noexcept

    @cython.locals(p=Py_ssize_t, v=cython.ulonglong)
    cdef unsigned long long _hex_number(self, const unsigned char[::1] buf, Py_ssize_t start,
                                       Py_ssize_t end) noexcept

    @cython.locals(m=int)
    cdef int _frame(self, long long key, unsigned long long le, Py_ssize_t size, double t) except -1

    @cython.locals(m=int, out=list)
    cpdef object decode_frame(self, long long key, const unsigned char[::1] data)

    @cython.locals(be=cython.ulonglong, first=int, s=int, mux=int, raw=cython.ulonglong, value=double)
    cdef int _decode(self, int m, unsigned long long le, double t, list out) except -1

    cdef unsigned long long _raw(self, int s, unsigned long long le, unsigned long long be) noexcept

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, sid=int, t=double)
    cpdef list feed_values(self, list ids, list times, list values)

    cpdef list close_due(self, double now)

    cpdef list flush(self)

    @cython.locals(w=cython.longlong)
    cdef int _advance(self, double t) except -1

    cdef void _sample(self, int sid, double t, double value) noexcept

    @cython.locals(k=Py_ssize_t, sid=int, c=int, rows=list)
    cdef int _close(self, long long next_index) except -1

    @cython.locals(out=list)
    cdef list _take_closed(self)
