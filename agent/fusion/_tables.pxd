# Types for compiling _tables_py.py with Cython as agent.fusion._tables (see _kernel.pxd).
import cython

cdef double INF


@cython.final
cdef class Tables:
    cdef Py_ssize_t id_space
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
    cdef double[::1] sig_min
    cdef double[::1] sig_max
    cdef double[::1] row_lo
    cdef double[::1] row_hi
    cdef unsigned long long[::1] row_raw_lo
    cdef unsigned long long[::1] row_raw_hi
    cdef double[::1] lim_lo
    cdef double[::1] lim_hi
    cdef double[::1] lim_rate

    @cython.locals(n=Py_ssize_t, s=Py_ssize_t, sid=int, lo=double, hi=double)
    cdef int _row_limits(self) except -1


cpdef Tables new_tables(Py_ssize_t id_space)
