"""``ebike-agent config show|check|set``: the configuration as the agent uses it, checked
against the unit (real ptys, a real read-only mount, the workshop's running agent),
and changed one key at a time without losing the file's comments."""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.checks import Check, agents_source, held_port
from agent.cli.config_cmd import key_path, parse_value
from agent.config import SourceConfig
from agent.control.client import request
from agent.errors import ConfigError
from tests.helpers import log_has
from tests.test_config import run_agent
from tests.test_storage_faults import ReadOnlyMount, mount  # noqa: F401 - the fixture
from tests.workshop import Workshop

COMMENTED = """\
# The bench unit.
device_id = "bench-1"   # as the fleet knows it
control_socket = "control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "/dev/ttyEBIKE-GNSS"
protocol = "nmea"

[[sources]]
name = "can0"   # the controller
kind = "slcan"
port = "/dev/ttyEBIKE-CAN"
protocol = "bafang-can"

[broker]
# the workshop's broker
host = "127.0.0.1"
username = "bike"
password = "s3cret-pw"

[outbox]
path = "outbox.sqlite"
"""


@pytest.fixture
def pty() -> Iterator[str]:
    """A real serial device: the slave end of a pseudo-terminal, open while the test runs."""
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_parse_value_and_key_path() -> None:
    assert [parse_value(v) for v in ("1883", "0.5", "true", '"1883"', "[1, 2]", "10.0.0.5", "eu-west")] == \
        [1883, 0.5, True, "1883", [1, 2], "10.0.0.5", "eu-west"]
    assert key_path("f", "broker.host") == ["broker", "host"]
    assert key_path("f", 'reporting."Vehicle.Speed".mode') == ["reporting", "Vehicle.Speed", "mode"]
    with pytest.raises(ConfigError, match="is not a dotted key"):
        key_path("f", "broker..host")


def test_config_check_names_each_fault_with_its_fix(tmp_path: Path, pty: str, request: pytest.FixtureRequest) -> None:
    """A missing port, a missing DBC, a CAN interface that is not there and a read-only
    outbox directory: one FAIL line each, with the fix to try; exit 1."""
    store: ReadOnlyMount = request.getfixturevalue("mount")
    store.read_only(True)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""\
device_id = "bench-1"
control_socket = "run/control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "/dev/ttyEBIKE-MISSING"
protocol = "nmea"

[[sources]]
name = "can0"
kind = "slcan"
port = "{pty}"
protocol = "dbc:missing.dbc"

[[sources]]
name = "can1"
kind = "socketcan"
port = "vcanmissing0"
protocol = "bafang-can"

[outbox]
path = "{store.directory}/outbox.sqlite"
""")
    out = run_agent("config", "check", str(cfg))
    assert out.returncode == 1 and out.stderr == "", out.stdout + out.stderr
    assert lines(out.stdout) == [
        f"agent: not running (no answer on {tmp_path}/run/control.sock)",
        f"PASS  configuration: {cfg}: device bench-1, 3 sources",
        "FAIL  source gnss (uart): /dev/ttyEBIKE-MISSING: no such device -> plug the adapter in, or set "
        "sources.gnss.port (ls -l /dev/serial/by-id/)",
        f"PASS  source can0 (slcan): {pty} opens at 115200 Bd",
        "FAIL  source can1 (socketcan): no interface vcanmissing0 -> plug the CAN adapter in (dmesg; modprobe can "
        "for the driver), or set sources.can1.port (ip -br link)",
        f"FAIL  DBC of can0: {tmp_path}/missing.dbc: no such DBC file or shipped profile (profiles: bafang) -> copy "
        f'the DBC to {tmp_path}/missing.dbc, or set sources.can0.protocol = "dbc:<its path>"',
        f"PASS  DBC of can1: {REPO_DBC}: 7 messages, 23 signals",
        f"FAIL  outbox directory: a test file cannot be written: read-only filesystem "
        f"({store.directory}) -> the filesystem is read-only (a worn SD card turns so): remount it read-write "
        "(mount -o remount,rw), replace the card, or set outbox.path elsewhere",
        f"PASS  control socket directory: {tmp_path}/run is not there yet; the agent makes it ({tmp_path} is "
        "writable)",
    ]
    as_json = run_agent("config", "check", "--json", "--config", str(cfg))
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["agent"] == {"running": False, "socket": f"{tmp_path}/run/control.sock"}
    assert [c["ok"] for c in report["checks"]] == [True, False, True, False, False, True, False, True]
    assert not os.listdir(store.directory), "the check left something in the outbox directory"
    store.read_only(False)
    again = run_agent("config", "check", str(cfg))
    assert f"PASS  outbox directory: {store.directory} is writable, " in again.stdout
    assert not os.listdir(store.directory), "the test file was not removed"


REPO_DBC = Path(__file__).resolve().parents[1] / "agent" / "dbc" / "profiles" / "bafang.dbc"


def test_config_check_passes_on_a_good_unit(tmp_path: Path, pty: str, shared_data: Path) -> None:
    log = shared_data / "bafang_can" / "ride-coasting-excerpt.log"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""\
device_id = "bench-2"
control_socket = "control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "{pty}"
protocol = "nmea"
baudrate = 9600

[[sources]]
name = "ride"
kind = "candump"
port = "{log}"
protocol = "bafang-can"

[outbox]
path = "data/outbox.sqlite"
""")
    out = run_agent("config", "check", "--config", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    got = lines(out.stdout)
    assert got[0] == f"agent: not running (no answer on {tmp_path}/control.sock)"
    assert all(line.startswith("PASS  ") for line in got[1:-1]), out.stdout
    assert f"PASS  source gnss (uart): {pty} opens at 9600 Bd" in got
    assert f"PASS  source ride (candump): {log}: 493 frames, 0 damaged lines" in got
    assert f"PASS  outbox directory: {tmp_path}/data is not there yet; the agent makes it ({tmp_path} is " \
        "writable)" in got
    assert got[-1] == f"ok: {cfg}: device bench-2, 2 sources; 6 checks, none failed"


def test_config_check_beside_the_running_agent(workshop: Workshop) -> None:
    """The ports the agent holds open are not opened again (a second reader would take
    its bytes): its status stands for them, and it reads on undisturbed."""
    before = {s["name"]: s["opens"] for s in workshop.status()["sources"]}  # type: ignore[attr-defined]
    out = workshop.cli("config", "check", str(workshop.config))
    assert out.returncode == 0, out.stdout + out.stderr
    got = lines(out.stdout)
    assert got[0].startswith("agent: running (up ") and got[0].endswith("the ports it holds open are not opened again")
    for name, port in (("gnss", "gps"), ("can0", "can"), ("bms", "bms")):
        line = next(x for x in got if x.startswith(f"PASS  source {name} "))
        assert f": {workshop.tmp / port} held by the running agent, last frame " in line and line.endswith(" ago")
    assert f"PASS  control socket {workshop.socket}: the running agent answers on it" in got
    after = workshop.status()
    assert {s["name"]: s["opens"] for s in after["sources"]} == before  # type: ignore[attr-defined]
    assert all(s["open"] for s in after["sources"])  # type: ignore[attr-defined]


def test_a_serial_port_of_the_running_agent_is_its_own_open_or_not(tmp_path: Path) -> None:
    """The rule config check and selftest share: the agent's serial port, under whatever
    name, is never opened here; one it cannot open is reported with the agent's error.
    A log file is read beside the agent: never the agent's alone."""
    link = tmp_path / "battery-port"
    link.symlink_to("/dev/ttyUSB7")
    src = SourceConfig(name="battery", kind="uart", port=str(link), protocol="jbd")
    error = ("cannot open /dev/ttyUSB7: [Errno 13] could not open port /dev/ttyUSB7: [Errno 13] Permission denied: "
             "'/dev/ttyUSB7'")
    log = str(tmp_path / "ride.log")
    status = {"sources": [{"name": "bms", "kind": "uart", "port": "/dev/ttyUSB7", "open": False, "last_error": error},
                          {"name": "ride", "kind": "candump", "port": log, "open": True}]}
    theirs = agents_source(status, src)
    assert theirs is status["sources"][0]
    assert held_port("battery port", src, theirs) == Check(
        False, "battery port", f"{link}: permission denied; the running agent cannot open it",
        "add the agent's user to the dialout group (usermod -aG dialout USER)")
    assert agents_source(None, src) is None
    assert agents_source(status, SourceConfig(name="ride", kind="candump", port=log, protocol="bafang-can")) is None


def test_config_check_and_selftest_agree_on_the_agents_ports(workshop: Workshop, pty: str) -> None:
    """Another configuration on the running agent's bench: its GNSS port under another
    name, through a symlink, is the agent's (not opened by either command; selftest reads
    it through the tap by the agent's name), and a port the agent does not read is
    opened here by both."""
    link = workshop.tmp / "gps-link"
    link.symlink_to(workshop.tmp / "gps")
    spare = f'[[sources]]\nname = "spare"\nkind = "uart"\nport = "{pty}"\nprotocol = "nmea"\nbaudrate = 9600\n\n'
    other = workshop.tmp / "other.toml"
    other.write_text(workshop.config.read_text().replace('name = "gnss"', 'name = "position"', 1)
                     .replace(f'port = "{workshop.tmp / "gps"}"', f'port = "{link}"', 1)
                     .replace("[broker]", spare + "[broker]", 1))
    before = {s["name"]: s["opens"] for s in workshop.status()["sources"]}  # type: ignore[attr-defined]
    check = workshop.cli("config", "check", str(other))
    assert check.returncode == 0, check.stdout + check.stderr
    got = lines(check.stdout)
    assert next(x for x in got if x.startswith("PASS  source position ")).startswith(
        f"PASS  source position (uart): {link} held by the running agent, last frame ")
    assert f"PASS  source spare (uart): {pty} opens at 9600 Bd" in got
    test = workshop.cli("selftest", "--config", str(other), "--listen", "1")
    assert test.returncode == 1, test.stdout + test.stderr
    got = lines(test.stdout)
    assert next(x for x in got if x.startswith("PASS  position port: ")).startswith(
        f"PASS  position port: {link} held by the running agent, last frame ")
    assert " valid NMEA frames in " in next(x for x in got if x.startswith("PASS  position data: "))
    assert f"PASS  spare port: {pty} opens at 9600 Bd" in got
    assert [x.split(":")[0] for x in got if x.startswith("FAIL")] == ["FAIL  spare data", "FAIL  clock"], test.stdout
    after = workshop.status()
    assert {s["name"]: s["opens"] for s in after["sources"]} == before  # type: ignore[attr-defined]


def test_config_set_changes_one_line_and_keeps_the_previous_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(COMMENTED)
    previous = tmp_path / "agent.toml.previous"
    out = run_agent("config", "set", "broker.host", "10.0.0.5", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert lines(out.stdout) == [
        f'broker.host: "127.0.0.1" -> "10.0.0.5" in {cfg}',
        f"previous file kept as {previous}",
        f"agent: not running (no answer on {tmp_path}/control.sock): the change takes effect at its next start",
    ]
    assert previous.read_text() == COMMENTED
    assert cfg.read_text() == COMMENTED.replace('host = "127.0.0.1"', 'host = "10.0.0.5"')
    assert not list(tmp_path.glob("*.new")), "the temporary file was left"

    # The [[sources]] entry named can0, a key it did not have: added to that entry only.
    first = cfg.read_text()
    out = run_agent("config", "set", "sources.can0.bitrate", "500000", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["comments_kept"] is True and json.loads(out.stdout)["old"] is None
    assert cfg.read_text() == first.replace('protocol = "bafang-can"\n', 'protocol = "bafang-can"\nbitrate = 500000\n')
    assert previous.read_text() == first

    # A table the file does not have yet.
    out = run_agent("config", "set", "commands.stationary_kmh", "2", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert cfg.read_text().endswith("\n\n[commands]\nstationary_kmh = 2\n")
    assert tomllib.loads(cfg.read_text())["commands"] == {"stationary_kmh": 2}


@pytest.mark.parametrize(("key", "value", "error"), [
    ("broker.port", "70000", "broker.port: must be a TCP port, 1-65535"),
    ("broker.port", '"1883"', "broker.port: must be int, not str"),
    ("sources.can0.bitrate", "12345", "sources[1].bitrate: must be one of 10000, 20000, 50000, 100000, 125000, "
                                      "250000, 500000, 800000, 1000000"),
    ("broker.hostname", "x", "broker.hostname: unknown key"),
    ("sources.bms.port", "/dev/x", "sources.bms.port: sources.<name>.<key> must name a [[sources]] entry "
                                   "(names: gnss, can0)"),
])
def test_config_set_refuses_a_bad_value_and_leaves_the_file(tmp_path: Path, key: str, value: str,
                                                            error: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(COMMENTED)
    out = run_agent("config", "set", key, value, "--config", str(cfg))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {cfg}:{error}"), out.stderr
    assert cfg.read_text() == COMMENTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]


def test_config_set_rewrites_whole_what_it_cannot_edit_in_place(tmp_path: Path) -> None:
    """A key in an inline table has no line of its own: the file is rewritten whole (the
    comments go, and it says so), valid, with the value."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(COMMENTED.replace("[[sources]]", "windows = { live = 1.0 }\n\n[[sources]]", 1))
    out = run_agent("config", "set", "windows.history", "120", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "the file was rewritten whole: its comments are not kept" in out.stdout
    doc = tomllib.loads(cfg.read_text())
    assert doc["windows"] == {"live": 1.0, "history": 120} and "#" not in cfg.read_text()
    assert doc["broker"]["password"] == "s3cret-pw"


def test_config_show_fills_the_defaults_and_hides_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(COMMENTED)
    out = run_agent("config", "show", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "s3cret-pw" not in out.stdout
    assert out.stdout.startswith(f"# {cfg}: the configuration in effect, defaults filled in, secrets hidden\n")
    doc = tomllib.loads(out.stdout)
    assert doc["broker"]["password"] == "(hidden)" and doc["broker"]["username"] == "bike"
    assert doc["broker"]["keepalive"] == 30 and doc["outbox"]["quota_mb"] == 256.0
    assert doc["outbox"]["path"] == f"{tmp_path}/outbox.sqlite"
    gnss, can0 = doc["sources"]
    assert "bitrate" not in gnss and can0["bitrate"] == 250000 and "poll_interval" not in gnss
    assert doc["alarms"]["battery_high_temperature"] == {"enabled": True, "level": 2, "threshold": 55.0,
                                                         "clear": 50.0, "delay": 5.0, "clear_delay": 5.0}
    assert doc["commands"]["keys"] == {} and doc["fusion"]["cells"] == 10.0
    as_json = json.loads(run_agent("config", "show", "--json", "--config", str(cfg)).stdout)
    assert as_json == doc


def test_config_set_reloads_the_running_agent(workshop: Workshop) -> None:
    cfg = ("--config", str(workshop.config))
    kept = workshop.cli("config", "set", "outbox.quota_mb", "128", "--no-reload", *cfg)
    assert kept.returncode == 0, kept.stderr
    assert "agent: not asked to reload (--no-reload): the change takes effect at its next start" in kept.stdout
    up = request(str(workshop.socket))["status"]["uptime"]
    asked = time.monotonic()
    out = workshop.cli("config", "set", "outbox.commit_interval", "0.25", *cfg, timeout=60)
    assert out.returncode == 0, out.stderr
    assert lines(out.stdout)[-1] == "agent: reloaded on the new configuration"
    status = request(str(workshop.socket))["status"]
    assert status["uptime"] < time.monotonic() - asked < up + 60
    assert log_has(workshop.log, "; restarting")
    shown = json.loads(workshop.cli("config", "show", "--json", *cfg).stdout)
    assert shown["outbox"]["commit_interval"] == 0.25 and shown["outbox"]["quota_mb"] == 128.0
