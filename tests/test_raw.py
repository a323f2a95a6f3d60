"""The raw lane (README "Reporting", docs/wire.cddl raw-record): the codec on random and
adversarial series, its decoder on hostile records, the kernel's OUT_RAW in both builds
(ring overrun announced), the recorder's lane and its run-time switch, and the
configuration and ``set_reporting`` that turn it on.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import wire
from agent.cli.buffer import describe
from agent.commands.actions import VehicleActions
from agent.commands.catalogue import check_arguments
from agent.commands.envelope import Command
from agent.config import RAW_BLOCK_S, load
from agent.dbc.compile import compile_dbc, decimals_of, profile_path
from agent.errors import CommandRejected, ConfigError, DecodeError
from agent.fusion.kernel import KERNELS
from agent.fusion.spec import OUT_RAW, OUT_WINDOW, REPORT_CHANGE, REPORT_RAW, REPORT_WINDOW, S_FUSED_SPEED, WIN_LIVE
from agent.signals import ID_SPACE, raw_decimals, signal_id
from agent.store.outbox import LANE_HISTORY, LANE_RAW, LANES, Outbox
from agent.store.recorder import RawLane
from tests.conftest import assert_same_outputs

T0 = 1.7e9
SPEED = signal_id("Vehicle.Speed")
LAT = signal_id("Vehicle.CurrentLocation.Latitude")
CADENCE = signal_id("Vehicle.LEV.Pedal.Cadence")


def at_resolution(value: float, decimals: int) -> float:
    """What the lane promises back: the reading in whole steps of 10^-decimals, as the
    double nearest that many steps."""
    return float(round(value * 10**decimals) / 10**decimals)


def round_trip(samples: list[tuple[int, float, float]], decimals: dict[int, int], start: float = T0,
               end: float = T0 + 1.0, lost: int = 0) -> tuple[dict[str, Any], list[tuple[int, int, float]]]:
    body, skipped = wire.raw_record(start, end, samples, decimals, lost)
    assert skipped == 0
    rec = cbor2.loads(body)
    return rec, wire.raw_samples(rec)


def expected(samples: list[tuple[int, float, float]], decimals: dict[int, int]) -> list[tuple[int, int, float]]:
    """Series after series (by signal id), each in the order given."""
    return [(sid, round(t * 1000), at_resolution(v, decimals[sid]))
            for sid in sorted({s for s, _t, _v in samples}) for s, t, v in samples if s == sid]


def assert_bit_exact(got: list[tuple[int, int, float]], want: list[tuple[int, int, float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        # bit for bit, -0.0 and 0.0 apart
        assert g[:2] == w[:2] and g[2].hex() == w[2].hex(), (g, w)


# --- the codec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_random_series_come_back_bit_exact(seed: int) -> None:
    rng = random.Random(seed)
    samples = []
    decimals = {}
    for sid in rng.sample(range(1, 200), rng.randint(1, 12)):
        decimals[sid] = rng.randint(0, 9)
        t, v = T0 + rng.uniform(0, 5), rng.uniform(-1e3, 1e3)
        for _ in range(rng.randint(1, 400)):
            t += rng.choice((0.0, 0.001, 0.1, 0.1, 0.1, rng.uniform(0, 3)))
            v += rng.choice((0.0, 0.0, 0.0, rng.gauss(0, 1), rng.uniform(-1e3, 1e3)))
            samples.append((sid, t, v))
    rng.shuffle(samples)  # signals interleaved in any order
    rec, got = round_trip(samples, decimals, T0, T0 + 30)
    assert_bit_exact(got, expected(samples, decimals))
    assert rec["z"] in (wire.CODEC_DEFLATE, wire.CODEC_LZMA)


@pytest.mark.parametrize("name,values,times", [
    ("constant", [3.3] * 500, [T0 + i * 0.1 for i in range(500)]),
    ("single sample", [12.34], [T0 + 0.5]),
    ("step", [0.0] * 100 + [1e6] * 100, [T0 + i * 0.05 for i in range(200)]),
    ("wrap", [179.9999999, -179.9999999] * 50, [T0 + i * 0.2 for i in range(100)]),
    ("extremes of 2^53 steps", [-(2**52) / 1e7, 2**52 / 1e7, 0.0], [T0, T0 + 1, T0 + 2]),
    ("huge gaps", [1.0, 2.0, 3.0, 4.0], [T0, T0 + 86400 * 30, T0 + 86400 * 30 + 0.001, T0 + 86400 * 365]),
    ("time going back", [1.0, 2.0, 3.0, 4.0], [T0 + 5, T0 + 1, T0 + 1, T0 + 9]),
    ("same ms", [1.0, 2.0, 2.0, 1.0], [T0 + 0.0001, T0 + 0.0002, T0 + 0.0003, T0 + 0.0004]),
    ("negative zero and off-grid floats", [-0.0, 3.7560000000000002, -0.1 - 0.2, 1 / 3], [T0, T0 + 1, T0 + 2, T0 + 3]),
])
def test_adversarial_series_come_back_at_their_resolution(name: str, values: list[float], times: list[float]) -> None:
    samples = [(LAT, t, v) for t, v in zip(times, values, strict=True)]
    rec, got = round_trip(samples, {LAT: 7}, T0, T0 + 1)
    assert_bit_exact(got, expected(samples, {LAT: 7}))


def test_a_constant_series_costs_a_few_bytes_whatever_its_length() -> None:
    short = wire.raw_record(T0, T0 + 1, [(SPEED, T0 + i * 0.1, 20.0) for i in range(10)], {SPEED: 2})[0]
    long = wire.raw_record(T0, T0 + 1, [(SPEED, T0 + i * 0.1, 20.0) for i in range(100_000)], {SPEED: 2})[0]
    assert len(long) - len(short) < 16


def test_nan_infinite_and_too_fine_values_are_left_out_and_counted() -> None:
    samples = [(SPEED, T0, 1.0), (SPEED, T0 + 0.1, math.nan), (SPEED, T0 + 0.2, math.inf),
               (SPEED, T0 + 0.3, -math.inf), (SPEED, T0 + 0.4, 1e300), (SPEED, T0 + 0.5, 2.0)]
    body, skipped = wire.raw_record(T0, T0 + 1, samples, {SPEED: 2})
    rec = cbor2.loads(body)
    assert skipped == 4 and rec["skip"] == 4 and "lost" not in rec
    assert wire.raw_samples(rec) == [(SPEED, round(T0 * 1000), 1.0), (SPEED, round(T0 * 1000) + 500, 2.0)]


def test_the_ring_loss_is_carried() -> None:
    rec, _ = round_trip([(SPEED, T0, 1.0)], {SPEED: 2}, lost=77)
    assert rec["lost"] == 77


# --- the decoder on hostile records ------------------------------------------------------------------

def packed(series: Any, codec: str = wire.CODEC_DEFLATE, **extra: Any) -> dict[str, Any]:
    raw = cbor2.dumps(series)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return {"k": "raw", "t": 1000, "d": 1000, "z": codec, "b": z.compress(raw) + z.flush(), **extra}


@pytest.mark.parametrize("rec,why", [
    (packed([[1, -2, 1, 3, b"\x00\x02\x00", b"\x00\x04"]]), "runs past"),  # 3 zeros for 2 changes
    (packed([[1, -2, 1, 1, b"\x00\x00", b"\x00"]]), "trailing"),           # one time too many
    (packed([[1, -2, 1, 1, b"\x80", b"\x00"]]), "inside a varint"),
    (packed([[1, -2, 1, 1, b"\xff" * 11, b"\x00"]]), "over 64 bits"),
    (packed([[1, -2, 1, 3, b"\x00\x02\x00", b"\x00"]]), "ends inside a varint"),  # the changes missing
    (packed([[1, -2, 1, 2**30, b"\x00\x02\xfe\xff\xff\xff\x07", b"\x00\xfe\xff\xff\xff\x07"]]), "more than"),
    (packed([[1, -10, 1, 1, b"\x00", b"\x00"]]), "e (-9..9)"),
    (packed([[1, -2, 0, 1, b"\x00", b"\x00"]]), "g >= 1"),
    (packed([[1, -2, 1, 0, b"", b""]]), "n >= 1"),
    (packed([[1, -2, 1, 1, b"\x01", b"\x00"]], t=0), "before the epoch"),  # 1 ms before t = 0
    (packed([[1, -2, 1, 3, b"\x02\x03\x0f", b"\x00\x02"]], t=0), "before the epoch"),  # 1, -1, then 1 ms
    (packed({"not": "a list"}), "must be an array"),
    (packed([[1, -2, 1, 1, b"\x00", b"\x00"]], codec="zstd"), "compression"),
    (dict(packed([]), b=b"\xff\xff\xff"), "decompress"),
    (dict(packed([]), b=zlib.compress(b"\x80")[2:-4] + b"junk"), "trailing"),
    (dict(packed([]), b="text"), "byte string"),
    (packed([], lost=-1), "unsigned"),
    (packed([], t=-5), "unsigned"),
])
def test_hostile_records_are_refused(rec: dict[str, Any], why: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(why)):
        wire.raw_samples(rec)


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = z.compress(b"\x00" * (wire.MAX_RAW_COLUMNS + 1)) + z.flush()
    with pytest.raises(DecodeError, match="exceed"):
        wire.raw_columns({"k": "raw", "t": 0, "d": 0, "z": "deflate", "b": bomb})


def test_a_batch_with_a_bad_raw_record_is_a_decode_error() -> None:
    body = cbor2.dumps(packed([[1, -2, 1, 3, b"\x00\x02", b"\x00"]]))
    payload = wire._head(4, 3) + cbor2.dumps(1) + cbor2.dumps("d") + wire._head(4, 1) + wire._head(4, 2) \
        + cbor2.dumps(1) + body
    with pytest.raises(DecodeError):
        wire.decode_batch(payload)


# --- the kernel --------------------------------------------------------------------------------------

def raw_outputs(outs: list[Any]) -> list[Any]:
    return [o for o in outs if o[0] == OUT_RAW]


def feed_random(k: Any, rng: random.Random, seconds: float, ids: list[int]) -> list[Any]:
    outs: list[Any] = []
    t = T0
    while t < T0 + seconds:
        n = rng.randint(1, 20)
        chunk = [rng.choice(ids) for _ in range(n)]
        times = [t + rng.uniform(0, 0.02) for _ in range(n)]
        outs += k.feed_values(chunk, times, [rng.uniform(0, 100) for _ in range(n)])
        t += rng.uniform(0.001, 0.05)
    outs += k.flush()
    return outs


def test_both_builds_hand_the_same_raw_samples() -> None:
    if "c" not in KERNELS:
        pytest.skip("the compiled kernel was not built")
    ids = [SPEED, CADENCE, LAT, signal_id("Vehicle.LEV.Controller.MotorCurrent")]
    results = []
    for build in ("c", "py"):
        rng = random.Random(5)
        k = KERNELS[build](ID_SPACE, 0.5, ring=64)  # small: the ring goes round, the loss is announced
        k.set_policy(SPEED, REPORT_RAW, 0.0)
        k.set_policy(CADENCE, REPORT_WINDOW | REPORT_RAW, 0.0)
        k.set_policy(S_FUSED_SPEED, REPORT_RAW | REPORT_CHANGE, 0.5)
        k.source = 1
        k.set_source_raw(1, True)
        outs = feed_random(k, rng, 10.0, ids)
        k.set_policy(CADENCE, REPORT_WINDOW, 0.0)
        k.set_source_raw(1, False)
        outs += feed_random(k, rng, 5.0, ids)
        results.append(outs)
    assert raw_outputs(results[0]), "no raw output"
    assert any(o[3] > 0 for o in raw_outputs(results[0])), "the small ring never overran"
    assert_same_outputs(results[0], results[1])


def test_every_raw_sample_once_in_order_and_windows_as_before(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.set_policy(SPEED, REPORT_RAW, 0.0)
    k.set_policy(CADENCE, REPORT_WINDOW | REPORT_RAW, 0.0)
    rng = random.Random(1)
    fed: dict[int, list[tuple[float, float]]] = {SPEED: [], CADENCE: [], LAT: []}
    outs: list[Any] = []
    for n in range(3000):
        t = T0 + n * 0.01
        sid = rng.choice(list(fed))
        v = float(rng.randint(0, 30))
        fed[sid].append((t, v))
        outs += k.feed_values([sid], [t], [v])
    outs += k.flush()
    raws = raw_outputs(outs)
    got: dict[int, list[tuple[float, float]]] = {SPEED: [], CADENCE: [], LAT: []}
    for _, start, length, lost, ids, times, values in raws:
        assert lost == 0 and length == 1.0
        for sid, t, v in zip(ids, times, values, strict=True):
            assert start <= t < start + length
            got[sid].append((t, v))
    assert got[SPEED] == fed[SPEED] and got[CADENCE] == fed[CADENCE] and got[LAT] == []
    live = [o for o in outs if o[0] == OUT_WINDOW and o[1] == WIN_LIVE]
    in_rows = {row[0] for o in live for row in o[4]}
    assert CADENCE in in_rows and LAT in in_rows and SPEED not in in_rows, "raw alone sends no window row"


def test_a_ring_overrun_is_announced_with_its_count(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0, ring=16)
    k.set_policy(SPEED, REPORT_RAW, 0.0)
    outs = k.feed_values([SPEED] * 40, [T0 + i * 0.001 for i in range(40)], [float(i) for i in range(40)])
    outs += k.flush()
    (raw,) = raw_outputs(outs)
    assert raw[3] == 24 and raw[5] == [T0 + i * 0.001 for i in range(24, 40)]


def test_the_first_raw_signal_starts_at_the_rings_head_not_in_its_past(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.feed_values([SPEED] * 5, [T0 + i * 0.01 for i in range(5)], [1.0] * 5)
    k.set_policy(SPEED, REPORT_RAW, 0.0)
    outs = k.feed_values([SPEED], [T0 + 0.5], [2.0]) + k.flush()
    assert [o[4:] for o in raw_outputs(outs)] == [([SPEED], [T0 + 0.5], [2.0])]


def test_policy_bits_out_of_range_are_refused(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    with pytest.raises(ValueError):
        k.set_policy(SPEED, 8, 0.0)
    with pytest.raises(ValueError):
        k.set_source_raw(16, True)


# --- the recorder's lane -----------------------------------------------------------------------------

def test_the_lane_makes_a_record_per_block_and_can_be_switched_off() -> None:
    lane = RawLane(2.0, {}, 1 << 20)
    records = []
    for w in range(5):
        records += lane.add(T0 + w, 1.0, 0, [SPEED, SPEED], [T0 + w, T0 + w + 0.5], [float(w), w + 0.25])
    assert len(records) == 2 and all(r[0] == LANE_RAW for r in records)
    lane.enabled = False
    assert lane.add(T0 + 5, 1.0, 3, [SPEED], [T0 + 5], [1.0]) == []
    records += lane.flush()
    samples = [s for _lane, _t, body in records for s in wire.raw_samples(cbor2.loads(body))]
    assert [s[2] for s in samples] == [0.0, 0.25, 1.0, 1.25, 2.0, 2.25, 3.0, 3.25, 4.0, 4.25]
    assert lane.recorded == 10 and lane.off_dropped == 1 and lane.lost_total == 3
    assert raw_decimals(SPEED) == 2 and raw_decimals(S_FUSED_SPEED) == 2 and raw_decimals(SPEED, {SPEED: 1}) == 1


def test_the_raw_lane_is_sent_last_and_dropped_first(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path / "outbox.sqlite"), 256 * 1024)
    try:
        raw = box.append([(LANE_RAW, T0 + i, b"r" * 1000) for i in range(20)])
        history = box.append([(LANE_HISTORY, T0 + i, b"h" * 1000) for i in range(20)])
        assert box.stats()["dropped"] == 0
        assert [s for s, _ in box.lease(1 << 30, 1 << 30)] == history + raw, "raw last"
        box.release_all()
        box.append([(LANE_HISTORY, T0 + 100 + i, b"h" * 1000) for i in range(200)])
        kept = {s for s, _ in box.lease(1 << 30, 1 << 30)}
        assert not kept & set(raw) and set(history) <= kept, "raw dropped before any history"
        assert box.stats()["depth"]["raw"] == 0 and "raw" in LANES
    finally:
        box.close()


# --- configuration and set_reporting -------------------------------------------------------------------

SOURCES = """
[[sources]]
name = "can0"
kind = "slcan"
port = "/dev/ttyCAN"
protocol = "bafang-can"
"""


def config_file(tmp_path: Path, reporting: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "bike-1"\n{SOURCES}\n[reporting]\n{reporting}\n')
    return path


def test_raw_reporting_is_read(tmp_path: Path) -> None:
    cfg = load(str(config_file(tmp_path, '"Vehicle.Speed" = {mode = "raw"}\n'
                                         '"Vehicle.LEV.Pedal.Cadence" = {mode = "change", deadband = 2, raw = true}\n'
                                         'raw_sources = ["can0"]\nraw_block_s = 30\n')))
    assert set(cfg.reporting) == {(SPEED, REPORT_RAW, 0.0), (CADENCE, REPORT_CHANGE | REPORT_RAW, 2.0)}
    assert cfg.raw_sources == (0,) and cfg.raw_block_s == 30.0
    assert load(str(config_file(tmp_path, ""))).raw_block_s == RAW_BLOCK_S


@pytest.mark.parametrize("reporting,key,reason", [
    ('"Vehicle.Speed" = {mode = "rawest"}', "reporting.Vehicle.Speed.mode", "must be one of"),
    ('"Vehicle.Speed" = {mode = "window", raw = 1}', "reporting.Vehicle.Speed.raw", "must be bool"),
    ('raw_sources = ["gnss"]', "reporting.raw_sources", "no source named 'gnss'"),
    ('raw_sources = "can0"', "reporting.raw_sources", "list of source names"),
    ("raw_block_s = 0.5", "reporting.raw_block_s", "from 1 to 3600"),
    ('raw_block_s = "long"', "reporting.raw_block_s", "from 1 to 3600"),
])
def test_bad_raw_reporting_names_file_key_and_reason(tmp_path: Path, reporting: str, key: str, reason: str) -> None:
    path = config_file(tmp_path, reporting)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (info.value.path, info.value.key) == (str(path), key) and reason in info.value.reason


def test_set_reporting_takes_raw() -> None:
    args = {"signals": {"Vehicle.Speed": {"mode": "raw"}, "Vehicle.LEV.Pedal.Cadence": {"mode": "both", "raw": True}},
            "raw_sources": ["can0"]}
    assert check_arguments("set_reporting", args) == {
        "signals": {"Vehicle.Speed": {"mode": "raw", "deadband": 0.0},
                    "Vehicle.LEV.Pedal.Cadence": {"mode": "both", "deadband": 0.0, "raw": True}},
        "raw_sources": ["can0"]}
    assert check_arguments("set_reporting", {"raw_sources": []}) == {"raw_sources": []}


@pytest.mark.parametrize("args,why", [
    ({}, "needs signals, raw_sources or both"),
    ({"signals": {"Vehicle.Speed": {"mode": "raw", "raw": "yes"}}}, "raw must be true or false"),
    ({"raw_sources": "can0"}, "list of at most"),
    ({"raw_sources": [""]}, "list of at most"),
    ({"raw_sources": ["can0"], "extra": 1}, "extra"),
])
def test_set_reporting_refuses_bad_raw_arguments(args: dict[str, Any], why: str) -> None:
    with pytest.raises(CommandRejected, match=why) as info:
        check_arguments("set_reporting", args)
    assert info.value.reason == "bad_arguments"


def test_set_reporting_keeps_raw_in_the_file_and_applies_it(tmp_path: Path, kernel_cls: Any) -> None:
    path = config_file(tmp_path, "")
    cfg = load(str(path))
    kernel = kernel_cls(ID_SPACE, 1.0)
    actions = VehicleActions(cfg, [], kernel, status=dict, record=lambda outs, now: None, recent_alarms=[],
                             restart=lambda: None)
    args = check_arguments("set_reporting", {"signals": {"Vehicle.Speed": {"mode": "raw"}}, "raw_sources": ["can0"]})
    outcome = actions.act(Command("c1", "bike-1", "set_reporting", args, 0, 2**31, "k"), T0)
    assert outcome is not None and outcome.status == "executed", outcome
    kept = load(str(path))
    assert kept.reporting == ((SPEED, REPORT_RAW, 0.0),) and kept.raw_sources == (0,)
    kernel.source = 0
    outs = kernel.feed_values([SPEED, CADENCE], [T0, T0], [10.0, 60.0]) + kernel.flush()
    assert [o[4:] for o in raw_outputs(outs)] == [([SPEED, CADENCE], [T0, T0], [10.0, 60.0])]
    assert all(row[0] != SPEED for o in outs if o[0] == OUT_WINDOW and o[1] == WIN_LIVE for row in o[4])


def test_buffer_export_says_what_a_raw_record_holds() -> None:
    body, _ = wire.raw_record(T0, T0 + 2, [(SPEED, T0, 1.0), (SPEED, T0 + 1, 2.0), (CADENCE, T0, 60.0)],
                              {SPEED: 2, CADENCE: 0}, lost=5)
    kind, detail = describe(cbor2.loads(body))
    assert kind == "raw" and "+2 s" in detail and "5 overwritten unread" in detail
    assert detail.endswith("Vehicle.Speed n=2; Vehicle.LEV.Pedal.Cadence n=1")


def test_a_block_whose_samples_stop_coming_goes_out_by_the_clock() -> None:
    lane = RawLane(60.0, {}, 1 << 20)
    assert lane.add(T0, 1.0, 0, [SPEED], [T0 + 0.5], [3.0]) == []
    assert lane.due(T0 + 59.0) == []
    (record,) = lane.due(T0 + 60.0)
    assert wire.raw_samples(cbor2.loads(record[2])) == [(SPEED, round(T0 * 1000) + 500, 3.0)]
    assert lane.due(T0 + 1000.0) == [] and lane.flush() == []


def test_a_record_too_large_for_a_batch_is_split_and_nothing_is_lost() -> None:
    rng = random.Random(3)
    lane = RawLane(10.0, {}, 4000)
    ids = [SPEED, LAT] * 2000
    times = [T0 + i * 0.0005 for i in range(4000)]
    values = [rng.uniform(0, 90) for _ in range(4000)]
    records = lane.add(T0, 1.0, 9, ids, times, values) + lane.flush()
    assert len(records) > 2 and all(len(body) <= 4000 for _lane, _t, body in records)
    decoded = [cbor2.loads(body) for _lane, _t, body in records]
    assert [rec.get("lost", 0) for rec in decoded] == [9] + [0] * (len(records) - 1)
    got = sorted(s for rec in decoded for s in wire.raw_samples(rec))
    assert got == sorted((sid, round(t * 1000), at_resolution(v, raw_decimals(sid)))
                         for sid, t, v in zip(ids, times, values, strict=True))


@pytest.mark.parametrize("factor,offset,decimals", [
    (1.0, 0.0, 0), (0.1, -40.0, 1), (0.5, 0.0, 1), (0.01, 0.0, 2), (0.0625, 0.0, 4), (0.001, 0.5, 3),
    (1 / 3, 0.0, 9), (1.0, 0.25, 2),
])
def test_a_dbc_signal_is_sent_at_its_factor_and_offset(factor: float, offset: float, decimals: int) -> None:
    assert decimals_of(factor, offset) == decimals


def test_the_bafang_dbc_gives_its_signals_resolutions() -> None:
    can = compile_dbc(profile_path("bafang")).decimals()
    assert raw_decimals(SPEED, can) == 2 and SPEED in can
