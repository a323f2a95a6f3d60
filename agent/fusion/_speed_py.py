"""Speed, position and distance, and the stationary decision.

Owns the speed Kalman filter (wheel and GNSS), the GNSS fix and frozen-receiver tracking,
the position (dead reckoning through a lost fix), the trip and the odometer carried on
between the vehicle's readings, and ``motion``: the fail-safe vote of every source able
to see motion. Reads the latest state; writes only derived samples. Imports
agent.fusion.spec and agent.fusion._state_py.
"""

import math

from agent.fusion.spec import (
    INF,
    M_PER_DEG,
    MOTION_MOVING,
    MOTION_STILL,
    MOTION_UNKNOWN,
    P_GNSS_FROZEN,
    P_GNSS_R,
    P_MOTOR_ACTIVE,
    P_MOVING,
    P_PEDAL_ACTIVE,
    P_SPEED_Q,
    P_WHEEL_R,
    S_CADENCE,
    S_FIX,
    S_FUSED_LAT,
    S_FUSED_LON,
    S_FUSED_ODOMETER,
    S_FUSED_SPEED,
    S_FUSED_TRIP,
    S_GNSS_SPEED,
    S_HDOP,
    S_HEADING,
    S_LAT,
    S_LON,
    S_MOTOR_I,
    S_ODOMETER,
    S_POS_ESTIMATED,
    S_SPEED,
    VOTE_ABSENT,
    VOTE_FROZEN,
    VOTE_MOVING,
    VOTE_NO_FIX,
    VOTE_REFUSED,
    VOTE_STALE,
    VOTE_STILL,
)

DEG = math.pi / 180.0


class Speed:
    """The fused speed and what follows from it, one fusion step at a time."""

    def __init__(self, st, params):
        self.st = st
        self.params = params
        self.kf_x = 0.0
        self.kf_p = -1.0
        self.kf_wheel_t = -1.0
        self.kf_gnss_t = -1.0
        self.pos_ok = 0
        self.pos_lat = 0.0
        self.pos_lon = 0.0
        self.heading = 0.0
        self.gnss_seen = 0
        self.fix = 0
        self.gnss_lat = 0.0
        self.gnss_lon = 0.0
        self.gnss_moved_t = -1.0
        self.trip_km = 0.0
        self.odo_t = -1.0
        self.odo_base = -1.0
        self.odo_base_trip = 0.0

    def _gnss_fix(self, t):
        """A fresh position, and no fresh "no fix" (GGA quality 0, RMC status V) since it."""
        st = self.st
        if not st.fresh(S_LAT, t) or not st.fresh(S_LON, t):
            return False
        return not (st.fresh(S_FIX, t) and st.w_last[S_FIX] < 1.0
                    and st.w_last_time[S_FIX] >= st.w_last_time[S_LAT])

    def track(self, t):
        """Whether there is a GNSS fix at step ``t`` (``fix``, for the rest of the step),
        and when the position last moved, to tell a frozen receiver (the same fix over
        and over) from a moving one."""
        st = self.st
        self.fix = self._gnss_fix(t)
        if not self.fix:
            self.gnss_moved_t = -1.0
        elif self.gnss_moved_t < 0.0 or st.w_last[S_LAT] != self.gnss_lat or st.w_last[S_LON] != self.gnss_lon:
            self.gnss_lat = st.w_last[S_LAT]
            self.gnss_lon = st.w_last[S_LON]
            self.gnss_moved_t = t
        return 0

    def _frozen(self, t):
        """The GNSS speed says moving while its position has not moved for gnss_frozen_s."""
        return (self.gnss_moved_t >= 0.0 and t - self.gnss_moved_t >= self.params[P_GNSS_FROZEN]
                and self.st.w_last[S_GNSS_SPEED] > self.params[P_MOVING])

    def speed(self, t, dt, implausible):
        """Wheel and GNSS speed in a one-state Kalman filter (GNSS with a fix that is not
        frozen). While the two are judged ``implausible`` (the alarm), only the faster one
        is used: a sensor that fails reads 0 or freezes far more often than it invents
        speed (a stuck receiver, an unplugged magnet), and a speed below the true one is
        the unsafe error. Returns -1 without any speed, else whether moving."""
        st = self.st
        wheel = st.fresh(S_SPEED, t)
        gnss = st.fresh(S_GNSS_SPEED, t) and self.fix and not self._frozen(t)
        if wheel and gnss and implausible:
            if st.w_last[S_SPEED] >= st.w_last[S_GNSS_SPEED]:
                gnss = False
            else:
                wheel = False
        if not wheel and not gnss:
            self.kf_p = -1.0
            return -1
        if self.kf_p < 0.0:
            self.kf_x = st.w_last[S_SPEED] if wheel else st.w_last[S_GNSS_SPEED]
            self.kf_p = self.params[P_WHEEL_R] if wheel else self.params[P_GNSS_R]
        else:
            self.kf_p += self.params[P_SPEED_Q] * dt
        if wheel and st.w_last_time[S_SPEED] > self.kf_wheel_t:
            self.kf_wheel_t = st.w_last_time[S_SPEED]
            self._kf_update(st.w_last[S_SPEED], self.params[P_WHEEL_R])
        if gnss and st.w_last_time[S_GNSS_SPEED] > self.kf_gnss_t:
            self.kf_gnss_t = st.w_last_time[S_GNSS_SPEED]
            hdop = st.w_last[S_HDOP] if st.fresh(S_HDOP, t) else 1.0
            if hdop < 1.0:
                hdop = 1.0
            self._kf_update(st.w_last[S_GNSS_SPEED], self.params[P_GNSS_R] * hdop * hdop)
        if self.kf_x < 0.0:
            self.kf_x = 0.0
        st.put(S_FUSED_SPEED, t, self.kf_x)
        return 1 if self.kf_x > self.params[P_MOVING] else 0

    def _kf_update(self, z, r):
        k = self.kf_p / (self.kf_p + r)
        self.kf_x += k * (z - self.kf_x)
        self.kf_p *= 1.0 - k

    def position(self, t, dt, moving):
        """GNSS position while there is a fix; without one, dead reckoning from the fused
        speed and the last course over ground, flagged as estimated."""
        st = self.st
        if self.fix:
            self.gnss_seen = 1
            self.pos_ok = 1
            self.pos_lat = st.w_last[S_LAT]
            self.pos_lon = st.w_last[S_LON]
            if moving == 1 and st.fresh(S_HEADING, t):
                self.heading = st.w_last[S_HEADING]
            estimated = 0.0
        elif self.pos_ok and moving >= 0:
            d = self.kf_x / 3.6 * dt
            h = self.heading * DEG
            self.pos_lat += d * math.cos(h) / M_PER_DEG
            self.pos_lon += d * math.sin(h) / (M_PER_DEG * math.cos(self.pos_lat * DEG))
            estimated = 1.0
        else:
            return 0
        st.put(S_FUSED_LAT, t, self.pos_lat)
        st.put(S_FUSED_LON, t, self.pos_lon)
        st.put(S_POS_ESTIMATED, t, estimated)
        return 0

    def distance(self, t, dt, moving):
        """The trip by the fused speed, and the odometer: the vehicle's last reading plus
        the trip since. Returns the km of this step."""
        st = self.st
        dd = 0.0
        if moving >= 0:
            dd = self.kf_x / 3600.0 * dt
            self.trip_km += dd
            st.put(S_FUSED_TRIP, t, self.trip_km)
        if st.seen[S_ODOMETER] and st.w_last_time[S_ODOMETER] > self.odo_t:
            self.odo_t = st.w_last_time[S_ODOMETER]
            self.odo_base = st.w_last[S_ODOMETER]
            self.odo_base_trip = self.trip_km
        if self.odo_base >= 0.0:
            st.put(S_FUSED_ODOMETER, t, self.odo_base + self.trip_km - self.odo_base_trip)
        return dd

    def motion(self, now, still_kmh):
        """See ``Kernel.motion``."""
        st = self.st
        wheel = self._vote(S_SPEED, now, still_kmh)
        gnss = self._vote(S_GNSS_SPEED, now, still_kmh)
        fix = self._gnss_fix(now)
        if gnss == VOTE_STILL or gnss == VOTE_MOVING:
            if not fix:
                gnss = VOTE_NO_FIX
            elif self._frozen(now):
                gnss = VOTE_FROZEN
        elif gnss != VOTE_ABSENT and not fix and st.fresh(S_FIX, now) and st.w_last[S_FIX] < 1.0:
            gnss = VOTE_NO_FIX  # a receiver that says so, not one that went quiet
        motor = self._vote(S_MOTOR_I, now, self.params[P_MOTOR_ACTIVE])
        pedal = self._vote(S_CADENCE, now, self.params[P_PEDAL_ACTIVE])
        if wheel == VOTE_MOVING or gnss == VOTE_MOVING or motor == VOTE_MOVING or pedal == VOTE_MOVING:
            verdict = MOTION_MOVING
        elif wheel == VOTE_STILL or gnss == VOTE_STILL:
            verdict = MOTION_STILL
        else:
            verdict = MOTION_UNKNOWN
        top = -1.0
        if (wheel == VOTE_STILL or wheel == VOTE_MOVING) and st.w_last[S_SPEED] > top:
            top = st.w_last[S_SPEED]
        if (gnss == VOTE_STILL or gnss == VOTE_MOVING) and st.w_last[S_GNSS_SPEED] > top:
            top = st.w_last[S_GNSS_SPEED]
        if st.fresh(S_FUSED_SPEED, now) and st.w_last[S_FUSED_SPEED] > top:
            top = st.w_last[S_FUSED_SPEED]
        return (verdict, wheel, st.w_last[S_SPEED], gnss, st.w_last[S_GNSS_SPEED], motor,
                st.w_last[S_MOTOR_I], pedal, st.w_last[S_CADENCE], top)

    def _vote(self, sid, t, limit):
        """What signal ``sid`` says of motion: moving at or above ``limit`` (either sign)."""
        st = self.st
        if not st.seen[sid]:
            return VOTE_ABSENT if st.bad_t[sid] == -INF else VOTE_REFUSED
        if st.bad_t[sid] > st.w_last_time[sid]:
            return VOTE_REFUSED
        if not st.fresh(sid, t):
            return VOTE_STALE
        v = st.w_last[sid]
        return VOTE_MOVING if v >= limit or v <= -limit else VOTE_STILL


def new_speed(st, params):
    """No speed yet, at trip 0 (see agent.fusion._frames_py.new_frames)."""
    return Speed(st, params)
