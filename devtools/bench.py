"""``make bench``: our DBC decode path (compiled and pure kernel) against cantools, on
the same frames, side by side in one run; medians of several rounds, because this
machine is shared and noisy. Writes every round to bench-results.json.

What is measured: frames/s through ``Kernel.feed_frames`` in batches of BATCH frames
(one call per port read, as the agent does; it also updates state and windows) and
through cantools ``Database.decode_message`` one frame at a time (how cantools is used).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.dbc.compile import compile_dbc, frame_key, load_cantools, profile_path
from agent.fusion.kernel import KERNELS

BATCH = 64


def _frames(db: Any, n: int, seed: int) -> list[tuple[int, int, bytes]]:
    """Random payloads of the DBC's messages: (kernel key, frame id, data)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choice(db.messages)
        out.append((frame_key(m.frame_id, m.is_extended_frame), m.frame_id, rng.randbytes(m.length)))
    return out


def _kernel_run(kind: str, path: str, frames: list[tuple[int, int, bytes]]) -> Callable[[], None]:
    dbc = compile_dbc(path)
    keys = [f[0] for f in frames]
    datas = [f[2] for f in frames]
    times = [i * 0.0005 for i in range(len(frames))]
    batches = [(keys[i:i + BATCH], datas[i:i + BATCH], times[i:i + BATCH]) for i in range(0, len(frames), BATCH)]

    def run() -> None:
        k = KERNELS[kind](dbc.id_space, 1.0)
        k.set_can_tables(*dbc.kernel_tables())
        for b in batches:
            k.feed_frames(*b)
        k.flush()

    return run


def _cantools_run(path: str, frames: list[tuple[int, int, bytes]]) -> Callable[[], None]:
    db = load_cantools(path)
    pairs = [(f[1], f[2]) for f in frames]

    def run() -> None:
        decode = db.decode_message
        for frame_id, data in pairs:
            decode(frame_id, data)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench", description=__doc__)
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="bench-results.json")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error("--rounds must be >= 5 (medians of fewer are not worth quoting)")
    path = profile_path("bafang")
    frames = _frames(load_cantools(path), args.frames, seed=1)
    contenders: dict[str, Callable[[], None]] = {}
    if "c" in KERNELS:
        contenders["ours (compiled kernel)"] = _kernel_run("c", path, frames)
    contenders["ours (pure kernel)"] = _kernel_run("py", path, frames)
    contenders["cantools decode_message"] = _cantools_run(path, frames)
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():  # interleaved, so drift hits all alike
            t0 = time.perf_counter()
            run()
            rounds[name].append(len(frames) / (time.perf_counter() - t0))
    base = statistics.median(rounds["cantools decode_message"])
    print(f"Bafang DBC decode, {len(frames)} frames x {args.rounds} rounds, batches of {BATCH} "
          f"({platform.machine()}, Python {platform.python_version()})")
    print(f"{'path':28s} {'median frames/s':>16s} {'min':>12s} {'max':>12s} {'vs cantools':>12s}")
    results = {}
    for name, values in rounds.items():
        med = statistics.median(values)
        results[name] = {"median_fps": med, "rounds_fps": values, "ratio_vs_cantools": med / base}
        print(f"{name:28s} {med:16,.0f} {min(values):12,.0f} {max(values):12,.0f} {med / base:11.2f}x")
    Path(args.out).write_text(json.dumps({
        "what": "frames/s through the DBC decode path", "dbc": "bafang", "frames": len(frames),
        "rounds": args.rounds, "batch": BATCH, "machine": platform.machine(),
        "python": platform.python_version(), "results": results,
    }, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
