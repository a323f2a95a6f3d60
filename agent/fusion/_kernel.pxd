# Types for compiling _kernel_py.py with Cython (the aiohttp trick): setup.py builds
# that file as the extension agent.fusion._kernel, and this augmenting .pxd gives it
# C types, so one source serves both the compiled and the pure kernel.
import cython

cdef unsigned long long EFF_FLAG, RTR_FLAG, ERR_FLAG, EFF_MASK, ERR_CLASS_MASK
cdef Py_ssize_t PACKED_SIZE
cdef int _CR, _LF, _BEL
cdef long long _HASH_EMPTY
cdef unsigned long long _M8, _M16, _M32
cdef int OUT_WINDOW, OUT_CHANGE, OUT_ALARM, OUT_SNAPSHOT, WIN_LIVE, WIN_HISTORY
cdef int REPORT_WINDOW, REPORT_CHANGE, SRC_FUSION, MAX_SOURCES, MAX_UART_SLOTS, MAX_TICKS_PER_CALL
cdef int TEMP_HISTORY
cdef int S_SPEED, S_ODOMETER, S_LAT, S_LON, S_HEADING, S_GNSS_SPEED, S_FIX, S_HDOP, S_PACK_V, S_PACK_I
cdef int S_POWER, S_SOC, S_SOH, S_CELL_MIN, S_CELL_MAX, S_TEMP_MIN, S_TEMP_MAX, S_FULL_AH, S_PROTECTION
cdef int S_MOTOR_I, S_CADENCE, S_MOTOR_TEMP, S_CTRL_TEMP, S_FAULT, S_FUSED_SPEED, S_FUSED_LAT, S_FUSED_LON, S_POS_ESTIMATED
cdef int S_FUSED_ODOMETER, S_FUSED_TRIP, S_ENERGY_OUT, S_ENERGY_REGEN, S_ENERGY_CHARGED, S_CONSUMPTION
cdef int S_FUSED_RANGE, S_FUSED_SOC, S_FUSED_SOH, S_CELL_SPREAD, S_TEMP_SPREAD, S_TEMP_RISE, S_LOCKED
cdef int S_CELL0, N_CELLS, S_TEMP0, N_TEMPS, FUSION_ID_SPACE
cdef int P_TICK, P_CELLS, P_DESIGN_AH, P_NOMINAL_V, P_RESERVE, P_STALE_PERIODS, P_STALE_MIN
cdef int P_HEALTH_PERIODS, P_HEALTH_MIN, P_CAPTURE_BEFORE, P_CAPTURE_AFTER, P_SPEED_Q, P_WHEEL_R
cdef int P_GNSS_R, P_SOC_BMS_TAU, P_REST_A, P_REST_TIME, P_SOC_OCV_TAU, P_SOH_SWING
cdef int P_CONSUMPTION_KM, P_MOVING, P_WHEEL_CHECK_MIN, P_RISE_WINDOW, P_FULL_SOC, P_RATE_MIN
cdef int P_MOTOR_ACTIVE, P_PEDAL_ACTIVE, P_GNSS_FROZEN, P_QUALITY_TAU, P_RATE_SCALE
cdef int REFUSED_RANGE, REFUSED_RATE, MOTION_UNKNOWN, MOTION_MOVING, MOTION_STILL
cdef int VOTE_ABSENT, VOTE_STILL, VOTE_MOVING, VOTE_STALE, VOTE_NO_FIX, VOTE_REFUSED, VOTE_FROZEN
cdef int A_TEMP_DIFFERENCE, A_BATTERY_HIGH_TEMP, A_PACK_OVER_VOLTAGE, A_PACK_UNDER_VOLTAGE, A_SOC_LOW
cdef int A_CELL_OVER_VOLTAGE, A_CELL_UNDER_VOLTAGE, A_SOC_HIGH, A_SOC_JUMP, A_POOR_CONSISTENCY
cdef int A_CONTROLLER_TEMP, A_MOTOR_TEMP, A_OVER_CHARGE, A_TEMP_RISE, A_BMS_PROTECTION
cdef int A_CONTROLLER_FAULT, A_OVER_SPEED, A_THEFT, A_GNSS_LOST, A_COMM_LOST, A_WHEEL_IMPLAUSIBLE
cdef int A_DATA_QUALITY, A_STORAGE_FAILED
cdef int ABOVE, BELOW, PER_VALUE, PER_CELL, SPECIAL, MAX_ALARM_CODE
cdef double NO_READING, DEG, M_PER_DEG, _QUANTISE_LIMIT, INF


cdef long long _hash(long long key, long long mask) noexcept

cdef unsigned long long _bswap64(unsigned long long x) noexcept

cdef Py_ssize_t _skip_blanks(const unsigned char[::1] buf, Py_ssize_t p, Py_ssize_t end) noexcept

cdef Py_ssize_t _token_end(const unsigned char[::1] buf, Py_ssize_t p, Py_ssize_t end) noexcept

@cython.locals(v=cython.ulonglong, i=Py_ssize_t, b=cython.ulonglong)
cdef unsigned long long _le(const unsigned char[::1] buf, Py_ssize_t off, Py_ssize_t size) noexcept

cdef double _learn(double p, double dt) noexcept

cdef double _gain(double dt, double tau) noexcept

cdef int _check_source(int source) except -1

@cython.locals(k=double)
cdef double _quantise(double x, double scale) noexcept


@cython.final
cdef class Kernel:
    cdef public Py_ssize_t id_space
    cdef public double window
    cdef public double history
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
    cdef public int source
    cdef int started
    cdef long long tick_index
    cdef double next_tick
    cdef double next_event
    cdef double live_start
    cdef int[::1] src_seen
    cdef int[::1] src_live
    cdef long long ring_mask
    cdef int[::1] r_sid
    cdef double[::1] r_t
    cdef double[::1] r_v
    cdef long long r_head
    cdef public long long ticks
    cdef public long long snapshots
    cdef public long long snapshots_truncated
    cdef double[::1] params
    cdef public double tick
    cdef double[::1] ocv_soc
    cdef double[::1] ocv_v
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
    cdef signed char[::1] a_active
    cdef double[::1] a_since
    cdef double[::1] a_raised_t
    cdef double[::1] a_value
    cdef double[::1] spec_value
    cdef signed char[::1] spec_ok
    cdef int[::1] a_row
    cdef int cap_pending
    cdef double cap_t
    cdef int cap_code
    cdef int cap_instance
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
    cdef double f_last
    cdef double kf_x
    cdef double kf_p
    cdef double kf_wheel_t
    cdef double kf_gnss_t
    cdef int pos_ok
    cdef double pos_lat
    cdef double pos_lon
    cdef double heading
    cdef int gnss_seen
    cdef double trip_km
    cdef double odo_t
    cdef double odo_base
    cdef double odo_base_trip
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
    cdef double[::1] temp_hist
    cdef double[::1] temp_hist_t
    cdef long long temp_hist_n
    cdef double temp_hist_next
    cdef int ext_n
    cdef double ext_lo
    cdef double ext_hi
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
    # Range and rate (set_limits), refusals, per-source alarm blocks, frozen GNSS: after
    # the fields the decode loop reads, so they keep their place in the object.
    cdef double[::1] sig_min
    cdef double[::1] sig_max
    cdef double[::1] row_lo
    cdef double[::1] row_hi
    cdef unsigned long long[::1] row_raw_lo
    cdef unsigned long long[::1] row_raw_hi
    cdef signed char[::1] row_rated
    cdef double[::1] lim_lo
    cdef double[::1] lim_hi
    cdef double[::1] lim_rate
    cdef double[::1] bad_t
    cdef int[::1] ref_count
    cdef long long[::1] src_refused
    cdef long long[::1] q_prev
    cdef double[::1] q_rate
    cdef public long long refused
    cdef int[::1] a_block
    cdef double gnss_lat
    cdef double gnss_lon
    cdef double gnss_moved_t

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

    @cython.locals(dt=double)
    cdef int _heard(self, Py_ssize_t slot, double t) except -1

    @cython.locals(m=int)
    cdef int _frame(self, long long key, unsigned long long le, Py_ssize_t size, double t) except -1

    @cython.locals(m=int, out=list)
    cpdef object decode_frame(self, long long key, const unsigned char[::1] data)

    @cython.locals(be=cython.ulonglong, first=int, s=int, mux=int, raw=cython.ulonglong, value=double)
    cdef int _decode(self, int m, unsigned long long le, double t, list out) except -1

    cdef double _value(self, int s, unsigned long long raw) noexcept

    @cython.locals(value=double)
    cdef int _row_slow(self, int s, unsigned long long raw, double t) except -1

    cdef unsigned long long _raw(self, int s, unsigned long long le, unsigned long long be) noexcept

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, sid=int, t=double)
    cpdef list feed_values(self, list ids, list times, list values)

    @cython.locals(n=Py_ssize_t, s=Py_ssize_t, sid=int, lo=double, hi=double)
    cdef int _row_limits(self) except -1

    @cython.locals(v=double)
    cdef int _vote(self, int sid, double t, double limit) noexcept

    cdef bint _accept(self, int sid, double t, double value, double lo, double hi) noexcept

    @cython.locals(dt=double)
    cdef bint _rate_ok(self, int sid, double t, double value) noexcept

    @cython.locals(s=int)
    cdef int _refuse(self, int sid, double t, int reason) noexcept

    cpdef list close_due(self, double now)

    @cython.locals(k=int)
    cpdef list flush(self)

    cdef int _advance(self, double t) except -1

    @cython.locals(k=int)
    cdef int _start(self, double t) except -1

    cdef void _skip_to(self, double t) noexcept

    @cython.locals(n=int)
    cdef int _due(self, double t) except -1

    @cython.locals(k=int, w=cython.longlong)
    cdef int _close_until(self, double t) except -1

    @cython.locals(e=double, end=double, k=int)
    cdef void _next_event(self) noexcept

    @cython.locals(dt=double, r=Py_ssize_t)
    cdef int _sample(self, int sid, double t, double value) except -1

    @cython.locals(h=Py_ssize_t)
    cdef void _merge(self, int sid) noexcept

    @cython.locals(c=int, base=Py_ssize_t, j=int, i=int, sid=int, n=int, rows=list)
    cdef int _close(self, int k, long long next_index) except -1

    @cython.locals(out=list)
    cdef list _take_closed(self)

    @cython.locals(limit=double)
    cdef bint _fresh(self, int sid, double t) noexcept

    @cython.locals(src=int)
    cdef int _put(self, int sid, double t, double value) except -1

    @cython.locals(dt=double, moving=int)
    cdef int _step(self, double t) except -1

    cdef bint _gnss_fix(self, double t) noexcept

    cdef int _gnss_track(self, double t) except -1

    cdef bint _gnss_frozen(self, double t) noexcept

    @cython.locals(a=int)
    cdef bint _active(self, int code) noexcept

    @cython.locals(wheel=bint, gnss=bint, hdop=double)
    cdef int _speed(self, double t, double dt) except -2

    @cython.locals(k=double)
    cdef void _kf_update(self, double z, double r) noexcept

    @cython.locals(d=double, h=double, estimated=double)
    cdef int _position(self, double t, double dt, int moving) except -1

    @cython.locals(dd=double, i=double, cap=double, p=double, wh=double, decay=double, wh_km=double,
                   usable=double, wh_left=double)
    cdef int _battery(self, double t, double dt, int moving) except -1

    cdef double _capacity(self) noexcept

    @cython.locals(bms=bint, rested=bint, ocv=double)
    cdef int _soc(self, double t, double dt, double i, double cap) except -1

    @cython.locals(capacity=double, observed=double)
    cdef int _soc_reading(self, double t, double reading, int src) except -1

    @cython.locals(n=Py_ssize_t, k=Py_ssize_t, f=double)
    cdef double _ocv_soc(self, double cell_v) noexcept

    cdef int _pack(self, double t) except -1

    @cython.locals(n=int, k=int, v=double)
    cdef int _extremes(self, int first, int count, double t) noexcept

    cdef int _fill_in(self, int sid, double t, double value) except -1

    @cython.locals(span=int, row=Py_ssize_t, back=Py_ssize_t, fastest=double, elapsed=double,
                   then=double, rate=double, n=int, k=int, fresh=bint)
    cdef int _temp_rise(self, double t) except -1

    @cython.locals(s=int, m=Py_ssize_t, limit=double)
    cdef void _health(self, double t) noexcept

    @cython.locals(tau=double, decay=double, s=int, new=cython.longlong)
    cdef int _quality(self) except -1

    @cython.locals(gnss=bint, locked=bint, full=bint, speed=double, g=double, w=double, top=double, a=int)
    cdef void _specials(self, double t) noexcept

    @cython.locals(a=int, code=int, sid=int, s=int, st=int)
    cdef int _alarms(self, double t) except -1

    @cython.locals(up=bint, cross=bint, delay=double, level=int)
    cdef int _debounce(self, int a, int st, int instance, double t, double value) except -1

    @cython.locals(t=double)
    cdef int _capture(self) except -1

    @cython.locals(ids=list, times=list, values=list, size=cython.longlong, stop=cython.longlong,
                   j=cython.longlong, r=Py_ssize_t, rt=double)
    cdef tuple _ring_slice(self, double t, int code, int instance, double lo, double hi)
