"""``make bench``'s machine-independent figures: instructions counted by valgrind
(every instruction the process executes, the same on any x86-64 machine however loaded,
unlike seconds), and the CPU share of a Raspberry Pi Zero 2 W core they project to.

Kernel (``kernel_instructions_per_frame``): a child process under cachegrind
(``--tool=cachegrind --cache-sim=no``) builds the compiled kernel (``ride.new_kernel``,
the Bafang tables; the pure one where it was not built) and loads the recorded saturated
commute of the bench (devtools/ride.py, recorded natively and handed over in a pickle),
then replays it once; a second child does all of that but replays nothing. The
difference over the ride's frames (CAN + NMEA + JBD, as ``kernel_frames_per_s`` counts
them) is the kernel's cost per frame, the fusion step and window ends of a saturated bus
included; interpreter start-up, imports and set-up cancel out. The same is done for the
packed decode buffer of the DBC benchmark (``packed``: decoding alone).

Agent (``agent_instructions_per_s_saturated``, ``..._commute``): the whole ``ebike-agent
run`` process under valgrind in the rig of bench_agent.py (real mosquitto, reference
consumer acknowledging, simulator on ptys at ``--speed 1``, not instrumented), on a
saturated 1 Mbit/s bus (``--can-fill``) and on the commute at the Bafang bus's own rate.
Its instructions are counted over a window of steady traffic only: once the agent has
decoded for a warm-up, its count is zeroed and, ``seconds`` later, dumped (valgrind's
gdbserver, ``vgdb zero`` and ``vgdb dump``). That needs callgrind: cachegrind (3.19)
counts the same instructions (Ir) but only reports at exit, and the difference of two
runs of different lengths that it allows proved noisy (start-up under valgrind takes a
varying time, with a varying number of status polls and idle turns in it). Instructions
per second of bus traffic = instructions in the window / (CAN frames the agent counted
in it, from its control socket just before and after / the bus's frame rate). Under
valgrind the agent runs ~50x slower; if it falls behind a saturated bus it still pays
every frame it took, but its per-second work (the 10 Hz fusion step, window ends, the
uplink) then spans more wall seconds than the traffic it consumed, so the figure errs
high, never low; ``kept_up`` (bus seconds consumed / wall seconds of the window) says
how far it fell behind.

Projection: instructions per second / (clock x IPC). The Pi Zero 2 W has Cortex-A53
cores at 1 GHz: in-order, dual-issue, small caches; on interpreter code (branchy, many
dependent loads) such a core retires about 0.6-0.8 instructions per cycle, and we
assume 0.7 (``A53_IPC``). The count is x86-64 instructions, taken as a proxy for AArch64
ones (RISC code runs a little longer, so read the projection as +/- 20 %).
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from devtools import ride
from devtools.bench_agent import CAN_BITRATE, AgentBenchError, rig
from devtools.bench_writes import BAFANG_BITRATE
from devtools.broker import BrokerMissing
from devtools.procs import REPO, stop
from firmware_sim.scenario import COMMUTE_CAN, STEPS_PER_S

A53_HZ = 1e9
A53_IPC = 0.7           # Cortex-A53 on interpreter code: ~0.6-0.8 (in-order, dual issue)
PI_ZERO2_SATURATED_GOAL_PCT = 10.0
PI_ZERO2_COMMUTE_GOAL_PCT = 2.0
# The Bafang bus's own CAN frames per second in the commute (64): messages every `period` steps.
COMMUTE_CAN_FPS = sum(STEPS_PER_S / period for _kind, period, _offset, _encode in COMMUTE_CAN)
CACHEGRIND = ("valgrind", "--tool=cachegrind", "--cache-sim=no")
CALLGRIND = ("valgrind", "--tool=callgrind")
VALGRIND_START_LIMIT = 120.0   # the agent's start-up under valgrind, on a shared machine
VALGRIND_STOP_LIMIT = 120.0


# The figures bench.py puts in its summary.
SUMMARY_KEYS = ("kernel_instructions_per_frame", "agent_instructions_per_s_saturated",
                "agent_instructions_per_s_commute", "pi_zero2_cpu_pct_saturated", "pi_zero2_cpu_pct_commute")


class InstrError(Exception):
    """valgrind is missing or a counted run failed."""


def valgrind_missing() -> str | None:
    """Why the instruction counts cannot be taken here, or None."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian package valgrind; make bench installs it)"
    return None


def _total(out_file: Path) -> int:
    """The ``summary:`` line of a cachegrind or callgrind output file: instructions
    executed (Ir)."""
    try:
        for line in out_file.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    except OSError as e:
        raise InstrError(f"no cachegrind output {out_file}: {e}") from e
    raise InstrError(f"no summary line in {out_file}")


def _counted(args: list[str], out_file: Path) -> int:
    """Instructions of ``python -m devtools.bench_instr ARGS`` under cachegrind."""
    proc = subprocess.run([*CACHEGRIND, f"--cachegrind-out-file={out_file}", sys.executable, "-m",
                           "devtools.bench_instr", *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise InstrError(f"counted run {args} exited with {proc.returncode}: {proc.stderr[-1500:]}")
    return _total(out_file)


def _kernel_child(what: str, path: str, replays: int) -> None:
    """The counted child: set-up of the compiled kernel and its input, then ``replays``
    passes over it (0: the baseline)."""
    from agent.fusion.kernel import KERNELS

    data = pickle.loads(Path(path).read_bytes())
    k, slots = ride.new_kernel(KERNELS["c" if "c" in KERNELS else "py"])
    for _ in range(replays):
        if what == "ride":
            ride.replay(k, slots, data)
        else:
            for chunk in data:
                k.feed_packed(chunk, 1.0)


def _per_frame(tmp: Path, what: str, data: Any, frames: int) -> dict[str, Any]:
    """Instructions per frame of ``what`` (its pickled input ``data``): replayed once
    minus replayed never, over its frames."""
    path = tmp / f"{what}.pickle"
    path.write_bytes(pickle.dumps(data))
    base = _counted(["kernel", what, str(path), "0"], tmp / f"{what}-0.cg")
    once = _counted(["kernel", what, str(path), "1"], tmp / f"{what}-1.cg")
    return {"instructions_per_frame": (once - base) / frames, "frames": frames, "baseline_instructions": base,
            "instructions": once - base}


def kernel_figures(saturated: ride.Recorder, packed_reads: list[bytes], packed_frames: int) -> dict[str, Any]:
    """Instructions per frame of the compiled kernel on the recorded saturated ride and
    on the packed decode buffer."""
    with tempfile.TemporaryDirectory(prefix="ebike-instr-") as tmp:
        return {"ride": _per_frame(Path(tmp), "ride", saturated.calls, ride.frames(saturated)),
                "packed": _per_frame(Path(tmp), "packed", packed_reads, packed_frames)}


def _frames(sock: Path) -> int:
    """CAN frames the agent's kernel counted (control socket status)."""
    from agent.control.client import request

    return int(request(str(sock), timeout=30.0)["status"]["fusion"]["frames"])


def _vgdb(pid: int, command: str) -> None:
    """A monitor command to the valgrind tool running process ``pid``."""
    try:
        proc = subprocess.run(["vgdb", f"--pid={pid}", command], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstrError(f"vgdb {command} to {pid} did not run: {e}") from e
    if proc.returncode != 0:
        raise InstrError(f"vgdb {command} to {pid} failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-500:]}")


def _agent_window(sim_args: list[str], bitrate: int, rate: float, warmup_s: float, seconds: float,
                  out_dir: Path) -> dict[str, Any]:
    """Instructions of the agent over ``seconds`` of traffic after ``warmup_s`` of decoding."""
    wrapper = (*CALLGRIND, f"--callgrind-out-file={out_dir}/agent.%p")
    with rig(sim_args, bitrate, VALGRIND_START_LIMIT + warmup_s + seconds + VALGRIND_STOP_LIMIT,
             agent_wrapper=wrapper, start_limit=VALGRIND_START_LIMIT) as r:
        time.sleep(warmup_s)
        frames0 = _frames(r.sock)
        _vgdb(r.agent.pid, "zero")
        t0 = time.monotonic()
        time.sleep(seconds)
        _vgdb(r.agent.pid, "dump")
        wall_s = time.monotonic() - t0
        frames1 = _frames(r.sock)
        stop(r.agent, VALGRIND_STOP_LIMIT)
    dumps = sorted(out_dir.glob(f"agent.{r.agent.pid}.*"))
    if len(dumps) != 1:
        raise InstrError(f"expected one callgrind dump of the window, found {[d.name for d in dumps]}")
    instructions = _total(dumps[0])
    bus_s = (frames1 - frames0) / rate
    if bus_s <= 0:
        raise InstrError(f"the agent decoded no CAN frame in the {wall_s:.1f} s window")
    per_s = instructions / bus_s
    return {"instructions_per_s": per_s, "instructions": instructions, "frames": frames1 - frames0, "bus_s": bus_s,
            "wall_s": wall_s, "kept_up": bus_s / wall_s, "frame_rate_sent": rate, "warmup_s": warmup_s,
            "pi_zero2_cpu_pct": pi_zero2_pct(per_s)}


def pi_zero2_pct(instructions_per_s: float) -> float:
    """Projected share of one Pi Zero 2 W core (A53_HZ x A53_IPC instructions a second)."""
    return 100.0 * instructions_per_s / (A53_HZ * A53_IPC)


def agent_figures(fill: int, warmup_s: float, seconds: float) -> dict[str, Any]:
    """The agent counted on a saturated bus (``fill`` CAN frames/s) and on the commute;
    a case that failed is ``{"error": ...}``."""
    cases = {"saturated": (["--can-fill", str(fill)], CAN_BITRATE, float(fill)),
             "commute": (["--scenario", "commute"], BAFANG_BITRATE, COMMUTE_CAN_FPS)}
    out: dict[str, Any] = {}
    for name, (sim_args, bitrate, rate) in cases.items():
        with tempfile.TemporaryDirectory(prefix="ebike-instr-") as tmp:
            try:
                out[name] = _agent_window(sim_args, bitrate, rate, warmup_s, seconds, Path(tmp))
            except (InstrError, AgentBenchError, AgentError, BrokerMissing, AssertionError) as e:
                out[name] = {"error": str(e)}
    return out


def measure(saturated: ride.Recorder, packed_reads: list[bytes], packed_frames: int, fill: int,
            warmup_s: float, seconds: float) -> dict[str, Any]:
    """Every instruction figure, and the summary keys; ``{"error": ...}`` without valgrind."""
    missing = valgrind_missing()
    if missing:
        return {"error": missing}
    try:
        kernel = kernel_figures(saturated, packed_reads, packed_frames)
    except InstrError as e:
        kernel = {"error": str(e)}
    agent = agent_figures(fill, warmup_s, seconds)
    out: dict[str, Any] = {"kernel": kernel, "agent": agent, "a53_ipc": A53_IPC, "a53_hz": A53_HZ,
                           "commute_can_frames_per_s": COMMUTE_CAN_FPS}
    out["kernel_instructions_per_frame"] = kernel["ride"]["instructions_per_frame"] if "ride" in kernel else None
    for name, case in agent.items():
        out[f"agent_instructions_per_s_{name}"] = case.get("instructions_per_s")
        out[f"pi_zero2_cpu_pct_{name}"] = case.get("pi_zero2_cpu_pct")
    errors = [f"kernel: {kernel['error']}"] if "error" in kernel else []
    errors += [f"{name}: {case['error']}" for name, case in agent.items() if "error" in case]
    if errors:
        out["error"] = "; ".join(errors)
    return out


def report(instr: dict[str, Any]) -> None:
    """Print the figures with their goals, as bench.py prints the others."""
    if "kernel_instructions_per_frame" not in instr:
        print(f"error: no instruction counts: {instr['error']}", file=sys.stderr)
        return
    kernel = instr["kernel"]
    if "error" in kernel:
        print(f"error: no kernel instruction counts: {kernel['error']}", file=sys.stderr)
    else:
        print(f"kernel_instructions_per_frame: {instr['kernel_instructions_per_frame']:,.0f} (compiled kernel, "
              f"recorded saturated ride, fusion step and windows included; packed decode buffer alone "
              f"{kernel['packed']['instructions_per_frame']:,.0f}; cachegrind, set-up subtracted)")
    goals = {"saturated": PI_ZERO2_SATURATED_GOAL_PCT, "commute": PI_ZERO2_COMMUTE_GOAL_PCT}
    for name, case in instr["agent"].items():
        if "error" in case:
            print(f"error: no agent instruction count ({name}): {case['error']}", file=sys.stderr)
            continue
        print(f"agent_instructions_per_s_{name}: {case['instructions_per_s']:,.0f} (whole ebike-agent run per "
              f"second of bus traffic, counted over {case['bus_s']:.1f} s of it after {case['warmup_s']:g} s; "
              f"kept up {100 * case['kept_up']:.0f} %)")
        print(f"pi_zero2_cpu_pct_{name}: {case['pi_zero2_cpu_pct']:.2f} % (goal <= {goals[name]:g} %; "
              f"projected: 1 GHz Cortex-A53 at an assumed IPC of {A53_IPC:g})")


def main(argv: list[str]) -> int:
    """The counted child: ``kernel ride|packed PICKLE REPLAYS``."""
    if len(argv) != 4 or argv[0] != "kernel" or argv[1] not in ("ride", "packed"):
        print("usage: python -m devtools.bench_instr kernel ride|packed PICKLE REPLAYS", file=sys.stderr)
        return 2
    _kernel_child(argv[1], argv[2], int(argv[3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
