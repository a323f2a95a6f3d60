"""The agent's side of the technicians' toolkit (agent/diagnostics.py, the control
socket's requests, docs/control.md): the tap, the verdicts, health by message name,
the live values, the clock against GNSS time."""

from __future__ import annotations

import base64
import calendar
import json
import re
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.control.client import request
from agent.control.server import ControlServer
from agent.diagnostics import TAP_KEEP_S, TAP_PER_SOURCE, TAP_REPLY_BYTES, Tap, _newest_rmc
from agent.errors import AgentError, AgentUnreachable, DecodeError
from agent.protocols import nmea
from devtools.broker import Mosquitto
from tests.helpers import log_has, spawn, stop, wait_for
from tests.workshop import Workshop, workshop_config


def _sentence(body: str) -> bytes:
    x = 0
    for c in body:
        x ^= ord(c)
    return f"${body}*{x:02X}\r\n".encode()


def test_tap_keeps_nothing_until_asked_then_follows_a_cursor() -> None:
    tap = Tap(2)
    tap.record(0, 1.0, b"before anyone asked")
    cursor, chunks, lost = tap.take(None, [0, 1])
    assert (chunks, lost) == ([], False)
    tap.record(0, 2.0, b"a")
    tap.record(1, 2.1, b"b")
    tap.record(0, 2.2, b"c")
    cursor, chunks, lost = tap.take(cursor, [0, 1])
    assert [(i, data) for _, i, _, data in chunks] == [(0, b"a"), (1, b"b"), (0, b"c")]
    assert not lost
    tap.record(1, 3.0, b"d")
    cursor2, chunks, _ = tap.take(cursor, [0])  # source 1 not wanted
    assert chunks == [] and cursor2 == cursor + 1
    tap.until = 0.0  # nobody asked for longer than TAP_ARMED_S
    tap.record(0, 4.0, b"e")
    assert tap.size == [0, 0] and all(not q for q in tap.chunks)


def test_tap_bounds_each_source_and_says_what_was_lost() -> None:
    tap = Tap(1)
    cursor, _, _ = tap.take(None, [0])
    block = b"x" * (TAP_PER_SOURCE // 4)
    for i in range(6):
        tap.record(0, float(i), block)
    assert tap.size[0] <= TAP_PER_SOURCE
    total = 0
    lost_seen = False
    for _ in range(10):
        cursor, chunks, lost = tap.take(cursor, [0])
        lost_seen |= lost
        size = sum(len(c[3]) for c in chunks)
        assert size <= max(TAP_REPLY_BYTES, len(block))
        total += len(chunks)
        if not chunks:
            break
    assert lost_seen and total == 4  # the 2 oldest were dropped, the 4 newest all delivered


def test_tap_drops_reads_older_than_it_keeps_and_says_so() -> None:
    """A follower that stops asking for longer than TAP_KEEP_S finds its reads gone (and
    is told); each request scans only what is kept, never a long session's worth."""
    tap = Tap(1)
    cursor, _, _ = tap.take(None, [0])
    for k in range(100):
        tap.record(0, 1000.0 + k * 0.5, b"%d" % k)  # 50 s of reads
    assert len(tap.chunks[0]) == int(TAP_KEEP_S / 0.5) + 1
    cursor, chunks, lost = tap.take(cursor, [0])
    assert lost and chunks[0][3] == b"%d" % (99 - int(TAP_KEEP_S / 0.5)) and chunks[-1][3] == b"99"
    tap.record(0, 1050.0, b"next")
    assert tap.take(cursor, [0])[1:] == ([(cursor + 1, 0, 1050.0, b"next")], False)


def test_rmc_time_and_date_give_the_epoch() -> None:
    s = _sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W")
    assert nmea.rmc_utc(s.strip()) == calendar.timegm((1994, 3, 23, 12, 35, 19))
    s = _sentence("GNRMC,235959.50,A,4807.038,N,01131.000,E,0.0,0.0,311226,,")
    assert nmea.rmc_utc(s.strip()) == calendar.timegm((2026, 12, 31, 23, 59, 59)) + 0.5
    assert nmea.rmc_utc(_sentence("GNRMC,120000,V,,,,,,,311226,,").strip()) is None  # no fix
    assert nmea.rmc_utc(_sentence("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,").strip()) is None
    with pytest.raises(DecodeError, match="bad date"):
        nmea.rmc_utc(_sentence("GPRMC,123519,A,4807.038,N,01131.000,E,0,0,321394,,").strip())
    # The newest valid RMC of a tail wins; a cut or corrupted one is passed over.
    newer = _sentence("GPRMC,000010,A,4807.038,N,01131.000,E,0,0,010126,,")
    corrupt = _sentence("GPRMC,000020,A,4807.038,N,01131.000,E,0,0,010126,,").replace(b"0,A", b"0,B")
    tail = b"garbage" + _sentence("GPRMC,000001,A,4807.038,N,01131.000,E,0,0,010126,,") + newer + corrupt + b"$GPR"
    assert _newest_rmc(tail) == calendar.timegm((2026, 1, 1, 0, 0, 10))


def _serve(server: ControlServer, stop_at: threading.Event) -> None:
    sel = selectors.DefaultSelector()
    server.start(sel)
    while not stop_at.is_set():
        for key, _ in sel.select(0.05):
            server.handle(key.fileobj)
    server.close()


def test_control_socket_dispatches_by_request_and_names_what_it_knows(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")

    def refuse(req: dict[str, Any]) -> dict[str, Any]:
        raise AgentError("purge: no lane 'x'")

    server = ControlServer(path, {"echo": lambda req: {"got": req}, "purge": refuse})
    done = threading.Event()
    thread = threading.Thread(target=_serve, args=(server, done))
    thread.start()
    try:
        wait_for("the socket", lambda: Path(path).exists(), 5)
        assert request(path, "echo", since=3)["got"] == {"cmd": "echo", "since": 3}
        with pytest.raises(AgentError, match="no lane 'x'"):
            request(path, "purge", lane="x")
        with pytest.raises(AgentError, match=r"unknown request 'nope' \(known: echo, purge\)"):
            request(path, "nope")
        with socket.socket(socket.AF_UNIX) as s:  # not an object: refused, not a crash
            s.connect(path)
            s.sendall(b"[1, 2]\n")
            assert json.loads(s.makefile().readline()) == {"ok": False, "error": "a request is a JSON object"}
    finally:
        done.set()
        thread.join(5)
    with pytest.raises(AgentUnreachable, match="no agent answering"):
        request(path)


@pytest.mark.e2e
def test_status_names_health_by_message_and_each_source_says_it_is_well(workshop: Workshop) -> None:
    st = wait_for("rates over a few seconds and an ack", lambda: _rated(workshop.status()), 30)
    by_name = {s["name"]: s for s in st["sources"]}
    for name in ("gnss", "can0", "bms"):
        assert by_name[name]["verdict"]["ok"], by_name[name]["verdict"]
        assert by_name[name]["verdict"]["text"].startswith("ok:")
        assert by_name[name]["frames_per_s"] > 0 and by_name[name]["last_frame_at"] <= time.time()
    assert by_name["can0"]["bytes_per_s"] > by_name["can0"]["frames_per_s"] * 10  # SLCAN text: ~20 B a frame
    messages = {(h["source"], h["message"], h["can_id"]) for h in st["health"]}
    assert ("can0", "Controller_32_01", "0x02F83201") in messages
    assert ("gnss", "nmea", None) in messages and ("bms", "jbd", None) in messages
    assert st["started_at"] <= time.time() - st["uptime"] + 1
    # The simulator's GNSS time is its own fixed epoch: the offset is what it is, but found.
    manifest = json.loads((workshop.tmp / "manifest.jsonl").read_text().splitlines()[0])
    assert st["clock"]["gnss_source"] == "gnss"
    assert st["clock"]["gnss_offset_s"] == pytest.approx(manifest["sim_epoch_unix"] - st["clock"]["gnss_at"], abs=1200)
    up = st["uplink"]
    assert up["connected_since"] <= time.time() and up["last_ack_at"] is not None and up["ack_rate"] > 0


def _with_speed(live: dict[str, Any]) -> dict[str, Any] | None:
    return live if {"Vehicle.Speed", "Vehicle.LEV.Fused.Speed"} <= set(live["signals"]) else None


def _rated(st: dict[str, Any]) -> dict[str, Any] | None:
    rated = all(s["frames_per_s"] > 0 and s["verdict"]["text"] != "just opened" for s in st["sources"])
    return st if rated and st["uplink"]["ack_rate"] else None


@pytest.mark.e2e
def test_live_values_and_a_tap_of_the_raw_bytes(workshop: Workshop) -> None:
    live = wait_for("the wheel speed", lambda: _with_speed(request(str(workshop.socket), "live")["live"]),
                    20)
    speed = live["signals"]["Vehicle.Speed"]
    assert speed["source"] == "can0" and speed["unit"] == "km/h" and 0 <= speed["value"] < 60
    assert live["signals"]["Vehicle.LEV.Fused.Speed"]["source"] == "fusion"
    assert live["motion"]["verdict"] in ("moving", "still", "unknown")
    cursor = request(str(workshop.socket), "tap")["cursor"]
    time.sleep(1.0)
    reply = request(str(workshop.socket), "tap", since=cursor, sources=["can0", "gnss"])
    data = {name: b"".join(base64.b64decode(c["data"]) for c in reply["chunks"] if c["source"] == name)
            for name in ("can0", "gnss")}
    assert {c["format"] for c in reply["chunks"] if c["source"] == "can0"} == {"slcan"}
    assert data["can0"].count(b"\r") >= 50 and b"T02F83201" in data["can0"]
    assert b"RMC," in data["gnss"] and not reply["lost"]
    assert all(c["n"] > cursor for c in reply["chunks"]) and reply["cursor"] >= max(c["n"] for c in reply["chunks"])
    # Requests a technician's script gets wrong are refused in words; the agent goes on.
    sock = str(workshop.socket)
    for cmd, args, words in (("tap", {"since": "yesterday"}, "since is a number"),
                             ("tap", {"sources": ["can9"]}, "no source named can9 (sources: gnss, can0, bms)"),
                             ("purge", {"lane": "everything"}, "no lane 'everything'"),
                             ("purge", {}, "name the lane")):
        with pytest.raises(AgentError, match=re.escape(words)):
            request(sock, cmd, **args)
    assert request(sock, "live")["live"]["signals"]


@pytest.mark.e2e
def test_swapped_gnss_and_bms_cables_are_named_in_the_status(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The BMS cable in the GNSS port and the other way round: the port that gets the
    GNSS receiver's sentences says so; the one on the silent BMS says nothing comes."""
    config = workshop_config(tmp_path, mosquitto)
    sim = spawn(["firmware_sim", "--slcan", str(tmp_path / "can"), "--nmea", str(tmp_path / "bms"),
                 "--jbd", str(tmp_path / "gps"), "--duration", "300", "--wait-open", "60", "--linger", "1"],
                tmp_path / "sim.log")
    agent = None
    try:
        wait_for("the simulator's ptys", lambda: log_has(tmp_path / "sim.log", "ready"), 20)
        agent = spawn(["agent", "run", "--config", str(config)], tmp_path / "agent.log")

        def verdicts() -> dict[str, str] | None:
            try:
                st = request(str(tmp_path / "control.sock"))["status"]
            except AgentError:
                return None
            out = {s["name"]: s["verdict"]["text"] for s in st["sources"]}
            return out if "look like nmea" in out["bms"] and "no bytes" in out["gnss"] else None

        out = wait_for("both verdicts", verdicts, 30, interval=0.5)
        assert out["bms"].startswith("no valid frame in ") and "cable of another device?" in out["bms"]
        assert out["gnss"].startswith("no bytes in ")
        assert out["can0"].startswith("ok:")
    finally:
        if agent is not None:
            stop(agent)
        stop(sim)


@pytest.mark.e2e
def test_a_noisy_line_is_told_from_a_quiet_one(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Every third frame corrupted on the wire (bit errors, garbage bursts): the sources
    still read frames, and their verdicts say the line is noisy, not that all is well."""
    bench = Workshop(tmp_path, mosquitto, scenario="noisy-line", sim_args=("--noise-rate", "0.35"))
    try:
        bench.start_agent()

        def noisy() -> dict[str, str] | None:
            out = {s["name"]: s["verdict"]["text"] for s in bench.status()["sources"]}
            return out if all("noisy line or loose contact?" in out[n] for n in ("gnss", "can0")) else None

        out = wait_for("noisy verdicts", noisy, 30, interval=0.5)
        assert all(" frames/s, but " in out[n] or " frames in " in out[n] for n in ("gnss", "can0")), out
        st = bench.status()
        bad = {s["name"]: s["bad_frames"] for s in st["sources"]}
        assert bad["can0"].get("bad lines", 0) > 0 and sum(bad["gnss"].values()) > 0, bad
    finally:
        bench.close()
