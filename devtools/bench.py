"""``make bench``: our paths against the reference tools, side by side in one run;
medians of several interleaved rounds, because this machine is shared and noisy.
Writes every round to bench-results.json.

1. DBC decode: frames/s of the kernel on the same 100,000 Bafang frames as packed
   ``struct can_frame`` records (as SocketCAN delivers them, 4 KiB per call) and as
   pre-split frames, compiled and pure, against cantools ``decode_message`` one frame
   at a time (how cantools is used). The kernel also updates state and windows.
2. Replay: ``ebike-agent decode --stats --file`` on a 1,000,000-line candump log (a
   subprocess, start-up included) against python-can's log reader + cantools on the
   same file (in-process, start-up not counted).
3. Outbox: records/s appended to the SQLite outbox in group commits.
4. UART framers: frames/s on a clean stream and with 10 % garbage bytes.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.dbc.compile import compile_dbc, frame_key, load_cantools, profile_path
from agent.fusion.kernel import KERNELS
from agent.store.outbox import LANE_LIVE, Outbox
from agent.uplink import wire
from devtools.bench_framers import framer_figures

READ_BYTES = 4096
BATCH = 64


def _frames(db: Any, n: int, seed: int) -> list[tuple[int, int, bytes, bool]]:
    """Random payloads of the DBC's messages: (kernel key, frame id, data, extended)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choice(db.messages)
        out.append((frame_key(m.frame_id, m.is_extended_frame), m.frame_id, rng.randbytes(m.length),
                    m.is_extended_frame))
    return out


def _packed_run(kind: str, path: str, frames: list[tuple[int, int, bytes, bool]]) -> Callable[[], None]:
    dbc = compile_dbc(path)
    buf = b"".join(struct.pack("=IB3x8s", fid | (0x80000000 if ext else 0), len(d), d) for _, fid, d, ext in frames)
    reads = [buf[i:i + READ_BYTES] for i in range(0, len(buf), READ_BYTES)]

    def run() -> None:
        k = KERNELS[kind](dbc.id_space, 1.0)
        k.set_can_tables(*dbc.kernel_tables())
        for r in reads:
            k.feed_packed(r, 1.0)
        assert k.frames == len(frames)

    return run


def _split_run(kind: str, path: str, frames: list[tuple[int, int, bytes, bool]]) -> Callable[[], None]:
    dbc = compile_dbc(path)
    keys = [f[0] for f in frames]
    datas = [f[2] for f in frames]
    times = [1.0] * len(frames)
    batches = [(keys[i:i + BATCH], datas[i:i + BATCH], times[i:i + BATCH]) for i in range(0, len(frames), BATCH)]

    def run() -> None:
        k = KERNELS[kind](dbc.id_space, 1.0)
        k.set_can_tables(*dbc.kernel_tables())
        for b in batches:
            k.feed_frames(*b)

    return run


def _cantools_run(path: str, frames: list[tuple[int, int, bytes, bool]]) -> Callable[[], None]:
    db = load_cantools(path)
    pairs = [(f[1], f[2]) for f in frames]

    def run() -> None:
        decode = db.decode_message
        for frame_id, data in pairs:
            decode(frame_id, data)

    return run


def _rounds(contenders: dict[str, Callable[[], None]], rounds: int, items: int) -> dict[str, list[float]]:
    """Items/s per contender per round, interleaved so drift hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            t0 = time.perf_counter()
            run()
            out[name].append(items / (time.perf_counter() - t0))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--log-lines", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--framer-seconds", type=float, default=0.3, help="per framer, case and round")
    p.add_argument("--outbox-records", type=int, default=200_000)
    p.add_argument("--group", type=int, default=1000, help="records per outbox group commit")
    p.add_argument("--out", default="bench-results.json")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error("--rounds must be >= 5 (medians of fewer are not worth quoting)")
    path = profile_path("bafang")
    frames = _frames(load_cantools(path), args.frames, seed=1)
    print(f"{platform.machine()}, Python {platform.python_version()}, {args.rounds} interleaved rounds, medians")

    decode: dict[str, Callable[[], None]] = {}
    if "c" in KERNELS:
        decode["ours compiled, packed reads"] = _packed_run("c", path, frames)
        decode["ours compiled, split frames"] = _split_run("c", path, frames)
    decode["ours pure, packed reads"] = _packed_run("py", path, frames)
    decode["cantools decode_message"] = _cantools_run(path, frames)
    decode_results = _table(f"Bafang DBC decode, {len(frames):,} frames (frames/s)",
                            _rounds(decode, args.rounds, len(frames)), "cantools decode_message", "frames/s")

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

    best = "ours compiled, packed reads" if "c" in KERNELS else "ours pure, packed reads"
    summary = {
        "decode_speedup_vs_cantools": decode_results[best]["ratio"],
        "replay_speedup_vs_python_can": replay_results["ebike-agent decode --stats"]["ratio"],
        "outbox_append_records_per_s": outbox_results["outbox append (group commit)"]["median"],
    }
    print(f"\ndecode_speedup_vs_cantools: {summary['decode_speedup_vs_cantools']:.1f}x ({best})")
    print(f"replay_speedup_vs_python_can: {summary['replay_speedup_vs_python_can']:.1f}x")
    print(f"outbox_append_records_per_s: {summary['outbox_append_records_per_s']:,.0f}")
    Path(args.out).write_text(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(), "rounds": args.rounds,
        "summary": summary, "decode": decode_results, "replay": replay_results, "outbox": outbox_results,
        "framers": framers,
    }, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
