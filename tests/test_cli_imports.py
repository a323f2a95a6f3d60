"""The command line stays light: ``ebike-agent --help`` and ``--version`` build the whole
parser (every subcommand module) and load none of the heavy libraries, which only the
command that needs them imports; a subcommand module that cannot import fails only
its own command."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import agent.cli
from agent.cli import main
from agent.control.client import request
from devtools.bench_agent import rig
from devtools.bench_writes import BAFANG_BITRATE
from devtools.procs import stop

REPO = Path(__file__).resolve().parents[1]
# Third-party libraries (and the runtime, which loads them all) that --help must not pay for.
HEAVY = ("paho", "cryptography", "cbor2", "serial", "rich", "matplotlib", "agent.runtime")


def imported(*args: str) -> tuple[set[str], str]:
    """The modules ``python -m agent ARGS`` imports by an import statement (``-X
    importtime`` names each; importlib.import_module's are not timed, but whatever
    those modules import is), and what it printed."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return modules, out.stdout


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_help_and_version_import_no_heavy_library(flag: str) -> None:
    modules, printed = imported(flag)
    assert "agent.cli.common" in modules  # the subcommand modules were loaded
    assert not {m for m in HEAVY if m in modules}
    if flag == "--help":
        listed = [m[1] for m in re.finditer(r"^ {4}(\S+)", printed, re.M)]
        assert listed == [command for command, _module in agent.cli._COMMANDS]
        assert "unavailable" not in printed  # every subcommand module imported


def test_every_subcommand_module_is_listed() -> None:
    on_disk = {p.stem for p in (REPO / "agent" / "cli").glob("*.py")} - {"__init__", "common", "view", "checks"}
    assert {module for _command, module in agent.cli._COMMANDS} == on_disk


def test_a_module_that_does_not_import_fails_only_its_command(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.import_module

    def broken(name: str, package: str | None = None) -> ModuleType:
        if name == "agent.cli.ingest":
            raise ModuleNotFoundError("No module named 'paho'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", broken)
    assert main(["ingest", "--broker", "127.0.0.1:1883", "--db", "x.sqlite"]) == 1
    assert capsys.readouterr().err == "error: ebike-agent ingest is unavailable: No module named 'paho'\n"
    assert main(["signals", "--json"]) == 0
    assert '"name"' in capsys.readouterr().out


def test_a_named_command_loads_only_its_own_module() -> None:
    """``ebike-agent run`` (the agent itself) carries none of the technicians' tools."""
    # (Modules loaded by importlib.import_module are not listed: what they import is.)
    modules, _ = imported("status", "--help")
    assert "agent.cli.view" in modules  # status's own
    assert not {"agent.cli.checks", "agent.capture"} & modules  # config's and selftest's, decode's
    modules, _ = imported("--help")
    assert {"agent.cli.view", "agent.cli.checks", "agent.capture"} <= modules


@pytest.mark.e2e
def test_the_running_agent_loads_only_what_its_configuration_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ebike-agent run`` on the bench's default configuration (SLCAN Bafang CAN from the
    shipped DBC profile, a polled JBD BMS, NMEA; no [commands]), decoding from the
    simulator and asked for its status, has not imported cantools (the DBC is compiled in
    a child process), python-can (another source kind), the COSE stack (only with
    [commands]) or the CLI's views: what ``-X importtime`` of the agent process lists."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    with rig([], BAFANG_BITRATE, 60.0) as r:
        assert request(str(r.sock))["status"]["fusion"]["frames"] > 0
        assert stop(r.agent) == 0
        log = (r.run / "agent.log").read_text()
    modules = {line.rsplit("|", 1)[1].strip() for line in log.splitlines() if line.startswith("import time:")}
    assert {"agent.runtime", "paho.mqtt.client", "serial"} <= modules  # the run's own imports are listed
    assert not {m for m in modules if m.split(".")[0] in ("cantools", "can", "cryptography", "rich", "matplotlib")}
