"""A simple but physical ride model of a 36 V mid-drive e-bike on a commute.

The rider rides legs of 40-60 s between stops (traffic lights), accelerating to a
chosen cruise speed of 20-24.5 km/h, braking to a stop and standing 5-10 s. The
power needed at the wheel (inertia, rolling resistance, air drag, hill grade) is
split between rider and motor by the assist level; the motor draws from a 10S
lithium pack with an OCV curve and internal resistance; losses heat the motor,
controller and pack through first-order thermal models. The bike follows a loop of
made-up waypoints in Chongqing's Liangjiang New Area, and a GNSS receiver sees the
position with metre-level correlated noise.

MicroPython-safe: plain classes, math, no typing at runtime, own PRNG.
All state is in SI units internally; the attributes named in the brief are exposed
in the units their names say (km/h, %, V, A, C, km, mAh, deg, m).
"""

import math

from firmware_sim.prng import Prng

DEG = math.pi / 180.0
G = 9.81
EARTH_M_PER_DEG = 111320.0

# Loop of (lat, lon, alt m) near Jinkai Ave / Huangshan Ave, Liangjiang New Area,
# Chongqing. Made up to look plausible on that grid; not surveyed coordinates.
ROUTE = (
    (29.66120, 106.56380, 258.0),
    (29.66410, 106.57250, 266.0),
    (29.66890, 106.58010, 281.0),
    (29.67520, 106.58680, 297.0),
    (29.68230, 106.59120, 318.0),
    (29.68910, 106.58740, 334.0),
    (29.69340, 106.57790, 341.0),
    (29.69020, 106.56680, 329.0),
    (29.68450, 106.55970, 308.0),
    (29.67680, 106.55710, 287.0),
    (29.66900, 106.55840, 271.0),
)
HILL_AMP_M = 5.0        # rolling hills on top of the waypoint altitudes
HILL_WAVE_M = 1150.0

# 10S NMC pack: open-circuit cell voltage against SoC (%), typical 18650/21700 curve.
OCV_TABLE = (
    (0.0, 3.00), (5.0, 3.30), (10.0, 3.45), (20.0, 3.56), (30.0, 3.63),
    (40.0, 3.69), (50.0, 3.75), (60.0, 3.82), (70.0, 3.90), (80.0, 3.98),
    (90.0, 4.07), (100.0, 4.18),
)
CELLS = 10

PHASE_STOP = 0
PHASE_GO = 1
PHASE_BRAKE = 2
PHASE_NAMES = ("stop", "go", "brake")

# Rider's gears as cadence rpm per km/h (a 1x drivetrain, low to high).
GEARS = (6.5, 5.2, 4.3, 3.7, 3.2, 2.9)
TORQUE_ZERO_RAW = 1300      # torque sensor raw reading with no force (bench capture ~1335)
TORQUE_RAW_PER_NM = 35.0


def _clamp(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def ocv_cell(soc):
    """Open-circuit voltage of one cell at ``soc`` percent, linear between table points."""
    soc = _clamp(soc, 0.0, 100.0)
    prev = OCV_TABLE[0]
    for point in OCV_TABLE[1:]:
        if soc <= point[0]:
            f = (soc - prev[0]) / (point[0] - prev[0])
            return prev[1] + f * (point[1] - prev[1])
        prev = point
    return OCV_TABLE[-1][1]


class Route:
    """A closed polyline; position by distance along it, in a local flat frame."""

    def __init__(self, points):
        self.points = points
        lat0 = sum(p[0] for p in points) / len(points)
        self.m_per_deg_lon = EARTH_M_PER_DEG * math.cos(lat0 * DEG)
        self.seg_start = []
        self.seg_len = []
        self.seg_heading = []
        total = 0.0
        n = len(points)
        for i in range(n):
            a = points[i]
            b = points[(i + 1) % n]
            north = (b[0] - a[0]) * EARTH_M_PER_DEG
            east = (b[1] - a[1]) * self.m_per_deg_lon
            length = math.sqrt(north * north + east * east)
            self.seg_start.append(total)
            self.seg_len.append(length)
            self.seg_heading.append((math.atan2(east, north) / DEG) % 360.0)
            total += length
        self.length = total

    def at(self, s):
        """(lat, lon, alt, heading deg, grade) at distance ``s`` metres along the loop."""
        s = s % self.length
        i = 0
        n = len(self.points)
        while i < n - 1 and s >= self.seg_start[i + 1]:
            i += 1
        a = self.points[i]
        b = self.points[(i + 1) % n]
        seg = self.seg_len[i]
        f = (s - self.seg_start[i]) / seg
        lat = a[0] + f * (b[0] - a[0])
        lon = a[1] + f * (b[1] - a[1])
        k = 2.0 * math.pi / HILL_WAVE_M
        alt = a[2] + f * (b[2] - a[2]) + HILL_AMP_M * math.sin(k * s)
        grade = (b[2] - a[2]) / seg + HILL_AMP_M * k * math.cos(k * s)
        return lat, lon, alt, self.seg_heading[i], grade


class Vehicle:
    """True state of the bike; ``step(dt)`` advances it by ``dt`` sim seconds."""

    def __init__(self, seed=1, cells=CELLS, wheel_circ_mm=2200):
        r = Prng(seed)
        self.rng = r
        self.route = Route(ROUTE)

        # Fixed properties of this bike and rider.
        self.speed_limit_kmh = 25.0
        if wheel_circ_mm < 1000 or wheel_circ_mm > 3000:
            raise ValueError("wheel circumference must be 1000-3000 mm")
        self.wheel_circ_mm = wheel_circ_mm
        self.wheel_size_code = 0x01C0      # 28.0" as (inches << 4 | sixteenths), as in captures
        self.design_mah = 14000.0          # new pack; full_mah fades from it with cycles
        self.full_mah = self.design_mah
        self.assist_level = 3
        self.assist_ratio = 1.6            # motor power per rider power at this level
        self.mass = 100.0 + r.uniform(-8.0, 8.0)   # bike + rider, kg
        self.crr = 0.007
        self.cda = 0.55                    # upright commuter, m^2
        self.rho = 1.22
        self.rider_max_w = r.uniform(180.0, 240.0)
        self.motor_max_w = 350.0           # mechanical, at the crank
        self.motor_eff = 0.80
        self.idle_w = 4.0                  # controller, display and lights
        self.r_int = 0.15                  # pack internal resistance, ohm
        self.r_cable = 0.03                # pack to controller wiring, ohm
        self.ambient = 14.0 + r.uniform(-2.0, 2.0)

        # State.
        self.t = 0.0
        self.s = r.uniform(0.0, self.route.length)   # distance along the loop, m
        self.v = 0.0                                  # m/s
        self.a = 0.0
        self.phase = PHASE_STOP
        self.phase_t = 0.0
        self.phase_len = r.uniform(1.0, 3.0)          # first stand before riding off
        self.v_set = 0.0
        self.v_wobble = 0.0                           # rider's speed variation, m/s
        self.decel = 1.5
        self.gear = 0
        self.crank_angle = 0.0
        self.pedalling = False
        self.rider_w = 0.0
        self.motor_w = 0.0

        self.remaining_mah = self.full_mah * r.uniform(0.78, 0.82)
        self.soc = 100.0 * self.remaining_mah / self.full_mah
        self.pack_i = 0.0
        self.pack_v = cells * ocv_cell(self.soc)
        self.ctrl_v = self.pack_v
        self.motor_i = 0.0

        self.motor_temp = self.ambient + r.uniform(0.0, 2.0)
        self.ctrl_temp = self.ambient + r.uniform(0.0, 2.0)
        self.batt_temp = self.ambient + r.uniform(2.0, 5.0)

        # Cells, BMS and controller state. A separate generator so that these extras
        # leave the ride itself (drawn from ``r``) exactly as it was.
        p = Prng(seed ^ 0x5CE11)
        if cells < 10 or cells > 13:
            raise ValueError("cells must be 10-13")
        self.cells = cells
        self.cell_soc_off = [p.gauss(0.0, 0.6) for _ in range(cells)]   # % of SoC
        self.cell_r = [self.r_int / cells * p.uniform(0.9, 1.1) for _ in range(cells)]
        self.ntc_off = [p.uniform(-0.4, 0.4), p.uniform(-0.4, 0.4)]
        self.runaway_cell = p.randint(0, cells - 1)
        self.runaway_rise = 0.0            # C above the pack, at the runaway cell's NTC
        self.cycles = float(p.randint(20, 180))  # equivalent full cycles, grows as the pack works
        self._fade()
        self.remaining_mah *= self.full_mah / self.design_mah  # the same SoC on the faded pack
        self.protection = 0                # JBD bit order (PROTOCOLS.md)
        self.charge_on = True              # FET states as the BMS drives them
        self.discharge_on = True
        self.fault_code = 0                # controller's live fault code, 0 = none
        self.locked = False
        self.parked = False                # nobody rides: the bike stands
        self.pushed_kmh = 0.0              # > 0: walked or carried at this speed, unassisted
        self.charge_a = 0.0                # charger current (+ into the pack)
        self.extra_heat = 0.0              # C/s forced on motor and controller (overheat)
        self.wheel_sensor = True           # False: unplugged, the controller reads speed 0
        self.cruise_max_kmh = 24.5
        self.cruise_min_kmh = 20.0

        self.cadence = 0.0
        self.torque_nm = 0.0
        self.torque = TORQUE_ZERO_RAW
        self.trip_km = 0.0
        self.wh_per_km = 9.0               # range estimator's running consumption
        self._wh_acc = 0.0
        self._m_acc = 0.0
        self.range_km = 0.0

        # GNSS receiver state: correlated position error (m), sats, HDOP.
        self.fix_quality = 1
        self.sats = r.randint(10, 12)
        self._sat_t = r.uniform(8.0, 20.0)
        self._err_n = r.gauss(0.0, 2.0)
        self._err_e = r.gauss(0.0, 2.0)
        self._err_u = r.gauss(0.0, 3.0)
        self._hdop_err = 0.0
        self._slow_t = 0.0

        self.lat = 0.0
        self.lon = 0.0
        self.alt = 0.0
        self.heading = 0.0
        self.grade = 0.0
        self._place()
        self._update_range()
        self.hdop = 1.0
        self.gnss_heading = self.heading
        self.gnss_speed_kmh = 0.0
        self._slow_update(0.0)

    # Public derived values -------------------------------------------------

    @property
    def speed_kmh(self):
        return self.v * 3.6

    @property
    def wheel_speed_kmh(self):
        """The speed the controller reports: the wheel sensor's, 0 while it is unplugged."""
        return self.speed_kmh if self.wheel_sensor else 0.0

    @property
    def assisting(self):
        """Whether the motor may assist: not locked, discharge FET on, no fault."""
        return not self.locked and self.discharge_on and self.fault_code == 0

    @property
    def pack_cells(self):
        return self.cells

    def cell_volts(self):
        """Each cell's terminal voltage (V): OCV at its own SoC, plus I x its resistance."""
        i = self.pack_i
        out = []
        for k in range(self.cells):
            out.append(ocv_cell(self.soc + self.cell_soc_off[k]) + i * self.cell_r[k])
        return out

    def ntc_temps(self):
        """The pack's two NTCs (C); NTC 2 sits by the runaway-prone cell."""
        return [self.batt_temp + self.ntc_off[0],
                self.batt_temp + self.ntc_off[1] + self.runaway_rise]

    @property
    def phase_name(self):
        return PHASE_NAMES[self.phase]

    def truth(self):
        """The true state as a plain dict (what the manifest's truth records hold)."""
        return {
            "t": self.t, "lat": self.lat, "lon": self.lon, "alt": self.alt,
            "heading": self.heading, "speed_kmh": self.speed_kmh, "soc": self.soc,
            "pack_v": self.pack_v, "pack_i": self.pack_i, "motor_i": self.motor_i,
            "ctrl_temp": self.ctrl_temp, "motor_temp": self.motor_temp,
            "batt_temp": self.batt_temp, "cadence": self.cadence, "torque": self.torque,
            "trip_km": self.trip_km, "range_km": self.range_km,
            "remaining_mah": self.remaining_mah, "full_mah": self.full_mah, "soh": self.soh,
            "cycles": self.cycles, "phase": self.phase_name,
        }

    # Model ----------------------------------------------------------------

    def _fade(self):
        """Capacity fade: 1 % of the design capacity per 20 equivalent full cycles (about
        80 % after 400), the state of health the BMS reports."""
        self.soh = max(50.0, 100.0 - self.cycles / 20.0)
        self.full_mah = self.design_mah * self.soh / 100.0

    def step(self, dt):
        self.t += dt
        self.phase_t += dt
        self._ride(dt)
        self._electrical(dt)
        self._thermal(dt)
        self._pedals(dt)
        self._place()
        self._slow_t += dt
        if self._slow_t >= 0.1:
            self._slow_update(self._slow_t)
            self._slow_t = 0.0

    def _ride(self, dt):
        r = self.rng
        if self.parked:
            self._parked(dt)
            return
        if self.phase == PHASE_STOP:
            self.v = 0.0
            self.a = 0.0
            self.rider_w = 0.0
            self.motor_w = 0.0
            self.pedalling = False
            if self.phase_t >= self.phase_len:
                self.phase = PHASE_GO
                self.phase_t = 0.0
                self.phase_len = r.uniform(40.0, 60.0)
                self.v_set = r.uniform(self.cruise_min_kmh, self.cruise_max_kmh) / 3.6
                self.gear = 0
            return
        if self.phase == PHASE_GO and self.phase_t >= self.phase_len:
            self.phase = PHASE_BRAKE
            self.phase_t = 0.0
            self.decel = r.uniform(1.2, 2.0)

        v = self.v
        f_res = (self.mass * G * (self.crr + self.grade)
                 + 0.5 * self.rho * self.cda * v * v)
        if self.phase == PHASE_BRAKE:
            a = -self.decel
            self.rider_w = 0.0
            self.motor_w = 0.0
            self.pedalling = False
        else:
            target = self.v_set + self.v_wobble
            if self.v_set * 3.6 > self.speed_limit_kmh:
                # A commuter rides at the assistance cut-off, not above it.
                target = self.speed_limit_kmh / 3.6 + self.v_wobble
            a = _clamp(0.6 * (target - v), -1.0, 1.0)
            force = self.mass * a + f_res
            if force <= 0.0:
                # Downhill or easing off: the rider freewheels and brakes as needed.
                self.rider_w = 0.0
                self.motor_w = 0.0
                self.pedalling = False
            else:
                need = force * v
                self._split_power(need)
                have = self.rider_w + self.motor_w
                if have < need - 1e-6:
                    a = (have / max(v, 0.3) - f_res) / self.mass
                self.pedalling = True
        v += a * dt
        if v <= 0.0:
            v = 0.0
            if self.phase == PHASE_BRAKE:
                self.phase = PHASE_STOP
                self.phase_t = 0.0
                self.phase_len = r.uniform(5.0, 10.0)
        self.a = a
        self.v = v
        d = v * dt
        self.s += d
        self.trip_km += d / 1000.0
        self._m_acc += d

    def _parked(self, dt):
        """Standing (or pushed along by someone, unassisted, at ``pushed_kmh``)."""
        self.rider_w = 0.0
        self.motor_w = 0.0
        self.pedalling = False
        self.a = 0.0
        self.phase = PHASE_STOP
        self.v = self.pushed_kmh / 3.6
        d = self.v * dt
        self.s += d
        self.trip_km += d / 1000.0
        self._m_acc += d

    def _split_power(self, need):
        """Share ``need`` watts between rider and motor by assist level and limits."""
        kmh = self.v * 3.6
        # Assistance fades out over the last km/h below the cut-off (GB 17761).
        taper = _clamp(self.speed_limit_kmh - kmh, 0.0, 1.0)
        if not self.assisting:
            taper = 0.0
        ratio = self.assist_ratio * taper
        rider = need / (1.0 + ratio)
        motor = need - rider
        if motor > self.motor_max_w:
            motor = self.motor_max_w
            rider = need - motor
        if rider > self.rider_max_w:
            rider = self.rider_max_w
            motor = min(self.motor_max_w, ratio * rider)
        self.rider_w = rider
        self.motor_w = motor

    def _electrical(self, dt):
        p_motor_el = self.motor_w / self.motor_eff
        p = p_motor_el + (0.3 if self.parked else self.idle_w)
        ocv = self.cells * ocv_cell(self.soc)
        if not self.discharge_on:
            # The BMS opened the discharge switch: nothing flows out of the pack.
            p = 0.0
            p_motor_el = 0.0
        if self.charge_a > 0.0 and self.charge_on:
            # Charger: constant current, tapering above 4.1 V per cell (CC/CV).
            i = self.charge_a * _clamp((4.18 - ocv / self.cells) / 0.08, 0.05, 1.0)
            p = 0.0
            v = ocv + i * self.r_int
        else:
            # Terminal voltage V with I = -P/V and V = OCV + I*R (I + = charging).
            disc = ocv * ocv - 4.0 * p * self.r_int
            v = 0.5 * (ocv + math.sqrt(disc)) if disc > 0.0 else 0.5 * ocv
            i = -p / v
        self.pack_v = v
        self.pack_i = i
        self.ctrl_v = v + i * self.r_cable if self.discharge_on else 0.0
        self.motor_i = p_motor_el / self.ctrl_v if self.ctrl_v > 0.0 else 0.0
        self.remaining_mah = _clamp(self.remaining_mah + i * dt / 3.6, 0.0, float(self.full_mah))
        if i < 0.0:
            # One equivalent full cycle per full capacity discharged; capacity fades with them.
            self.cycles += -i * dt / 3.6 / self.design_mah
            self._fade()
        self.soc = 100.0 * self.remaining_mah / self.full_mah
        self._wh_acc += p * dt / 3600.0
        if self._m_acc >= 100.0:
            # Range estimator: running average of Wh/km over 100 m pieces of road.
            sample = self._wh_acc / (self._m_acc / 1000.0)
            self.wh_per_km += 0.05 * (sample - self.wh_per_km)
            self._wh_acc = 0.0
            self._m_acc = 0.0
            self._update_range()

    def _update_range(self):
        usable_wh = max(0.0, self.remaining_mah - 0.05 * self.full_mah) / 1000.0 * 3.6 * self.cells
        self.range_km = usable_wh / max(self.wh_per_km, 1.0)

    def _thermal(self, dt):
        amb = self.ambient
        p_el = self.motor_w / self.motor_eff
        cooling = 1.0 + 0.05 * self.v          # moving air helps the motor case
        motor_loss = 0.15 * p_el
        ctrl_loss = 0.04 * p_el + 1.5
        batt_loss = self.pack_i * self.pack_i * self.r_int
        self.motor_temp += dt * (motor_loss - (self.motor_temp - amb) * cooling / 0.9) / 1800.0
        self.ctrl_temp += dt * (ctrl_loss - (self.ctrl_temp - amb) / 1.6) / 500.0
        self.batt_temp += dt * (batt_loss - (self.batt_temp - amb) / 2.5) / 2200.0
        if self.extra_heat > 0.0:
            self.motor_temp += dt * self.extra_heat
            self.ctrl_temp += dt * self.extra_heat * 0.8

    def _pedals(self, dt):
        jitter = (self.rng.next_u32() % 7) - 3
        if not self.pedalling:
            self.cadence = 0.0
            self.torque_nm = 0.0
            self.torque = TORQUE_ZERO_RAW + jitter
            return
        kmh = self.v * 3.6
        cad = kmh * GEARS[self.gear]
        if cad > 85.0 and self.gear < len(GEARS) - 1:
            self.gear += 1
        elif cad < 50.0 and self.gear > 0:
            self.gear -= 1
        cad = kmh * GEARS[self.gear]
        omega = cad * 2.0 * math.pi / 60.0
        self.cadence = cad
        self.torque_nm = min(self.rider_w / max(omega, 0.5), 120.0)
        self.crank_angle = (self.crank_angle + omega * dt) % (2.0 * math.pi)
        # Two power strokes per crank turn.
        stroke = 1.0 + 0.55 * math.sin(2.0 * self.crank_angle)
        raw = TORQUE_ZERO_RAW + TORQUE_RAW_PER_NM * self.torque_nm * stroke + jitter
        self.torque = int(_clamp(raw, 0.0, 65535.0))

    def _place(self):
        lat, lon, alt, heading, grade = self.route.at(self.s)
        self.lat = lat
        self.lon = lon
        self.alt = alt
        self.heading = heading
        self.grade = grade

    def _slow_update(self, dt):
        """10 Hz: rider variation and the GNSS receiver's slowly varying errors."""
        r = self.rng
        if dt > 0.0:
            # Ornstein-Uhlenbeck processes: rider wobble (tau 8 s, 0.3 m/s) and
            # GNSS position error (tau 30 s, ~2 m horizontal, ~3 m vertical).
            self.v_wobble = _ou(self.v_wobble, dt, 8.0, 0.3, r)
            self._err_n = _ou(self._err_n, dt, 30.0, 2.0, r)
            self._err_e = _ou(self._err_e, dt, 30.0, 2.0, r)
            self._err_u = _ou(self._err_u, dt, 30.0, 3.0, r)
            self._hdop_err = _ou(self._hdop_err, dt, 20.0, 0.05, r)
            self._sat_t -= dt
            if self._sat_t <= 0.0:
                self._sat_t = r.uniform(8.0, 20.0)
                self.sats = int(_clamp(self.sats + (1 if r.next_u32() & 1 else -1), 8, 14))
        self.hdop = _clamp(0.8 + 0.1 * (14 - self.sats) + self._hdop_err, 0.8, 1.5)
        self.gnss_lat = self.lat + self._err_n / EARTH_M_PER_DEG
        self.gnss_lon = self.lon + self._err_e / (EARTH_M_PER_DEG * math.cos(self.lat * DEG))
        self.gnss_alt = self.alt + self._err_u
        self.gnss_speed_kmh = max(0.0, self.speed_kmh + r.gauss(0.0, 0.15))
        if self.v > 1.0:
            # Below ~1 m/s receivers hold the last course rather than report noise.
            self.gnss_heading = (self.heading + r.gauss(0.0, 1.0)) % 360.0


def _ou(x, dt, tau, sigma, rng):
    """One exact step of an Ornstein-Uhlenbeck process with stationary std ``sigma``."""
    k = math.exp(-dt / tau)
    return x * k + sigma * math.sqrt(1.0 - k * k) * rng.gauss(0.0, 1.0)
