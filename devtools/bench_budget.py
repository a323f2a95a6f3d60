"""``make bench``'s data-budget figure: MB a month of a typical day, 2 h riding and 22 h
parked, with the default configuration.

The agent's own output, in accelerated time: rides the simulator records in process
(devtools/ride.py; ``commute`` for riding, ``park`` for parked: the vehicle standing
locked with its unit powered, the controller, the BMS and the GNSS receiver still
talking, as bench_writes.py measures it) go through the kernel the default configuration
builds, the recorder, a real SQLite outbox and the wire's batch encoder (deflated, as by
default). The recorder commits every ``commit_interval`` riding and every
PARKED_COMMIT_S parked, its live windows merged PARKED_LIVE_MERGE times more (as the agent
does once the vehicle is still), and each commit's records are sent at once in batches
of at most ``max_batch_records``, as the send stage leases them. What the link carries
is counted by the agent's data budget (agent/uplink/budget.py): each batch's payload
plus its estimate of the MQTT, TLS and TCP/IP overhead, the consumer's ack (ack =
"cloud" by default) and the keepalive pings of an idle link ([broker] keepalive 30 s:
they are most of a parked hour's bytes). The same is measured at each level of the
budget's degradation, to show what each saves. A month is 365.25 / 12 days.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from agent import config, wire
from agent.feed import make_kernel, one_dbc
from agent.store.memory import Storage
from agent.store.recorder import PARKED_COMMIT_S, Recorder, live_merge
from agent.uplink.budget import LEVELS, Budget
from devtools import ride

RIDING_H = 2.0
PARKED_H = 22.0
DAYS_PER_MONTH = 365.25 / 12
DEVICE = "bench-bike"


def _config(tmp: Path) -> config.Config:
    """The default configuration, with the sources the recorded rides come from (in
    devtools/ride.py's source order)."""
    return config.parse(str(tmp / "agent.toml"), {
        "device_id": DEVICE,
        "sources": [{"name": "can0", "kind": "slcan", "port": "/dev/null", "protocol": "bafang-can"},
                    {"name": "gnss", "kind": "uart", "port": "/dev/null", "protocol": "nmea"},
                    {"name": "bms", "kind": "uart", "port": "/dev/null", "protocol": "jbd", "poll_interval": 0.5}],
    })


def link_bytes(rec: ride.Recorder, parked: bool, level: int, tmp: Path) -> tuple[float, float, float]:
    """(link bytes, payload bytes, sim seconds) of one recorded ride through the agent's
    record and send stages at ``level``."""
    cfg = _config(tmp)
    kernel = make_kernel(cfg, one_dbc(cfg))
    kernel.set_can_source(0)
    slots = [-1] + [kernel.health_slot(i) for i in range(1, len(ride.SOURCES))]
    outbox = Storage(str(tmp / f"outbox-{level}-{parked}.sqlite"), int(cfg.outbox.quota_mb * 1024 * 1024))
    recorder = Recorder(cfg, kernel, outbox)
    topic = cfg.topic_prefix + "telemetry"
    budget = Budget(0.0, cfg.broker.keepalive, cfg.broker.ack == "cloud", len(cfg.topic_prefix + "ack"))
    # Parked, as the agent does once the vehicle is still: live windows merged
    # PARKED_LIVE_MERGE times more, a commit every PARKED_COMMIT_S (the recorder decides that
    # on the real clock, which an accelerated replay does not move).
    history, live = LEVELS[level][:2]
    recorder.coarsen(history, live_merge(live, parked))
    interval = PARKED_COMMIT_S if parked else cfg.outbox.commit_interval
    committed = 0.0
    tail = b""
    t = 0.0

    def send(now: float) -> None:
        recorder.commit(force=True)
        while batch := outbox.lease(cfg.broker.max_batch_records,
                                    cfg.broker.max_batch_bytes - wire.batch_overhead(DEVICE),
                                    overhead=wire.RECORD_OVERHEAD):
            payload = wire.encode_batch(DEVICE, batch, cfg.broker.deflate)
            budget.published(len(topic), len(payload), now, sum(len(b) for _, b in batch))
            outbox.ack([seq for seq, _ in batch])

    for call in rec.calls:
        t = call[1] if call[0] != "uart" else call[2]
        if call[0] == "can":
            buf = tail + call[2]
            consumed, out = kernel.feed_slcan(buf, t)
            tail = buf[consumed:]
        elif call[0] == "uart":
            _, src, _, frames, ids, values = call
            kernel.note_frames(slots[src], [t] * frames)
            out = kernel.feed_values(ids, [t] * len(ids), values)
        else:
            out = kernel.close_due(t)
            if recorder.urgent or t - committed >= interval:
                send(t)
                committed = t
            budget.idle(t, True)
        recorder.add(out, t)
    outbox.close()
    return budget.used, budget.payload, t


def measure(riding_s: float = 600.0, parked_s: float = 600.0) -> dict[str, Any]:
    """MB a month of the typical day at each level (level 0: full resolution, the figure)."""
    riding = ride.record("commute", riding_s, seed=1)
    parked = ride.record("park", parked_s, seed=1)
    out: dict[str, Any] = {"day": f"{RIDING_H:g} h riding + {PARKED_H:g} h parked", "levels": []}
    with tempfile.TemporaryDirectory() as tmp:
        for level in range(len(LEVELS)):
            ride_b, ride_p, ride_t = link_bytes(riding, False, level, Path(tmp))
            park_b, park_p, park_t = link_bytes(parked, True, level, Path(tmp))
            per_h = (ride_b / ride_t * 3600, park_b / park_t * 3600)
            day = RIDING_H * per_h[0] + PARKED_H * per_h[1]
            payload_day = RIDING_H * ride_p / ride_t * 3600 + PARKED_H * park_p / park_t * 3600
            out["levels"].append({"level": level, "meaning": LEVELS[level][3],
                                  "riding_mb_per_h": per_h[0] / 1e6, "parked_mb_per_h": per_h[1] / 1e6,
                                  "mb_per_month": day * DAYS_PER_MONTH / 1e6,
                                  "payload_mb_per_month": payload_day * DAYS_PER_MONTH / 1e6})
    out["mb_per_month_typical"] = out["levels"][0]["mb_per_month"]
    out["riding_s"], out["parked_s"] = riding_s, parked_s
    return out


def report(fig: dict[str, Any]) -> None:
    """The section's lines in ``make bench``'s output."""
    full = fig["levels"][0]
    print(f"mb_per_month_typical: {fig['mb_per_month_typical']:.1f} ({fig['day']}, default configuration; "
          f"riding {full['riding_mb_per_h']:.2f} MB/h, parked {full['parked_mb_per_h']:.2f} MB/h; payload "
          f"{full['payload_mb_per_month']:.1f} MB, the rest MQTT/TLS/TCP overhead, acks and keepalives, estimated)")
    for lv in fig["levels"][1:]:
        print(f"  budget level {lv['level']} ({lv['meaning']}): {lv['mb_per_month']:.1f} MB/month")
