"""``make bench``: our paths against the reference tools, side by side in one run;
medians of several interleaved rounds, because this machine is shared and noisy.
Writes every round to bench-results.json.

1. DBC decode: frames/s of the kernel on the same 100,000 Bafang frames as packed
   ``struct can_frame`` records (as SocketCAN delivers them, 4 KiB per call) and as
   pre-split frames, compiled and pure, against cantools ``decode_message`` one frame
   at a time (how cantools is used) and against a minimal typed C loop over the same
   packed buffer that only keeps each signal's latest value (devtools/bench_c_decode.py:
   generated from the same DBC tables, compiled with the system ``cc -O2`` at bench time;
   without ``cc`` its row reports why). The kernel also updates state and windows, tests
   range and rate, fills the sample ring and counts each message's health; each pass on a
   fresh kernel, built untimed. ``decode_vs_c_loop``: ours compiled, packed / the C loop.
2. Replay: ``ebike-agent decode --stats --file`` on a 1,000,000-line candump log (a
   subprocess, start-up included) against python-can's log reader + cantools on the
   same file (in-process, start-up not counted).
3. Outbox: records/s appended to the SQLite outbox in group commits.
4. UART framers: frames/s on a clean stream and with 10 % garbage bytes.
5. Recorded traffic (devtools/ride.py): frames/s of the kernel, compiled and pure, on
   commute rides the simulator records in process once per run, fed the agent's way:
   SLCAN text into ``feed_slcan``, NMEA and the polled JBD BMS decoded (untimed, at
   recording) into ``feed_values``, ``close_due`` every 0.1 s; outputs collected.
   ``kernel_frames_per_s``: the ride on a saturated 1 Mbit/s bus (padded to 8,400 CAN
   frames/s like ``ebike-sim --can-fill``, SLCAN read 2 KiB at a time), the load the
   goal is stated against. ``kernel_frames_per_s_commute``: the same ride at the bus's
   own 64 CAN frames/s, one read per 10 ms; there the fusion step (10 Hz) and window ends
   (1 Hz), which cost per second and not per frame, dominate. Each pass on a fresh
   kernel (built untimed); the compiled one 10 times a round, its mean taken.
   Frames = CAN frames + NMEA sentences + JBD answers.
6. Uplink (devtools/bench_uplink.py): draining a 24 h backlog, and the first live window
   after the broker comes back; the wire format's size, like for like
   (devtools/bench_wire.py): every 10 Hz sample (the raw lane) against ThingsBoard JSON
   and Sparkplug B carrying every sample, the 1 s aggregates against the same aggregates.
7. The agent: CPU (% of one core, user + sys) and RSS of the whole ``ebike-agent run``
   process on a saturated 1 Mbit/s CAN bus (``ebike-sim --can-fill``), see bench_agent.py.
8. SD-card care (devtools/bench_writes.py): bytes the agent process writes (write_bytes of
   /proc/<pid>/io) per hour of riding and per hour parked, on its default [outbox]
   settings, the consumer acknowledging; medians of runs made at once.
9. Instructions (devtools/bench_instr.py, valgrind): per frame of the compiled kernel on
   the recorded saturated ride (cachegrind), per second of bus traffic of the whole agent
   on a saturated bus and on a commute (callgrind, over a window of steady traffic), and
   the CPU share of a Pi Zero 2 W core they project to.

10. Data budget (devtools/bench_budget.py): MB a month of a typical day (2 h riding, 22 h
   parked) with the default configuration, recorded rides through the agent's record and
   send stages in accelerated time, payload plus the budget's overhead estimate.

11. Fleet (devtools/bench_fleet.py): 1,000 virtual devices (devtools/fleet.py) at one live
   window a second through mosquitto into PostgreSQL, with 1, 2 and 4 consumers of one
   shared subscription: records stored per second, ack latency p50/p99, loss and
   duplicates, each part's CPU, and the devices one consumer carries.

``--smoke`` runs every section once at tiny sizes (about two minutes), to prove the bench
works; its figures are not worth quoting and the JSON says ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent import wire
from agent.dbc.compile import CompiledDbc, compile_dbc, frame_key, load_cantools, profile_path
from agent.fusion.kernel import KERNELS
from agent.signals import limits
from agent.store.outbox import LANE_LIVE, Outbox
from agent.store.recorder import PARKED_COMMIT_S
from devtools import (
    bench_budget,
    bench_c_decode,
    bench_fleet,
    bench_instr,
    bench_uplink,
    bench_wire,
    bench_writes,
    ride,
)
from devtools.bench_agent import CPU_GOAL_PCT, RSS_GOAL_MB, AgentBenchError, agent_figures
from devtools.bench_framers import framer_figures
from devtools.bench_writes import PARKED_GOAL_MB_H, RIDING_GOAL_MB_H
from devtools.broker import BrokerMissing

READ_BYTES = 4096
BATCH = 64
# A read of the SLCAN adapter: about 8 ms of a saturated 1 Mbit/s bus as SLCAN text
# (27-byte lines); a tty read returns at most 4 KiB.
SLCAN_READ_BYTES = 2048
COMMUTE_CAN_FPS = round(bench_instr.COMMUTE_CAN_FPS)  # the simulated Bafang bus's own frames (scenario.py)
COMPILED_PASSES = 10    # ~15 ms a pass compiled; the pure kernel takes ~1 s for one
KERNEL_FPS_GOAL = 5_000_000
KERNEL_SPEEDUP_GOAL = 30.0
DECODE_CANTOOLS_GOAL = 60.0
DECODE_C_GOAL = 0.6
C_ROW = "C loop, packed (cc -O2)"


def _kernel(kind: str, dbc: CompiledDbc) -> Any:
    """A kernel of build ``kind`` with the DBC's tables and the agent's range and rate
    limits: the one place the bench builds one."""
    k = KERNELS[kind](dbc.id_space, 1.0)
    k.set_can_tables(*dbc.kernel_tables())
    k.set_limits(*limits(dbc.id_space))
    return k


def _frames(db: Any, n: int, seed: int) -> list[tuple[int, int, bytes, bool]]:
    """Random payloads of the DBC's messages: (kernel key, frame id, data, extended)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choice(db.messages)
        out.append((frame_key(m.frame_id, m.is_extended_frame), m.frame_id, rng.randbytes(m.length),
                    m.is_extended_frame))
    return out


def _packed(frames: list[tuple[int, int, bytes, bool]]) -> bytes:
    """The frames as Linux ``struct can_frame`` records, as a SocketCAN read delivers them."""
    return b"".join(struct.pack("=IB3x8s", fid | (0x80000000 if ext else 0), len(d), d) for _, fid, d, ext in frames)


def _reads(buf: bytes) -> list[bytes]:
    """``buf`` cut into the reads of READ_BYTES the kernel is fed."""
    return [buf[i:i + READ_BYTES] for i in range(0, len(buf), READ_BYTES)]


def _packed_run(kind: str, dbc: CompiledDbc, buf: bytes, frames: int) -> Callable[[], float]:
    """The seconds the kernel takes over ``buf`` in 4 KiB reads (a fresh kernel, built untimed)."""
    reads = _reads(buf)

    def run() -> float:
        k = _kernel(kind, dbc)
        t0 = time.perf_counter()
        for r in reads:
            k.feed_packed(r, 1.0)
        took = time.perf_counter() - t0
        assert k.frames == frames
        return took

    return run


def _split_run(kind: str, dbc: CompiledDbc, frames: list[tuple[int, int, bytes, bool]]) -> Callable[[], float]:
    """The seconds the kernel takes over the frames pre-split, in batches (built untimed)."""
    keys = [f[0] for f in frames]
    datas = [f[2] for f in frames]
    times = [1.0] * len(frames)
    batches = [(keys[i:i + BATCH], datas[i:i + BATCH], times[i:i + BATCH]) for i in range(0, len(frames), BATCH)]

    def run() -> float:
        k = _kernel(kind, dbc)
        t0 = time.perf_counter()
        for b in batches:
            k.feed_frames(*b)
        return time.perf_counter() - t0

    return run


def _cantools_run(path: str, frames: list[tuple[int, int, bytes, bool]]) -> Callable[[], None]:
    db = load_cantools(path)
    pairs = [(f[1], f[2]) for f in frames]

    def run() -> None:
        decode = db.decode_message
        for frame_id, data in pairs:
            decode(frame_id, data)

    return run


def _rounds(contenders: Mapping[str, Callable[[], float | None]], rounds: int, items: int) -> dict[str, list[float]]:
    """Items/s per contender per round, interleaved so drift hits all alike. A contender
    that has set-up to leave out returns the seconds it timed itself; None = the whole call."""
    out: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            t0 = time.perf_counter()
            took = run()
            out[name].append(items / (took if took is not None else time.perf_counter() - t0))
    return out


def _table(title: str, rounds: dict[str, list[float]], base: str, unit: str) -> dict[str, Any]:
    ref = statistics.median(rounds[base])
    print(f"\n{title}")
    print(f"{'path':34s} {'median ' + unit:>18s} {'min':>12s} {'max':>12s} {'vs ' + base.split()[0]:>12s}")
    results = {}
    for name, values in rounds.items():
        med = statistics.median(values)
        results[name] = {"median": med, "rounds": values, "ratio": med / ref}
        print(f"{name:34s} {med:18,.0f} {min(values):12,.0f} {max(values):12,.0f} {med / ref:11.2f}x")
    return results


def _write_log(path: Path, frames: list[tuple[int, int, bytes, bool]], lines: int) -> None:
    with open(path, "wb") as f:
        for i in range(lines):
            _, fid, data, ext = frames[i % len(frames)]
            ident = b"%08X" % fid if ext else b"%03X" % fid
            f.write(b"(%d.%06d) can0 %s#%s%s\n" % (1700000000 + i // 1000, (i % 1000) * 1000, ident,
                                                  data.hex().upper().encode(), b" R" if i % 2 else b""))


def _replay_ours(log: Path) -> Callable[[], None]:
    def run() -> None:
        out = subprocess.run([sys.executable, "-m", "agent", "decode", "--protocol", "bafang-can", "--stats",
                              "--file", str(log)], check=True, capture_output=True)
        json.loads(out.stdout)

    return run


def _replay_python_can(log: Path, path: str) -> Callable[[], None]:
    import can

    db = load_cantools(path)

    def run() -> None:
        decode = db.decode_message
        for msg in can.CanutilsLogReader(str(log)):
            with contextlib.suppress(KeyError):  # not in the DBC: ours counts it too
                decode(msg.arbitration_id, msg.data)

    return run


def _traffic_run(kind: str, rec: ride.Recorder, passes: int) -> Callable[[], float]:
    """Times the kernel calls of a recorded ride (devtools/ride.py ``replay``: outputs
    collected as the agent collects them), ``passes`` times on a fresh kernel each (built
    untimed; a fast build gets several so a round outlasts the machine's hiccups); the mean
    seconds of one pass."""
    def one() -> float:
        k, slots = ride.new_kernel(KERNELS[kind])
        t0 = time.perf_counter()
        ride.replay(k, slots, rec.calls)
        took = time.perf_counter() - t0
        if k.frames != rec.can_frames:
            raise AssertionError(f"{kind} kernel decoded {k.frames} of {rec.can_frames} CAN frames")
        return took

    return lambda: sum(one() for _ in range(passes)) / passes


def _recorded_ride(title: str, rec: ride.Recorder, rounds: int) -> dict[str, Any]:
    """Frames/s of each kernel build on one recorded ride."""
    runs: dict[str, Callable[[], float | None]] = {}
    if "c" in KERNELS:
        runs["compiled kernel"] = _traffic_run("c", rec, COMPILED_PASSES)
    runs["pure kernel"] = _traffic_run("py", rec, 1)
    uart = ride.frames(rec) - rec.can_frames
    return _table(f"{title}: {rec.can_frames:,} CAN frames + {uart:,} NMEA/JBD frames (frames/s)",
                  _rounds(runs, rounds, ride.frames(rec)), "pure kernel", "frames/s")


def _agent(seconds: float, fill: int, warmup: float) -> dict[str, Any]:
    """The agent process figures (bench_agent.py); ``{"error": ...}`` if it failed, so the
    other figures are still written."""
    print(f"\nagent on a saturated CAN bus ({fill:,} frames/s sent), {seconds:g} s after {warmup:g} s "
          f"of warm-up...", flush=True)
    try:
        agent = agent_figures(seconds, fill, warmup)
    except (AgentBenchError, BrokerMissing) as e:
        print(f"error: no agent figures: {e}", file=sys.stderr)
        agent = {"error": str(e)}
    agent["can_frames_per_s_sent"] = fill
    return agent


def _sd_writes(rounds: int, riding_s: float, parked_s: float, warmup_s: float | None) -> dict[str, Any]:
    """The SD-card figures (bench_writes.py); ``{"error": ...}`` if a run failed."""
    print(f"\nSD-card writes: {rounds} riding runs of {riding_s:g} s and {rounds} parked runs of {parked_s:g} s, "
          f"all at once...", flush=True)
    try:
        return bench_writes.measure(rounds, riding_s, parked_s, warmup_s)
    except (AgentBenchError, BrokerMissing) as e:
        print(f"error: no SD-card figures: {e}", file=sys.stderr)
        return {"error": str(e)}


WINDOW_BODY = wire.window_record(1.7e9, 1.0, [(sid, 10, 1.0, 2.0, 1.5, 2.0, 0.0) for sid in range(1, 9)])


def _outbox_run(tmp: str, records: int, group: int) -> Callable[[], None]:
    """Append ``records`` 8-signal window records in group commits of ``group`` (real file,
    WAL, synchronous=FULL, as the agent runs it)."""
    body = WINDOW_BODY
    rounds = [0]

    def run() -> None:
        rounds[0] += 1
        box = Outbox(str(Path(tmp) / f"outbox-{rounds[0]}.sqlite"), 1 << 40)
        rows = [(LANE_LIVE, 1.7e9, body)] * group
        for _ in range(records // group):
            box.append(rows)
        box.close()

    return run


# --smoke: every section once, at sizes that take seconds (each overrides the option's value).
SMOKE = {"frames": 2000, "log_lines": 2000, "rounds": 1, "framer_seconds": 0.02, "outbox_records": 2000,
         "group": 100, "traffic_seconds": 20.0, "saturated_seconds": 2.0, "agent_warmup": 1.0, "agent_seconds": 2.0,
         "writes_rounds": 1, "writes_riding_seconds": 3.0, "writes_parked_seconds": 3.0, "writes_warmup": 1.0,
         "uplink_rounds": 1, "uplink_backlog_seconds": 600, "wire_seconds": 60.0, "instr_warmup": 1.0,
         "instr_seconds": 3.0, "fleet_devices": 20, "fleet_seconds": 5.0,
         "fleet_ramp": (30,), "fleet_ramp_seconds": 2.0}


def _instr(saturated: ride.Recorder, reads: list[bytes], frames: int, fill: int, warmup_s: float,
           seconds: float) -> dict[str, Any]:
    """The instruction counts (bench_instr.py); ``{"error": ...}`` where they failed."""
    print(f"\ninstructions (valgrind): the kernel on the recorded saturated ride and the packed buffer; the agent "
          f"on a saturated bus and a commute, {seconds:g} s after {warmup_s:g} s of decoding...", flush=True)
    return bench_instr.measure(saturated, reads, frames, fill, warmup_s, seconds)


def _decode(path: str, frames: list[tuple[int, int, bytes, bool]], rounds: int) -> tuple[dict[str, Any],
                                                                                          dict[str, Any]]:
    """The decode table (section 1) and its summary keys: ours against cantools and against
    the C reference loop (devtools/bench_c_decode.py), or why there is no C row."""
    dbc = compile_dbc(path)
    buf = _packed(frames)
    decode: dict[str, Callable[[], float | None]] = {}
    if "c" in KERNELS:
        decode["ours compiled, packed reads"] = _packed_run("c", dbc, buf, len(frames))
        decode["ours compiled, split frames"] = _split_run("c", dbc, frames)
    decode["ours pure, packed reads"] = _packed_run("py", dbc, buf, len(frames))
    decode["cantools decode_message"] = _cantools_run(path, frames)
    c_loop, c_error = bench_c_decode.c_contender(dbc, buf, len(frames))
    if c_loop is not None:
        decode[C_ROW] = c_loop
    results = _table(f"Bafang DBC decode, {len(frames):,} frames (frames/s)", _rounds(decode, rounds, len(frames)),
                     "cantools decode_message", "frames/s")
    if c_error is not None:
        print(f"{C_ROW:34s} error: {c_error}")
        results[C_ROW] = {"error": c_error}
    best = "ours compiled, packed reads" if "c" in KERNELS else "ours pure, packed reads"
    return results, {
        "decode_speedup_vs_cantools": results[best]["ratio"],
        "decode_vs_c_loop": results[best]["median"] / results[C_ROW]["median"] if c_error is None else None,
        "decode_c_loop_error": c_error,
        "decode_best": best,
    }


def _print_decode(summary: Mapping[str, Any]) -> None:
    print(f"decode_speedup_vs_cantools: {summary['decode_speedup_vs_cantools']:.1f}x (goal >= "
          f"{DECODE_CANTOOLS_GOAL:g}x; {summary['decode_best']})")
    if summary["decode_vs_c_loop"] is None:
        print(f"decode_vs_c_loop: none ({summary['decode_c_loop_error']})")
    else:
        print(f"decode_vs_c_loop: {summary['decode_vs_c_loop']:.2f} (goal >= {DECODE_C_GOAL:g}; "
              f"{summary['decode_best']} / the {C_ROW})")


def _fleet(args: argparse.Namespace) -> dict[str, Any]:
    """The fleet section (devtools/bench_fleet.py) at the sizes the options ask."""
    return bench_fleet.measure(args.fleet_devices, 1.0, args.fleet_seconds, ramp=args.fleet_ramp,
                               ramp_seconds=args.fleet_ramp_seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--log-lines", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--framer-seconds", type=float, default=0.3, help="per framer, case and round")
    p.add_argument("--outbox-records", type=int, default=200_000)
    p.add_argument("--group", type=int, default=1000, help="records per outbox group commit")
    p.add_argument("--traffic-seconds", type=float, default=1800.0, help="sim seconds of the recorded commute")
    p.add_argument("--saturated-seconds", type=float, default=60.0,
                   help="sim seconds of the recorded commute on a saturated bus")
    p.add_argument("--can-fill", type=int, default=8400, help="CAN frames/s the agent is fed (1 Mbit/s bus)")
    p.add_argument("--agent-warmup", type=float, default=8.0, help="s of decoding before the agent is measured")
    p.add_argument("--agent-seconds", type=float, default=24.0, help="steady interval the agent is measured over")
    p.add_argument("--writes-rounds", type=int, default=3, help="runs of each case for the SD-card figures")
    p.add_argument("--writes-riding-seconds", type=float, default=240.0, help="interval a riding run is measured over")
    p.add_argument("--writes-parked-seconds", type=float, default=240.0,
                   help="interval a parked run is measured over (at least two parked commits)")
    p.add_argument("--writes-warmup", type=float, default=None,
                   help="s before a write run is measured (default: each case's own, see bench_writes.py)")
    p.add_argument("--uplink-rounds", type=int, default=3, help="rounds of the uplink figures (a 24 h backlog each)")
    p.add_argument("--uplink-backlog-seconds", type=int, default=bench_uplink.DAY_S)
    p.add_argument("--wire-seconds", type=float, default=1800.0, help="s of the commute the wire figures encode")
    p.add_argument("--instr-warmup", type=float, default=5.0,
                   help="s of decoding under valgrind before the agent's instructions are counted")
    p.add_argument("--instr-seconds", type=float, default=30.0, help="window the agent's instructions are counted over")
    p.add_argument("--fleet-devices", type=int, default=1000, help="virtual devices of the fleet section")
    p.add_argument("--fleet-seconds", type=float, default=60.0, help="s each fleet run publishes for")
    p.add_argument("--fleet-ramp", type=lambda v: tuple(int(x) for x in v.split(",")), default=(1500, 2000, 2500, 3000),
                   help="device counts one consumer is then tried with, until it no longer carries them")
    p.add_argument("--fleet-ramp-seconds", type=float, default=30.0, help="s of each ramp run")
    p.add_argument("--smoke", action="store_true", help="every section once at tiny sizes, to prove the bench runs")
    p.add_argument("--only", choices=("decode", "fleet"),
                   help="run one section alone: 'decode' = the DBC decode table (1.), 'fleet' = the fleet "
                        "section (1,000 devices, 1, 2 and 4 consumers, PostgreSQL), and their summary keys")
    p.add_argument("--out", default="bench-results.json")
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    elif args.rounds < 5:
        p.error("--rounds must be >= 5 (medians of fewer are not worth quoting)")
    if args.agent_seconds < 20 and not args.smoke:
        p.error("--agent-seconds must be >= 20 (a CPU share over less is not steady)")
    if args.writes_parked_seconds < 2 * PARKED_COMMIT_S and not args.smoke:
        p.error(f"--writes-parked-seconds must be >= {2 * PARKED_COMMIT_S:g} (two parked commits)")
    if args.only == "fleet":
        fleet_fig = _fleet(args)
        bench_fleet.report(fleet_fig)
        Path(args.out).write_text(json.dumps({
            "machine": platform.machine(), "python": platform.python_version(), "smoke": args.smoke,
            "summary": bench_fleet.summary(fleet_fig), "fleet": fleet_fig}, indent=1))
        print(f"written to {args.out}")
        return 0
    path = profile_path("bafang")
    frames = _frames(load_cantools(path), args.frames, seed=1)
    print(f"{platform.machine()}, Python {platform.python_version()}, {args.rounds} interleaved rounds, medians"
          f"{' (SMOKE RUN: tiny sizes, figures not worth quoting)' if args.smoke else ''}")

    decode_results, decode_summary = _decode(path, frames, args.rounds)
    if args.only == "decode":
        print()
        _print_decode(decode_summary)
        Path(args.out).write_text(json.dumps({
            "machine": platform.machine(), "python": platform.python_version(), "rounds": args.rounds,
            "summary": decode_summary, "decode": decode_results}, indent=1))
        print(f"written to {args.out}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "replay.log"
        _write_log(log, frames, args.log_lines)
        replay = {"ebike-agent decode --stats": _replay_ours(log),
                  "python-can reader + cantools": _replay_python_can(log, path)}
        replay_results = _table(f"candump replay, {args.log_lines:,} lines (lines/s)",
                                _rounds(replay, args.rounds, args.log_lines),
                                "python-can reader + cantools", "lines/s")

    with tempfile.TemporaryDirectory() as tmp:
        outbox_results = _table(f"outbox append, {args.outbox_records:,} records of {len(WINDOW_BODY)} bytes, "
                                f"group commits of {args.group}",
                                _rounds({"outbox append (group commit)": _outbox_run(tmp, args.outbox_records,
                                                                                    args.group)},
                                        args.rounds, args.outbox_records),
                                "outbox append (group commit)", "records/s")

    framers = framer_figures(args.framer_seconds)
    print(f"\nUART framers (frames/s, median): {'clean':>12s} {'10 % garbage':>14s}")
    for name, fig in framers.items():
        print(f"  {name:32s} {fig['clean_frames_per_s']:12,.0f} {fig['garbage10_frames_per_s']:14,.0f}")

    saturated = ride.record("commute", args.saturated_seconds, seed=1, can_fill=args.can_fill - COMMUTE_CAN_FPS,
                            can_read_bytes=SLCAN_READ_BYTES)
    saturated_results = _recorded_ride(f"recorded commute on a saturated bus ({args.can_fill:,} CAN frames/s, "
                                       f"SLCAN reads of {SLCAN_READ_BYTES} B), {args.saturated_seconds:g} s",
                                       saturated, args.rounds)
    commute = ride.record("commute", args.traffic_seconds, seed=1)
    traffic_results = _recorded_ride(f"recorded commute ({COMMUTE_CAN_FPS} CAN frames/s, a read per 10 ms), "
                                     f"{args.traffic_seconds:g} s", commute, args.rounds)
    uplink = bench_uplink.measure(args.uplink_rounds, args.uplink_backlog_seconds)
    wire_figures = bench_wire.measure(args.wire_seconds)
    agent = _agent(args.agent_seconds, args.can_fill, args.agent_warmup)
    writes = _sd_writes(args.writes_rounds, args.writes_riding_seconds, args.writes_parked_seconds,
                        args.writes_warmup)
    instr = _instr(saturated, _reads(_packed(frames)), len(frames), args.can_fill, args.instr_warmup,
                   args.instr_seconds)
    budget = bench_budget.measure()
    fleet_fig = _fleet(args)

    kernel = "compiled kernel" if "c" in KERNELS else "pure kernel"
    summary = {
        **decode_summary,
        "replay_speedup_vs_python_can": replay_results["ebike-agent decode --stats"]["ratio"],
        "outbox_append_records_per_s": outbox_results["outbox append (group commit)"]["median"],
        "kernel_frames_per_s": saturated_results[kernel]["median"],
        "kernel_speedup_vs_pure": saturated_results[kernel]["ratio"] if "c" in KERNELS else None,
        "kernel_frames_per_s_commute": traffic_results[kernel]["median"],
        "kernel_speedup_vs_pure_commute": traffic_results[kernel]["ratio"] if "c" in KERNELS else None,
        **uplink,
        **bench_wire.summary(wire_figures),
        "agent_cpu_pct_saturated_can": agent.get("cpu_pct"),
        "agent_rss_mb": agent.get("rss_mb"),
        "agent_can_frames_per_s_received": agent.get("can_frames_per_s"),
        "sd_write_mb_per_h_riding": writes.get("sd_write_mb_per_h_riding"),
        "sd_write_mb_per_h_parked": writes.get("sd_write_mb_per_h_parked"),
        **{key: instr.get(key) for key in bench_instr.SUMMARY_KEYS},
        "mb_per_month_typical": budget["mb_per_month_typical"],
        **bench_fleet.summary(fleet_fig),
    }
    print()
    _print_decode(decode_summary)
    print(f"replay_speedup_vs_python_can: {summary['replay_speedup_vs_python_can']:.1f}x")
    print(f"outbox_append_records_per_s: {summary['outbox_append_records_per_s']:,.0f}")
    print(f"kernel_frames_per_s: {summary['kernel_frames_per_s']:,.0f} (goal >= {KERNEL_FPS_GOAL:,}; {kernel}, "
          f"saturated bus)")
    print(f"kernel_frames_per_s_commute: {summary['kernel_frames_per_s_commute']:,.0f} (the fusion step and "
          f"window ends cost per second, not per frame: at {COMMUTE_CAN_FPS} CAN frames/s they dominate)")
    if summary["kernel_speedup_vs_pure"] is not None:
        print(f"kernel_speedup_vs_pure: {summary['kernel_speedup_vs_pure']:.1f}x saturated, "
              f"{summary['kernel_speedup_vs_pure_commute']:.1f}x commute (goal >= {KERNEL_SPEEDUP_GOAL:g}x)")
    for name, value in uplink.items():
        print(f"{name}: {value:.2f}")
    print(bench_wire.report(wire_figures))
    if "error" not in agent:
        print(f"agent_cpu_pct_saturated_can: {agent['cpu_pct']:.1f} % of one core (goal <= {CPU_GOAL_PCT:g} %; "
              f"kernel {agent['kernel']}, over {agent['interval_s']:.1f} s; the simulator feeding it: "
              f"{agent['sim_cpu_pct']:.1f} %)")
        print(f"  CAN frames/s received: {agent['can_frames_per_s']:,.0f} of {args.can_fill:,} sent "
              f"(+ {agent['uart_frames_per_s']:.1f} NMEA/JBD frames/s; status says "
              f"{agent['status_frames_per_s']:,.0f} frames/s; bad SLCAN lines {agent['bad_lines']})")
        print(f"agent_rss_mb: {agent['rss_mb']:.1f} (goal <= {RSS_GOAL_MB:g})")
    for case, goal in (("riding", RIDING_GOAL_MB_H), ("parked", PARKED_GOAL_MB_H)):
        if "error" not in writes:
            runs = ", ".join(f"{r['mb_per_h']:.2f}" for r in writes["runs"][case])
            print(f"sd_write_mb_per_h_{case}: {writes[f'sd_write_mb_per_h_{case}']:.2f} (goal <= {goal:g}; "
                  f"{writes[f'{case}_source']} of the agent process over {writes[f'{case}_interval_s']:g} s after "
                  f"{writes[f'{case}_warmup_s']:g} s, per hour; runs {runs})")
    bench_instr.report(instr)
    bench_budget.report(budget)
    bench_fleet.report(fleet_fig)
    Path(args.out).write_text(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(), "rounds": args.rounds, "smoke": args.smoke,
        "summary": summary, "decode": decode_results, "replay": replay_results, "outbox": outbox_results,
        "framers": framers, "recorded_ride_saturated": saturated_results, "recorded_ride": traffic_results,
        "uplink": uplink, "wire": wire_figures, "agent": agent, "sd_writes": writes, "instructions": instr,
        "budget": budget, "fleet": fleet_fig,
    }, indent=1))
    print(f"written to {args.out}")
    return 1 if "error" in agent or "error" in writes or "error" in instr else 0


if __name__ == "__main__":
    raise SystemExit(main())
