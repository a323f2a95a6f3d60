"""The CBOR wire format (docs/wire.cddl) and its reference decoder.

A record is encoded once, when it enters the outbox; a batch is then assembled by
concatenating stored record bodies behind a CBOR array head, so nothing is decoded
and encoded again on the way out. The cloud-side decoder below is the reference the
CDDL is checked against.
"""

from __future__ import annotations

import functools
import hashlib
import io
import lzma
import math
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2

from agent.errors import DecodeError

VERSION = 1
# The same batch with its records deflated (RFC 1951, raw): [2, device, bstr].
VERSION_DEFLATE = 2
# A deflated batch may inflate to at most this: a hostile payload cannot make the
# consumer allocate more.
MAX_INFLATED = 64 * 1024 * 1024
# The ack (docs/wire.cddl): version 1 carried ranges only and anyone could forge it.
ACK_VERSION = 2
# 64 bits of SHA-256: an ack is forged only by guessing the digest of a batch in flight
# (at most a few dozen at a time), one MQTT publish per guess, about 2^59 publishes on
# average; collisions do not matter, the device chose what it hashed. 8 bytes per ack.
DIGEST_BYTES = 8
# An ack (signed or not) longer than this is refused unread: a whole batch of scattered
# sequence numbers is a few KiB of ranges.
MAX_ACK = 64 * 1024
# cbor2's own errors, plus what its decoder lets through on hostile input.
DECODE_ERRORS = (cbor2.CBORError, ValueError, TypeError, EOFError, OverflowError, RecursionError,
                 UnicodeDecodeError)


def dumps(obj: Any) -> bytes:
    """CBOR of ``obj`` (for the command envelope and its results)."""
    return bytes(cbor2.dumps(obj))


def tagged(tag: int, value: Any) -> bytes:
    """CBOR of ``value`` under ``tag`` (COSE_Sign1 is tag 18)."""
    return bytes(cbor2.dumps(cbor2.CBORTag(tag, value)))


def strict_loads(data: bytes, what: str, max_depth: int) -> Any:
    """One strict CBOR item filling ``data`` exactly: no trailing bytes, no indefinite
    lengths, no duplicate map keys, bounded nesting. A tag comes back as (tag, value)."""
    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp, allow_indefinite=False, allow_duplicate_keys=False,
                                 max_depth=max_depth).decode()
    except DECODE_ERRORS as e:
        raise ValueError(f"{what} is not CBOR: {type(e).__name__}") from e
    if fp.tell() != len(data):
        raise ValueError(f"{what} has {len(data) - fp.tell()} trailing bytes")
    if isinstance(item, cbor2.CBORTag):
        return (item.tag, item.value)
    return item
KIND_WINDOW = "win"
KIND_GAP = "gap"
KIND_CHANGE = "chg"
KIND_ALARM = "alm"
KIND_SNAPSHOT = "snap"
KIND_RESULT = "res"
KIND_UPDATE = "upd"
KIND_RAW = "raw"
# Samples per snapshot record: a 15 s capture of a busy bus is split into records that
# each fit a batch with room to spare.
SNAPSHOT_PART_SAMPLES = 4000
_UINT64 = 2**64 - 1


def _head(major: int, n: int) -> bytes:
    """A CBOR item head (major type + length), as RFC 8949 section 3 lays it out."""
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 0x100000000:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


# Fixed point: the grids a window row may use (10^e), and the size of its integers.
MIN_EXPONENT = -9
MAX_EXPONENT = 9
_INT_LIMIT = 2**53
# A window's sum is a float accumulation: it is on a grid when a whole number of steps
# is this close to it, relatively (a sum of thousands of readings errs by about 1e-15).
_SUM_TOLERANCE = 1e-9


def _steps(x: float, e: int) -> float:
    return x * 10.0 ** -e if e < 0 else x / 10.0 ** e


def _unscaled(k: int, e: int) -> float:
    # Dividing by 10^-e (exact for -e <= 22) gives the double nearest k x 10^e: the very
    # double a reading of that resolution was decoded to.
    return k / 10.0 ** -e if e < 0 else k * 10.0 ** e


def _exact(x: float, e: int) -> int | None:
    """``x`` as a whole number of 10^e steps, if it is one to the bit."""
    if x == 0 and math.copysign(1.0, x) < 0:
        return None  # -0.0: the sign survives only as a float
    steps = _steps(x, e)
    if not abs(steps) < _INT_LIMIT:
        return None
    k = round(steps)
    return k if _unscaled(k, e) == x else None


def _window_row(sid: int, count: int, vmin: float, vmax: float, mean: float, last: float) -> list[Any]:
    """One signal of a window in whole steps of 10^e, e the coarsest grid its readings
    lie on: ``[sig, count, e, min, max - min, sum - count x min, last - min]``, min, max
    and last exact to the bit, the mean (sum / count) to the float error of the sum.
    Values on no decimal grid (computed ones, or not finite) stay floats:
    ``[sig, count, min, max, mean, last]``."""
    total = mean * count
    if count >= 1 and all(math.isfinite(v) for v in (vmin, vmax, mean, last)):
        # A fraction lies on no grid coarser than 10^-1: those are not tried (the encoder
        # runs for every signal of every window).
        for e in range(MAX_EXPONENT if float(vmin).is_integer() else -1, MIN_EXPONENT - 1, -1):
            lo = _exact(vmin, e)
            if lo is None:
                continue
            hi, end = _exact(vmax, e), _exact(last, e)
            steps = _steps(total, e)
            if hi is None or end is None or not abs(steps) < _INT_LIMIT \
                    or abs(_unscaled(round(steps), e) - total) > _SUM_TOLERANCE * abs(total):
                continue
            dsum = round(steps) - count * lo
            if not 0 <= end - lo <= hi - lo or not 0 <= dsum <= count * (hi - lo) or dsum >= 2**63:
                break  # not a window's own aggregates (min <= last <= max, the sum between), or too big
            return [sid, count, e, lo, hi - lo, dsum, end - lo]
    return [sid, count, vmin, vmax, mean, last]


def window_values(row: list[Any]) -> tuple[int, int, float, float, float, float]:
    """``(signal id, count, min, max, mean, last)`` of a decoded window row, either form."""
    if len(row) == 6:
        return row[0], row[1], float(row[2]), float(row[3]), float(row[4]), float(row[5])
    sid, count, e, lo, dmax, dsum, dlast = row
    # _unscaled four times over, its scale worked out once (the consumer's hot loop).
    if e < 0:
        div = 10.0 ** -e
        return sid, count, lo / div, (lo + dmax) / div, (count * lo + dsum) / div / count, (lo + dlast) / div
    mul = 10.0 ** e
    return sid, count, lo * mul, (lo + dmax) * mul, (count * lo + dsum) * mul / count, (lo + dlast) * mul


def window_record(start: float, length: float, rows: list[tuple[Any, ...]]) -> bytes:
    """Body of a closed-window record: start and length in ms, one row per signal, in
    fixed point where the readings allow (see ``_window_row``)."""
    return cbor2.dumps({
        "k": KIND_WINDOW,
        "t": int(round(start * 1000)),
        "d": int(round(length * 1000)),
        "s": [_window_row(sid, count, vmin, vmax, mean, last) for sid, count, vmin, vmax, mean, last, _ in rows],
    })


def _ms(t: float) -> int:
    return int(round(t * 1000))


def change_record(changes: list[tuple[int, float, float]]) -> bytes:
    """Body of the on-change reports of one read: ``(signal id, time, value)`` each."""
    return cbor2.dumps({"k": KIND_CHANGE, "c": [[sid, _ms(t), value] for sid, t, value in changes]})


def alarm_record(t: float, code: int, name: str, instance: int, level: int, raised: bool,
                 value: float, threshold: float) -> bytes:
    """Body of an alarm raise or clear, with the value that did it and the threshold crossed."""
    return cbor2.dumps({"k": KIND_ALARM, "t": _ms(t), "code": code, "name": name, "inst": instance,
                        "lvl": level, "on": raised, "v": value, "thr": threshold})


def snapshot_records(t: float, code: int, instance: int, start: float, end: float, ids: list[int],
                     times: list[float], values: list[float]) -> list[bytes]:
    """Bodies of one captured event: the samples grouped per signal (columnar), times as
    ms deltas, split into parts of at most ``SNAPSHOT_PART_SAMPLES`` samples."""
    n = len(ids)
    parts = max(1, -(-n // SNAPSHOT_PART_SAMPLES))
    out = []
    for p in range(parts):
        cols: dict[int, tuple[list[int], list[float]]] = {}
        base = _ms(start)
        for i in range(p * SNAPSHOT_PART_SAMPLES, min(n, (p + 1) * SNAPSHOT_PART_SAMPLES)):
            col = cols.setdefault(ids[i], ([], []))
            col[0].append(_ms(times[i]))
            col[1].append(values[i])
        series = []
        for sid, (ts, vs) in cols.items():
            deltas = [max(0, ts[0] - base)] + [max(0, b - a) for a, b in zip(ts, ts[1:], strict=False)]
            series.append([sid, deltas, vs])
        out.append(cbor2.dumps({"k": KIND_SNAPSHOT, "t": _ms(t), "code": code, "inst": instance,
                                "from": base, "to": _ms(end), "part": p, "parts": parts, "s": series}))
    return out


def gap_record(runs: list[tuple[int, int]], why: str, t: float) -> bytes:
    """Body of a record announcing sequence numbers the device dropped, and why, so the
    cloud can tell an explained gap from a lost record."""
    return cbor2.dumps({"k": KIND_GAP, "t": int(round(t * 1000)), "why": why,
                        "runs": [[first, last] for first, last in runs]})


def result_record(t: float, result: bytes) -> bytes:
    """Body of a command result kept in the outbox: the ``cmd/result`` message itself
    (already CBOR) under ``r``, so a result survives an outage like any record."""
    return (_head(5, 3) + cbor2.dumps("k") + cbor2.dumps(KIND_RESULT) + cbor2.dumps("t") + cbor2.dumps(_ms(t))
            + cbor2.dumps("r") + result)


def update_record(t: float, failed: str, running: str, why: str) -> bytes:
    """Body of the report that a new version failed its health check and the unit went
    back to the previous one (packaging/update-guard), sent once at the next connection."""
    return cbor2.dumps({"k": KIND_UPDATE, "t": _ms(t), "failed": failed, "running": running, "why": why})


def state_message(online: bool, boot_id: str, version: str, kernel: str) -> bytes:
    """The retained ``state`` payload: birth (online) and last will (offline)."""
    return cbor2.dumps({"online": online, "boot": boot_id, "version": version, "kernel": kernel})


def record_bytes(record: dict[str, Any]) -> bytes:
    """One decoded record encoded again, for the consumer's archive."""
    return cbor2.dumps(record)


def batch_digest(payload: bytes) -> bytes:
    """What names a batch in its ack: the first ``DIGEST_BYTES`` of the SHA-256 of the
    exact payload bytes published. Only someone who saw the batch can name it, so an
    ack cannot be made up without it; computed once per batch on each side."""
    return hashlib.sha256(payload).digest()[:DIGEST_BYTES]


def encode_ack(digest: bytes, seqs: list[int]) -> bytes:
    """``[2, digest, [[first, last], ...]]``: the consumer stored these sequence numbers
    of the batch whose payload has this ``batch_digest``."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return cbor2.dumps([ACK_VERSION, digest, ranges])


def decode_ack(payload: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """The batch digest and ranges of an (unsigned) ack; anything off the CDDL, or longer
    than ``MAX_ACK`` bytes, is a DecodeError."""
    if len(payload) > MAX_ACK:
        raise DecodeError(f"ack of {len(payload)} bytes > {MAX_ACK}")
    try:
        msg = strict_loads(payload, "ack", 4)
    except ValueError as e:
        raise DecodeError(str(e)) from e
    if (not isinstance(msg, list) or len(msg) != 3 or type(msg[0]) is not int or msg[0] != ACK_VERSION
            or not isinstance(msg[1], bytes) or len(msg[1]) != DIGEST_BYTES
            or not isinstance(msg[2], list) or not msg[2]):
        raise DecodeError(f"ack must be [{ACK_VERSION}, digest ({DIGEST_BYTES} bytes), [+ [first, last]]]")
    out = []
    for r in msg[2]:
        if (not isinstance(r, list) or len(r) != 2 or not _uint(r[0]) or not _uint(r[1])
                or not 1 <= r[0] <= r[1]):
            raise DecodeError("ack range must be [first, last] with 1 <= first <= last")
        out.append((r[0], r[1]))
    return msg[1], out


# What a batch adds around each record body: its 2-array head and a sequence number (at
# most 9 bytes); and around all of them: array heads, version and the device id.
RECORD_OVERHEAD = 10


@functools.lru_cache(maxsize=8)
def batch_overhead(device_id: str) -> int:
    return 1 + 1 + len(cbor2.dumps(device_id)) + 5


def encode_batch(device_id: str, records: list[tuple[int, bytes]], deflate: bool = False) -> bytes:
    """``[1, device, [[seq, record], ...]]`` from already-encoded record bodies; with
    ``deflate``, ``[2, device, bstr]``, the bstr the records array deflated."""
    parts = [_head(4, len(records))]
    for seq, body in records:
        parts.append(_head(4, 2))
        parts.append(cbor2.dumps(seq))
        parts.append(body)
    array = b"".join(parts)
    if not deflate:
        return _head(4, 3) + cbor2.dumps(VERSION) + cbor2.dumps(device_id) + array
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = z.compress(array) + z.flush()
    return _head(4, 3) + cbor2.dumps(VERSION_DEFLATE) + cbor2.dumps(device_id) + cbor2.dumps(packed)


def _inflate(data: bytes) -> Any:
    """The records array of a deflated batch; DecodeError if it is not a whole deflate
    stream, inflates beyond MAX_INFLATED or is not CBOR."""
    d = zlib.decompressobj(-15)
    try:
        raw = d.decompress(data, MAX_INFLATED)
    except zlib.error as e:
        raise DecodeError(f"deflated records are not a deflate stream: {e}") from e
    if d.unconsumed_tail or not d.eof or d.unused_data:
        raise DecodeError(f"deflated records are cut short, have trailing bytes or inflate beyond {MAX_INFLATED} bytes")
    try:
        return cbor2.loads(raw)
    except (cbor2.CBORDecodeError, ValueError, EOFError) as e:
        raise DecodeError(f"deflated records are not CBOR: {e}") from e


def decode_batch(payload: bytes) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """Device id and ``(seq, record)`` pairs; anything off the CDDL is a DecodeError."""
    try:
        batch = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, EOFError) as e:
        raise DecodeError(f"batch is not CBOR: {e}") from e
    if not isinstance(batch, list) or len(batch) != 3:
        raise DecodeError("batch must be [version, device, records]")
    version, device, records = batch
    if type(version) is not int or version not in (VERSION, VERSION_DEFLATE):
        raise DecodeError(f"unsupported batch version {version!r}")
    if version == VERSION_DEFLATE:
        if not isinstance(records, bytes):
            raise DecodeError("a deflated batch carries its records as a byte string")
        records = _inflate(records)
    if not isinstance(device, str) or not isinstance(records, list):
        raise DecodeError("batch device must be text and records an array")
    out = []
    for item in records:
        if not isinstance(item, list) or len(item) != 2 or not _uint(item[0]) or item[0] < 1 \
                or not isinstance(item[1], dict):
            raise DecodeError("record must be [seq (uint >= 1), {record}]")
        _check_record(item[1])
        out.append((item[0], item[1]))
    return device, out


def _uint(v: Any) -> bool:
    """A CBOR unsigned integer (major type 0); bools and bignums are not."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _UINT64


def _value(v: Any) -> bool:
    """The CDDL's ``float / int``: a float, or an integer CBOR encodes without a bignum tag."""
    if isinstance(v, bool):
        return False
    return isinstance(v, float) or (isinstance(v, int) and -_UINT64 - 1 <= v <= _UINT64)


def _check_change(rec: dict[str, Any]) -> None:
    changes = rec.get("c")
    if not isinstance(changes, list) or not all(
            isinstance(c, list) and len(c) == 3 and _uint(c[0]) and _uint(c[1]) and _value(c[2]) for c in changes):
        raise DecodeError("change record needs c: [[signal id, ms, value], ...]")


def _check_alarm(rec: dict[str, Any]) -> None:
    if (not _uint(rec.get("t")) or not _uint(rec.get("code")) or not isinstance(rec.get("name"), str)
            or not isinstance(rec.get("inst"), int) or isinstance(rec.get("inst"), bool)
            or rec.get("lvl") not in (1, 2, 3) or not isinstance(rec.get("on"), bool)
            or not _value(rec.get("v")) or not _value(rec.get("thr"))):
        raise DecodeError("alarm record needs t, code, name, inst, lvl 1-3, on, v and thr")


def _check_snapshot(rec: dict[str, Any]) -> None:
    if not all(_uint(rec.get(k)) for k in ("t", "code", "from", "to", "part", "parts")) \
            or not isinstance(rec.get("inst"), int) or not rec["part"] < rec["parts"]:
        raise DecodeError("snapshot record needs unsigned t, code, from, to, part < parts and inst")
    series = rec.get("s")
    if not isinstance(series, list) or not all(
            isinstance(c, list) and len(c) == 3 and _uint(c[0]) and isinstance(c[1], list)
            and isinstance(c[2], list) and len(c[1]) == len(c[2]) and all(_uint(d) for d in c[1])
            and all(_value(v) for v in c[2]) for c in series):
        raise DecodeError("snapshot series must be [signal id, [ms deltas], [values]] of equal lengths")


def _check_result(rec: dict[str, Any]) -> None:
    r = rec.get("r")
    if (not _uint(rec.get("t")) or not isinstance(r, dict) or not isinstance(r.get("status"), str)
            or not isinstance(r.get("reason"), str) or not (r.get("id") is None or isinstance(r.get("id"), str))
            or not isinstance(r.get("t"), dict)):
        raise DecodeError("result record needs unsigned t and r: a command result (id, status, reason, t)")


def _check_update(rec: dict[str, Any]) -> None:
    if not _uint(rec.get("t")) or not all(isinstance(rec.get(k), str) for k in ("failed", "running", "why")):
        raise DecodeError("update record needs unsigned t and text failed, running and why")


def _check_raw(rec: dict[str, Any]) -> None:
    """The whole record decoded: its series are opaque until then."""
    raw_samples(rec)


def _check_record(rec: dict[str, Any]) -> None:
    checks = {KIND_CHANGE: _check_change, KIND_ALARM: _check_alarm, KIND_SNAPSHOT: _check_snapshot,
              KIND_RESULT: _check_result, KIND_UPDATE: _check_update, KIND_RAW: _check_raw}
    check = checks.get(str(rec.get("k")))
    if check is not None:
        check(rec)
        return
    if rec.get("k") == KIND_GAP:
        runs = rec.get("runs")
        if (not _uint(rec.get("t")) or not isinstance(rec.get("why"), str) or not isinstance(runs, list)
                or not all(isinstance(r, list) and len(r) == 2 and _uint(r[0]) and _uint(r[1])
                           and 1 <= r[0] <= r[1] for r in runs)):
            raise DecodeError("gap record needs unsigned t, text why and runs of [first, last]")
        return
    if rec.get("k") != KIND_WINDOW:
        raise DecodeError(f"unknown record kind {rec.get('k')!r}")
    if not _uint(rec.get("t")) or not _uint(rec.get("d")) or not isinstance(rec.get("s"), list):
        raise DecodeError("window record needs unsigned integer t, d and a list s")
    for row in rec["s"]:
        if not _window_row_ok(row):
            raise DecodeError("window row must be [signal id, count, e, min, max - min, sum - count x min, "
                              "last - min] (fixed point) or [signal id, count, min, max, mean, last]")


def _window_row_ok(row: Any) -> bool:
    # Straight-line on purpose: a day's backlog is 3.5 M rows, and this check was the
    # consumer's largest cost as a chain of generic helpers. ``type(v) is int`` keeps
    # bools out, as _uint does.
    if type(row) is not list:
        return False
    if len(row) == 6:
        return _uint(row[0]) and _uint(row[1]) and all(_value(v) for v in row[2:])
    if len(row) != 7:
        return False
    sid, count, e, lo, dmax, dsum, dlast = row
    return (type(sid) is int and type(count) is int and type(e) is int and type(lo) is int
            and type(dmax) is int and type(dsum) is int and type(dlast) is int
            and 0 <= sid <= _UINT64 and 1 <= count <= _UINT64 and MIN_EXPONENT <= e <= MAX_EXPONENT
            and -(2**63) <= lo < 2**63 and 0 <= dlast <= dmax < 2**63 and 0 <= dsum <= count * dmax
            and dsum < 2**63)


# The raw lane ------------------------------------------------------------------------
# Raw records: every sample of a signal, lossless at its resolution, with its
# time to the millisecond (docs/wire.cddl ``raw-record``, docs/raw.md).
#
# A record holds a span of samples, grouped per signal (columnar). Each series keeps its
# values as whole steps of its resolution (10^e) and its times as ms; both columns are
# varints of zigzag integers: times as the first offset, the first interval, then the
# change of interval (delta-of-delta), values as the first step count, then the change
# from the previous sample divided by the series' common step ``g`` (the GCD of its
# changes). In both, a run of zeros (a value held, a regular period) is one varint: most
# samples of a vehicle repeat their predecessor or change by it by a constant. The CBOR of
# the series is then deflated or LZMA-compressed, whichever is smaller (``z``): LZMA's
# context modelling is what brings a 10 Hz commute to about 0.14 B per sample, deflate
# gets about 0.16.
#
# Resolution (agent/signals.py raw_decimals): a CAN signal's from its DBC factor and
# offset, a derived signal's agent/fusion/spec.py DERIVED_DECIMALS, any other its unit's.
# A sample is sent as ``round(value / 10^e)`` steps and comes back as that many steps
# times 10^e (the double nearest it), so a reading decoded at its resolution comes back
# bit for bit, and one computed finer comes back rounded to it.

CODEC_DEFLATE = "deflate"
CODEC_LZMA = "lzma"
# Step counts stay below 2^53: the double k x 10^e is then the nearest to the reading.
_RAW_STEP_LIMIT = 2**53
# Samples one record may hold: the encoder starts another record beyond RAW_RECORD_SAMPLES,
# the decoder refuses more than MAX_RAW_SAMPLES (a run of zeros is one varint, so
# a hostile record could otherwise claim billions of samples in a few bytes).
RAW_RECORD_SAMPLES = 1 << 20
MAX_RAW_SAMPLES = 1 << 21
# The decompressed series may take at most this (as wire.MAX_INFLATED for a batch).
MAX_RAW_COLUMNS = 64 * 1024 * 1024
# LZMA with a dictionary of 256 KiB, larger than a 200 s record of a commute's columns
# (32 KB): about 3 MB of memory to compress, 256 KiB to decompress (the presets' 64 MiB
# dictionary would take 670 MB on the device).
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 18}]


def _zigzag(x: int) -> int:
    return x << 1 if x >= 0 else ((-x) << 1) - 1


def _unzigzag(v: int) -> int:
    return v >> 1 if not v & 1 else -((v + 1) >> 1)


def _varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _runs(out: bytearray, xs: list[int]) -> None:
    """``xs`` as varints, a run of n zeros as 2(n - 1), any other x as 2 zigzag(x) - 1."""
    i, n = 0, len(xs)
    while i < n:
        if xs[i] == 0:
            j = i + 1
            while j < n and xs[j] == 0:
                j += 1
            _varint(out, 2 * (j - i - 1))
            i = j
        else:
            _varint(out, 2 * _zigzag(xs[i]) - 1)
            i += 1


class _Reader:
    """Varints out of one column, each checked against the column's end."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def varint(self) -> int:
        v = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise DecodeError(f"raw {self.what} column ends inside a varint or has one over 64 bits")
            b = self.data[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7

    def signed(self) -> int:
        return _unzigzag(self.varint())

    def runs(self, n: int) -> list[int]:
        """``n`` integers written by ``_runs``."""
        out: list[int] = []
        while len(out) < n:
            v = self.varint()
            if v & 1:
                out.append(_unzigzag((v + 1) >> 1))
            elif len(out) + v // 2 + 1 > n:
                raise DecodeError(f"raw {self.what} column runs past its sample count")
            else:
                out.extend([0] * (v // 2 + 1))
        return out

    def done(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"raw {self.what} column has {len(self.data) - self.pos} trailing bytes")


def _raw_series(sid: int, dec: int, base: int, times: list[int], steps: list[int]) -> list[Any]:
    """``[sig, e, g, n, times, values]`` of one signal's samples (ms, whole steps)."""
    tcol, vcol = bytearray(), bytearray()
    _varint(tcol, _zigzag(times[0] - base))
    if len(times) > 1:
        _varint(tcol, _zigzag(times[1] - times[0]))
        _runs(tcol, [times[i + 1] - 2 * times[i] + times[i - 1] for i in range(1, len(times) - 1)])
    deltas = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    g = 0
    for d in deltas:
        g = math.gcd(g, d)
    g = g or 1
    _varint(vcol, _zigzag(steps[0]))
    _runs(vcol, [d // g for d in deltas])
    return [sid, -dec, g, len(times), bytes(tcol), bytes(vcol)]


def _raw_compress(columns: bytes) -> tuple[str, bytes]:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = z.compress(columns) + z.flush()
    packed = lzma.compress(columns, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return (CODEC_LZMA, packed) if len(packed) < len(deflated) else (CODEC_DEFLATE, deflated)


def raw_record(start: float, end: float, samples: Iterable[tuple[int, float, float]],
               decimals: Mapping[int, int], lost: int = 0) -> tuple[bytes, int]:
    """Body of a raw record of the span ``start``..``end`` (s) from ``(signal id, time,
    value)`` samples in any order (series keep the order given), each signal at
    ``decimals[sid]``; ``lost``: samples the kernel's ring overwrote before they were read.
    Returns the body and how many samples were left out as not finite or beyond 2^53
    steps (the kernel believes neither, so this is 0 unless the caller mixed others in);
    the body says that count too (``skip``)."""
    base = round(start * 1000)
    per: dict[int, tuple[list[int], list[int]]] = {}
    skipped = 0
    for sid, t, value in samples:
        scale = 10.0 ** decimals[sid]
        k = value * scale
        if not abs(k) < _RAW_STEP_LIMIT:  # NaN too
            skipped += 1
            continue
        col = per.setdefault(sid, ([], []))
        col[0].append(round(t * 1000))
        col[1].append(round(k))
    series = [_raw_series(sid, decimals[sid], base, ts, ks) for sid, (ts, ks) in sorted(per.items())]
    codec, packed = _raw_compress(cbor2.dumps(series))
    body: dict[str, Any] = {"k": KIND_RAW, "t": base, "d": max(0, round(end * 1000) - base), "z": codec, "b": packed}
    if lost:
        body["lost"] = lost
    if skipped:
        body["skip"] = skipped
    return cbor2.dumps(body), skipped


def raw_columns(rec: Mapping[str, Any]) -> bytes:
    """The decompressed CBOR of a raw record's series (``raw-columns`` in the CDDL)."""
    data, codec = rec.get("b"), rec.get("z")
    if not isinstance(data, bytes):
        raise DecodeError("raw record needs its compressed series as a byte string b")
    try:
        if codec == CODEC_DEFLATE:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, MAX_RAW_COLUMNS)
            whole = d.eof and not d.unconsumed_tail and not d.unused_data
        elif codec == CODEC_LZMA:
            lz = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            out = lz.decompress(data, MAX_RAW_COLUMNS)
            whole = lz.eof and not lz.unused_data
        else:
            raise DecodeError(f"raw record compression z must be {CODEC_DEFLATE!r} or {CODEC_LZMA!r}")
    except (zlib.error, lzma.LZMAError) as e:
        raise DecodeError(f"raw record's series do not decompress: {e}") from e
    if not whole:
        raise DecodeError(f"raw record's series are cut short, have trailing bytes or exceed {MAX_RAW_COLUMNS} bytes")
    return bytes(out)


def raw_samples(rec: Mapping[str, Any]) -> list[tuple[int, int, float]]:
    """Every sample of a raw record as ``(signal id, ms since the epoch, value)``, series
    after series; anything off the CDDL is a DecodeError."""
    if not (_uint(rec.get("t")) and _uint(rec.get("d")) and _uint(rec.get("lost", 0)) and _uint(rec.get("skip", 0))):
        raise DecodeError("raw record needs unsigned t and d (and lost, skip if present)")
    try:
        series = cbor2.loads(raw_columns(rec))
    except (cbor2.CBORDecodeError, ValueError, EOFError, RecursionError) as e:
        raise DecodeError(f"raw record's series are not CBOR: {e}") from e
    if not isinstance(series, list):
        raise DecodeError("raw record's series must be an array")
    out: list[tuple[int, int, float]] = []
    for s in series:
        if (not isinstance(s, list) or len(s) != 6 or not _uint(s[0]) or type(s[1]) is not int
                or not MIN_EXPONENT <= s[1] <= MAX_EXPONENT or not _uint(s[2]) or s[2] < 1
                or not _uint(s[3]) or s[3] < 1 or not isinstance(s[4], bytes) or not isinstance(s[5], bytes)):
            raise DecodeError("raw series must be [sig, e (-9..9), g >= 1, n >= 1, times, values]")
        sid, exp, g, n, tcol, vcol = s
        if len(out) + n > MAX_RAW_SAMPLES:
            raise DecodeError(f"raw record holds more than {MAX_RAW_SAMPLES} samples")
        tr, vr = _Reader(tcol, "time"), _Reader(vcol, "value")
        t = rec["t"] + tr.signed()
        times = [t]
        if n > 1:
            dt = tr.signed()
            times.append(t + dt)
            for dod in tr.runs(n - 2):
                dt += dod
                times.append(times[-1] + dt)
        k = vr.signed()
        steps = [k]
        for d in vr.runs(n - 1):
            k += d * g
            steps.append(k)
        tr.done()
        vr.done()
        if min(times) < 0 or max(times) > _UINT64 or any(abs(x) >= _RAW_STEP_LIMIT for x in steps):
            raise DecodeError("raw series has a time before the epoch or a value beyond 2^53 steps")
        div, mul = (10.0 ** -exp, 1.0) if exp < 0 else (1.0, 10.0 ** exp)
        out.extend((sid, ms, x / div * mul) for ms, x in zip(times, steps, strict=True))
    return out
