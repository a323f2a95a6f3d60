"""The agent's configuration: one TOML file, checked against the schema below at start-up.

Every key has a type, a default (or is required) and a check. Anything unknown or out
of range refuses the start with ``<file>:<key>: <reason>``: a typo must not silently
turn into a default on a vehicle nobody is watching.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import tomli_w

from agent.commands.keys import load_public_key
from agent.errors import ConfigError
from agent.fusion.spec import ABOVE, ALARMS, PARAMS, REPORT_CHANGE, REPORT_RAW, REPORT_WINDOW
from agent.power import gpiod_problem
from agent.protocols import UART_PROTOCOLS
from agent.signals import BY_NAME
from agent.sources.kinds import KINDS

CAN_KINDS = tuple(name for name, kind in KINDS.items() if kind.can)
CAN_PROTOCOLS = ("bafang-can",)  # and dbc:<path>
POLLED_PROTOCOLS = tuple(name for name, (_module, polled) in UART_PROTOCOLS.items() if polled)
PARITIES = ("N", "E", "O", "M", "S")
STOPBITS = (1.0, 1.5, 2.0)
SLCAN_BITRATES = (10000, 20000, 50000, 100000, 125000, 250000, 500000, 800000, 1000000)
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    port: str
    protocol: str
    bitrate: int = 250000
    baudrate: int = 115200
    poll_interval: float = 0.0
    poll_timeout: float = 1.0
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1.0
    replay_speed: float = 1.0
    loop: bool = False
    interface: str = ""
    channel: str = ""


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    username: str = ""
    password: str = ""
    topic_prefix: str = "ebike/v1/{device_id}/"
    keepalive: int = 30
    max_inflight: int = 8
    max_batch_records: int = 200
    ack: str = "cloud"
    ack_timeout: float = 30.0
    max_batch_bytes: int = 262144
    max_bytes_per_s: int = 0
    protocol: str = "5"
    deflate: bool = True
    session_expiry: int = 86400


@dataclass(frozen=True)
class OutboxConfig:
    path: str = "/var/lib/ebike-agent/outbox.sqlite"
    quota_mb: float = 256.0
    commit_interval: float = 5.0


@dataclass(frozen=True)
class WindowsConfig:
    live: float = 1.0
    history: float = 60.0
    ring_samples: int = 1 << 17


@dataclass(frozen=True)
class CommandsConfig:
    """Signed cloud commands: which fleet keys to trust and when a command may act."""

    keys: tuple[tuple[str, str], ...] = ()  # (key id, PEM text); none = commands are off
    revoked: tuple[str, ...] = ()
    ack_keys: tuple[tuple[str, str], ...] = ()  # (key id, PEM text); any = only signed acks are taken
    clock_skew: float = 60.0
    stationary_s: float = 3.0
    stationary_kmh: float = 1.0
    config_trial_s: float = 60.0
    max_pending: int = 32
    kt_assist_level: int = 3

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True)
class PowerConfig:
    """[power]: the input that says the supply is going (agent/power.py watches it)."""

    loss_input: str = ""  # "", "file:<absolute path>" or "gpio:<chip device>:<line>"
    active_low: bool = False
    bias: str = "as-is"

    @property
    def kind(self) -> str:
        return self.loss_input.partition(":")[0]

    @property
    def path(self) -> str:
        """The file's path, or the GPIO chip's device."""
        rest = self.loss_input.partition(":")[2]
        return rest.partition(":")[0] if self.kind == "gpio" else rest

    @property
    def line(self) -> str:
        """The GPIO line: its offset on the chip, or its name."""
        return self.loss_input.partition(":")[2].partition(":")[2] if self.kind == "gpio" else ""


@dataclass(frozen=True)
class UpdateConfig:
    """[update]: read by packaging/update-guard after an upgrade (with the standard library
    only); the agent checks the table here so a typo refuses the start, not the rollback."""

    timeout_s: float = 300.0
    check: str = ""
    restart: str = "systemctl reset-failed ebike-agent.service; systemctl restart ebike-agent.service"


@dataclass(frozen=True)
class UplinkConfig:
    """[uplink]: the data budget of a metered SIM (agent/uplink/budget.py)."""

    budget_mb_per_month: float = 0.0  # 0 = no budget


# An alarm row as the kernel takes it (see ALARMS in agent/fusion/spec.py).
AlarmRow = tuple[int, str, int, int, int, float, float, float, float, int, str]
REPORT_MODES = {"window": REPORT_WINDOW, "change": REPORT_CHANGE, "both": REPORT_WINDOW | REPORT_CHANGE,
                "raw": REPORT_RAW}
# Keys of [reporting] that are not signal names (every catalogue name starts "Vehicle.").
REPORTING_KEYS = ("raw_sources", "raw_block_s")
RAW_BLOCK_S = 200.0


@dataclass(frozen=True)
class Config:
    path: str
    device_id: str
    sources: tuple[SourceConfig, ...]
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    control_socket: str = "/run/ebike-agent/control.sock"
    # The kernel's tunables in PARAMS order, its alarm table, and (signal id, mode,
    # deadband) for each signal whose reporting is not the default (every window).
    fusion: tuple[float, ...] = tuple(p[1] for p in PARAMS)
    alarms: tuple[AlarmRow, ...] = ALARMS
    reporting: tuple[tuple[int, int, float], ...] = ()
    # [reporting] raw_sources: the indices of the sources whose signals are all sent raw;
    # raw_block_s: the span one raw record covers (its samples wait in memory meanwhile).
    raw_sources: tuple[int, ...] = ()
    raw_block_s: float = RAW_BLOCK_S
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)

    @property
    def topic_prefix(self) -> str:
        return self.broker.topic_prefix.format(device_id=self.device_id)


Check = Callable[[Any], str | None]


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _port(v: Any) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP port, 1-65535"


def _one_of(options: tuple[Any, ...]) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(map(str, options))}"

    return check


def _protocol(v: str) -> str | None:
    if v in UART_PROTOCOLS or v in CAN_PROTOCOLS or (v.startswith("dbc:") and len(v) > 4):
        return None
    return f"must be one of {', '.join((*UART_PROTOCOLS, *CAN_PROTOCOLS))} or dbc:<path>"


def _bytesize(v: int) -> str | None:
    return None if 5 <= v <= 8 else "must be 5-8 data bits"


def _ifname(v: str) -> str | None:
    """Linux's dev_valid_name(): 1-15 chars (IFNAMSIZ 16), not . or .., no / : or space."""
    if not 1 <= len(v) <= 15 or v in (".", "..") or any(c in "/:" or c.isspace() for c in v):
        return "must be a network interface name (1-15 chars, no '/', ':' or spaces), e.g. can0"
    return None


def _device_id(v: str) -> str | None:
    return None if _DEVICE_ID.match(v) else "must be 1-64 of A-Z a-z 0-9 _ . - (no MQTT wildcards)"


def _prefix(v: str) -> str | None:
    if "+" in v or "#" in v:
        return "must not contain MQTT wildcards"
    try:
        v.format(device_id="x")
    except (KeyError, IndexError, ValueError):
        return "may only use the field {device_id}"
    return None if v.endswith("/") else "must end with '/'"


# (key, type, default or REQUIRED, check)
REQUIRED = object()
Schema = tuple[tuple[str, type, Any, Check | None], ...]

_SOURCE: Schema = (
    ("name", str, REQUIRED, None),
    ("kind", str, REQUIRED, _one_of(tuple(KINDS))),
    ("port", str, "", None),  # required by every kind but python-can: checked in _source()
    ("protocol", str, REQUIRED, _protocol),
    ("bitrate", int, 250000, _one_of(SLCAN_BITRATES)),
    ("baudrate", int, 115200, _positive),
    ("poll_interval", float, 0.0, _non_negative),
    ("poll_timeout", float, 1.0, _positive),
    ("bytesize", int, 8, _bytesize),
    ("parity", str, "N", _one_of(PARITIES)),
    ("stopbits", float, 1.0, _one_of(STOPBITS)),
    ("replay_speed", float, 1.0, _non_negative),
    ("loop", bool, False, None),
    ("interface", str, "", None),
    ("channel", str, "", None),
)
_BROKER: Schema = (
    ("host", str, "127.0.0.1", None),
    ("port", int, 1883, _port),
    ("tls_ca", str, "", None),
    ("tls_cert", str, "", None),
    ("tls_key", str, "", None),
    ("username", str, "", None),
    ("password", str, "", None),
    ("topic_prefix", str, "ebike/v1/{device_id}/", _prefix),
    ("keepalive", int, 30, _positive),
    ("max_inflight", int, 8, _positive),
    ("max_batch_records", int, 200, _positive),
    # "cloud": rows leave the outbox when the consumer has stored them (its ack topic);
    # "broker": on PUBACK, for backends that cannot acknowledge (a broker crash then loses data).
    ("ack", str, "cloud", _one_of(("cloud", "broker"))),
    ("ack_timeout", float, 30.0, _positive),
    ("max_batch_bytes", int, 262144, _positive),
    ("max_bytes_per_s", int, 0, _non_negative),  # 0 = no cap
    # MQTT 3.1.1 only by explicit choice: a broker refusing a publish still answers success.
    ("protocol", str, "5", _one_of(("5", "3.1.1"))),
    # Batches deflated (docs/wire.cddl batch-deflated): a tenth of the bytes on a metered link.
    ("deflate", bool, True, None),
    # With [commands]: how long the broker keeps the session (commands sent while the
    # vehicle is offline) after it goes; each command still expires on its own.
    ("session_expiry", int, 86400, _positive),
)
_OUTBOX: Schema = (
    ("path", str, "/var/lib/ebike-agent/outbox.sqlite", None),
    ("quota_mb", float, 256.0, _positive),
    ("commit_interval", float, 5.0, _positive),
)
POWER_BIASES = ("as-is", "pull-up", "pull-down", "disabled")
_POWER: Schema = (
    # What says the supply is going: the agent then stops as on SIGTERM (agent/power.py).
    ("loss_input", str, "", None),
    # gpio: only: power lost = the line low (a power-good line that drops), its pull.
    ("active_low", bool, False, None),
    ("bias", str, "as-is", _one_of(POWER_BIASES)),
)
LOSS_INPUT_FORMS = '"" (none), "file:<path>" or "gpio:<chip>:<line>"'
_UPDATE: Schema = (
    # How long a new version has to come up healthy before the previous one is put back.
    ("timeout_s", float, 300.0, lambda v: None if 10.0 <= v <= 86400.0 else "must be 10-86400 s"),
    # A shell command that says healthy by exiting 0; "": a batch acknowledged since the start.
    ("check", str, "", None),
    # How the guard restarts the agent (a shell command).
    ("restart", str, UpdateConfig.restart, lambda v: None if v.strip() else "must be a shell command"),
)


_UPLINK: Schema = (
    # MB (10^6 bytes) a month the SIM may carry, counted as the link's bytes both ways
    # (payload and an estimate of MQTT/TLS/TCP overhead); 0: no budget.
    ("budget_mb_per_month", float, 0.0, _non_negative),
)


def _power_of_two(v: int) -> str | None:
    return None if v >= 16 and v & (v - 1) == 0 else "must be a power of two >= 16"


_WINDOWS: Schema = (
    ("live", float, 1.0, _positive),
    ("history", float, 60.0, _positive),
    # Samples the event-capture ring holds: at least (capture_before_s + capture_after_s) x
    # the samples per second of the vehicle's buses, or snapshots come out truncated
    # (counted: status fusion.snapshots_truncated). 2^17 (2.6 MB) is 15 s at 8,700 samples/s.
    ("ring_samples", int, 1 << 17, _power_of_two),
)
_FUSION: Schema = tuple((name, float, default, _positive) for name, default, _unit, _why in PARAMS)
_ALARM_KEYS = ("enabled", "level", "threshold", "clear", "delay", "clear_delay")
_REPORTING: Schema = (
    ("mode", str, REQUIRED, _one_of(tuple(REPORT_MODES))),
    ("deadband", float, 0.0, _non_negative),
    # Every sample too, beside the windows or changes (mode "raw" is every sample alone).
    ("raw", bool, False, None),
)
_COMMANDS: Schema = (
    # Key id -> PEM file of a fleet public key (Ed25519); several, so keys can rotate.
    ("keys", dict, {}, None),
    ("revoked", list, [], None),
    # Key id -> PEM file of a consumer's public key: when any, the cloud's acks must be
    # signed by one of them (ebike-agent ingest --ack-key); never a command key.
    ("ack_keys", dict, {}, None),
    ("clock_skew", float, 60.0, _non_negative),
    # The interlock: lock, and a speed limit below the current speed, wait until the
    # vehicle has been below stationary_kmh for stationary_s.
    ("stationary_s", float, 3.0, _non_negative),
    ("stationary_kmh", float, 1.0, _positive),
    # set_config: the new configuration must be healthy within this, or it is rolled back.
    ("config_trial_s", float, 60.0, _positive),
    ("max_pending", int, 32, _positive),
    # A KT display frame carries an assist level with the lock bit: the level to send
    # (the LCD3 starts at 3).
    ("kt_assist_level", int, 3, _one_of(tuple(range(10)))),
)
_TOP_KEYS = ("device_id", "control_socket", "sources", "broker", "outbox", "windows", "fusion", "alarms",
             "reporting", "commands", "power", "update", "uplink")


def _alarms(path: str, raw: Any) -> tuple[AlarmRow, ...]:
    """ALARMS with the [alarms.<name>] overrides; per-cell thresholds stay per cell here
    (the kernel scales them), disabled alarms are left out."""
    if not isinstance(raw, dict):
        raise ConfigError(path, "alarms", "must be a table of [alarms.<name>] tables")
    by_name = {row[1]: row for row in ALARMS}
    for name in raw:
        if name not in by_name:
            raise ConfigError(path, f"alarms.{name}", f"unknown alarm (known: {', '.join(sorted(by_name))})")
    rows = []
    for row in ALARMS:
        code, name, level, sid, direction, thr, clr, on, off, scale, why = row
        schema: Schema = (("enabled", bool, True, None), ("level", int, level, _one_of((1, 2, 3))),
                          ("threshold", float, thr, None), ("clear", float, clr, None),
                          ("delay", float, on, _non_negative), ("clear_delay", float, off, _non_negative))
        got = _table(path, f"alarms.{name}", raw.get(name, {}), schema)
        if not got["enabled"]:
            continue
        thr, clr = got["threshold"], got["clear"]
        if (direction == ABOVE and clr > thr) or (direction != ABOVE and clr < thr):
            side = "at or below" if direction == ABOVE else "at or above"
            raise ConfigError(path, f"alarms.{name}.clear", f"must be {side} the threshold {thr} (hysteresis)")
        rows.append((code, name, got["level"], sid, direction, thr, clr, got["delay"], got["clear_delay"], scale,
                     why))
    return tuple(rows)


def _reporting(path: str, raw: Any) -> tuple[tuple[int, int, float], ...]:
    """(signal id, policy bits, deadband) of each ``"<signal>" = {mode, deadband, raw}``."""
    if not isinstance(raw, dict):
        raise ConfigError(path, "reporting", 'must be a table of "<signal name>" = {mode, deadband, raw} tables')
    out = []
    for name, table in raw.items():
        if name in REPORTING_KEYS:
            continue
        if name not in BY_NAME:
            raise ConfigError(path, f"reporting.{name}", "unknown signal (ebike-agent signals lists them)")
        got = _table(path, f"reporting.{name}", table, _REPORTING)
        out.append((BY_NAME[name].id, REPORT_MODES[got["mode"]] | (REPORT_RAW if got["raw"] else 0),
                    got["deadband"]))
    return tuple(out)


def policy_table(mode: int, deadband: float) -> dict[str, Any]:
    """The ``{mode, deadband, raw}`` table of policy bits ``mode`` (what _reporting reads)."""
    base = mode & ~REPORT_RAW
    if not base:
        return {"mode": "raw", "deadband": deadband, "raw": False}
    name = next(n for n, bits in REPORT_MODES.items() if bits == base)
    return {"mode": name, "deadband": deadband, "raw": bool(mode & REPORT_RAW)}


def _raw_lane(path: str, raw: Any, sources: tuple[SourceConfig, ...]) -> tuple[tuple[int, ...], float]:
    """[reporting] raw_sources (names of [[sources]], as their indices) and raw_block_s."""
    if not isinstance(raw, dict):
        return (), RAW_BLOCK_S  # _reporting has said why
    names = raw.get("raw_sources", [])
    by_name = {s.name: i for i, s in enumerate(sources)}
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(path, "reporting.raw_sources", "must be a list of source names")
    for n in names:
        if n not in by_name:
            raise ConfigError(path, "reporting.raw_sources", f"no source named {n!r} (known: {', '.join(by_name)})")
    block = raw.get("raw_block_s", RAW_BLOCK_S)
    if isinstance(block, bool) or not isinstance(block, (int, float)) or not 1.0 <= block <= 3600.0:
        raise ConfigError(path, "reporting.raw_block_s", "must be a number of seconds from 1 to 3600")
    return tuple(sorted({by_name[n] for n in names})), float(block)


def _commands(path: str, raw: Any) -> CommandsConfig:
    """[commands]: the trusted keys are read (and checked to be Ed25519) here, so a bad
    key file refuses the start instead of every command later."""
    got = _table(path, "commands", raw, _COMMANDS)
    keys: list[tuple[str, str]] = []
    ack_keys: list[tuple[str, str]] = []
    for table, out in (("keys", keys), ("ack_keys", ack_keys)):
        for kid, key_path in got[table].items():
            where = f"commands.{table}.{kid}"
            if not isinstance(key_path, str) or not key_path:
                raise ConfigError(path, where, "must be the path of a PEM public key file")
            if not 0 < len(kid.encode()) <= 64:
                raise ConfigError(path, where, "a key id is 1 to 64 UTF-8 bytes")
            full = _resolve(path, key_path)
            try:
                with open(full, "rb") as f:
                    pem = f.read()
            except OSError as e:
                raise ConfigError(path, where, f"cannot read {full}: {e.strerror or e}") from e
            try:
                load_public_key(pem)
            except ValueError as e:
                raise ConfigError(path, where, f"{full}: {e}") from e
            out.append((kid, pem.decode("ascii", "replace")))
    for kid, text in ack_keys:
        if kid in dict(keys) or text in dict(keys).values():
            raise ConfigError(path, f"commands.ack_keys.{kid}", "is a command key too: the consumer's key "
                              "signs acks only (give it its own pair: ebike-agent keys generate)")
    revoked = got["revoked"]
    if not all(isinstance(kid, str) and kid for kid in revoked):
        raise ConfigError(path, "commands.revoked", "must be a list of key ids")
    return CommandsConfig(keys=tuple(keys), revoked=tuple(revoked), ack_keys=tuple(ack_keys),
                          clock_skew=got["clock_skew"],
                          stationary_s=got["stationary_s"], stationary_kmh=got["stationary_kmh"],
                          config_trial_s=got["config_trial_s"], max_pending=got["max_pending"],
                          kt_assist_level=got["kt_assist_level"])


def _table(path: str, where: str, raw: Any, schema: Schema) -> dict[str, Any]:
    """Check one TOML table against its schema: types, defaults, ranges, unknown keys."""
    if not isinstance(raw, dict):
        raise ConfigError(path, where, "must be a table")
    known = {k for k, _, _, _ in schema}
    for key in raw:
        if key not in known:
            raise ConfigError(path, f"{where}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    for key, typ, default, check in schema:
        name = f"{where}.{key}"
        if key not in raw:
            if default is REQUIRED:
                raise ConfigError(path, name, "is required")
            out[key] = default
            continue
        value = raw[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            raise ConfigError(path, name, f"must be {typ.__name__}, not {type(value).__name__}")
        reason = check(value) if check else None
        if reason:
            raise ConfigError(path, name, reason)
        out[key] = value
    return out


def parse(path: str, data: dict[str, Any]) -> Config:
    """Validate an already-parsed TOML document; ``path`` only names it in errors."""
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(path, key, f"unknown key (known: {', '.join(_TOP_KEYS)})")
    if "device_id" not in data:
        raise ConfigError(path, "device_id", "is required")
    device_id = data["device_id"]
    if not isinstance(device_id, str) or _device_id(device_id):
        raise ConfigError(path, "device_id", _device_id(str(device_id)) or "must be str")
    raw_sources = data.get("sources", [])
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError(path, "sources", "must be a non-empty array of tables ([[sources]])")
    sources = [_source(path, f"sources[{i}]", raw) for i, raw in enumerate(raw_sources)]
    names = [s.name for s in sources]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(path, f"sources[{i}].name", f"duplicate source name {name!r}")
    broker = BrokerConfig(**_table(path, "broker", data.get("broker", {}), _BROKER))
    if bool(broker.tls_cert) != bool(broker.tls_key):
        raise ConfigError(path, "broker.tls_cert", "tls_cert and tls_key go together")
    broker = replace(broker, tls_ca=_resolve(path, broker.tls_ca) if broker.tls_ca else "",
                     tls_cert=_resolve(path, broker.tls_cert) if broker.tls_cert else "",
                     tls_key=_resolve(path, broker.tls_key) if broker.tls_key else "")
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = getattr(broker, key)
        if value and not os.path.isfile(value):
            raise ConfigError(path, f"broker.{key}", f"no such file: {value}")
    outbox = OutboxConfig(**_table(path, "outbox", data.get("outbox", {}), _OUTBOX))
    windows = WindowsConfig(**_table(path, "windows", data.get("windows", {}), _WINDOWS))
    ratio = windows.history / windows.live
    if abs(ratio - round(ratio)) > 1e-9 * ratio:
        raise ConfigError(path, "windows.history", f"must be a whole number of live windows ({windows.live} s)")
    raw_fusion = _table(path, "fusion", data.get("fusion", {}), _FUSION)
    fusion = tuple(raw_fusion[name] for name, _d, _u, _w in PARAMS)
    if not 1.0 <= raw_fusion["temp_rise_window_s"] <= 30.0:
        raise ConfigError(path, "fusion.temp_rise_window_s", "must be 1-30 s")
    control = data.get("control_socket", "/run/ebike-agent/control.sock")
    if not isinstance(control, str) or not control:
        raise ConfigError(path, "control_socket", "must be a non-empty path")
    raw_sources, raw_block_s = _raw_lane(path, data.get("reporting", {}), tuple(sources))
    return Config(
        path=path,
        device_id=device_id,
        sources=tuple(sources),
        broker=broker,
        outbox=replace(outbox, path=_resolve(path, outbox.path)),
        windows=windows,
        control_socket=_resolve(path, control),
        fusion=fusion,
        alarms=_alarms(path, data.get("alarms", {})),
        reporting=_reporting(path, data.get("reporting", {})),
        raw_sources=raw_sources,
        raw_block_s=raw_block_s,
        commands=_commands(path, data.get("commands", {})),
        power=_power(path, data.get("power", {})),
        update=UpdateConfig(**_table(path, "update", data.get("update", {}), _UPDATE)),
        uplink=UplinkConfig(**_table(path, "uplink", data.get("uplink", {}), _UPLINK)),
    )


def _power(path: str, raw: Any) -> PowerConfig:
    """[power]: the loss input's form checked, its path made absolute; a gpio: input
    also needs libgpiod's bindings, so their absence refuses the start here."""
    power = PowerConfig(**_table(path, "power", raw, _POWER))
    where = "power.loss_input"
    if power.kind == "file":
        if not power.path:
            raise ConfigError(path, where, 'file: needs a path, e.g. "file:/run/ebike-agent/power-lost"')
        power = replace(power, loss_input="file:" + _resolve(path, power.path))
    elif power.kind == "gpio":
        if not power.path or not power.line:
            raise ConfigError(path, where, 'gpio: needs a chip and a line, e.g. "gpio:/dev/gpiochip0:17" '
                              'or "gpio:gpiochip0:GPIO17"')
        if not power.path.startswith("/"):
            power = replace(power, loss_input=f"gpio:/dev/{power.path}:{power.line}")
        problem = gpiod_problem()
        if problem:
            raise ConfigError(path, where, problem)
    elif power.loss_input:
        raise ConfigError(path, where, f"must be {LOSS_INPUT_FORMS}, not {power.loss_input!r}")
    if power.kind != "gpio":
        for key in ("active_low", "bias"):
            if key in raw:
                raise ConfigError(path, f"power.{key}", 'applies to a "gpio:" loss_input only')
    return power


def _source(path: str, where: str, raw: Any) -> SourceConfig:
    """One [[sources]] table: the schema, then what depends on its kind and protocol."""
    src = SourceConfig(**_table(path, where, raw, _SOURCE))
    kind, protocol = src.kind, src.protocol
    spec = KINDS[kind]
    for key in raw:
        if key not in ("name", "kind", "protocol") and key not in spec.keys:
            hint = spec.hints.get(key, f"it takes {', '.join(spec.keys)}")
            raise ConfigError(path, f"{where}.{key}", f"does not apply to kind {kind} ({hint})")
    if not spec.can and protocol not in UART_PROTOCOLS:
        raise ConfigError(path, f"{where}.protocol",
                          f"{spec.label} speaks {', '.join(UART_PROTOCOLS)} "
                          f"(CAN needs kind {', '.join(CAN_KINDS)})")
    if spec.can and protocol in UART_PROTOCOLS:
        raise ConfigError(path, f"{where}.protocol",
                          f"{spec.label} carries CAN: bafang-can or dbc:<path>, not {protocol}")
    if src.poll_interval > 0 and protocol not in POLLED_PROTOCOLS:
        raise ConfigError(path, f"{where}.poll_interval",
                          f"{protocol} is not polled: only {', '.join(POLLED_PROTOCOLS)} take a poll_interval > 0")
    if "poll_timeout" in raw and protocol not in POLLED_PROTOCOLS:
        raise ConfigError(path, f"{where}.poll_timeout",
                          f"{protocol} is not polled: only {', '.join(POLLED_PROTOCOLS)} take a poll_timeout")
    if kind == "python-can":
        if not src.interface:
            raise ConfigError(path, f"{where}.interface",
                              "is required for kind python-can (e.g. pcan, kvaser, vector, virtual)")
    elif not src.port:
        raise ConfigError(path, f"{where}.port", "is required")
    if kind == "socketcan" and _ifname(src.port):
        raise ConfigError(path, f"{where}.port", str(_ifname(src.port)))
    if kind == "candump":
        src = replace(src, port=_resolve(path, src.port))
        if not os.path.isfile(src.port):
            raise ConfigError(path, f"{where}.port", f"no such file: {src.port}")
    if protocol.startswith("dbc:"):
        src = replace(src, protocol="dbc:" + _resolve(path, protocol[4:]))
    return src


def load(path: str) -> Config:
    """Read and validate ``path``; every failure is a ConfigError naming file and key."""
    return parse(path, read_raw(path))


def read_raw(path: str) -> dict[str, Any]:
    """The TOML document of ``path``, not yet validated. Every way the file itself can
    fail (absent, unreadable, not UTF-8, not TOML) is a ConfigError of key ``-``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "-", "not a UTF-8 TOML file") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "-", _toml_fault(str(e), text)) from e


_TOML_AT = re.compile(r"^(?P<msg>.*) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S)


def _toml_fault(message: str, text: str) -> str:
    """tomllib's ``msg (at line L, column C)`` as ``line L, column C: not valid TOML: msg``,
    the place first, as a technician looks for it; "end of document" gets the file's last
    position."""
    m = _TOML_AT.match(message)
    if m is None:
        return f"not valid TOML: {message}"
    if m["line"] is None:
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    else:
        line, col = int(m["line"]), int(m["col"])
    msg = m["msg"]
    return f"line {line}, column {col}: not valid TOML: {msg[:1].lower()}{msg[1:]}"


def merged(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in: tables key by key, any other value (arrays
    too) replaced."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


PREVIOUS_SUFFIX = ".previous"


def render_config(path: str, data: Mapping[str, Any]) -> bytes:
    """``data`` validated as the configuration at ``path``, as TOML text. Comments of
    the file it will replace are not kept."""
    parse(path, dict(data))
    try:
        return tomli_w.dumps(dict(data)).encode()
    except (TypeError, ValueError) as e:
        raise ConfigError(path, "-", f"cannot be written as TOML: {e}") from e


def install_config(path: str, text: bytes) -> None:
    """Put ``text`` at ``path`` atomically (written beside it, fsynced, renamed over
    it), the file it replaces kept as ``<path>.previous`` for a rollback."""
    _replace_durably(path, text, keep=path + PREVIOUS_SUFFIX)


def roll_back(path: str) -> None:
    """Put ``<path>.previous`` back in place of ``path`` (atomically)."""
    try:
        with open(path + PREVIOUS_SUFFIX, "rb") as f:
            old = f.read()
    except OSError as e:
        raise ConfigError(path + PREVIOUS_SUFFIX, "-", f"cannot read: {e.strerror or e}") from e
    _replace_durably(path, old)


def _replace_durably(path: str, data: bytes, keep: str = "") -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if keep:
            with open(path, "rb") as f:
                old = f.read()
            _write_synced(keep, old, like=path)
        _write_synced(path + ".new", data, like=path)
        os.replace(path + ".new", path)
        sync_dir(directory)
    except OSError as e:
        raise ConfigError(path, "-", f"cannot write: {e.strerror or e}") from e


def sync_dir(directory: str) -> None:
    """A directory's entries made durable (renames, removals); OSError if it cannot be."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o077


def _write_synced(path: str, data: bytes, like: str) -> None:
    """Created 0600 (the file may hold secrets) and never through a symlink, then given the
    mode (less the umask) and owner of ``like`` when that exists: root's ``config set`` must
    leave the agent's file as readable by the agent as it was, and by nobody else."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        try:
            st = os.stat(like)
        except FileNotFoundError:
            st = None
        if st is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_umask())
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
        f.write(data)
        f.flush()
        os.fsync(fd)


def _resolve(path: str, value: str) -> str:
    """Relative paths in a config file are relative to that file, not to the cwd."""
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(os.path.abspath(path)), value)
