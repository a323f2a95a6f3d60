"""Fuzz the UART framers: ``python -m devtools.fuzz [--streams N] [--seconds S]``.

Each stream is valid frames spliced between garbage (random bytes, truncated and
mutated copies of frames: false starts), fed in random chunk sizes. Checked: no
exception escapes, every byte is accounted for (frames + garbage + pending), and
every valid frame spliced in comes out, in order, unless a false candidate that
itself passes the protocol's checks overlaps it (an 8-bit checksum collides 1 time
in 256; such a frame cannot be told from a real one).
The REFERENCE below re-states each protocol from PROTOCOLS.md, naively and without
agent code, so it can judge the framers; tests use it too. Uses atheris when it
imports (coverage-guided), else its own mutation loop with a fixed seed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.protocols import protocol

# --- reference protocol rules, from PROTOCOLS.md only --------------------------------


def _sum8(b: bytes) -> int:
    return sum(b) & 0xFF


def _xor(b: bytes) -> int:
    x = 0
    for c in b:
        x ^= c
    return x


def jbd_frame(reg: int, data: bytes, status: int = 0) -> bytes:
    body = bytes([status, len(data)]) + data
    chk = (0x10000 - sum(body)) & 0xFFFF
    return bytes([0xDD, reg]) + body + chk.to_bytes(2, "big") + b"\x77"


def jbd_lengths(s: bytes, p: int) -> list[int]:
    if s[p] != 0xDD or p + 4 > len(s) or s[p + 2] not in (0x00, 0x80):
        return []
    n = s[p + 3]
    out = []
    for extra in (0, 3):
        end = p + 4 + n + extra
        if end + 3 <= len(s) and s[end + 2] == 0x77:
            chk = (0x10000 - sum(s[p + 2:p + 4 + n])) & 0xFFFF
            if int.from_bytes(s[end:end + 2], "big") == chk:
                out.append(n + 7 + extra)
    return out


def daly_frame(addr: int, cmd: int, data: bytes) -> bytes:
    body = bytes([0xA5, addr, cmd, 8]) + data
    return body + bytes([_sum8(body)])


def daly_lengths(s: bytes, p: int) -> list[int]:
    ok = s[p] == 0xA5 and p + 13 <= len(s) and s[p + 3] == 8 and _sum8(s[p:p + 12]) == s[p + 12]
    return [13] if ok else []


def ninebot_frame(dev: int, kind: int, reg: int, data: bytes) -> bytes:
    body = bytes([len(data) + 2, dev, kind, reg]) + data
    ck = (sum(body) & 0xFFFF) ^ 0xFFFF
    return b"\x55\xaa" + body + ck.to_bytes(2, "little")


def ninebot_lengths(s: bytes, p: int) -> list[int]:
    if s[p:p + 2] != b"\x55\xaa" or p + 3 > len(s) or s[p + 2] < 2:
        return []
    total = s[p + 2] + 6
    if p + total > len(s):
        return []
    ck = (sum(s[p + 2:p + total - 2]) & 0xFFFF) ^ 0xFFFF
    return [total] if int.from_bytes(s[p + total - 2:p + total], "little") == ck else []


def kt_controller_frame(b1_5: bytes, b7_11: bytes) -> bytes:
    return b"\x41" + b1_5 + bytes([_xor(b1_5 + b7_11)]) + b7_11


def kt_controller_lengths(s: bytes, p: int) -> list[int]:
    f = s[p:p + 12]
    ok = len(f) == 12 and f[0] == 0x41 and _xor(f[1:6] + f[7:12]) == f[6]
    return [12] if ok else []


def kt_display_frame(b0_4: bytes, b6_10: bytes) -> bytes:
    rest = b6_10 + b"\x32\x0e"
    return b0_4 + bytes([_xor(b0_4 + rest) ^ 0x02]) + rest


def kt_display_lengths(s: bytes, p: int) -> list[int]:
    f = s[p:p + 13]
    ok = len(f) == 13 and f[11:] == b"\x32\x0e" and _xor(f[:5] + f[6:]) ^ 0x02 == f[5]
    return [13] if ok else []


SURRON_ADDRESSES = (0x0116, 0x0183)


def surron_frame(cmd: int, addr: int, param: int, data: bytes, wanted: int = 0) -> bytes:
    size = {0x46: wanted, 0x47: len(data), 0x57: len(data) + 1}[cmd]
    body = bytes([cmd]) + addr.to_bytes(2, "little") + bytes([param, size]) + data
    return body + bytes([_sum8(body)])


def surron_lengths(s: bytes, p: int) -> list[int]:
    if s[p] not in (0x46, 0x47, 0x57) or p + 5 > len(s):
        return []
    if int.from_bytes(s[p + 1:p + 3], "little") not in SURRON_ADDRESSES:
        return []
    size = s[p + 4]
    total = {0x46: 6, 0x47: 6 + size, 0x57: 5 + size}[s[p]]
    if s[p] == 0x57 and size == 0:
        return []
    ok = p + total <= len(s) and _sum8(s[p:p + total - 1]) == s[p + total - 1]
    return [total] if ok else []


def _rb(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _jbd_random(rng: random.Random) -> bytes:
    return jbd_frame(rng.choice((3, 4, 5, rng.randrange(256))), _rb(rng, rng.randrange(0, 40)),
                     rng.choice((0, 0, 0, 0x80)))


def _surron_random(rng: random.Random) -> bytes:
    cmd = rng.choice((0x46, 0x47, 0x57))
    addr = rng.choice(SURRON_ADDRESSES)
    if cmd == 0x46:
        return surron_frame(cmd, addr, rng.randrange(256), b"", rng.randrange(1, 40))
    return surron_frame(cmd, addr, rng.randrange(256), _rb(rng, rng.randrange(0, 20)))


class Reference:
    """How to make a random valid frame and how to tell, naively, where frames verify."""

    def __init__(self, name: str, options: dict[str, Any], make: Callable[[random.Random], bytes],
                 lengths: Callable[[bytes, int], list[int]]) -> None:
        self.name = name
        self.options = options
        self.make = make
        self.lengths = lengths

    def framer(self) -> Any:
        return protocol(self.name.split(":")[0], **self.options).framer()


REFERENCE = {
    "jbd": Reference("jbd", {}, _jbd_random, jbd_lengths),
    "daly": Reference("daly", {}, lambda r: daly_frame(r.choice((1, 0x40, 0x80)),
                                                      r.choice((0x90, 0x91, r.randrange(256))), _rb(r, 8)),
                      daly_lengths),
    "ninebot": Reference("ninebot", {}, lambda r: ninebot_frame(r.choice((0x20, 0x22, 0x23, 0x25)), r.choice((1, 3)),
                                                               r.randrange(256), _rb(r, r.randrange(0, 24))),
                         ninebot_lengths),
    "kt-lcd3": Reference("kt-lcd3", {}, lambda r: kt_controller_frame(_rb(r, 5), _rb(r, 5)), kt_controller_lengths),
    "kt-lcd3:display": Reference("kt-lcd3:display", {"direction": "display"},
                                 lambda r: kt_display_frame(_rb(r, 5), _rb(r, 5)), kt_display_lengths),
    "surron": Reference("surron", {}, _surron_random, surron_lengths),
}


# --- the property --------------------------------------------------------------------


def splice(frames: list[bytes], gaps: list[bytes]) -> tuple[bytes, list[int]]:
    """gaps[0] f0 gaps[1] f1 ... gaps[n]; returns the stream and each frame's offset."""
    out = bytearray()
    offsets = []
    for i, f in enumerate(frames):
        out += gaps[i]
        offsets.append(len(out))
        out += f
    out += gaps[len(frames)]
    return bytes(out), offsets


def excused(ref: Reference, stream: bytes, frames: list[bytes], offsets: list[int]) -> set[int]:
    """Indexes of spliced frames overlapped by a false candidate that passes the checks."""
    real = {(o, len(f)) for o, f in zip(offsets, frames, strict=True)}
    out: set[int] = set()
    for p in range(len(stream)):
        for length in ref.lengths(stream, p):
            if (p, length) in real:
                continue
            for i, (o, f) in enumerate(zip(offsets, frames, strict=True)):
                if p < o + len(f) and o < p + length:
                    out.add(i)
    return out


def missing(found: list[bytes], frames: list[bytes]) -> list[int]:
    """Indexes of ``frames`` not found in order (greedy subsequence match)."""
    lost = []
    j = 0
    for i, f in enumerate(frames):
        k = j
        while k < len(found) and found[k] != f:
            k += 1
        if k == len(found):
            lost.append(i)
        else:
            j = k + 1
    return lost


def feed_chunks(framer: Any, stream: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``stream`` cut at ``cuts``, then ``flush`` as a quiet line would."""
    found: list[bytes] = []
    prev = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(stream))) + [len(stream)]:
        found += framer.feed(stream[prev:cut])
        prev = cut
    if hasattr(framer, "flush"):
        found += framer.flush()
    return found


def check_stream(ref: Reference, frames: list[bytes], gaps: list[bytes], cuts: list[int]) -> None:
    """Raise AssertionError if the framer loses an unexcused frame or misplaces a byte."""
    stream, offsets = splice(frames, gaps)
    fr = ref.framer()
    found = feed_chunks(fr, stream, cuts)
    assert sum(map(len, found)) + fr.garbage_bytes + fr.pending == len(stream), "byte accounting"
    lost = missing(found, frames)
    if lost:
        # Only frames a colliding false candidate overlaps may be lost; dropping the
        # excused ones, the rest must still come out in order.
        allowed = excused(ref, stream, frames, offsets)
        keep = [f for i, f in enumerate(frames) if i not in allowed]
        assert not missing(found, keep), f"lost frames {lost} of {len(frames)} (excused {sorted(allowed)})"


def random_gap(rng: random.Random, ref: Reference) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b""
    if kind == 1:
        return _rb(rng, rng.randrange(1, 24))
    f = bytearray(ref.make(rng))
    if kind == 2:  # truncated frame: a false start
        return bytes(f[:rng.randrange(1, len(f))])
    if kind == 3:  # mutated frame
        for _ in range(rng.randrange(1, 4)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        return bytes(f)
    if kind == 4:  # a frame's start marker alone, then noise
        return bytes(f[:2]) + _rb(rng, rng.randrange(0, 8))
    return _rb(rng, rng.randrange(1, 8)) + bytes(f[:rng.randrange(1, len(f))])


def random_case(rng: random.Random, ref: Reference) -> tuple[list[bytes], list[bytes], list[int]]:
    frames = [ref.make(rng) for _ in range(rng.randrange(0, 4))]
    gaps = [random_gap(rng, ref) for _ in range(len(frames) + 1)]
    total = sum(map(len, frames)) + sum(map(len, gaps))
    cuts = [rng.randrange(total + 1) for _ in range(rng.randrange(0, 5))]
    return frames, gaps, cuts


def fuzz_one(name: str, streams: int, seconds: float, seed: int = 1) -> dict[str, float]:
    ref = REFERENCE[name]
    rng = random.Random(seed)
    start = time.perf_counter()
    deadline = start + seconds
    done = 0
    while done < streams:
        frames, gaps, cuts = random_case(rng, ref)
        check_stream(ref, frames, gaps, cuts)
        done += 1
        if done % 256 == 0 and time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    return {"streams": done, "seconds": elapsed, "streams_per_s": done / elapsed if elapsed else 0.0}


def _atheris_main(atheris: Any, names: list[str], streams: int, seconds: float) -> None:
    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        ref = REFERENCE[names[fdp.ConsumeIntInRange(0, len(names) - 1)]]
        rng = random.Random(fdp.ConsumeInt(4))
        frames = [ref.make(rng) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        gaps = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32)) for _ in range(len(frames) + 1)]
        cuts = [fdp.ConsumeIntInRange(0, 200) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        check_stream(ref, frames, gaps, cuts)

    # Coverage guidance needs the framers' bytecode instrumented; they are imported already.
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-runs={streams * len(names)}", f"-max_total_time={max(1, int(seconds))}"],
                  one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1_000_000, help="streams per framer (default 10^6)")
    ap.add_argument("--seconds", type=float, default=300.0, help="time limit per framer (default 300)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--framer", action="append", choices=sorted(REFERENCE), help="only these (repeatable)")
    ap.add_argument("--no-atheris", action="store_true", help="use the built-in mutation loop even if atheris imports")
    args = ap.parse_args(argv)
    names = args.framer or sorted(REFERENCE)
    if not args.no_atheris:
        try:
            import atheris  # type: ignore[import-not-found]
        except ImportError:
            atheris = None
        if atheris is not None:
            print(f"atheris: coverage-guided, {args.streams} runs per framer ({args.streams * len(names)} in all),"
                  f" at most {args.seconds * len(names):.0f} s")
            _atheris_main(atheris, names, args.streams, args.seconds * len(names))
            return 0
    for name in names:
        r = fuzz_one(name, args.streams, args.seconds, args.seed)
        print(f"{name:16} {r['streams']:9.0f} streams in {r['seconds']:6.1f} s: "
              f"{r['streams_per_s']:8.0f} streams/s, no failure", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
