"""``wire_bytes_per_sample_signal``: what our wire format spends per sample of a signal,
against ThingsBoard-style JSON and Sparkplug-B-style protobuf carrying the same samples.

The simulator's 30-minute commute, recorded in process (devtools/ride.py), gives every
signal its vehicle sends; each is sampled at 10 Hz (its latest value every 100 ms).
Ours: those samples through the fusion kernel, its 1 s live windows of them (count,
min, max, mean, last per signal; the kernel's own derived signals left out) encoded as
the agent encodes them, in deflated batches of 200 records. JSON: one ThingsBoard
telemetry message a second, ``[{"ts": ms, "values": {name: value}}, ...]`` with the ten
samples of every signal. Protobuf: one Sparkplug B ``Payload`` a second, each sample a
``Metric`` with its alias, timestamp, datatype Double and value (the schema is built with
google.protobuf from the Sparkplug B field numbers; no protoc needed). Bytes per
sample-signal = payload bytes / (ticks x signals).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent import wire
from agent.fusion.kernel import Kernel
from agent.fusion.spec import OUT_WINDOW, WIN_LIVE
from agent.signals import BY_NAME, ID_SPACE
from devtools import ride

HZ = 10
BATCH_RECORDS = 200
DEVICE = "bike-0001"
_F = descriptor_pb2.FieldDescriptorProto


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


def samples(seconds: float = 1800.0) -> tuple[list[str], list[list[float]]]:
    """Signal names and, per 100 ms tick, every signal's latest value (from its first one on)."""
    rec = ride.record("commute", seconds, seed=1, kt=True, keep_values=True)
    names = sorted(rec.values)
    events = sorted((t, i, v) for i, n in enumerate(names) for t, v in rec.values[n])
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


def ours(names: list[str], ticks: list[list[float]]) -> int:
    ids = [BY_NAME[n].id for n in names]
    wanted = set(ids)
    k = Kernel(ID_SPACE, 1.0)
    bodies = []
    t0 = 1.8e9
    for n, values in enumerate(ticks):
        t = t0 + n / HZ
        for out in k.feed_values(ids, [t] * len(ids), values):
            if out[0] == OUT_WINDOW and out[1] == WIN_LIVE:
                bodies.append(wire.window_record(out[2], out[3], [r for r in out[4] if r[0] in wanted]))
    total = 0
    for first in range(0, len(bodies), BATCH_RECORDS):
        batch = [(first + i + 1, b) for i, b in enumerate(bodies[first:first + BATCH_RECORDS])]
        total += len(wire.encode_batch(DEVICE, batch, deflate=True))
    return total


def thingsboard_json(names: list[str], ticks: list[list[float]]) -> int:
    total = 0
    for first in range(0, len(ticks), HZ):
        msg = [{"ts": 1_800_000_000_000 + (first + j) * 100, "values": dict(zip(names, values, strict=True))}
               for j, values in enumerate(ticks[first:first + HZ])]
        total += len(json.dumps(msg, separators=(",", ":")))
    return total


def sparkplug_protobuf(names: list[str], ticks: list[list[float]]) -> int:
    payload_cls = _sparkplug_payload()
    total = 0
    for seq, first in enumerate(range(0, len(ticks), HZ)):
        p = payload_cls(timestamp=1_800_000_000_000 + first * 100, seq=seq % 256)
        for j, values in enumerate(ticks[first:first + HZ]):
            for alias, v in enumerate(values):
                p.metrics.add(alias=alias, timestamp=1_800_000_000_000 + (first + j) * 100, datatype=10,
                              double_value=v)
        total += len(p.SerializeToString())
    return total


def measure(seconds: float = 1800.0) -> dict[str, float]:
    names, ticks = samples(seconds)
    count = len(ticks) * len(names)
    figures = {"wire_bytes_per_sample_signal": ours(names, ticks) / count,
               "json_bytes_per_sample_signal": thingsboard_json(names, ticks) / count,
               "protobuf_bytes_per_sample_signal": sparkplug_protobuf(names, ticks) / count}
    ours_b = figures["wire_bytes_per_sample_signal"]
    figures["wire_smaller_than_json"] = figures["json_bytes_per_sample_signal"] / ours_b
    figures["wire_smaller_than_protobuf"] = figures["protobuf_bytes_per_sample_signal"] / ours_b
    figures["wire_signals"] = float(len(names))
    return figures


if __name__ == "__main__":
    for name, value in measure().items():
        print(f"{name}: {value:.3f}")
