"""The agent's TOML configuration: what loads, what refuses, and how the refusal reads.

A vehicle nobody watches must not start on a typo, and the technician must be told
which file and which key is wrong: every failure is ``<file>:<key>: <reason>``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import (
    BrokerConfig,
    Config,
    OutboxConfig,
    SourceConfig,
    WindowsConfig,
    install_config,
    load,
)
from agent.errors import ConfigError
from agent.sources.kinds import KINDS

REPO = Path(__file__).resolve().parents[1]

SOURCES = """
[[sources]]
name = "gnss"
kind = "uart"
port = "/dev/ttyGNSS"
protocol = "nmea"

[[sources]]
name = "can0"
kind = "slcan"
port = "/dev/ttyCAN"
protocol = "bafang-can"
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(extra_top: str = "", sources: str = SOURCES, tail: str = "") -> str:
    """A valid file with room for one mistake at the top, in the sources or at the end."""
    return f'device_id = "bike-1"\n{extra_top}\n{sources}\n{tail}\n'


def refused(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(str(path))
    return info.value


def assert_refusal(path: Path, key: str, reason_part: str) -> None:
    """The message is exactly ``<file>:<key>: <reason>`` and names the key that is wrong."""
    err = refused(path)
    assert err.path == str(path)
    assert err.key == key
    assert reason_part in err.reason
    assert str(err) == f"{path}:{key}: {err.reason}"


def test_full_file_loads_every_value(tmp_path: Path) -> None:
    """Every key a deployment may set arrives in the Config with its type, so nothing
    written in the file is silently replaced by a default."""
    ca = write(tmp_path, "ca", "ca.pem")
    cert = write(tmp_path, "cert", "cert.pem")
    key = write(tmp_path, "key", "key.pem")
    log = write(tmp_path, "(1.000000) can0 123#00\n", "drive.log")
    path = write(tmp_path, f"""
device_id = "bike-42.a_b"
control_socket = "/run/x/control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "/dev/ttyUSB0"
protocol = "nmea"
baudrate = 9600

[[sources]]
name = "bms"
kind = "uart"
port = "/dev/ttyUSB1"
protocol = "jbd"
baudrate = 9600
bytesize = 7
parity = "E"
stopbits = 2
poll_interval = 2
poll_timeout = 0.5

[[sources]]
name = "can0"
kind = "slcan"
port = "/dev/ttyACM0"
protocol = "bafang-can"
bitrate = 500000
baudrate = 230400
stopbits = 1.5
parity = "M"
bytesize = 5

[[sources]]
name = "can1"
kind = "socketcan"
port = "vcan0"
protocol = "bafang-can"
poll_interval = 0

[[sources]]
name = "replay"
kind = "candump"
port = "{log}"
protocol = "bafang-can"
replay_speed = 2.5
loop = true

[[sources]]
name = "pcan"
kind = "python-can"
interface = "pcan"
channel = "PCAN_USBBUS1"
protocol = "bafang-can"
bitrate = 1000000

[broker]
host = "mqtt.example.net"
port = 8883
tls_ca = "{ca}"
tls_cert = "{cert}"
tls_key = "{key}"
username = "bike"
password = "secret"
topic_prefix = "fleet/{{device_id}}/"
keepalive = 15
max_inflight = 3
max_batch_records = 50

[outbox]
path = "/data/outbox.sqlite"
quota_mb = 64
commit_interval = 0.5

[windows]
live = 2.5
""")
    cfg = load(str(path))
    assert cfg == Config(
        path=str(path),
        device_id="bike-42.a_b",
        sources=(
            SourceConfig("gnss", "uart", "/dev/ttyUSB0", "nmea", 250000, 9600, 0.0),
            SourceConfig("bms", "uart", "/dev/ttyUSB1", "jbd", baudrate=9600, bytesize=7, parity="E",
                         stopbits=2.0, poll_interval=2.0, poll_timeout=0.5),
            SourceConfig("can0", "slcan", "/dev/ttyACM0", "bafang-can", 500000, 230400, bytesize=5, parity="M",
                         stopbits=1.5),
            SourceConfig("can1", "socketcan", "vcan0", "bafang-can"),
            SourceConfig("replay", "candump", str(log), "bafang-can", replay_speed=2.5, loop=True),
            SourceConfig("pcan", "python-can", "", "bafang-can", bitrate=1000000, interface="pcan",
                         channel="PCAN_USBBUS1"),
        ),
        broker=BrokerConfig("mqtt.example.net", 8883, str(ca), str(cert), str(key), "bike", "secret",
                            "fleet/{device_id}/", 15, 3, 50),
        outbox=OutboxConfig("/data/outbox.sqlite", 64.0, 0.5),
        windows=WindowsConfig(2.5),
        control_socket="/run/x/control.sock",
    )
    assert cfg.topic_prefix == "fleet/bike-42.a_b/"
    assert isinstance(cfg.outbox.quota_mb, float) and isinstance(cfg.sources[1].poll_interval, float)
    assert isinstance(cfg.sources[1].stopbits, float) and cfg.sources[4].loop is True


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    """Only device_id and sources are required; the rest takes the defaults the docs promise."""
    cfg = load(str(write(tmp_path, minimal())))
    assert cfg.broker == BrokerConfig()
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.keepalive) == ("127.0.0.1", 1883, 30)
    assert cfg.topic_prefix == "ebike/v1/bike-1/"
    assert cfg.outbox == OutboxConfig("/var/lib/ebike-agent/outbox.sqlite", 256.0, 5.0)
    assert cfg.windows.live == 1.0
    assert cfg.control_socket == "/run/ebike-agent/control.sock"
    assert cfg.sources[1].bitrate == 250000 and cfg.sources[0].baudrate == 115200
    gnss = cfg.sources[0]
    assert (gnss.bytesize, gnss.parity, gnss.stopbits) == (8, "N", 1.0)
    assert (gnss.poll_interval, gnss.poll_timeout) == (0.0, 1.0)
    assert (gnss.replay_speed, gnss.loop, gnss.interface, gnss.channel) == (1.0, False, "", "")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd starts the agent with cwd=/, so a relative path must not depend on the cwd."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "certs").mkdir()
    (conf_dir / "certs" / "ca.pem").write_text("ca")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf_dir, minimal(
        extra_top='control_socket = "run/control.sock"',
        sources=SOURCES.replace('protocol = "bafang-can"', 'protocol = "dbc:profiles/my.dbc"'),
        tail='[outbox]\npath = "state/outbox.sqlite"\n[broker]\ntls_ca = "certs/ca.pem"\n',
    ))
    cfg = load(os.path.relpath(path))
    assert cfg.outbox.path == str(conf_dir / "state" / "outbox.sqlite")
    assert cfg.control_socket == str(conf_dir / "run" / "control.sock")
    assert cfg.sources[1].protocol == "dbc:" + str(conf_dir / "profiles" / "my.dbc")
    assert cfg.broker.tls_ca == str(conf_dir / "certs" / "ca.pem")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    cfg = load(str(write(tmp_path, minimal(tail='[outbox]\npath = "/abs/outbox.sqlite"\n'))))
    assert cfg.outbox.path == "/abs/outbox.sqlite"


BAD_SOURCE = """
[[sources]]
name = "can0"
kind = "slcan"
port = "/dev/ttyCAN"
protocol = "bafang-can"
{extra}
"""


@pytest.mark.parametrize(("text", "key", "reason"), [
    pytest.param(minimal('colour = "red"'), "colour", "unknown key", id="unknown-top-level"),
    pytest.param(minimal(tail='[broker]\nhots = "x"'), "broker.hots", "unknown key", id="unknown-broker"),
    pytest.param(minimal(tail="[outbox]\nquota = 5"), "outbox.quota", "unknown key", id="unknown-outbox"),
    pytest.param(minimal(tail="[windows]\nlength = 5"), "windows.length", "unknown key", id="unknown-windows"),
    pytest.param(minimal(sources=BAD_SOURCE.format(extra="baud = 9600")), "sources[0].baud", "unknown key",
                 id="unknown-source"),
    pytest.param(minimal(tail='[broker]\nport = "1883"'), "broker.port", "must be int, not str", id="port-str"),
    pytest.param(minimal(tail="[broker]\nkeepalive = true"), "broker.keepalive", "must be int, not bool",
                 id="bool-for-int"),
    pytest.param(minimal(tail="[outbox]\nquota_mb = true"), "outbox.quota_mb", "must be float, not bool",
                 id="bool-for-float"),
    pytest.param(minimal(tail="[broker]\nport = 65536"), "broker.port", "1-65535", id="port-high"),
    pytest.param(minimal(tail="[update]\ntimeout_s = 5"), "update.timeout_s", "must be 10-86400 s",
                 id="update-timeout-short"),
    pytest.param(minimal(tail='[update]\nrestart = "  "'), "update.restart", "must be a shell command",
                 id="update-restart-empty"),
    pytest.param(minimal(tail='[update]\ncheck = 1'), "update.check", "must be str, not int", id="update-check-int"),
    pytest.param(minimal(tail="[update]\nretries = 3"), "update.retries", "unknown key", id="update-unknown"),
    pytest.param(minimal(tail="[broker]\nport = 0"), "broker.port", "1-65535", id="port-zero"),
    pytest.param(minimal(tail="[windows]\nlive = 0"), "windows.live", "must be > 0", id="window-zero"),
    pytest.param(minimal(sources=BAD_SOURCE.format(extra="bitrate = 123456")), "sources[0].bitrate",
                 "must be one of", id="bad-bitrate"),
    pytest.param(minimal(sources=BAD_SOURCE.format(extra='kind = "lin"').replace('kind = "slcan"\n', "")),
                 "sources[0].kind", "must be one of", id="bad-kind"),
    pytest.param(minimal(sources=BAD_SOURCE.replace("bafang-can", "j1939").format(extra="")),
                 "sources[0].protocol", "must be one of", id="bad-protocol"),
    pytest.param(minimal(sources=BAD_SOURCE.format(extra="poll_interval = -1")), "sources[0].poll_interval",
                 ">= 0", id="negative-poll"),
    pytest.param(minimal(sources=BAD_SOURCE.replace('port = "/dev/ttyCAN"\n', "").format(extra="")),
                 "sources[0].port", "is required", id="missing-port"),
    pytest.param(minimal(sources=BAD_SOURCE.replace('name = "can0"\n', "").format(extra="")),
                 "sources[0].name", "is required", id="missing-name"),
    pytest.param(minimal(sources=BAD_SOURCE.replace('protocol = "bafang-can"\n', "").format(extra="")),
                 "sources[0].protocol", "is required", id="missing-protocol"),
    pytest.param(minimal(sources=SOURCES.replace('"gnss"', '"can0"')), "sources[1].name",
                 "duplicate source name 'can0'", id="duplicate-names"),
    pytest.param(minimal(sources=SOURCES.replace('protocol = "nmea"', 'protocol = "bafang-can"')),
                 "sources[0].protocol", "UART", id="uart-with-can"),
    pytest.param(minimal(sources=SOURCES.replace('protocol = "bafang-can"', 'protocol = "nmea"')),
                 "sources[1].protocol", "SLCAN", id="slcan-with-nmea"),
    pytest.param(minimal(sources=""), "sources", "non-empty", id="no-sources"),
    pytest.param(minimal(sources="sources = []"), "sources", "non-empty", id="empty-sources"),
    pytest.param(SOURCES, "device_id", "is required", id="no-device-id"),
    pytest.param('device_id = "bike/+"\n' + SOURCES, "device_id", "wildcards", id="wildcard-device-plus"),
    pytest.param('device_id = "#"\n' + SOURCES, "device_id", "wildcards", id="wildcard-device-hash"),
    pytest.param('device_id = 7\n' + SOURCES, "device_id", "must be str", id="device-id-int"),
    pytest.param(minimal(tail='[broker]\ntopic_prefix = "ebike/+/{device_id}/"'), "broker.topic_prefix",
                 "wildcards", id="wildcard-prefix-plus"),
    pytest.param(minimal(tail='[broker]\ntopic_prefix = "ebike/#/"'), "broker.topic_prefix", "wildcards",
                 id="wildcard-prefix-hash"),
    pytest.param(minimal(tail='[broker]\ntopic_prefix = "ebike/{device_id}"'), "broker.topic_prefix",
                 "end with '/'", id="prefix-no-slash"),
    pytest.param(minimal(tail='[broker]\ntopic_prefix = "ebike/{devide_id}/"'), "broker.topic_prefix",
                 "{device_id}", id="prefix-unknown-field"),
    pytest.param(minimal("broker = 5"), "broker", "must be a table", id="broker-not-table"),
    pytest.param(minimal("control_socket = 3"), "control_socket", "non-empty path", id="control-socket-int"),
    pytest.param(minimal(tail='[broker]\ntls_cert = "/etc/hostname"'), "broker.tls_cert", "go together",
                 id="cert-without-key"),
    pytest.param(minimal(tail='[broker]\ntls_ca = "/nonexistent/ca.pem"'), "broker.tls_ca",
                 "no such file: /nonexistent/ca.pem", id="missing-tls-file"),
    pytest.param(minimal(tail="[windows]\nring_samples = 1000"), "windows.ring_samples", "power of two",
                 id="ring-not-power-of-two"),
    pytest.param(minimal(tail="[windows]\nlive = 0.7"), "windows.history", "whole number of live windows",
                 id="history-not-multiple"),
    pytest.param(minimal(tail="[fusion]\ncells = 0"), "fusion.cells", "must be > 0", id="fusion-zero"),
    pytest.param(minimal(tail="[fusion]\ncels = 13"), "fusion.cels", "unknown key", id="fusion-unknown"),
    pytest.param(minimal(tail="[fusion]\ntemp_rise_window_s = 40"), "fusion.temp_rise_window_s", "1-30 s",
                 id="rise-window-long"),
    pytest.param(minimal(tail="[alarms.overspeed]\nthreshold = 30"), "alarms.overspeed", "unknown alarm",
                 id="alarm-unknown"),
    pytest.param(minimal(tail="[alarms.over_speed]\nthreshold = 30\nclear = 31"), "alarms.over_speed.clear",
                 "at or below the threshold 30.0", id="alarm-clear-wrong-side"),
    pytest.param(minimal(tail="[alarms.soc_low]\nlevel = 4"), "alarms.soc_low.level", "must be one of",
                 id="alarm-level"),
    pytest.param(minimal(tail="[alarms.soc_low]\ndelay = -1"), "alarms.soc_low.delay", ">= 0",
                 id="alarm-negative-delay"),
    pytest.param(minimal(tail='[reporting."Vehicle.Sped"]\nmode = "change"'), "reporting.Vehicle.Sped",
                 "unknown signal", id="reporting-unknown-signal"),
    pytest.param(minimal(tail='[reporting."Vehicle.Speed"]\nmode = "sometimes"'), "reporting.Vehicle.Speed.mode",
                 "must be one of", id="reporting-bad-mode"),
    pytest.param(minimal(tail='[reporting."Vehicle.Speed"]\ndeadband = 1.0'), "reporting.Vehicle.Speed.mode",
                 "is required", id="reporting-no-mode"),
    pytest.param('device_id = "x"\n[[sources]\n', "-", "not valid TOML", id="bad-toml"),
    pytest.param('device_id = "x"\ndevice_id = "y"\n', "-", "not valid TOML", id="toml-duplicate-key"),
])
def test_refusals_name_file_and_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    """Each mistake is refused at start-up, naming the key a technician has to fix."""
    assert_refusal(write(tmp_path, text), key, reason)


def one_source(kind: str, protocol: str = "bafang-can", port: str | None = "/dev/ttyX", extra: str = "") -> str:
    """A valid file whose only source is of ``kind``, plus ``extra`` lines in its table."""
    port_line = f'port = "{port}"\n' if port is not None else ""
    return minimal(sources=f'[[sources]]\nname = "s"\nkind = "{kind}"\n{port_line}protocol = "{protocol}"\n{extra}\n')


@pytest.mark.parametrize("protocol", ["nmea", "jbd", "daly", "ninebot", "kt-lcd3", "surron"])
def test_uart_protocols(tmp_path: Path, protocol: str) -> None:
    cfg = load(str(write(tmp_path, one_source("uart", protocol))))
    assert cfg.sources[0].protocol == protocol


@pytest.mark.parametrize("kind", ["slcan", "socketcan", "candump", "python-can"])
@pytest.mark.parametrize("protocol", ["bafang-can", "dbc:/abs/bike.dbc"])
def test_can_kinds_take_can_protocols(tmp_path: Path, kind: str, protocol: str) -> None:
    log = write(tmp_path, "", "x.log")
    port = {"socketcan": "can0", "candump": str(log), "python-can": None}.get(kind, "/dev/ttyACM0")
    extra = 'interface = "virtual"' if kind == "python-can" else ""
    cfg = load(str(write(tmp_path, one_source(kind, protocol, port, extra))))
    assert (cfg.sources[0].kind, cfg.sources[0].protocol) == (kind, protocol)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_names_its_class_and_whether_it_carries_can(kind: str) -> None:
    """The configuration reads the table without importing the sources: they must agree."""
    row = KINDS[kind]
    source = getattr(importlib.import_module(row.module), row.cls)
    assert (source.frame_format != "bytes") == row.can


@pytest.mark.parametrize("protocol", ["jbd", "daly", "ninebot"])
def test_polled_protocols_take_a_poll_interval(tmp_path: Path, protocol: str) -> None:
    cfg = load(str(write(tmp_path, one_source("uart", protocol, extra="poll_interval = 1\npoll_timeout = 0.3"))))
    assert (cfg.sources[0].poll_interval, cfg.sources[0].poll_timeout) == (1.0, 0.3)


@pytest.mark.parametrize(("text", "want"), [
    ("bytesize = 5\nparity = \"O\"\nstopbits = 1.5", (5, "O", 1.5)),
    ("bytesize = 6\nparity = \"S\"\nstopbits = 2", (6, "S", 2.0)),
    ("bytesize = 7\nparity = \"M\"\nstopbits = 1", (7, "M", 1.0)),
])
def test_uart_framing(tmp_path: Path, text: str, want: tuple[int, str, float]) -> None:
    src = load(str(write(tmp_path, one_source("uart", "nmea", extra=text)))).sources[0]
    assert (src.bytesize, src.parity, src.stopbits) == want
    assert isinstance(src.stopbits, float)


def test_candump_log_path_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "logs").mkdir(parents=True)
    (conf_dir / "logs" / "ride.log").write_text("(0.0) can0 123#\n")
    monkeypatch.chdir(tmp_path)
    path = write(conf_dir, one_source("candump", port="logs/ride.log", extra="replay_speed = 0\nloop = false"))
    src = load(os.path.relpath(path)).sources[0]
    assert src.port == str(conf_dir / "logs" / "ride.log")
    assert (src.replay_speed, src.loop) == (0.0, False)


@pytest.mark.parametrize("name", ["can0", "vcan0", "slcan12", "a", "x" * 15, "can-bus_1.2"])
def test_socketcan_interface_names(tmp_path: Path, name: str) -> None:
    assert load(str(write(tmp_path, one_source("socketcan", port=name)))).sources[0].port == name


def test_python_can_source(tmp_path: Path) -> None:
    src = load(str(write(tmp_path, one_source("python-can", port=None, extra='interface = "kvaser"\nchannel = "0"')))
               ).sources[0]
    assert (src.interface, src.channel, src.bitrate, src.port) == ("kvaser", "0", 250000, "")


SOURCE_REFUSALS = [
    pytest.param(one_source("slcan", "jbd"), "sources[0].protocol", "an SLCAN adapter carries CAN", id="slcan-jbd"),
    pytest.param(one_source("socketcan", "nmea", "can0"), "sources[0].protocol", "SocketCAN interface carries CAN",
                 id="socketcan-nmea"),
    pytest.param(one_source("python-can", "daly", None, 'interface = "virtual"'), "sources[0].protocol",
                 "python-can bus carries CAN", id="python-can-daly"),
    pytest.param(one_source("uart", "dbc:x.dbc"), "sources[0].protocol", "a UART source speaks", id="uart-dbc"),
    pytest.param(one_source("uart", "nmea", extra="bytesize = 9"), "sources[0].bytesize", "5-8", id="bytesize-9"),
    pytest.param(one_source("uart", "nmea", extra="bytesize = 4"), "sources[0].bytesize", "5-8", id="bytesize-4"),
    pytest.param(one_source("uart", "nmea", extra='bytesize = "8"'), "sources[0].bytesize", "must be int",
                 id="bytesize-str"),
    pytest.param(one_source("uart", "nmea", extra='parity = "X"'), "sources[0].parity", "one of N, E, O, M, S",
                 id="parity-x"),
    pytest.param(one_source("uart", "nmea", extra='parity = "n"'), "sources[0].parity", "one of", id="parity-lower"),
    pytest.param(one_source("uart", "nmea", extra="stopbits = 3"), "sources[0].stopbits", "one of 1.0, 1.5, 2.0",
                 id="stopbits-3"),
    pytest.param(one_source("uart", "nmea", extra="stopbits = true"), "sources[0].stopbits", "must be float, not bool",
                 id="stopbits-bool"),
    pytest.param(one_source("uart", "nmea", extra="poll_interval = 1"), "sources[0].poll_interval",
                 "nmea is not polled", id="poll-nmea"),
    pytest.param(one_source("uart", "kt-lcd3", extra="poll_interval = 0.5"), "sources[0].poll_interval",
                 "only jbd, daly, ninebot", id="poll-kt"),
    pytest.param(one_source("slcan", extra="poll_interval = 1"), "sources[0].poll_interval",
                 "bafang-can is not polled", id="poll-can"),
    pytest.param(one_source("uart", "jbd", extra="poll_interval = -0.5"), "sources[0].poll_interval", ">= 0",
                 id="poll-negative"),
    pytest.param(one_source("uart", "jbd", extra="poll_interval = 1\npoll_timeout = 0"), "sources[0].poll_timeout",
                 "must be > 0", id="poll-timeout-zero"),
    pytest.param(one_source("uart", "nmea", extra="poll_timeout = 2"), "sources[0].poll_timeout",
                 "nmea is not polled", id="poll-timeout-unpolled"),
    pytest.param(one_source("uart", "nmea", extra="replay_speed = 2"), "sources[0].replay_speed",
                 "does not apply to kind uart", id="replay-speed-on-uart"),
    pytest.param(one_source("uart", "nmea", extra="bitrate = 500000"), "sources[0].bitrate",
                 "does not apply to kind uart", id="bitrate-on-uart"),
    pytest.param(one_source("slcan", extra="loop = true"), "sources[0].loop", "does not apply to kind slcan",
                 id="loop-on-slcan"),
    pytest.param(one_source("uart", "nmea", extra='interface = "pcan"'), "sources[0].interface",
                 "does not apply", id="interface-on-uart"),
    pytest.param(one_source("socketcan", port="can/0"), "sources[0].port", "network interface name",
                 id="ifname-slash"),
    pytest.param(one_source("socketcan", port="x" * 16), "sources[0].port", "1-15 chars", id="ifname-long"),
    pytest.param(one_source("socketcan", port="can 0"), "sources[0].port", "network interface name",
                 id="ifname-space"),
    pytest.param(one_source("socketcan", port="can0:1"), "sources[0].port", "network interface name",
                 id="ifname-colon"),
    pytest.param(one_source("socketcan", port=".."), "sources[0].port", "network interface name", id="ifname-dots"),
    pytest.param(one_source("socketcan", port=""), "sources[0].port", "is required", id="ifname-empty"),
    pytest.param(one_source("socketcan", port="can0", extra="bitrate = 500000"), "sources[0].bitrate",
                 "ip link set", id="socketcan-bitrate"),
    pytest.param(one_source("socketcan", port="can0", extra="baudrate = 9600"), "sources[0].baudrate",
                 "does not apply to kind socketcan", id="socketcan-baudrate"),
    pytest.param(one_source("candump", port="/nonexistent/ride.log"), "sources[0].port",
                 "no such file: /nonexistent/ride.log", id="candump-missing-log"),
    pytest.param(one_source("candump", port=None), "sources[0].port", "is required", id="candump-no-port"),
    pytest.param(one_source("candump", port="/etc/hostname", extra="replay_speed = -1"), "sources[0].replay_speed",
                 ">= 0", id="replay-speed-negative"),
    pytest.param(one_source("candump", port="/etc/hostname", extra='replay_speed = "fast"'),
                 "sources[0].replay_speed", "must be float, not str", id="replay-speed-str"),
    pytest.param(one_source("candump", port="/etc/hostname", extra="loop = 1"), "sources[0].loop",
                 "must be bool, not int", id="loop-int"),
    pytest.param(one_source("candump", port="/etc/hostname", extra='loop = "yes"'), "sources[0].loop",
                 "must be bool, not str", id="loop-str"),
    pytest.param(one_source("python-can", port=None), "sources[0].interface", "is required for kind python-can",
                 id="python-can-no-interface"),
    pytest.param(one_source("python-can", port=None, extra='interface = ""'), "sources[0].interface",
                 "is required", id="python-can-empty-interface"),
    pytest.param(one_source("python-can", port="/dev/ttyX", extra='interface = "pcan"'), "sources[0].port",
                 "python-can takes interface and channel", id="python-can-port"),
    pytest.param(one_source("python-can", port=None, extra='interface = "pcan"\nchannel = 1'),
                 "sources[0].channel", "must be str, not int", id="python-can-channel-int"),
    pytest.param(one_source("python-can", port=None, extra='interface = "pcan"\nbitrate = 12345'),
                 "sources[0].bitrate", "must be one of", id="python-can-bitrate"),
]


@pytest.mark.parametrize(("text", "key", "reason"), SOURCE_REFUSALS)
def test_source_refusals_name_file_and_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    """Each new source key is typed, range-checked and refused where its kind ignores it."""
    assert_refusal(write(tmp_path, text), key, reason)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert_refusal(tmp_path / "absent.toml", "-", "cannot read")


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    """A path that cannot be read as a file (a directory: root reads any mode) is refused."""
    folder = tmp_path / "agent.toml"
    folder.mkdir()
    assert_refusal(folder, "-", "cannot read")


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_cli_config_check(tmp_path: Path) -> None:
    """``config check`` is what an installer runs before a restart: the file is read and
    then the parts of the unit it names are checked (tests/test_cli_config.py): here its
    ports are not there, so exit 1 after a PASS for the file itself; a file that cannot
    be used is the exact refusal on stderr and exit 2."""
    good = write(tmp_path, minimal(), "good.toml")
    bad = write(tmp_path, minimal(tail="[broker]\nport = 70000"), "bad.toml")
    ok = run_agent("config", "check", str(good))
    assert ok.returncode == 1, ok.stderr
    assert f"PASS  configuration: {good}: device bike-1, 2 sources" in ok.stdout
    assert any(line.startswith("FAIL  ") and "/dev/ttyGNSS" in line for line in ok.stdout.splitlines())
    fail = run_agent("config", "check", str(bad))
    assert fail.returncode == 2
    assert fail.stdout == ""
    assert fail.stderr.strip().splitlines()[-1] == f"error: {bad}:broker.port: must be a TCP port, 1-65535"


def test_cli_run_refuses_a_bad_config(tmp_path: Path) -> None:
    """``run`` must stop before it opens anything when the file is wrong."""
    bad = write(tmp_path, minimal(sources=SOURCES.replace('"gnss"', '"can0"')), "bad.toml")
    proc = run_agent("run", "--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:sources[1].name: duplicate source name 'can0'"


FILE_FAULTS = {
    # name: (how the file is made, the message after "error: <file>: ")
    "not-utf8": (lambda p: p.write_bytes(b'device_id = "bike-1"\n# caf\xe9\n\x89PNG\x00'), "not a UTF-8 TOML file"),
    "syntax": (lambda p: p.write_text('device_id = "x"\n[[sources]\n'),
               "line 2, column 10: not valid TOML: expected ']]' at the end of an array declaration"),
    "duplicate-key": (lambda p: p.write_text('device_id = "x"\ndevice_id = "y"\n'),
                      "line 2, column 16: not valid TOML: cannot overwrite a value"),
    "ends-early": (lambda p: p.write_text('device_id = "x"\nport = '),
                   "line 2, column 8: not valid TOML: invalid value"),
    "absent": (lambda p: None, "cannot read: No such file or directory"),
    "directory": (lambda p: p.mkdir(), "cannot read: Is a directory"),
}
CONFIG_COMMANDS = {
    "run": ("run", "--config"),
    "config-check": ("config", "check"),
    "status": ("status", "--config"),
    "buffer-stats": ("buffer", "stats", "--config"),
}


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("fault", FILE_FAULTS)
def test_cli_file_faults_are_clean_errors(tmp_path: Path, command: str, fault: str) -> None:
    """Whatever is wrong with the file itself, every command that reads a configuration
    names the file and the fault (line and column for TOML), exit 2, no traceback."""
    make, message = FILE_FAULTS[fault]
    path = tmp_path / "agent.toml"
    make(path)
    proc = run_agent(*CONFIG_COMMANDS[command], str(path))
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == f"error: {path}: {message}\n"


def test_file_faults_keep_the_key_convention(tmp_path: Path) -> None:
    """Through the API the file-level faults stay ``<file>:-: <reason>``, as before."""
    path = tmp_path / "agent.toml"
    path.write_bytes(b"\xff\xfe")
    assert_refusal(path, "-", "not a UTF-8 TOML file")
    path.write_text('device_id = "x"\n[[sources]\n')
    assert refused(path).reason.startswith("line 2, column 10: not valid TOML: ")


def test_fusion_alarm_and_reporting_tables(tmp_path: Path) -> None:
    from agent.fusion.spec import ALARMS, PARAMS, REPORT_CHANGE, REPORT_WINDOW
    from agent.signals import signal_id

    cfg = load(str(write(tmp_path, minimal(tail="""
[windows]
history = 120
ring_samples = 65536

[fusion]
cells = 13
design_capacity_ah = 17.5

[alarms.over_speed]
threshold = 32.0
clear = 30.0
delay = 2
level = 2

[alarms.soc_high]
enabled = false

[reporting."Vehicle.LEV.Controller.FaultCode"]
mode = "change"

[reporting."Vehicle.Powertrain.TractionBattery.CurrentVoltage"]
mode = "both"
deadband = 0.5
"""))))
    assert (cfg.windows.history, cfg.windows.ring_samples) == (120.0, 65536)
    names = [p[0] for p in PARAMS]
    assert cfg.fusion[names.index("cells")] == 13.0 and cfg.fusion[names.index("design_capacity_ah")] == 17.5
    assert cfg.fusion[names.index("tick")] == PARAMS[names.index("tick")][1]
    rows = {r[1]: r for r in cfg.alarms}
    assert "soc_high" not in rows and len(rows) == len(ALARMS) - 1
    default_clear_delay = next(r for r in ALARMS if r[1] == "over_speed")[8]
    assert rows["over_speed"][2] == 2 and rows["over_speed"][5:9] == (32.0, 30.0, 2.0, default_clear_delay)
    assert rows["pack_over_voltage"] == next(r for r in ALARMS if r[1] == "pack_over_voltage")
    assert set(cfg.reporting) == {(signal_id("Vehicle.LEV.Controller.FaultCode"), REPORT_CHANGE, 0.0),
                                  (signal_id("Vehicle.Powertrain.TractionBattery.CurrentVoltage"),
                                   REPORT_WINDOW | REPORT_CHANGE, 0.5)}


def test_fusion_doc_is_the_alarms_command_output() -> None:
    from agent.cli.alarms_cmd import markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "fusion.md"
    assert doc.read_text() == markdown(), "regenerate: ebike-agent alarms --markdown > docs/fusion.md"


def test_a_rewritten_config_keeps_its_mode_and_owner_less_the_umask(tmp_path: Path) -> None:
    """root's ``config set`` (umask 022) on the package's 0660 root:ebike-agent file: the
    agent can still read it, nobody else can; a tighter umask tightens it; the writer never
    follows a symlink planted at its temporary name."""
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "a"\n')
    os.chmod(path, 0o660)
    os.chown(path, os.getuid(), 20)
    old = os.umask(0o022)
    try:
        install_config(str(path), b'device_id = "b"\n')
        assert (os.stat(path).st_mode & 0o777, os.stat(path).st_gid) == (0o640, 20)
        assert os.stat(str(path) + ".previous").st_mode & 0o777 == 0o640
        os.umask(0o077)
        install_config(str(path), b'device_id = "c"\n')
        assert os.stat(path).st_mode & 0o777 == 0o600
        target = tmp_path / "elsewhere"
        target.write_text("untouched")
        os.symlink(target, str(path) + ".new")
        with pytest.raises(ConfigError, match="cannot write"):
            install_config(str(path), b'device_id = "d"\n')
        assert target.read_text() == "untouched" and path.read_text() == 'device_id = "c"\n'
    finally:
        os.umask(old)
