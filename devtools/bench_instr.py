"""``make bench``'s machine-independent figures: instructions counted by valgrind's
cachegrind (``--tool=cachegrind --cache-sim=no``: every instruction the process executes,
the same on any x86-64 machine however loaded, unlike seconds), and the CPU share of a
Raspberry Pi Zero 2 W core they project to.

Kernel (``kernel_instructions_per_frame``): a child process under cachegrind builds the
compiled kernel (``ride.new_kernel``, the Bafang tables) and loads the recorded saturated
commute of the bench (devtools/ride.py, recorded here natively and handed over in a
pickle), then replays it once; a second child does all of that but replays nothing. The
difference over the ride's frames (CAN + NMEA + JBD, as ``kernel_frames_per_s`` counts
them) is the kernel's cost per frame, the fusion step and window ends of a saturated bus
included; interpreter start-up, imports and set-up cancel out. The same is done for the
packed decode buffer of the DBC benchmark (``decode_packed_instructions_per_frame``).

Agent (``agent_instructions_per_s_saturated``, ``..._commute``): the whole ``ebike-agent
run`` process under cachegrind in the rig of bench_agent.py (real mosquitto, reference
consumer acknowledging, simulator on ptys at ``--speed 1``, not instrumented), on a
saturated 1 Mbit/s bus (``--can-fill``) and on the commute at the Bafang bus's own rate.
Two runs of each, of different lengths of traffic: a run waits until the agent decodes,
lets traffic flow for its length, stops the simulator, waits until the agent's frame
count stands still, reads it (control socket) and stops the agent (SIGTERM; cachegrind
writes its count at exit). Start-up, the wait for the first frame and shutdown are the
same in both runs, so (instructions of the long run - of the short one) / (seconds of
bus traffic the agent consumed more) is the agent's cost per second of riding, where
seconds of traffic = CAN frames the agent counted / the bus's frame rate. Under valgrind
the agent runs ~50x slower; if it falls behind a saturated bus it still pays every
frame it took, but its per-second work (the 10 Hz fusion step, window ends, the
uplink) then spans more wall seconds than the traffic it consumed, so the figure errs
high, never low; ``kept_up`` (frames consumed / frames sent in the extra time) says how
far it fell behind.

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
from devtools.procs import REPO, stop, wait_for
from firmware_sim.scenario import COMMUTE_CAN, STEPS_PER_S

A53_HZ = 1e9
A53_IPC = 0.7           # Cortex-A53 on interpreter code: ~0.6-0.8 (in-order, dual issue)
PI_ZERO2_SATURATED_GOAL_PCT = 10.0
PI_ZERO2_COMMUTE_GOAL_PCT = 2.0
# The Bafang bus's own CAN frames per second in the commute (64): messages every `period` steps.
COMMUTE_CAN_FPS = sum(STEPS_PER_S / period for _kind, period, _offset, _encode in COMMUTE_CAN)
CACHEGRIND = ("valgrind", "--tool=cachegrind", "--cache-sim=no")
VALGRIND_START_LIMIT = 120.0   # the agent's start-up under valgrind, on a shared machine
VALGRIND_STOP_LIMIT = 120.0
SETTLE_S = 1.0                 # the frame count standing still this long: the agent has drained the pty


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
    """The ``summary:`` line of a cachegrind output file: instructions executed (Ir)."""
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
    k, slots = ride.new_kernel(KERNELS["c"])
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


def _settled(sock: Path) -> int:
    """The agent's frame count once it stands still for SETTLE_S (the simulator stopped)."""
    last = [-1]

    def still() -> int | None:
        now = _frames(sock)
        if now == last[0]:
            return now
        last[0] = now
        time.sleep(SETTLE_S)
        return None

    return int(wait_for("the agent to drain its input", still, VALGRIND_STOP_LIMIT))


def _agent_run(sim_args: list[str], bitrate: int, seconds: float, out_file: Path) -> dict[str, Any]:
    """One counted run of the agent: ``seconds`` of traffic after it first decodes."""
    wrapper = (*CACHEGRIND, f"--cachegrind-out-file={out_file}")
    with rig(sim_args, bitrate, VALGRIND_START_LIMIT + seconds + VALGRIND_STOP_LIMIT, agent_wrapper=wrapper,
             start_limit=VALGRIND_START_LIMIT) as r:
        first = _frames(r.sock)
        t0 = time.monotonic()
        time.sleep(seconds)
        stop(r.sim)
        traffic_s = time.monotonic() - t0
        frames = _settled(r.sock)
        code = stop(r.agent, VALGRIND_STOP_LIMIT)
        if code != 0:
            raise AgentBenchError(f"the agent under valgrind exited with {code}")
    return {"instructions": _total(out_file), "frames": frames, "frames_at_first_status": first,
            "traffic_s": traffic_s}


def _agent_case(sim_args: list[str], bitrate: int, rate: float, short_s: float, long_s: float,
                tmp: Path, name: str) -> dict[str, Any]:
    """Instructions per second of bus traffic: the long run minus the short one."""
    short = _agent_run(sim_args, bitrate, short_s, tmp / f"{name}-short.cg")
    long = _agent_run(sim_args, bitrate, long_s, tmp / f"{name}-long.cg")
    bus_s = (long["frames"] - short["frames"]) / rate
    if bus_s <= 0:
        raise InstrError(f"{name}: the long run consumed no more traffic than the short one ({short}, {long})")
    per_s = (long["instructions"] - short["instructions"]) / bus_s
    return {"instructions_per_s": per_s, "bus_s": bus_s, "frame_rate_sent": rate,
            "kept_up": bus_s / (long["traffic_s"] - short["traffic_s"]),
            "pi_zero2_cpu_pct": pi_zero2_pct(per_s), "runs": {"short": short, "long": long}}


def pi_zero2_pct(instructions_per_s: float) -> float:
    """Projected share of one Pi Zero 2 W core (A53_HZ x A53_IPC instructions a second)."""
    return 100.0 * instructions_per_s / (A53_HZ * A53_IPC)


def agent_figures(fill: int, short_s: float, long_s: float) -> dict[str, Any]:
    """The agent counted on a saturated bus (``fill`` CAN frames/s) and on the commute;
    a case that failed is ``{"error": ...}``."""
    cases = {"saturated": (["--can-fill", str(fill)], CAN_BITRATE, float(fill)),
             "commute": (["--scenario", "commute"], BAFANG_BITRATE, COMMUTE_CAN_FPS)}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ebike-instr-") as tmp:
        for name, (sim_args, bitrate, rate) in cases.items():
            try:
                out[name] = _agent_case(sim_args, bitrate, rate, short_s, long_s, Path(tmp), name)
            except (InstrError, AgentBenchError, AgentError, BrokerMissing, AssertionError) as e:
                out[name] = {"error": str(e)}
    return out


def measure(saturated: ride.Recorder, packed_reads: list[bytes], packed_frames: int, fill: int,
            short_s: float, long_s: float) -> dict[str, Any]:
    """Every instruction figure, and the summary keys; ``{"error": ...}`` without valgrind."""
    missing = valgrind_missing()
    if missing:
        return {"error": missing}
    try:
        kernel = kernel_figures(saturated, packed_reads, packed_frames)
    except InstrError as e:
        kernel = {"error": str(e)}
    agent = agent_figures(fill, short_s, long_s)
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
              f"second of bus traffic, {case['bus_s']:.1f} s more consumed by the long run; kept up "
              f"{100 * case['kept_up']:.0f} %)")
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
