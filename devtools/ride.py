"""A simulated ride fed to a fusion kernel in process, in sim time.

The simulator's frames go through the agent's real decode path: CAN as SLCAN text
into the kernel (one call per 10 ms step, as a read of the adapter delivers it), NMEA,
the polled JBD BMS and the KT controller through their framers and decoders into
``feed_values``. The kernel calls are recorded, so the same traffic can be replayed
into the other build, into the MicroPython port (devtools/mp_kernel_run.py reads the
recording) or into a benchmark; the simulator's truth and fault records come along
for the tests to compare with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from agent.dbc.compile import compile_dbc, profile_path
from agent.protocols import jbd, protocol
from agent.signals import BY_NAME, ID_SPACE, limits
from firmware_sim import scenario
from firmware_sim.cli import FILL_CAN

# Source index of each bus: the kernel's ``source`` and the health slots use it.
SOURCES = ("can", "nmea", "jbd", "kt")
UART_PROTOCOLS = {"nmea": "nmea", "jbd": "jbd", "kt": "kt-lcd3"}
JBD_REGISTERS = (jbd.REG_BASIC, jbd.REG_CELLS)
# Kernel calls: ("can", t, slcan bytes), ("uart", source, t, frames, ids, values), ("due", t).
Call = tuple[Any, ...]


class Recorder:
    """The simulator's writer: turns each frame into the kernel call the agent makes."""

    def __init__(self, poll_interval: float = 0.5, keep_values: bool = False, can_fill: int = 0,
                 can_read_bytes: int = 0) -> None:
        self.calls: list[Call] = []
        # Extra CAN frames per sim second (as ebike-sim --can-fill pads a bus), and the size
        # the SLCAN text is cut into reads at (0: one read per 10 ms step).
        self.can_fill = can_fill
        self.can_read_bytes = can_read_bytes
        self.fill_state = {"counter": 0}
        self.fill_sent = 0
        self.can_frames = 0
        # The simulator's encoded values per signal name, (t, value), when asked for.
        self.values: dict[str, list[tuple[float, float]]] = {}
        self.keep_values = keep_values
        self.truth: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.protos = {bus: protocol(name) for bus, name in UART_PROTOCOLS.items()}
        self.framers = {bus: p.framer() for bus, p in self.protos.items()}
        self.can = bytearray()
        self.can_t = 0.0
        self.poll_interval = poll_interval
        self.next_poll = 0.0
        self.polls = 0
        self.ride: Any = None

    def attach(self, ride: Any) -> None:
        self.ride = ride

    def tick(self, t: float) -> bool:
        if not self.can_read_bytes:
            self._flush_can()
        self.can_t = t
        if self.can_fill:
            self._fill(t)
        if round(t * 100) % 10 == 0:
            self.calls.append(("due", t))
        if t >= self.next_poll:
            # Answers are emitted at once, as frames of this step.
            self.ride.serve("jbd", jbd.request(JBD_REGISTERS[self.polls % len(JBD_REGISTERS)]))
            self.polls += 1
            self.next_poll = t + self.poll_interval / len(JBD_REGISTERS)
        return True

    def frame(self, bus: str, t: float, payload: Any, kind: str, values: dict[str, float]) -> None:
        if self.keep_values:
            for name, value in values.items():
                self.values.setdefault(name, []).append((t, value))
        if bus == "can":
            if kind == "garbage":
                self.can += payload
                return
            self._can_line(payload[0], payload[1], payload[2] if len(payload) == 3 else None)
            return
        proto = self.protos[bus]
        frames = [f for f in self.framers[bus].feed(payload) if proto.understood(f)]
        ids: list[int] = []
        vals: list[float] = []
        for f in frames:
            for name, value in proto.decode(f).items():
                ids.append(BY_NAME[name].id)
                vals.append(value)
        if frames:
            self.calls.append(("uart", SOURCES.index(bus), t, len(frames), ids, vals))

    def fault(self, record: dict[str, Any]) -> None:
        self.faults.append(record)

    def truth_record(self, t: float, state: dict[str, Any]) -> None:
        self.truth.append(state)

    def _can_line(self, can_id: int, data: bytes, edit: Any) -> None:
        line = b"T%08X%d%s\r" % (can_id, len(data), data.hex().upper().encode())
        self.can += scenario.edit_line(line, edit) if edit is not None else line
        self.can_frames += 1
        while self.can_read_bytes and len(self.can) >= self.can_read_bytes:
            self.calls.append(("can", self.can_t, bytes(self.can[:self.can_read_bytes])))
            del self.can[:self.can_read_bytes]

    def _fill(self, t: float) -> None:
        """This step's share of the fill: every sim second carries exactly ``can_fill`` more."""
        step = round(t * scenario.STEPS_PER_S)
        due = (step + 1) * self.can_fill // scenario.STEPS_PER_S
        while self.fill_sent < due:
            _kind, _period, _offset, enc = FILL_CAN[self.fill_sent % len(FILL_CAN)]
            can_id, data, _values = enc(self.ride.vehicle, self.fill_state)
            self._can_line(can_id, data, None)
            self.fill_sent += 1

    def _flush_can(self) -> None:
        if self.can:
            self.calls.append(("can", self.can_t, bytes(self.can)))
            self.can = bytearray()


def record(scenario_name: str = "commute", duration: float = 120.0, seed: int = 1,
           fault_at: float | None = None, kt: bool = False, keep_values: bool = False, can_fill: int = 0,
           can_read_bytes: int = 0) -> Recorder:
    """Ride ``scenario_name`` and record the kernel calls (KT streamed when ``kt``)."""
    rec = Recorder(keep_values=keep_values, can_fill=can_fill, can_read_bytes=can_read_bytes)
    writer = _Writer(rec)
    buses = ("can", "nmea", "kt") if kt else ("can", "nmea")
    scenario.run(writer, scenario=scenario_name, seed=seed, duration=duration, buses=buses, fault_at=fault_at)
    rec.can_read_bytes = rec.can_fill = 0
    rec.tick(duration)
    return rec


class _Writer:
    """The writer interface the simulator expects, on a Recorder (truth renamed: the
    Recorder keeps the records in ``truth``)."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.frame = rec.frame
        self.fault = rec.fault
        self.attach = rec.attach
        self.tick = rec.tick
        self.truth = rec.truth_record


def new_kernel(kernel_cls: Any) -> tuple[Any, list[int]]:
    """A kernel with the Bafang tables, CAN health counted for source 0, and a health slot
    for each UART source (index = source)."""
    dbc = compile_dbc(profile_path("bafang"))
    k = kernel_cls(max(dbc.id_space, ID_SPACE), 1.0)
    k.set_can_tables(*dbc.kernel_tables())
    k.set_limits(*limits(k.id_space))
    k.set_can_source(0)
    slots = [-1] + [k.health_slot(i) for i in range(1, len(SOURCES))]
    return k, slots


def frames(rec: Recorder) -> int:
    """Frames of the recording: CAN frames plus the UART frames the decoders understood."""
    return rec.can_frames + sum(c[3] for c in rec.calls if c[0] == "uart")


def replay(kernel: Any, slots: list[int], calls: list[Call]) -> list[Any]:
    """Make the recorded calls on ``kernel``; every output, in order."""
    out: list[Any] = []
    tail = b""
    for call in calls:
        if call[0] == "can":
            kernel.source = 0
            buf = tail + call[2]
            consumed, got = kernel.feed_slcan(buf, call[1])
            tail = buf[consumed:]
            out += got
        elif call[0] == "uart":
            _, src, t, frames, ids, values = call
            kernel.source = src
            kernel.note_frames(slots[src], [t] * frames)
            out += kernel.feed_values(ids, [t] * len(ids), values)
        else:
            out += kernel.close_due(call[1])
    return out + kernel.flush()


def save(calls: list[Call], path: Path) -> None:
    """The kernel's set-up and the recording as JSON lines (bytes as hex), for
    devtools/mp_kernel_run.py."""
    dbc = compile_dbc(profile_path("bafang"))
    tables = dbc.kernel_tables()
    id_space = max(dbc.id_space, ID_SPACE)
    # JSON has no infinity: an unbounded end of a range is written null.
    bounds = [[v if math.isfinite(v) else None for v in column] for column in limits(id_space)]
    setup = {"id_space": id_space, "sources": len(SOURCES),
             "tables": [sorted(tables[0].items())] + [list(t) for t in tables[1:]],
             "codes": [""] + [t.typecode for t in tables[1:]], "limits": bounds}
    with path.open("w") as f:
        f.write(json.dumps(setup) + "\n")
        for call in calls:
            f.write(json.dumps([call[0], call[1], call[2].hex()] if call[0] == "can" else list(call)) + "\n")
