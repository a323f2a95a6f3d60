"""``make bench``'s SD-card figures: bytes the real agent writes per hour of riding and
per hour parked.

The rig of bench_agent.py (a private mosquitto; the reference consumer acknowledging
what it stores, so acknowledged rows are deleted as in the field; the simulator on ptys
at ``--speed 1``: Bafang CAN over SLCAN at the bus's own rate, NMEA at 5 Hz, a JBD BMS
polled once a second) and ``ebike-agent run`` on its default [outbox] settings.
Riding is the ``commute`` scenario; parked is ``park``: the vehicle standing locked with
its unit powered, the controller, the BMS and the GNSS receiver still talking. Each
parked run is measured only once the agent counts the vehicle as parked (after
recorder.PARKED_AFTER_S still), and its interval spans several parked commits.

``write_bytes`` of /proc/<agent pid>/io is read at the start and the end of the interval
and scaled to an hour: the bytes the process sent towards the block layer (page-cache
pages it dirtied, the agent's log file included), which is what wears the card; the
filesystem's own journal is not in it. Where the kernel does not account it (0, as in
some containers and on some filesystems), the figure is ``wchar`` instead (bytes handed
to write(); page rounding and SQLite's mapped -shm file not seen) and ``source`` says so.
The runs of all rounds go at once (each process's counters are its own), so the section
takes one run's time.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.store.recorder import PARKED_AFTER_S
from devtools.bench_agent import START_LIMIT, AgentBenchError, rig

BAFANG_BITRATE = 250_000
RIDING_GOAL_MB_H = 20.0
PARKED_GOAL_MB_H = 1.0
# case: (simulator scenario, warm-up s before the interval)
CASES = {"riding": ("commute", 15.0), "parked": ("park", PARKED_AFTER_S + 15.0)}
FALLBACK = "wchar (write_bytes not accounted here)"


def proc_io(pid: int) -> dict[str, int]:
    """/proc/<pid>/io as numbers (rchar, wchar, write_bytes, cancelled_write_bytes, ...)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError as e:
        raise AgentBenchError(f"cannot read /proc/{pid}/io (has the agent exited?): {e}") from e
    rows = (line.split(":") for line in text.splitlines())
    return {key.strip(): int(value) for key, value in rows}


def one_run(scenario: str, seconds: float, warmup: float) -> dict[str, Any]:
    """The agent's writes over ``seconds`` of ``scenario`` after ``warmup``, per hour."""
    with rig(["--scenario", scenario], BAFANG_BITRATE, warmup + seconds + 2 * START_LIMIT) as r:
        time.sleep(warmup)
        io0, t0 = proc_io(r.agent.pid), time.monotonic()
        time.sleep(seconds)
        io1, t1 = proc_io(r.agent.pid), time.monotonic()
    per_h = 3600.0 / (t1 - t0) / 1e6
    delta = {key: io1[key] - io0[key] for key in io1}
    accounted = io1["write_bytes"] > 0
    return {"mb_per_h": (delta["write_bytes"] if accounted else delta["wchar"]) * per_h,
            "source": "write_bytes" if accounted else FALLBACK,
            "write_bytes_mb_per_h": delta["write_bytes"] * per_h, "wchar_mb_per_h": delta["wchar"] * per_h,
            "cancelled_write_mb_per_h": delta["cancelled_write_bytes"] * per_h, "interval_s": t1 - t0}


def measure(rounds: int, riding_s: float, parked_s: float, warmup_s: float | None = None) -> dict[str, Any]:
    """``rounds`` runs of each case, all at once; the median per case and every run.
    ``warmup_s`` replaces each case's warm-up (the smoke run: a parked run is then not
    yet counted as parked)."""
    seconds = {"riding": riding_s, "parked": parked_s}
    warmups = {case: warmup if warmup_s is None else warmup_s for case, (_scenario, warmup) in CASES.items()}
    with ThreadPoolExecutor(max_workers=rounds * len(CASES)) as pool:
        futures = {case: [pool.submit(one_run, scenario, seconds[case], warmups[case]) for _ in range(rounds)]
                   for case, (scenario, _warmup) in CASES.items()}
        runs = {case: [f.result() for f in fs] for case, fs in futures.items()}
    out: dict[str, Any] = {"runs": runs}
    for case, figures in runs.items():
        sources = {f["source"] for f in figures}
        out[f"sd_write_mb_per_h_{case}"] = statistics.median(f["mb_per_h"] for f in figures)
        out[f"{case}_source"] = sources.pop() if len(sources) == 1 else "mixed: " + ", ".join(sorted(sources))
        out[f"{case}_interval_s"] = seconds[case]
        out[f"{case}_warmup_s"] = warmups[case]
    return out
