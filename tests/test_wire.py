"""The CBOR batch codec against cbor2, the CDDL and itself.

The encoder builds CBOR heads by hand to avoid re-encoding stored records; a wrong
head at a size boundary would corrupt every batch of that size. The decoder is the
reference for the fleet backend, so it must accept exactly what docs/wire.cddl does.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pycddl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import wire
from agent.errors import DecodeError
from tests.conftest import WIRE_CDDL, WireSchema

UINT64 = 2**64 - 1
uints = st.integers(min_value=0, max_value=UINT64)
numbers = st.one_of(
    st.floats(allow_nan=False),
    st.integers(min_value=-(2**64), max_value=UINT64),
)
rows = st.lists(st.tuples(uints, uints, numbers, numbers, numbers, numbers, st.none()), max_size=8)
windows = st.tuples(
    st.floats(min_value=0, max_value=4e12, allow_nan=False),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    rows,
)


def record(t: int = 0, d: int = 1000, s: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"k": "win", "t": t, "d": d, "s": [] if s is None else s, **extra}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device=st.text(min_size=1, max_size=20),
       first_seq=st.integers(min_value=1, max_value=UINT64 - 50),
       recs=st.lists(windows, max_size=12))
def test_round_trip(device: str, first_seq: int, recs: list[tuple[float, float, list[Any]]]) -> None:
    """What the agent encodes, the cloud decodes to the same numbers: ids, counts,
    negative and huge values; min, max and last bit for bit, the mean too where the row
    stays in floats and to the float error of a sum in fixed point."""
    batch = [(first_seq + i, wire.window_record(start, length, r)) for i, (start, length, r) in enumerate(recs)]
    got_device, got = wire.decode_batch(wire.encode_batch(device, batch))
    assert got_device == device
    assert [seq for seq, _ in got] == [seq for seq, _ in batch]
    for (_, rec), (start, length, r) in zip(got, recs, strict=True):
        assert rec["k"] == "win"
        assert rec["t"] == round(start * 1000) and rec["d"] == round(length * 1000)
        assert len(rec["s"]) == len(r)
        for got_row, want in zip(rec["s"], r, strict=True):
            if len(got_row) == 6:
                assert got_row == list(want[:6])
                assert all(type(a) is type(b) for a, b in zip(got_row, want[:6], strict=True))
                assert all(math.copysign(1, a) == math.copysign(1, b) for a, b in zip(got_row, want[:6], strict=True)
                           if isinstance(a, float))
                continue
            sid, count, vmin, vmax, mean, last = wire.window_values(got_row)
            assert (sid, count) == want[:2]
            for a, b in ((vmin, want[2]), (vmax, want[3]), (last, want[5])):
                assert a == b and math.copysign(1, a) == math.copysign(1, b)
            assert mean == pytest.approx(want[4], rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(step=st.sampled_from([1e-3, 0.01, 0.1, 1.0, 10.0]), base=st.integers(-10**6, 10**6),
       spread=st.lists(st.integers(0, 5000), min_size=1, max_size=60))
def test_readings_of_a_resolution_go_fixed_point(step: float, base: int, spread: list[int]) -> None:
    """Readings a sensor of resolution ``step`` gives (as the decoders compute them) are
    sent as small integers, min/max/last exact, the mean to 1e-12."""
    scale = round(1 / step) if step < 1 else None
    values = [(base + d) / scale if scale else (base + d) * step for d in spread]
    row = (7, len(values), min(values), max(values), sum(values) / len(values), values[-1], 0.0)
    body = wire.window_record(1.7e9, 1.0, [row])
    got = cbor2.loads(body)["s"][0]
    assert len(got) == 7 and 10.0 ** got[2] >= step / 1.0001
    sid, count, vmin, vmax, mean, last = wire.window_values(got)
    assert (vmin, vmax, last, count) == (row[2], row[3], row[5], len(values))
    assert mean == pytest.approx(row[4], rel=1e-12, abs=1e-12)
    assert len(cbor2.dumps(got)) < len(cbor2.dumps(list(row[:6]))), "fixed point is the smaller row"


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_array_heads_match_cbor2(n: int) -> None:
    """The hand-built batch equals cbor2's own encoding of the same structure at each
    size where the CBOR length head changes form."""
    rec = record(t=1_700_000_000_000, s=[[1, 3, 24.5, 25.0, 24.75, 25]])
    body = cbor2.dumps(rec)
    first_seq = 2**32 - 1 if n else 1
    records = [(first_seq + i, body) for i in range(n)]
    expected = cbor2.dumps([1, "bike-1", [[seq, rec] for seq, _ in records]])
    assert wire.encode_batch("bike-1", records) == expected


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, UINT64])
def test_head_matches_cbor2_uint(n: int) -> None:
    """The head helper gives the same bytes as cbor2 for every head width, including the
    32- and 64-bit forms no test batch is large enough to reach."""
    assert wire._head(0, n) == cbor2.dumps(n)
    assert wire._head(4, n)[0] == 0x80 | cbor2.dumps(n)[0] & 0x1F
    assert wire._head(4, n)[1:] == cbor2.dumps(n)[1:]


def batch(*records: Any, version: Any = 1, device: Any = "bike-1") -> bytes:
    return cbor2.dumps([version, device, list(records)])


BAD_BATCHES = {
    "not-cbor": b"\xff\x00garbage",
    "truncated": cbor2.dumps([1, "bike-1", [[1, record()]]])[:-3],
    "empty": b"",
    "version-2": batch(version=2),
    "version-str": batch(version="1"),
    "not-array": cbor2.dumps({"v": 1}),
    "two-items": cbor2.dumps([1, "bike-1"]),
    "device-bytes": batch(device=b"bike-1"),
    "records-map": cbor2.dumps([1, "bike-1", {}]),
    "record-not-pair": batch([1]),
    "record-three": batch([1, record(), 2]),
    "seq-bool": batch([True, record()]),
    "seq-float": batch([1.0, record()]),
    "body-list": batch([1, ["win"]]),
    "kind-unknown": batch([1, record(k="alarm")]),
    "kind-missing": batch([1, {"t": 0, "d": 0, "s": []}]),
    "t-float": batch([1, record(t=1.5)]),
    "t-negative": batch([1, record(t=-1)]),
    "t-bool": batch([1, record(t=True)]),
    "d-missing": batch([1, {"k": "win", "t": 0, "s": []}]),
    "s-map": batch([1, record(s={})]),
    "row-short": batch([1, record(s=[[1, 2, 3, 4, 5]])]),
    "row-long": batch([1, record(s=[[1, 2, 3, 4, 5, 6, 7, 8]])]),
    "fixed-row-e-float": batch([1, record(s=[[1, 2, 0.5, 4, 5, 6, 0]])]),
    "fixed-row-dmax-negative": batch([1, record(s=[[1, 2, 0, 4, -5, 0, 0]])]),
    "row-not-list": batch([1, record(s=[7])]),
    "row-sig-float": batch([1, record(s=[[1.0, 2, 3, 4, 5, 6]])]),
    "row-sig-negative": batch([1, record(s=[[-1, 2, 3, 4, 5, 6]])]),
    "row-count-negative": batch([1, record(s=[[1, -2, 3, 4, 5, 6]])]),
    "row-count-bool": batch([1, record(s=[[1, True, 3, 4, 5, 6]])]),
    "row-value-text": batch([1, record(s=[[1, 2, "3", 4, 5, 6]])]),
    "row-value-bool": batch([1, record(s=[[1, 2, 3, 4, 5, False]])]),
    "row-value-null": batch([1, record(s=[[1, 2, 3, None, 5, 6]])]),
}


@pytest.mark.parametrize("payload", list(BAD_BATCHES.values()), ids=list(BAD_BATCHES))
def test_decoder_rejects(payload: bytes, batch_schema: WireSchema) -> None:
    """Everything off the contract is a DecodeError (which the consumer counts), never
    another exception, and the CDDL refuses the same bytes."""
    with pytest.raises(DecodeError):
        wire.decode_batch(payload)
    with pytest.raises(pycddl.ValidationError):
        batch_schema.validate_cbor(payload)


@pytest.mark.parametrize("payload", [batch([0, record()]), batch([-1, record()]), batch([2**64, record()])],
                         ids=["seq-0", "seq-negative", "seq-2**64"])
def test_decoder_rejects_seqs_outside_the_outbox_range(payload: bytes, batch_schema: WireSchema) -> None:
    """Sequence numbers start at 1 and fit 64 bits, in the decoder and the CDDL alike."""
    with pytest.raises(DecodeError, match="seq"):
        wire.decode_batch(payload)
    with pytest.raises(pycddl.ValidationError):
        batch_schema.validate_cbor(payload)


def test_decoder_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not CBOR"):
        wire.decode_batch(b"\xff")


def test_schema_rejects_hand_made_invalid_batch(batch_schema: WireSchema) -> None:
    """The CDDL check the suite relies on does bite: a valid batch passes, a wrong one fails."""
    batch_schema.validate_cbor(batch([1, record(s=[[1, 2, 3.5, 4, 5, 6]])]))
    with pytest.raises(pycddl.ValidationError):
        batch_schema.validate_cbor(batch([1, record(k="nope")]))
    with pytest.raises(pycddl.ValidationError):
        batch_schema.validate_cbor(batch([1, record(s=[[1, 2, "x", 4, 5, 6]])]))


def test_autouse_check_covers_encode_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autouse fixture really wraps encode_batch: a body off the CDDL fails the call."""
    with pytest.raises(pycddl.ValidationError):
        wire.encode_batch("bike-1", [(1, cbor2.dumps(record(t=-5)))])


# Arbitrary CBOR-ish structures near the batch shape: the decoder and the CDDL must agree.
# Kept away from what pycddl 0.6 (cddl-rs 0.9.5) gets wrong by itself: it accepts tagged
# items (bignums beyond 64 bits) in place of any type, panics on a byte string as a
# record body, and checks only the first element of a ``[* x]`` array (so arrays here
# hold at most one record and one row; the decoder checks every element).
leaf = st.one_of(st.integers(min_value=-(2**64), max_value=UINT64), st.floats(), st.booleans(), st.none(),
                 st.text(max_size=3))
row_like = st.one_of(st.lists(leaf, min_size=5, max_size=7), leaf)
one = {"max_size": 1}
rec_like = st.one_of(
    st.fixed_dictionaries({"k": st.sampled_from(["win", "win", "x"]), "t": leaf, "d": leaf,
                           "s": st.one_of(st.lists(row_like, **one), leaf)}),
    st.fixed_dictionaries({"k": st.just("win"), "t": uints, "d": uints,
                           "s": st.lists(st.lists(st.one_of(uints, numbers), min_size=6, max_size=6), **one)}),
    leaf,
)
item_like = st.one_of(st.tuples(st.one_of(leaf, uints), rec_like).map(list), st.lists(leaf, max_size=3))
batch_like = st.one_of(
    st.tuples(st.sampled_from([1, 1, 1, 2, True]), st.one_of(st.text(max_size=5), leaf),
              st.lists(item_like, **one)).map(list),
    leaf,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=batch_like)
def test_decoder_agrees_with_cddl(obj: Any, batch_schema: WireSchema) -> None:
    """The reference decoder and docs/wire.cddl accept exactly the same batches (but for
    seq < 1, which only the decoder refuses: see above)."""
    payload = cbor2.dumps(obj)
    try:
        batch_schema.validate_cbor(payload)
        cddl_ok = True
    except pycddl.ValidationError:
        cddl_ok = False
    try:
        wire.decode_batch(payload)
        decoder_ok = True
    except DecodeError:
        decoder_ok = False
    seq_below_1 = isinstance(obj, list) and len(obj) == 3 and isinstance(obj[2], list) and any(
        isinstance(item, list) and item and type(item[0]) is int and item[0] < 1 for item in obj[2])
    if seq_below_1 and cddl_ok:
        assert not decoder_ok
        return
    assert decoder_ok == cddl_ok, (obj, cddl_ok)


def test_ingest_tells_announced_drops_from_lost_records(tmp_path: Path) -> None:
    """A hole the device announced in a gap record is not reported as lost; any other is."""
    from agent.fleet.ingest import Ingest

    def batch_of(items: list[tuple[int, bytes]]) -> bytes:
        return wire.encode_batch("bike-7", items)

    win = [wire.window_record(1.7e9 + i, 1.0, [(1, 1, 1.0, 1.0, 1.0, 1.0, 0.0)]) for i in range(10)]
    store = Ingest(str(tmp_path / "cloud.sqlite"))
    try:
        topic = "ebike/v1/bike-7/telemetry"
        assert store.handle(topic, batch_of([(1, win[0]), (2, win[1]), (5, win[4]), (9, win[8])])) == [1, 2, 5, 9]
        assert store.report()["gaps"] == {"bike-7": [[3, 4], [6, 8]]}
        store.handle(topic, batch_of([(10, wire.gap_record([(3, 4), (7, 7)], "quota", 1.7e9))]))
        report = store.report()
        assert report["announced_drops"] == {"bike-7": [[3, 4], [7, 7]]}
        assert report["gaps"] == {"bike-7": [[6, 6], [8, 8]]}
    finally:
        store.close()


def test_deflated_batch_round_trips_and_is_smaller() -> None:
    rows = [(sid, 10, 20.0 + sid / 100, 21.5, 20.75, 21.0, 0.0) for sid in range(1, 41)]
    batch = [(i + 1, wire.window_record(1.7e9 + i, 1.0, rows)) for i in range(200)]
    plain, packed = wire.encode_batch("bike-1", batch), wire.encode_batch("bike-1", batch, deflate=True)
    assert cbor2.loads(packed)[0] == wire.VERSION_DEFLATE and len(packed) * 10 < len(plain)
    assert wire.decode_batch(packed) == wire.decode_batch(plain)


@pytest.mark.parametrize("records", [b"\x00\x01garbage", zlib.compress(cbor2.dumps([]))[2:-6] + b"",
                                     b"\x03\x00" + b"tail"], ids=["not-deflate", "cut-short", "trailing"])
def test_deflated_batch_that_does_not_inflate_is_refused(records: bytes) -> None:
    with pytest.raises(DecodeError, match="deflate"):
        wire.decode_batch(cbor2.dumps([wire.VERSION_DEFLATE, "bike-1", records]))


def test_deflated_batch_may_not_inflate_beyond_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_INFLATED", 1000)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = z.compress(cbor2.dumps([[1, {"k": "gap", "t": 0, "why": "x" * 5000, "runs": []}]])) + z.flush()
    with pytest.raises(DecodeError, match="beyond 1000 bytes"):
        wire.decode_batch(cbor2.dumps([wire.VERSION_DEFLATE, "bike-1", bomb]))


def test_fixed_point_rows_must_be_a_windows_own_aggregates() -> None:
    for row in ([1, 2, -2, 100, 5, 4, 6], [1, 2, -2, 100, 5, 11, 0], [1, 0, -2, 100, 0, 0, 0], [1, 1, 10, 0, 0, 0, 0]):
        with pytest.raises(DecodeError, match="fixed point"):
            wire.decode_batch(cbor2.dumps([1, "bike-1", [[1, record(s=[row])]]]))


PLAIN_ACK = pycddl.Schema("root = plain-ack\n" + WIRE_CDDL)


@given(st.lists(st.integers(1, 2**64 - 1), min_size=1, max_size=50), st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_ack_round_trips_and_matches_the_cddl(seqs: list[int], payload: bytes) -> None:
    """The ack names the batch by the digest of its exact bytes and lists its numbers as
    ranges that cover exactly those numbers."""
    digest = wire.batch_digest(payload)
    ack = wire.encode_ack(digest, seqs)
    PLAIN_ACK.validate_cbor(ack)
    got_digest, ranges = wire.decode_ack(ack)
    assert got_digest == digest == hashlib.sha256(payload).digest()[:wire.DIGEST_BYTES]
    assert sorted(s for first, last in ranges for s in range(first, last + 1)) == sorted(set(seqs))


def test_ack_digest_is_of_the_exact_bytes() -> None:
    payload = wire.encode_batch("bike-1", [(1, cbor2.dumps(record()))], deflate=True)
    assert len(wire.batch_digest(payload)) == wire.DIGEST_BYTES == 8
    assert wire.batch_digest(payload) != wire.batch_digest(payload[:-1] + bytes([payload[-1] ^ 1]))


D = b"\x01" * wire.DIGEST_BYTES
BAD_ACKS = [
    b"", b"\xff\x00garbage", cbor2.dumps([1, [[1, 2]]]),                     # version 1: ranges only
    cbor2.dumps([2, D, []]), cbor2.dumps([2, D[:7], [[1, 2]]]), cbor2.dumps([2, D + b"\x00", [[1, 2]]]),
    cbor2.dumps([2, D.hex(), [[1, 2]]]), cbor2.dumps([True, D, [[1, 2]]]), cbor2.dumps([3, D, [[1, 2]]]),
    cbor2.dumps([2, D, [[0, 1]]]), cbor2.dumps([2, D, [[1, 2**64]]]),
    cbor2.dumps([2, D, [[1]]]), cbor2.dumps([2, D, [[1, 2]], 0]), cbor2.dumps({"v": 2}),
]


@pytest.mark.parametrize("payload", BAD_ACKS)
def test_ack_decoder_agrees_with_the_cddl(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode_ack(payload)
    with pytest.raises(pycddl.ValidationError):
        PLAIN_ACK.validate_cbor(payload)


def test_ack_decoder_refuses_what_the_cddl_cannot_see() -> None:
    good = wire.encode_ack(D, [1, 2])
    # A trailing byte, first after last, over MAX_ACK.
    for payload in (good + b"\x00", cbor2.dumps([2, D, [[2, 1]]]), cbor2.dumps([2, D, [[1, 1]] * 22000])):
        with pytest.raises(DecodeError):
            wire.decode_ack(payload)


def test_signed_ack_matches_the_cddl() -> None:
    """pycddl 0.6 cannot follow ``.cbor`` inside an array: the outer shape here, the
    protected header and the plain ack inside against their rules."""
    from agent.fleet.signing import Signer, generate_key_pair

    private, _public = generate_key_pair()
    ack = wire.encode_ack(D, [5, 6, 7, 9])
    tag = cbor2.loads(Signer(private, "ingest-1").sign(ack))
    assert tag.tag == 18 and len(tag.value) == 4 and tag.value[1] == {} and len(tag.value[3]) == 64
    pycddl.Schema("root = command-protected\n" + WIRE_CDDL).validate_cbor(tag.value[0])
    assert tag.value[2] == ack
    PLAIN_ACK.validate_cbor(tag.value[2])
