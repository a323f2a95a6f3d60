"""Frames per second of each UART framer, on a clean stream and with 10 % garbage.

``framer_figures(seconds_per_case)`` is called by devtools/bench.py; run alone with
``python -m devtools.bench_framers [SECONDS]``.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

from devtools.fuzz import REFERENCE, Reference

ROUNDS = 5
STREAM_FRAMES = 2000
CHUNK = 64  # bytes per feed, about what a 9600-baud read returns at a time


def _stream(ref: Reference, garbage: float, rng: random.Random) -> tuple[bytes, int]:
    """STREAM_FRAMES valid frames with ``garbage`` of the bytes random in between."""
    out = bytearray()
    frames = [ref.make(rng) for _ in range(STREAM_FRAMES)]
    body = sum(map(len, frames))
    noise = int(body * garbage / (1 - garbage)) if garbage else 0
    for i, f in enumerate(frames):
        gap = noise // STREAM_FRAMES + (1 if i < noise % STREAM_FRAMES else 0)
        out += rng.randbytes(gap)
        out += f
    return bytes(out), len(frames)


def _one_round(ref: Reference, stream: bytes, seconds: float) -> float:
    """Frames/s over as many passes of ``stream`` as fit in ``seconds``."""
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    frames = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds or not frames:
        fr = ref.framer()
        for c in chunks:
            frames += len(fr.feed(c))
        elapsed = time.perf_counter() - start
    return frames / elapsed


def framer_figures(seconds_per_case: float) -> dict:
    """{framer: {"clean_frames_per_s", "garbage10_frames_per_s", "found_clean",
    "found_garbage10", "frames"}}, each rate the median of ROUNDS rounds."""
    rng = random.Random(7)
    out = {}
    for name in sorted(REFERENCE):
        ref = REFERENCE[name]
        row: dict[str, float] = {}
        for label, garbage in (("clean", 0.0), ("garbage10", 0.10)):
            stream, count = _stream(ref, garbage, rng)
            fr = ref.framer()
            found = len(fr.feed(stream)) + len(fr.flush())
            rates = [_one_round(ref, stream, seconds_per_case / ROUNDS) for _ in range(ROUNDS)]
            row[label + "_frames_per_s"] = round(statistics.median(rates))
            row["found_" + label] = found
            row["frames"] = count
        out[name] = row
    return out


if __name__ == "__main__":
    print(json.dumps(framer_figures(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0), indent=2))
