"""``ebike-agent status`` and ``alarms`` as a technician reads them: from reply dicts
(the rendering alone), and against the workshop's agent fed by the simulator (piped,
so plain text: at most 80 columns, every section there, exit codes scripts rely on)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import alarms_cmd, status, view
from agent.control.client import request
from agent.fusion.spec import ALARMS, PARAMS
from devtools.broker import Mosquitto
from tests.helpers import REPO, wait_for
from tests.workshop import Workshop

NOW = 1_700_000_000.0
VERDICT = "no valid frame in 10 s: 1,240 bytes of something else that look like nmea: cable of another device?"


def one_line(text: str) -> str:
    """The text with its wrapping undone, to find a phrase a long line was wrapped in."""
    return " ".join(text.split())


def assert_fits(text: str) -> None:
    wide = [line for line in text.splitlines() if len(line) > view.WIDTH]
    assert not wide, f"wider than {view.WIDTH} columns: {wide}"


def status_reply() -> dict[str, Any]:
    """A status as docs/control.md words it: the BMS cable in the GNSS port, an alarm,
    the outbox on memory, the broker refusing."""
    return {
        "device_id": "bike-7", "version": "1.2.3", "kernel": "c", "pid": 4242, "started_at": NOW - 7260,
        "uptime": 7260.0, "frames_per_s": 130.0,
        "motion": {"verdict": "still", "why": "wheel 0.0 km/h: still"},
        "sources": [
            {"name": "gnss", "kind": "uart", "port": "/dev/ttyUSB0", "protocol": "nmea", "open": True,
             "last_error": None, "frames_per_s": 0.0, "bytes_per_s": 124.0, "last_frame_at": None,
             "bad_frames": {"garbage bytes": 1240}, "verdict": {"ok": False, "text": VERDICT},
             "heard": [{"protocol": "jbd", "frames": 12}]},
            {"name": "can0", "kind": "slcan", "port": "/dev/ttyACM0", "protocol": "bafang-can", "open": True,
             "last_error": None, "frames_per_s": 128.0, "bytes_per_s": 2600.0, "last_frame_at": NOW - 0.2,
             "bad_frames": {}, "verdict": {"ok": True, "text": "ok: 128 frames/s"}, "heard": []},
        ],
        "health": [
            {"slot": 1, "source": "can0", "message": "Controller_32_01", "can_id": "0x02F83201", "frames": 1596,
             "period_s": 0.125, "timeouts": 0, "timed_out": False, "checksum_errors": 0, "counter_errors": 0,
             "age_s": 0.1},
            {"slot": 7, "source": "gnss", "message": "nmea", "can_id": None, "frames": 0, "period_s": 0.0,
             "timeouts": 3, "timed_out": True, "checksum_errors": 2, "counter_errors": 0, "age_s": 95.0},
        ],
        "alarms": [{"name": "controller_fault", "code": 9, "level": 3, "since": NOW - 125, "value": 33.0,
                    "source": "can0"}],
        "outbox": {"depth": {"live": 1200, "history": 40, "event": 0, "alarm": 2}, "records": 1242,
                   "bytes": 2_400_000, "oldest": NOW - 3600,
                   "storage_failed": {"cause": "permission denied", "since": NOW - 60, "memory_only": True}},
        "uplink": {"connected": False, "connected_since": None, "last_ack_at": NOW - 600, "ack_rate": 0.0,
                   "drain_s": None, "last_error": "connection refused: wrong host or port?",
                   "last_error_at": "2023-11-14T22:12:20Z", "last_error_age_s": 5.0, "batches_sent": 120,
                   "batches_acked": 118, "batches_failed": 2},
        "clock": {"source": "system", "synchronized": True, "gnss_offset_s": 0.25, "gnss_source": "gnss",
                  "gnss_at": NOW - 1},
    }


def rendered(st: dict[str, Any]) -> str:
    out = io.StringIO()
    status.render(st, out)
    return out.getvalue()


def test_status_text_names_the_fault_first_class() -> None:
    """The verdict in words, the alarm, health by message name and CAN id, the storage
    failure, the uplink's error in words with its time, all local times with ages."""
    text = rendered(status_reply())
    assert_fits(text)
    flat = one_line(text)
    assert f"FAULT: {VERDICT}" in flat
    assert "the bytes look like: jbd (12 frames)" in flat
    assert "OK: 128 frames/s" in flat
    assert "bad frames: garbage bytes 1,240" in flat
    assert "kernel compiled (c)" in flat and "up 2 h 1 min" in flat
    assert "ACTIVE ALARMS (1)" in flat
    assert f"level 3 controller_fault on can0: value 33, since {view.when(NOW - 125, NOW)}" in flat
    health = [line.split() for line in text.splitlines() if line.startswith(("Controller_32_01", "nmea "))]
    assert health == [["Controller_32_01", "0x02F83201", "can0", "1,596", "0.12", "s", "0.1", "s", "ok"],
                      ["nmea", "-", "gnss", "0", "-", "95", "s", "TIMED", "OUT"]]
    assert "nmea (gnss): 3 timeouts, 2 checksum errors" in flat
    assert "slot" not in text
    assert "1,242 records waiting (live 1,200, history 40, event 0, alarm 2), 2.4 MB" in flat
    assert "IN MEMORY ONLY (storage failed: permission denied)" in flat
    assert "NOT CONNECTED" in flat
    assert f"last error {view.when(NOW - 5, NOW)}: connection refused: wrong host or port?" in flat
    assert f"last ack {view.when(NOW - 600, NOW)}" in flat
    assert "synchronized (NTP)" in flat and "+0.25 s" in flat
    # Every section, in the order a technician reads them.
    order = [flat.index(h) for h in ("SOURCES", "ACTIVE ALARMS", "HEALTH", "OUTBOX", "UPLINK", "CLOCK")]
    assert order == sorted(order)


def test_status_text_of_a_healthy_agent_without_the_new_fields() -> None:
    """An agent that gives less (no clock, no verdict yet) still renders, saying none."""
    st = status_reply()
    st.update(alarms=[], health=[])
    del st["clock"]
    for s in st["sources"]:
        del s["verdict"]
    st["outbox"]["storage_failed"] = None
    text = rendered(st)
    assert_fits(text)
    assert "ACTIVE ALARMS (0)\n  none" in text
    assert "CLOCK" not in text and "IN MEMORY ONLY" not in text


def alarms_reply() -> dict[str, Any]:
    return {"active": [{"name": "over_speed", "code": 1, "level": 1, "since": NOW - 30, "value": 31.5,
                        "source": None},
                       {"name": "controller_fault", "code": 9, "level": 3, "since": NOW - 3000, "value": 33.0,
                        "source": "can0"}],
            "recent": [{"t": NOW - 90, "name": "soc_low", "instance": -1, "level": 1, "raised": True,
                        "value": 9.5, "threshold": 10.0, "source": None},
                       {"t": NOW - 45, "name": "soc_low", "instance": -1, "level": 1, "raised": False,
                        "value": 15.5, "threshold": 15.0, "source": None},
                       {"t": NOW - 30, "name": "over_speed", "instance": -1, "level": 1, "raised": True,
                        "value": 30.5, "threshold": 20.0, "source": None}]}


def test_alarms_text_shows_what_fired_them() -> None:
    """The worst first; an alarm raised within the history shows the value and the
    (configured) threshold of its raise, one older than the history the catalogue's."""
    out = io.StringIO()
    alarms_cmd.render(alarms_reply(), NOW, out)
    text = out.getvalue()
    assert_fits(text)
    flat = one_line(text)
    fault = next(r for r in ALARMS if r[1] == "controller_fault")
    assert (f"ACTIVE ALARMS (2) level 3 controller_fault on can0: value 33 (default: fires > {fault[5]:g} "
            f"(clear {fault[6]:g})); since {view.when(NOW - 3000, NOW)}") in flat
    assert (f"level 1 over_speed: value 31.5 (raised at 30.5, threshold 20); since {view.when(NOW - 30, NOW)}"
            in flat)
    assert "stop / call for help: " in flat
    assert "RECENT RAISES AND CLEARS (3, oldest first)" in flat
    events = re.findall(r" ago +(RAISED|cleared) +(\w+) ", text)
    assert events == [("RAISED", "soc_low"), ("cleared", "soc_low"), ("RAISED", "over_speed")]
    assert f"{view.when(NOW - 90, NOW)} RAISED soc_low (level 1): value 9.5, threshold 10" in flat
    assert "cleared soc_low (level 1): value 15.5, threshold 15" in flat


def test_catalogue_text_has_every_alarm_and_tunable_within_80_columns() -> None:
    out = io.StringIO()
    alarms_cmd.catalogue(out)
    text = out.getvalue()
    assert_fits(text)
    names = [line.split()[1] for line in text.splitlines() if line[:3].strip().isdigit()]
    assert names == [row[1] for row in ALARMS]
    for name, default, unit, _why in PARAMS:
        assert f"{name} = {default:g} {unit}:" in text


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m agent ARGS`` with no agent needed."""
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_catalogue_json_and_markdown_keep_their_output(tmp_path: Path) -> None:
    """docs/fusion.md is ``alarms --markdown``; ``--catalogue --json`` is the catalogue
    as before; neither needs an agent."""
    md = cli("alarms", "--markdown")
    assert md.returncode == 0 and md.stdout == (Path(__file__).parents[1] / "docs" / "fusion.md").read_text()
    js = cli("alarms", "--catalogue", "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert [a["name"] for a in doc["alarms"]] == [r[1] for r in ALARMS]
    assert [p["name"] for p in doc["params"]] == [p[0] for p in PARAMS]
    text = cli("alarms", "--catalogue", "--socket", str(tmp_path / "none.sock"))
    assert text.returncode == 0 and "TUNABLES" in text.stdout


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("alarms",), ("alarms", "--json"),
                                  ("watch", "--count", "1"), ("frames", "--count", "1")])
def test_no_agent_is_exit_3(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = cli(*args, "--socket", str(tmp_path / "no-such.sock"))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no agent answering on ") and str(tmp_path / "no-such.sock") in proc.stderr


# --- against the workshop's agent ---------------------------------------------------------

# over_speed fires at a walking pace, so the commute raises it within seconds.
OVER_SPEED = "[alarms.over_speed]\nthreshold = 5.0\nclear = 4.0\ndelay = 0.5\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Workshop]:
    """One bench for the module: an agent on the simulator, over_speed raised."""
    bench = Workshop(tmp_path_factory.mktemp("bench"), mosquitto, extra=OVER_SPEED)
    try:
        bench.start_agent()
        wait_for("over_speed raised", lambda: any(
            a["name"] == "over_speed" for a in request(str(bench.socket), "alarms")["active"]), 60)
        yield bench
    finally:
        bench.close()


def test_status_against_the_simulator(bench: Workshop) -> None:
    """Piped: plain text within 80 columns; every source's verdict (all good on the
    bench), the active alarm, health by message name and CAN id."""
    proc = bench.cli("status", "--config", str(bench.config))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert_fits(text)
    assert "\x1b[" not in text, "colour codes in piped output"
    flat = one_line(text)
    kernel = "pure Python" if os.environ.get("EBIKE_AGENT_PUREPYTHON") == "1" else "compiled (c)"
    assert "workshop-bike-1: ebike-agent " in flat and f"kernel {kernel}" in flat
    for name, protocol in (("gnss", "nmea"), ("can0", "bafang-can"), ("bms", "jbd")):
        head = next(i for i, line in enumerate(text.splitlines()) if line.startswith(f"{name}  "))
        block = text.splitlines()[head:head + 2]
        assert block[0].endswith(f"  {protocol}  open") and block[1].startswith("  OK: "), block
    assert "ACTIVE ALARMS (1)" in flat and "over_speed: value " in flat
    rows = {line.split()[0]: line.split() for line in text.splitlines()[text.splitlines().index("HEALTH (messages)"):]
            if line.split() and line.split()[0] in ("Controller_32_01", "Battery_34_01", "nmea", "jbd")}
    assert rows["Controller_32_01"][1:3] == ["0x02F83201", "can0"]
    assert rows["Battery_34_01"][1:3] == ["0x04F83401", "can0"]
    assert rows["nmea"][1:3] == ["-", "gnss"] and rows["jbd"][1:3] == ["-", "bms"]
    assert "UPLINK" in text and "connected since " in flat


def test_status_json_round_trips(bench: Workshop) -> None:
    """``--json`` is the agent's status as it is: the same document the socket gives,
    and the text view renders it as it renders the agent's own."""
    proc = bench.cli("status", "--json", "--socket", str(bench.socket))
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    direct = bench.status()
    assert set(printed) == set(direct)
    assert [s["name"] for s in printed["sources"]] == [s["name"] for s in direct["sources"]]
    assert printed["device_id"] == "workshop-bike-1" and printed["started_at"] == direct["started_at"]
    assert "ACTIVE ALARMS (1)" in rendered(printed)


def test_alarms_against_the_simulator(bench: Workshop) -> None:
    proc = bench.cli("alarms", "--config", str(bench.config))
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout)
    flat = one_line(proc.stdout)
    assert "ACTIVE ALARMS (1) level 1 over_speed: value " in flat
    fired = re.search(r"over_speed: value [0-9.]+ \(raised at ([0-9.]+), threshold 5\)", flat)
    assert fired and float(fired.group(1)) > 5.0, flat
    raised = re.search(r" RAISED over_speed \(level 1\): value ([0-9.]+), threshold 5(?: |$)", flat)
    assert raised and raised.group(1) == fired.group(1), flat
    js = bench.cli("alarms", "--json", "--socket", str(bench.socket))
    doc = json.loads(js.stdout)
    assert [a["name"] for a in doc["active"]] == ["over_speed"]
    assert any(r["name"] == "over_speed" and r["raised"] and r["threshold"] == 5.0 for r in doc["recent"])
    assert time.time() - doc["active"][0]["since"] < 600
