"""NMEA 0183 from a GNSS receiver's UART: a framer and a decoder to catalogue signals.

Framing and checking are split on purpose: the framer only cuts the byte stream into
candidate sentences, so every candidate reaches ``decode_sentence`` and a bad
checksum is counted as a decode failure instead of vanishing as garbage.
Written for MicroPython too (see DESIGN): plain classes, ints, bytes and str only.
"""

from agent.errors import DecodeError

SUPPORTED = ("GGA", "RMC", "VTG", "GSA")
TALKERS = ("GP", "GN", "GB", "BD", "GL", "GA")

# NMEA allows 82 characters with CR LF; real receivers overshoot (proprietary
# sentences, extra fields), so the framer tolerates more before it gives up.
MAX_SENTENCE = 120

KNOT_KMH = 1.852

_DOLLAR = 0x24
_CR = 0x0D
_LF = 0x0A
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"

LATITUDE = "Vehicle.CurrentLocation.Latitude"
LONGITUDE = "Vehicle.CurrentLocation.Longitude"
ALTITUDE = "Vehicle.CurrentLocation.Altitude"
HEADING = "Vehicle.CurrentLocation.Heading"
SPEED = "Vehicle.LEV.GNSS.Speed"
FIX_QUALITY = "Vehicle.LEV.GNSS.FixQuality"
SATELLITES = "Vehicle.LEV.GNSS.Satellites"
HDOP = "Vehicle.LEV.GNSS.HDOP"


class NmeaFramer:
    """Cuts a UART byte stream into ``$...`` sentences; bounded and never raises.

    Every input byte ends up in exactly one place: a returned sentence, a CR/LF
    separator, ``garbage_bytes``, or the pending tail. ``overlong`` counts lines
    dropped for length (their bytes are also in ``garbage_bytes``).
    """

    def __init__(self) -> None:
        self._buf = bytearray(MAX_SENTENCE)
        self._n = 0
        self.frames = 0
        self.garbage_bytes = 0
        self.overlong = 0

    def feed(self, data: bytes) -> list:
        """Sentences completed by ``data``, each from ``$`` up to but excluding CR/LF."""
        out = []
        buf = self._buf
        n = self._n
        for b in data:
            if b == _DOLLAR:
                # A new start always wins: what came before it was cut short.
                self.garbage_bytes += n
                buf[0] = b
                n = 1
            elif b in (_CR, _LF):
                if n:
                    out.append(bytes(buf[:n]))
                    self.frames += 1
                    n = 0
            elif n == 0:
                # Hunting for '$': AIS ('!') and line noise land here.
                self.garbage_bytes += 1
            elif b < 0x20 or b > 0x7E:
                # Not printable ASCII, so not NMEA: give up on this candidate.
                self.garbage_bytes += n + 1
                n = 0
            elif n == MAX_SENTENCE:
                self.overlong += 1
                self.garbage_bytes += n + 1
                n = 0
            else:
                buf[n] = b
                n += 1
        self._n = n
        return out

    @property
    def pending(self) -> int:
        """Bytes of an unfinished sentence held for the next ``feed``."""
        return self._n


def _text(sentence) -> str:
    """The sentence as str from its '$', without CR/LF."""
    if isinstance(sentence, (bytes, bytearray, memoryview)):
        try:
            sentence = bytes(sentence).decode("ascii")
        except UnicodeError as e:
            raise DecodeError("non-ASCII bytes in sentence") from e
    while sentence and sentence[-1] in "\r\n":
        sentence = sentence[:-1]
    if not sentence.startswith("$"):
        raise DecodeError("sentence does not start with '$': %r" % sentence[:12])
    return sentence


def _checked_fields(sentence) -> list:
    """Fields of a sentence whose checksum is good; field 0 is the address."""
    s = _text(sentence)
    star = s.rfind("*")
    if star < 0 or star == len(s) - 1:
        raise DecodeError("no checksum")
    given = s[star + 1:]
    if len(given) != 2 or given[0] not in _HEX or given[1] not in _HEX:
        raise DecodeError("bad checksum field %r" % given)
    body = s[1:star]
    x = 0
    for c in body:
        x ^= ord(c)
    if x != int(given, 16):
        raise DecodeError("bad checksum: sentence says %s, computed %02X" % (given.upper(), x))
    for c in body:
        if c < " " or c > "~" or c == "$" or c == "*":
            raise DecodeError("reserved or non-printable character %r in sentence" % c)
    return body.split(",")


def _type_of(address: str) -> str:
    if len(address) == 5 and address[:2] in TALKERS:
        return address[2:]
    return address


def sentence_type(sentence) -> str:
    """The sentence type ("GGA") for accepted talkers, else the whole address.

    Proprietary (``PSRFEPE``) and foreign-talker sentences thus never match
    ``SUPPORTED``, which lets callers count them as unknown. The checksum is not
    checked here; ``decode_sentence`` does that.
    """
    s = _text(sentence)
    end = len(s)
    for sep in ",*":
        i = s.find(sep)
        if 0 <= i < end:
            end = i
    return _type_of(s[1:end])


def _all_digits(s: str) -> bool:
    for c in s:
        if c not in _DIGITS:
            return False
    return True


def _number(field: str, name: str) -> float:
    if not field:
        raise DecodeError("empty %s" % name)
    digits = field[1:] if field[0] == "-" else field
    dots = 0
    for c in digits:
        if c == ".":
            dots += 1
        elif c not in _DIGITS:
            dots = 2
            break
    if not digits or dots > 1 or digits == ".":
        raise DecodeError("bad %s %r" % (name, field))
    try:
        return float(field)
    except ValueError as e:
        raise DecodeError("bad %s %r" % (name, field)) from e


def _angle(value: str, hemi: str, name: str, limit: int, negative: str) -> float:
    """ddmm.mmmm / dddmm.mmmm to signed decimal degrees."""
    if value[:1] == "-":
        raise DecodeError("bad %s %r" % (name, value))
    number = _number(value, name)
    dot = value.find(".")
    whole = value if dot < 0 else value[:dot]
    if len(whole) < 3:
        raise DecodeError("bad %s %r: no degrees" % (name, value))
    degrees = int(whole[:-2])
    minutes = number - degrees * 100
    if minutes >= 60.0 or degrees + minutes / 60.0 > limit:
        raise DecodeError("bad %s %r: out of range" % (name, value))
    if hemi not in ("N", "S", "E", "W"):
        raise DecodeError("bad %s hemisphere %r" % (name, hemi))
    result = degrees + minutes / 60.0
    return -result if hemi == negative else result


def _position(out: dict, f: list, i: int) -> None:
    """Latitude/longitude from fields i..i+3, only when both are present."""
    if f[i] and f[i + 2]:
        out[LATITUDE] = _angle(f[i], f[i + 1], "latitude", 90, "S")
        out[LONGITUDE] = _angle(f[i + 2], f[i + 3], "longitude", 180, "W")


def _need(f: list, count: int, kind: str) -> None:
    if len(f) < count:
        raise DecodeError("%s too short: %d fields, need %d" % (kind, len(f) - 1, count - 1))


def _gga(f: list) -> dict:
    _need(f, 15, "GGA")
    out = {}
    fix = 0.0
    if f[6]:
        fix = _number(f[6], "fix quality")
        out[FIX_QUALITY] = fix
    if f[7]:
        out[SATELLITES] = _number(f[7], "satellites")
    if f[8]:
        out[HDOP] = _number(f[8], "HDOP")
    if fix > 0:
        _position(out, f, 2)
        if f[9]:
            out[ALTITUDE] = _number(f[9], "altitude")
    return out


def _void(f: list, mode_field: int) -> bool:
    """The NMEA 2.3 mode indicator says "not valid" (N)."""
    return len(f) > mode_field and f[mode_field][:1] == "N"


def _rmc(f: list) -> dict:
    _need(f, 12, "RMC")
    if f[2] not in ("A", "V"):
        raise DecodeError("bad RMC status %r" % f[2])
    if f[2] == "V" or _void(f, 12):
        # No fix: no position, speed or course. "No fix" is not "standing still".
        return {FIX_QUALITY: 0.0}
    out = {}  # type: dict
    _position(out, f, 3)
    if f[7]:
        out[SPEED] = _number(f[7], "speed") * KNOT_KMH
    if f[8]:
        out[HEADING] = _number(f[8], "course")
    return out


def _vtg(f: list) -> dict:
    _need(f, 9, "VTG")
    if _void(f, 9):
        return {}
    out = {}
    if f[1]:
        out[HEADING] = _number(f[1], "course")
    if f[7]:
        out[SPEED] = _number(f[7], "speed km/h")
    elif f[5]:
        out[SPEED] = _number(f[5], "speed knots") * KNOT_KMH
    return out


def decode_sentence(sentence) -> dict:
    """Catalogue signal name -> float from one sentence (str or bytes).

    Raises DecodeError for a bad checksum or a malformed field of a supported type.
    Anything the checksum vouches for but we do not decode (GSA, GSV, proprietary,
    other talkers) gives ``{}``; ``sentence_type`` tells those apart.
    """
    f = _checked_fields(sentence)
    kind = _type_of(f[0])
    if kind == "GGA":
        return _gga(f)
    if kind == "RMC":
        return _rmc(f)
    if kind == "VTG":
        return _vtg(f)
    return {}


def sentence_time(sentence):
    """Seconds since midnight UTC of a GGA or RMC fix, None if absent or another type."""
    f = _checked_fields(sentence)
    if _type_of(f[0]) not in ("GGA", "RMC") or len(f) < 2 or not f[1]:
        return None
    t = f[1]
    if len(t) < 6 or not _all_digits(t[:6]) or (t[6:] and (t[6] != "." or not _all_digits(t[7:]))):
        raise DecodeError("bad time %r" % t)
    hours = int(t[:2])
    minutes = int(t[2:4])
    secs = float(t[4:])
    if hours > 23 or minutes > 59 or secs >= 61.0:
        raise DecodeError("bad time %r" % t)
    return hours * 3600 + minutes * 60 + secs


def _days_from_civil(y, m, d):
    """Days since 1970-01-01 of a Gregorian date (Hinnant's algorithm; no calendar module
    on MicroPython)."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def rmc_utc(sentence):
    """The UTC time (epoch seconds) an RMC sentence with status A states, from its time and
    date fields; None for another sentence, a void fix or no date. Used to compare the
    unit's clock with the GNSS receiver's (``ebike-agent status``, ``selftest``)."""
    f = _checked_fields(sentence)
    if _type_of(f[0]) != "RMC" or len(f) < 10 or f[2] != "A" or len(f[9]) != 6 or not _all_digits(f[9]):
        return None
    secs = sentence_time(sentence)
    if secs is None:
        return None
    # Two-digit years: 80-99 are the 1900s (GPS began in 1980), the rest this century.
    yy = int(f[9][4:])
    day, month, year = int(f[9][:2]), int(f[9][2:4]), (1900 if yy >= 80 else 2000) + yy
    if not 1 <= month <= 12 or not 1 <= day <= 31:
        raise DecodeError("bad date %r" % f[9])
    return _days_from_civil(year, month, day) * 86400 + secs
