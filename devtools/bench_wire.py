"""The wire format's size, like for like: the same information on both sides of each
ratio (docs: README "Wire format size"; /work/shared/WIRE-AUDIT.md found the old ratios
divided every-sample formats by our 1 s aggregates).

The simulator's 30-minute commute, recorded in process (devtools/ride.py), gives every
signal its vehicle sends; each is sampled at 10 Hz (its latest value every 100 ms), and
these ticks go through the fusion kernel with every one of those signals reported both
in windows and raw (the kernel's own derived signals left out). Two lanes come out:

* Aggregates: the 1 s live windows (count, min, max, mean, last per signal), encoded as
  the agent encodes them, in deflated batches of 200 records. Against the same
  aggregates as ThingsBoard JSON (one telemetry message a second, flat keys
  ``<name>.count`` ... ``<name>.last``) and as Sparkplug B 3.0 (one DATA payload a
  second, five metrics per signal with alias and timestamp), each as those formats are
  sent (uncompressed, 1 s messages), and deflated in the same 200 s batches as ours.
  Counted per signal-window (one signal's aggregates for one second).
* Every sample (the raw lane): the kernel's OUT_RAW through the recorder's raw lane
  (records of ``raw_block_s`` = 200 s, each signal at its resolution: the Bafang DBC's for
  CAN signals, its unit's for the others), each record in a deflated batch as the pump
  sends it. Against ThingsBoard JSON with every sample (``[{"ts": ms, "values": {name:
  value}}]``, one message a second) and Sparkplug B 3.0 with every sample (a metric
  each: alias, timestamp, double), as sent and deflated per 200 s. Counted per
  sample-signal (ticks x signals), per native sample (every value the simulator encoded,
  at its own time, through the same lane) and per ride second.

Payload bytes only; MQTT framing is left out on all sides.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent import wire
from agent.config import BrokerConfig
from agent.dbc.compile import compile_dbc, profile_path
from agent.fusion.kernel import Kernel
from agent.fusion.spec import OUT_RAW, OUT_WINDOW, REPORT_RAW, REPORT_WINDOW, WIN_LIVE
from agent.signals import BY_NAME, ID_SPACE
from agent.store.recorder import RawLane
from devtools import ride

HZ = 10
BATCH_RECORDS = 200
RAW_BLOCK_S = 200.0
DEVICE = "bike-0001"
T0 = 1.8e9
_F = descriptor_pb2.FieldDescriptorProto
AGGREGATES = ("count", "min", "max", "mean", "last")


def _sparkplug_payload() -> Any:
    """The Sparkplug B Payload/Metric messages (the fields used here, their numbers)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="bench_sparkplug_b.proto", package="bench", syntax="proto2")
    metric = fdp.message_type.add(name="Metric")
    for name, number, kind in (("name", 1, _F.TYPE_STRING), ("alias", 2, _F.TYPE_UINT64),
                               ("timestamp", 3, _F.TYPE_UINT64), ("datatype", 4, _F.TYPE_UINT32),
                               ("double_value", 13, _F.TYPE_DOUBLE)):
        metric.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    payload = fdp.message_type.add(name="Payload")
    payload.field.add(name="timestamp", number=1, type=_F.TYPE_UINT64, label=_F.LABEL_OPTIONAL)
    payload.field.add(name="metrics", number=2, type=_F.TYPE_MESSAGE, type_name=".bench.Metric",
                      label=_F.LABEL_REPEATED)
    payload.field.add(name="seq", number=3, type=_F.TYPE_UINT64, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Payload"))


def _deflated(data: bytes) -> int:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return len(z.compress(data) + z.flush())


def _sizes(messages: list[bytes], per_batch: int) -> tuple[int, int]:
    """Bytes of ``messages`` as sent one by one, and deflated ``per_batch`` at a time."""
    return (sum(len(m) for m in messages),
            sum(_deflated(b"".join(messages[i:i + per_batch])) for i in range(0, len(messages), per_batch)))


def ride_values(seconds: float = 1800.0) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """Signal names and every value the simulator encoded for each, with its time."""
    rec = ride.record("commute", seconds, seed=1, kt=True, keep_values=True)
    return sorted(rec.values), rec.values


def samples(seconds: float = 1800.0, native: dict[str, list[tuple[float, float]]] | None = None
            ) -> tuple[list[str], list[list[float]]]:
    """Signal names and, per 100 ms tick, every signal's latest value (from its first one on)."""
    names, values = ride_values(seconds) if native is None else (sorted(native), native)
    events = sorted((t, i, v) for i, n in enumerate(names) for t, v in values[n])
    ticks: list[list[float]] = []
    latest = [events[0][2]] * len(names)
    seen = [False] * len(names)
    pos = 0
    for n in range(int(seconds * HZ)):
        t = n / HZ
        while pos < len(events) and events[pos][0] <= t:
            _, i, v = events[pos]
            latest[i], seen[i] = float(v), True
            pos += 1
        if all(seen):
            ticks.append(list(latest))
    return names, ticks


def _kernel(ids: list[int]) -> Any:
    k = Kernel(ID_SPACE, 1.0)
    for sid in ids:
        k.set_policy(sid, REPORT_WINDOW | REPORT_RAW, 0.0)
    return k


def _raw_bytes(lane: RawLane, outputs: Iterable[tuple[Any, ...]]) -> int:
    """Payload bytes of the raw records the lane makes of ``outputs``, a deflated batch each."""
    bodies = [body for out in outputs if out[0] == OUT_RAW for _lane, _t, body in lane.add(*out[1:])]
    bodies += [body for _lane, _t, body in lane.flush()]
    return sum(len(wire.encode_batch(DEVICE, [(i + 1, body)], deflate=True)) for i, body in enumerate(bodies))


def _lane() -> RawLane:
    return RawLane(RAW_BLOCK_S, compile_dbc(profile_path("bafang")).decimals(), BrokerConfig().max_batch_bytes // 2)


def through_kernel(names: list[str], ticks: list[list[float]]) -> tuple[list[tuple[float, list[Any]]], int]:
    """The live windows (start, rows of the bench's signals) and the raw lane's bytes."""
    ids = [BY_NAME[n].id for n in names]
    wanted = set(ids)
    k = _kernel(ids)
    windows: list[tuple[float, list[Any]]] = []
    raws: list[tuple[Any, ...]] = []
    for n, values in enumerate(ticks):
        for out in k.feed_values(ids, [T0 + n / HZ] * len(ids), values):
            if out[0] == OUT_WINDOW and out[1] == WIN_LIVE:
                windows.append((out[2], [r for r in out[4] if r[0] in wanted]))
            elif out[0] == OUT_RAW:
                raws.append(out)
    return windows, _raw_bytes(_lane(), raws)


def native_raw_bytes(names: list[str], values: dict[str, list[tuple[float, float]]]) -> tuple[int, int]:
    """The raw lane's bytes for every value the simulator encoded, at its own time; and
    how many samples that is."""
    ids = {n: BY_NAME[n].id for n in names}
    events = sorted((t, ids[n], v) for n in names for t, v in values[n])
    k = _kernel(list(ids.values()))
    outputs: list[tuple[Any, ...]] = []
    for first in range(0, len(events), 64):
        chunk = events[first:first + 64]
        outputs += k.feed_values([e[1] for e in chunk], [T0 + e[0] for e in chunk], [e[2] for e in chunk])
    outputs += k.flush()
    return _raw_bytes(_lane(), outputs), len(events)


def ours(windows: list[tuple[float, list[Any]]]) -> int:
    bodies = [wire.window_record(start, 1.0, rows) for start, rows in windows]
    total = 0
    for first in range(0, len(bodies), BATCH_RECORDS):
        batch = [(first + i + 1, b) for i, b in enumerate(bodies[first:first + BATCH_RECORDS])]
        total += len(wire.encode_batch(DEVICE, batch, deflate=True))
    return total


def thingsboard_aggregates(names: dict[int, str], windows: list[tuple[float, list[Any]]]) -> list[bytes]:
    """One ThingsBoard telemetry message per window: ``<name>.count`` ... ``.last`` keys."""
    return [json.dumps([{"ts": round(start * 1000), "values": {
        f"{names[row[0]]}.{key}": value for row in rows for key, value in zip(AGGREGATES, row[1:6], strict=True)}}],
        separators=(",", ":")).encode() for start, rows in windows]


def sparkplug_aggregates(windows: list[tuple[float, list[Any]]]) -> list[bytes]:
    """One Sparkplug B 3.0 DATA payload per window, five metrics per signal (alias,
    timestamp, value; DATA metrics carry no datatype)."""
    payload_cls = _sparkplug_payload()
    out = []
    for seq, (start, rows) in enumerate(windows):
        ms = round(start * 1000)
        p = payload_cls(timestamp=ms, seq=seq % 256)
        for row in rows:
            for j, value in enumerate(row[1:6]):
                p.metrics.add(alias=row[0] * len(AGGREGATES) + j, timestamp=ms, double_value=float(value))
        out.append(p.SerializeToString())
    return out


def thingsboard_json(names: list[str], ticks: list[list[float]]) -> list[bytes]:
    """One ThingsBoard telemetry message a second with every sample of every signal."""
    return [json.dumps([{"ts": 1_800_000_000_000 + (first + j) * 100, "values": dict(zip(names, values, strict=True))}
                        for j, values in enumerate(ticks[first:first + HZ])], separators=(",", ":")).encode()
            for first in range(0, len(ticks), HZ)]


def sparkplug_protobuf(ticks: list[list[float]]) -> list[bytes]:
    """One Sparkplug B 3.0 DATA payload a second, a metric per sample (alias, timestamp,
    double)."""
    payload_cls = _sparkplug_payload()
    out = []
    for seq, first in enumerate(range(0, len(ticks), HZ)):
        p = payload_cls(timestamp=1_800_000_000_000 + first * 100, seq=seq % 256)
        for j, values in enumerate(ticks[first:first + HZ]):
            for alias, v in enumerate(values):
                p.metrics.add(alias=alias, timestamp=1_800_000_000_000 + (first + j) * 100, double_value=v)
        out.append(p.SerializeToString())
    return out


def measure(seconds: float = 1800.0) -> dict[str, float]:
    names, native = ride_values(seconds)
    _, ticks = samples(seconds, native)
    sample_signals = len(ticks) * len(names)
    windows, raw_total = through_kernel(names, ticks)
    rows = sum(len(r) for _start, r in windows)
    agg = ours(windows)
    per_batch = int(RAW_BLOCK_S)  # 1 s messages: 200 s batches
    tb_agg, tb_agg_z = _sizes(thingsboard_aggregates({BY_NAME[n].id: n for n in names}, windows), per_batch)
    sp_agg, sp_agg_z = _sizes(sparkplug_aggregates(windows), per_batch)
    tb, tb_z = _sizes(thingsboard_json(names, ticks), per_batch)
    sp, sp_z = _sizes(sparkplug_protobuf(ticks), per_batch)
    native_total, native_count = native_raw_bytes(names, native)
    return {
        "wire_signals": float(len(names)),
        "wire_seconds": seconds,
        # Aggregates, per signal-window.
        "wire_aggregates_bytes_per_signal_window": agg / rows,
        "json_aggregates_bytes_per_signal_window": tb_agg / rows,
        "protobuf_aggregates_bytes_per_signal_window": sp_agg / rows,
        "aggregates_smaller_than_json": tb_agg / agg,
        "aggregates_smaller_than_protobuf": sp_agg / agg,
        "aggregates_smaller_than_json_deflated": tb_agg_z / agg,
        "aggregates_smaller_than_protobuf_deflated": sp_agg_z / agg,
        # Every sample, per sample-signal.
        "wire_full_rate_bytes_per_sample_signal": raw_total / sample_signals,
        "json_bytes_per_sample_signal": tb / sample_signals,
        "protobuf_bytes_per_sample_signal": sp / sample_signals,
        "full_rate_smaller_than_json": tb / raw_total,
        "full_rate_smaller_than_protobuf": sp / raw_total,
        "full_rate_smaller_than_json_deflated": tb_z / raw_total,
        "full_rate_smaller_than_protobuf_deflated": sp_z / raw_total,
        "wire_full_rate_bytes_per_native_sample": native_total / native_count,
        "wire_full_rate_bytes_per_s": raw_total / seconds,
        "wire_aggregates_bytes_per_s": agg / seconds,
    }


def summary(fig: dict[str, float]) -> dict[str, float]:
    """The keys bench-results.json's summary carries."""
    return {key: fig[key] for key in (
        "wire_full_rate_bytes_per_sample_signal", "full_rate_smaller_than_json", "full_rate_smaller_than_protobuf",
        "wire_aggregates_bytes_per_signal_window", "aggregates_smaller_than_json", "aggregates_smaller_than_protobuf",
        "aggregates_smaller_than_json_deflated", "aggregates_smaller_than_protobuf_deflated")}


def report(fig: dict[str, float]) -> str:
    """What ``make bench`` prints: each figure with what it compares."""
    return (
        f"wire, every sample ({fig['wire_signals']:.0f} signals of the {fig['wire_seconds'] / 60:g}-min commute at "
        f"10 Hz, raw lane, "
        f"{RAW_BLOCK_S:g} s records):\n"
        f"  wire_full_rate_bytes_per_sample_signal: {fig['wire_full_rate_bytes_per_sample_signal']:.3f} "
        f"(goal <= 0.15; {fig['wire_full_rate_bytes_per_native_sample']:.3f} per native sample, "
        f"{fig['wire_full_rate_bytes_per_s']:.0f} B per ride second)\n"
        f"  the same samples as ThingsBoard JSON {fig['json_bytes_per_sample_signal']:.1f} B = "
        f"{fig['full_rate_smaller_than_json']:.0f}x, as Sparkplug B {fig['protobuf_bytes_per_sample_signal']:.1f} B "
        f"= {fig['full_rate_smaller_than_protobuf']:.0f}x (goal >= 30x both; 1 s messages as sent); deflated in "
        f"the same 200 s batches {fig['full_rate_smaller_than_json_deflated']:.1f}x and "
        f"{fig['full_rate_smaller_than_protobuf_deflated']:.1f}x\n"
        f"wire, 1 s aggregates (count, min, max, mean, last; deflated batches of {BATCH_RECORDS}):\n"
        f"  wire_aggregates_bytes_per_signal_window: {fig['wire_aggregates_bytes_per_signal_window']:.2f} "
        f"({fig['wire_aggregates_bytes_per_s']:.0f} B per ride second)\n"
        f"  the same aggregates as ThingsBoard JSON {fig['json_aggregates_bytes_per_signal_window']:.1f} B = "
        f"{fig['aggregates_smaller_than_json']:.0f}x, as Sparkplug B "
        f"{fig['protobuf_aggregates_bytes_per_signal_window']:.1f} B = {fig['aggregates_smaller_than_protobuf']:.0f}x "
        f"(1 s messages as sent); deflated in the same 200 s batches "
        f"{fig['aggregates_smaller_than_json_deflated']:.1f}x and "
        f"{fig['aggregates_smaller_than_protobuf_deflated']:.1f}x")


if __name__ == "__main__":
    print(report(measure()))
