"""``ebike-agent selftest`` as a technician runs it: real ptys from the simulator, a real
mosquitto (with a password file when the password is the fault), a read-only bind mount
for a worn SD card, and the workshop's running agent read through its tap. Each fault
must come out as a FAIL line naming it, with the fix to try, and exit 1; a healthy
bench exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.selftest import Heard, Report, clock, diagnose
from agent.config import SourceConfig
from devtools.broker import Mosquitto
from firmware_sim.encoders import nmea
from tests.helpers import REPO, reap, start_sim, wait_ready
from tests.test_storage_faults import ReadOnlyMount
from tests.workshop import Workshop

GNSS = SourceConfig(name="gnss", kind="uart", port="/dev/ttyUSB0", protocol="nmea", baudrate=9600)
BMS = SourceConfig(name="bms", kind="uart", port="/dev/ttyUSB1", protocol="jbd", baudrate=9600, poll_interval=1.0)


def selftest(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "selftest", "--config", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def bench_config(tmp: Path, sources: str, broker: str, outbox: Path | None = None) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f'device_id = "bench-1"\ncontrol_socket = "control.sock"\n\n{sources}\n[broker]\n{broker}\n\n'
                    f'[outbox]\npath = "{(outbox or tmp) / "outbox.sqlite"}"\n')
    return path


def uart(name: str, port: Path | str, protocol: str, extra: str = "") -> str:
    return (f'[[sources]]\nname = "{name}"\nkind = "uart"\nport = "{port}"\nprotocol = "{protocol}"\n'
            f'baudrate = 9600\n{extra}\n')


def local(broker: Mosquitto, extra: str = "") -> str:
    return f'host = "{broker.host}"\nport = {broker.port}\n{extra}'


def line(out: str, start: str) -> str:
    """The one output line that starts with ``start``."""
    found = [x for x in out.splitlines() if x.startswith(start)]
    assert len(found) == 1, f"no single line {start!r} in:\n{out}"
    return found[0]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Path]:
    """The simulator's GNSS receiver at ``gps`` and JBD BMS at ``bms`` in the returned folder."""
    proc = start_sim(["--nmea", str(tmp_path / "gps"), "--jbd", str(tmp_path / "bms"), "--duration", "300",
                      "--linger", "0"])
    try:
        wait_ready(proc)
        yield tmp_path
    finally:
        reap(proc)


# --- the words, on their own ----------------------------------------------------------


def test_nmea_on_the_bms_port_names_the_swap() -> None:
    heard = Heard("jbd")
    for i in range(5):
        heard.add(nmea.rmc(1000 + i, 48.1, 11.5, 20.0, 90.0)[0], time.time())
    assert heard.frames == 0
    assert diagnose(BMS, (GNSS, BMS), heard) == ("ttyUSB1 speaks NMEA at 9600 Bd, not JBD",
                                                 "GNSS and BMS cables swapped?")
    assert diagnose(BMS, (BMS,), heard)[1] == 'wrong port? or set protocol = "nmea" for source bms'


def test_garbage_through_the_agent_asks_for_it_to_be_stopped_not_for_a_rate() -> None:
    heard = Heard("nmea")
    heard.add(bytes(range(256)) * 4, time.time())
    heard.seconds = 3.0
    detail, fix = diagnose(GNSS, (GNSS,), heard, probe=False)
    assert detail == "1,024 bytes in 3 s, no valid NMEA frame"
    assert fix == "wrong port or protocol? noisy line?"


def test_rmc_sentences_give_the_clock_offset() -> None:
    heard = Heard("nmea")
    fix, _ = nmea.rmc(0, 48.1, 11.5, 20.0, 90.0)
    heard.add(fix, nmea.SIM_EPOCH_UNIX + 1.5)
    assert heard.frames == 1
    assert heard.gnss_offsets == [pytest.approx(-1.5)]


@pytest.mark.parametrize(("offsets", "status", "want"), [
    ([0.4], None, "PASS  clock: system 0.4 s behind GNSS time"),
    ([-90.0], None, "FAIL  clock: system 90 s ahead of GNSS time -> set the clock; enable NTP"),
    ([], {"clock": {"gnss_offset_s": 3.0}}, "FAIL  clock: system 3 s behind GNSS time -> set the clock; enable NTP"),
    ([], {"clock": {"gnss_offset_s": None}}, "SKIP  clock: no GNSS time to compare with (no RMC with a fix heard)"),
])
def test_clock_line(capsys: pytest.CaptureFixture[str], offsets: list[float], status: dict[str, object] | None,
                    want: str) -> None:
    clock(Report(quiet=False), offsets, status)
    assert capsys.readouterr().out == want + "\n"


# --- end to end ------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_missing_port_and_no_socketcan_fail_with_the_fix(tmp_path: Path, mosquitto: Mosquitto) -> None:
    sources = uart("bms", tmp_path / "ttyUSB9", "jbd", "poll_interval = 1.0") + \
        '[[sources]]\nname = "can9"\nkind = "socketcan"\nport = "can9"\nprotocol = "bafang-can"\n'
    out = selftest(bench_config(tmp_path, sources, local(mosquitto)), "--listen", "1")
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith(f"agent: not running (no answer on {tmp_path / 'control.sock'})")
    assert line(out.stdout, "FAIL  bms port") == \
        f"FAIL  bms port: {tmp_path / 'ttyUSB9'}: no such device -> plug the adapter in, or set sources.bms.port " \
        "(ls -l /dev/serial/by-id/)"
    assert line(out.stdout, "FAIL  can9 interface").startswith("FAIL  can9 interface: no interface can9")
    assert " -> plug the CAN adapter in" in line(out.stdout, "FAIL  can9 interface")
    for ok in ("broker dns", "broker tcp", "broker mqtt", "outbox writable", "outbox space", "outbox speed"):
        line(out.stdout, f"PASS  {ok}: ")
    line(out.stdout, "SKIP  clock: ")
    assert out.stdout.count("FAIL") == 2


@pytest.mark.e2e
def test_swapped_gnss_and_bms_cables_are_named(sim: Path, tmp_path: Path, mosquitto: Mosquitto) -> None:
    sources = uart("gnss", sim / "bms", "nmea") + uart("bms", sim / "gps", "jbd", "poll_interval = 0.5")
    out = selftest(bench_config(tmp_path, sources, local(mosquitto)), "--listen", "2")
    assert out.returncode == 1, out.stderr
    line(out.stdout, "PASS  gnss port: ")
    line(out.stdout, "PASS  bms port: ")
    assert line(out.stdout, "FAIL  gnss data") == \
        "FAIL  gnss data: bms silent as NMEA; answers JBD polls at 9600 Bd -> BMS and GNSS cables swapped?"
    assert line(out.stdout, "FAIL  bms data") == \
        "FAIL  bms data: gps speaks NMEA at 9600 Bd, not JBD -> GNSS and BMS cables swapped?"


@pytest.mark.e2e
def test_a_healthy_bench_passes(sim: Path, tmp_path: Path, mosquitto: Mosquitto, shared_data: Path) -> None:
    capture = shared_data / "bafang_can" / "ride-coasting-excerpt.log"
    sources = uart("bms", sim / "bms", "jbd", "poll_interval = 0.5") + \
        f'[[sources]]\nname = "log"\nkind = "candump"\nport = "{capture}"\nprotocol = "bafang-can"\n'
    out = selftest(bench_config(tmp_path, sources, local(mosquitto)), "--listen", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["agent"]["running"] is False
    assert report["failed"] == 0
    results = {c["check"]: c["result"] for c in report["checks"]}
    assert results == {"bms port": "PASS", "bms data": "PASS", "log file": "PASS", "broker dns": "PASS",
                       "broker tcp": "PASS", "broker tls": "SKIP", "broker mqtt": "PASS", "outbox writable": "PASS",
                       "outbox space": "PASS", "outbox speed": "PASS", "clock": "SKIP"}
    detail = {c["check"]: c["detail"] for c in report["checks"]}
    assert detail["bms data"].split()[1:4] == ["valid", "JBD", "frames"]


@pytest.mark.e2e
def test_a_wrong_broker_password_is_an_authentication_fail(tmp_path: Path, shared_data: Path) -> None:
    capture = shared_data / "bafang_can" / "bench-repaired-excerpt.log"
    sources = f'[[sources]]\nname = "log"\nkind = "candump"\nport = "{capture}"\nprotocol = "bafang-can"\n'
    (tmp_path / "broker").mkdir()
    with Mosquitto(str(tmp_path / "broker"), users={"bike": "right horse battery"}) as password_broker:
        wrong = bench_config(tmp_path, sources, local(password_broker, 'username = "bike"\npassword = "wrong"'))
        out = selftest(wrong)
        right = bench_config(tmp_path, sources,
                             local(password_broker, 'username = "bike"\npassword = "right horse battery"'))
        out_right = selftest(right)
    assert out.returncode == 1, out.stderr
    line(out.stdout, "PASS  broker dns: ")
    line(out.stdout, f"PASS  broker tcp: 127.0.0.1:{password_broker.port} answers")
    assert line(out.stdout, "FAIL  broker mqtt") == (
        f"FAIL  broker mqtt: authentication refused by 127.0.0.1:{password_broker.port}: Not authorized"
        " -> [broker] username and password right?")
    assert out.stdout.count("FAIL") == 1
    assert out_right.returncode == 0, out_right.stdout
    line(out_right.stdout, "PASS  broker mqtt: CONNECT accepted (as bike, MQTT 5)")


@pytest.mark.e2e
def test_a_read_only_outbox_directory_fails(tmp_path: Path, mosquitto: Mosquitto, shared_data: Path) -> None:
    capture = shared_data / "bafang_can" / "bench-repaired-excerpt.log"
    sources = f'[[sources]]\nname = "log"\nkind = "candump"\nport = "{capture}"\nprotocol = "bafang-can"\n'
    store = ReadOnlyMount(tmp_path / "store")
    try:
        store.read_only(True)
        out = selftest(bench_config(tmp_path, sources, local(mosquitto), outbox=store.directory))
    finally:
        store.close()
    assert out.returncode == 1, out.stderr
    assert line(out.stdout, "FAIL  outbox writable") == \
        f"FAIL  outbox writable: a test file cannot be written: read-only filesystem ({store.directory}) -> the " \
        "filesystem is read-only (a worn SD card turns so): remount it read-write (mount -o remount,rw), replace " \
        "the card, or set outbox.path elsewhere"
    line(out.stdout, "SKIP  outbox space: not tried: not writable")
    line(out.stdout, "SKIP  outbox speed: not tried: not writable")
    assert out.stdout.count("FAIL") == 1


@pytest.mark.e2e
def test_with_the_agent_running_its_ports_are_read_through_its_tap(workshop: Workshop) -> None:
    """The agent keeps its ports (nothing opened twice): every source passes through the
    tap; the simulator's GNSS clock is days behind this machine's, which the clock check names."""
    out = workshop.cli("selftest", "--config", str(workshop.config), "--listen", "2")
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("agent: running (up ")
    for name, port, proto in (("gnss", "gps", "NMEA"), ("can0", "can", "SLCAN"), ("bms", "bms", "JBD")):
        assert line(out.stdout, f"PASS  {name} port").startswith(
            f"PASS  {name} port: {workshop.tmp / port} held by the running agent, last frame ")
        assert f" valid {proto} frames in " in line(out.stdout, f"PASS  {name} data")
    assert line(out.stdout, "FAIL  clock").endswith("ahead of GNSS time -> set the clock; enable NTP")
    assert out.stdout.count("FAIL") == 1
    assert workshop.status()["sources"][0]["open"]  # type: ignore[index]
