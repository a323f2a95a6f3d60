"""NMEA 0183 GGA, RMC, VTG and GSA sentences (PROTOCOLS.md, "NMEA 0183").

Each encoder returns ``(sentence_bytes, values)``: the full sentence with ``*hh``
checksum and CR LF, and the values a perfect decoder reads back from the text
(so quantised to the printed digits), keyed by signal-catalogue names.
All numbers are printed from integers so output is identical on any float format.

MicroPython-safe.
"""

import math

# Sim clock: sim second 0 is 2026-11-21T08:00:00Z.
SIM_EPOCH_ISO = "2026-11-21T08:00:00Z"
SIM_EPOCH_UNIX = 1795248000
_EPOCH_DAYS = SIM_EPOCH_UNIX // 86400
_EPOCH_SOD = SIM_EPOCH_UNIX % 86400

KNOTS_KMH = 1.852
# Geoid separation printed in GGA; an approximate, fixed value for the area.
GEOID_SEP_DM = -265    # decimetres


def _round(x):
    return int(math.floor(x + 0.5))


def checksum(body):
    """XOR of the characters between ``$`` and ``*``, as two upper-case hex digits."""
    c = 0
    for ch in body:
        c ^= ord(ch)
    return f"{c:02X}"


def _finish(body):
    return ("$" + body + "*" + checksum(body) + "\r\n").encode()


def civil_from_days(days):
    """(year, month, day) of ``days`` since 1970-01-01 (H. Hinnant's algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    return y, m, d


def utc_fields(t):
    """(``hhmmss.ss``, ``ddmmyy``) of sim time ``t`` seconds, to the centisecond."""
    cs = _round(t * 100.0) + _EPOCH_SOD * 100
    day = cs // 8640000
    cs -= day * 8640000
    y, m, d = civil_from_days(_EPOCH_DAYS + day)
    hh = cs // 360000
    mm = (cs // 6000) % 60
    ss = (cs // 100) % 60
    return (f"{hh:02d}{mm:02d}{ss:02d}.{cs % 100:02d}", f"{d:02d}{m:02d}{y % 100:02d}")


def _coord(value, deg_digits, pos, neg):
    """``(d)ddmm.mmmm`` text, hemisphere letter and the value the text stands for."""
    units = _round(abs(value) * 600000.0)     # 1e-4 arc-minutes
    deg = units // 600000
    mu = units % 600000
    head = f"{deg:03d}" if deg_digits == 3 else f"{deg:02d}"
    text = f"{head}{mu // 10000:02d}.{mu % 10000:04d}"
    back = deg + (mu / 10000.0) / 60.0
    if value < 0 and units:
        return text, neg, -back
    return text, pos, back


def _fixed(x, decimals):
    """``x`` printed with ``decimals`` digits, from an integer; and the printed value."""
    scale = 10 ** decimals
    n = _round(x * scale)
    sign = "-" if n < 0 else ""
    a = abs(n)
    text = f"{sign}{a // scale}"
    if decimals:
        frac = str(a % scale)
        text += "." + "0" * (decimals - len(frac)) + frac
    return text, n / scale


def gga(t, lat, lon, fix_quality, satellites, hdop, alt, talker="GN"):
    """GGA fix data: time, position, fix quality, satellites, HDOP, altitude."""
    hms, _ = utc_fields(t)
    lat_s, ns, lat_v = _coord(lat, 2, "N", "S")
    lon_s, ew, lon_v = _coord(lon, 3, "E", "W")
    sats = max(0, min(99, int(satellites)))
    hdop_s, hdop_v = _fixed(hdop, 1)
    alt_s, alt_v = _fixed(alt, 1)
    geoid_s, _ = _fixed(GEOID_SEP_DM / 10.0, 1)
    fix = int(fix_quality)
    if fix == 0:
        # No fix: position, altitude and geoid fields are empty, as receivers send them.
        body = f"{talker}GGA,{hms},,,,,0,{sats:02d},{hdop_s},,M,,M,,"
        values = {
            "Vehicle.LEV.GNSS.FixQuality": 0,
            "Vehicle.LEV.GNSS.Satellites": sats,
            "Vehicle.LEV.GNSS.HDOP": hdop_v,
        }
        return _finish(body), values
    body = (f"{talker}GGA,{hms},{lat_s},{ns},{lon_s},{ew},{fix},{sats:02d},{hdop_s},{alt_s},M,"
            f"{geoid_s},M,,")
    values = {
        "Vehicle.CurrentLocation.Latitude": lat_v,
        "Vehicle.CurrentLocation.Longitude": lon_v,
        "Vehicle.LEV.GNSS.FixQuality": fix,
        "Vehicle.LEV.GNSS.Satellites": sats,
        "Vehicle.LEV.GNSS.HDOP": hdop_v,
        "Vehicle.CurrentLocation.Altitude": alt_v,
    }
    return _finish(body), values


def rmc(t, lat, lon, speed_kmh, course, talker="GN", fix=True):
    """RMC: time, status A, position, speed over ground (knots), course, date, mode A.

    Without a fix: status V, mode N, position, speed and course empty; what it says is
    "no fix" (fix quality 0). The speed is printed as given, so a faulty receiver's
    negative speed keeps its sign.
    """
    hms, date = utc_fields(t)
    if not fix:
        return _finish(f"{talker}RMC,{hms},V,,,,,,,{date},,,N"), {"Vehicle.LEV.GNSS.FixQuality": 0}
    lat_s, ns, lat_v = _coord(lat, 2, "N", "S")
    lon_s, ew, lon_v = _coord(lon, 3, "E", "W")
    kn_s, kn_v = _fixed(speed_kmh / KNOTS_KMH, 3)
    crs = _round(course * 10.0) % 3600
    crs_s = f"{crs // 10}.{crs % 10}"
    body = f"{talker}RMC,{hms},A,{lat_s},{ns},{lon_s},{ew},{kn_s},{crs_s},{date},,,A"
    values = {
        "Vehicle.CurrentLocation.Latitude": lat_v,
        "Vehicle.CurrentLocation.Longitude": lon_v,
        "Vehicle.LEV.GNSS.Speed": kn_v * KNOTS_KMH,
        "Vehicle.CurrentLocation.Heading": crs / 10.0,
    }
    return _finish(body), values


def vtg(speed_kmh, course, talker="GN", fix=True):
    """VTG: course true, (magnetic empty), speed in knots and km/h (as given, like
    :func:`rmc`), mode A (N without a fix)."""
    if not fix:
        return _finish(f"{talker}VTG,,T,,M,,N,,K,N"), {}
    kn_s, _ = _fixed(speed_kmh / KNOTS_KMH, 3)
    kmh_s, kmh_v = _fixed(speed_kmh, 2)
    crs = _round(course * 10.0) % 3600
    body = f"{talker}VTG,{crs // 10}.{crs % 10},T,,M,{kn_s},N,{kmh_s},K,A"
    values = {
        "Vehicle.CurrentLocation.Heading": crs / 10.0,
        "Vehicle.LEV.GNSS.Speed": kmh_v,
    }
    return _finish(body), values


def gsa(satellites, hdop, fix=True, talker="GN"):
    """GSA: auto mode, fix type (3 = 3D, 1 = none), the satellites used, PDOP, HDOP, VDOP.

    PRNs are made up (BeiDou-style numbers from 201 with a GB/BD talker, GPS 1-32
    otherwise). No catalogue signal comes from GSA, so ``values`` is empty.
    """
    n = max(0, min(12, int(satellites))) if fix else 0
    base = 201 if talker in ("GB", "BD") else 1
    prns = [str(base + 3 * i) for i in range(n)] + [""] * (12 - n)
    if fix:
        hdop_s, hdop_v = _fixed(hdop, 1)
        pdop_s, _ = _fixed(hdop_v * 1.4, 1)
        vdop_s, _ = _fixed(hdop_v * 1.1, 1)
        mode = 3
    else:
        hdop_s = pdop_s = vdop_s = "99.9"
        mode = 1
    body = f"{talker}GSA,A,{mode}," + ",".join(prns) + f",{pdop_s},{hdop_s},{vdop_s}"
    return _finish(body), {}
