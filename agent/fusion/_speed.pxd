# Types for compiling _speed_py.py with Cython as agent.fusion._speed (see _kernel.pxd).
import cython
from libc cimport math  # the .py's math.exp, .cos... become the C functions, not module lookups

from agent.fusion._state cimport State

cdef int MOTION_MOVING, MOTION_STILL, MOTION_UNKNOWN, P_GNSS_FROZEN, P_GNSS_R, P_MOTOR_ACTIVE, P_MOVING
cdef int P_PEDAL_ACTIVE, P_SPEED_Q, P_WHEEL_R, S_CADENCE, S_FIX, S_FUSED_LAT, S_FUSED_LON, S_FUSED_ODOMETER
cdef int S_FUSED_SPEED, S_FUSED_TRIP, S_GNSS_SPEED, S_HDOP, S_HEADING, S_LAT, S_LON, S_MOTOR_I, S_ODOMETER
cdef int S_POS_ESTIMATED, S_SPEED, VOTE_ABSENT, VOTE_FROZEN, VOTE_MOVING, VOTE_NO_FIX, VOTE_REFUSED
cdef int VOTE_STALE, VOTE_STILL
cdef double DEG, M_PER_DEG, INF


@cython.final
cdef class Speed:
    cdef State st
    cdef double[::1] params
    cdef double kf_x
    cdef double kf_p
    cdef double kf_wheel_t
    cdef double kf_gnss_t
    cdef int pos_ok
    cdef double pos_lat
    cdef double pos_lon
    cdef double heading
    cdef int gnss_seen
    cdef bint fix
    cdef double gnss_lat
    cdef double gnss_lon
    cdef double gnss_moved_t
    cdef double trip_km
    cdef double odo_t
    cdef double odo_base
    cdef double odo_base_trip

    @cython.locals(st=State)
    cdef bint _gnss_fix(self, double t) noexcept

    @cython.locals(st=State)
    cdef int track(self, double t) except -1

    cdef bint _frozen(self, double t) noexcept

    @cython.locals(st=State, wheel=bint, gnss=bint, hdop=double)
    cdef int speed(self, double t, double dt, bint implausible) except -2

    @cython.locals(k=double)
    cdef void _kf_update(self, double z, double r) noexcept

    @cython.locals(st=State, d=double, h=double, estimated=double)
    cdef int position(self, double t, double dt, int moving) except -1

    @cython.locals(st=State, dd=double)
    cdef double distance(self, double t, double dt, int moving) except? -1.0

    @cython.locals(st=State, wheel=int, gnss=int, fix=bint, motor=int, pedal=int, verdict=int, top=double)
    cpdef tuple motion(self, double now, double still_kmh)

    @cython.locals(st=State, v=double)
    cdef int _vote(self, int sid, double t, double limit) noexcept


cpdef Speed new_speed(State st, double[::1] params)
