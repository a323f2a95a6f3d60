# Types for compiling _kernel_py.py with Cython (the aiohttp trick): setup.py builds
# that file as the extension agent.fusion._kernel, and this augmenting .pxd gives it
# C types, so one source serves both the compiled and the pure kernel.
import cython


cdef class Kernel:
    cdef public Py_ssize_t id_space
    cdef public double window
    cdef double[::1] last
    cdef double[::1] last_time
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
    cdef list closed
    cdef dict msg_index
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
    cdef signed char[::1] sig_has_na
    cdef unsigned long long[::1] sig_na
    cdef unsigned long long[::1] sig_mask

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, m=int, size=Py_ssize_t, t=double, data=bytes)
    cpdef list feed_frames(self, list keys, list datas, list times)

    @cython.locals(m=int, out=list)
    cpdef object decode_frame(self, object key, bytes data)

    @cython.locals(size=Py_ssize_t, le=cython.ulonglong, be=cython.ulonglong, first=int, s=int,
                   raw=cython.ulonglong, value=double)
    cdef void _decode(self, int m, bytes data, double t, list out)

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, sid=int, t=double)
    cpdef list feed_values(self, list ids, list times, list values)

    cpdef list close_due(self, double now)

    cpdef list flush(self)

    @cython.locals(w=cython.longlong)
    cdef void _advance(self, double t)

    cdef void _sample(self, int sid, double t, double value)

    @cython.locals(k=Py_ssize_t, sid=int, c=int, rows=list)
    cdef void _close(self, long long next_index)

    @cython.locals(out=list)
    cdef list _take_closed(self)
