"""``ebike-agent config show|check|set``: the configuration as the agent uses it, checked
against the unit it runs on, and changed one key at a time.

- ``show``: every key with its default filled in, the broker password hidden.
- ``check``: the file loads, then each port opens, each DBC compiles, the outbox and the
  control socket's directories take a file. The checks are selftest's (agent.cli.checks)
  but for one thing: a port is opened and closed, never read or written, so the check is
  quick and safe on a unit in service. A port the running agent holds is not opened
  again (checks.agents_source): the agent's own word (open, last frame) stands for it.
- ``set``: the file with one key changed, validated as a whole before anything is
  written, put in place atomically (the previous file kept as ``FILE.previous``, as a
  remote set_config does), and the running agent asked to reload.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import stat
import time
import tomllib
from dataclasses import asdict
from typing import Any

from agent import config
from agent.cli import checks, view
from agent.cli.common import agent_options, control_socket
from agent.control.client import request
from agent.errors import AgentError, AgentUnreachable, CheckFailed, ConfigError
from agent.fusion.spec import ALARMS, PARAMS
from agent.sources.kinds import KINDS

HIDDEN = "(hidden)"
SECRETS = ("password",)
# How long ``set`` waits for a reloading agent to answer again.
RELOAD_WAIT_S = 30.0
POLL_S = 0.2
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


# --- show -----------------------------------------------------------------------------

def effective(cfg: config.Config) -> dict[str, Any]:
    """The configuration in effect as a document of the file's shape: every key with its
    value or default, secrets replaced by ``(hidden)``, trusted keys by their fingerprint."""
    from agent.signals import BY_ID

    broker = {k: HIDDEN if k in SECRETS and v else v for k, v in asdict(cfg.broker).items()}
    active = {row[1]: row for row in cfg.alarms}
    alarms = {}
    for row in ALARMS:
        _code, name, level, _sid, _dir, thr, clr, on, off, _scale, _why = active.get(row[1], row)
        alarms[name] = {"enabled": name in active, "level": level, "threshold": thr, "clear": clr, "delay": on,
                        "clear_delay": off}
    commands = {k: v for k, v in asdict(cfg.commands).items() if k not in ("keys", "ack_keys")}
    return {
        "device_id": cfg.device_id, "control_socket": cfg.control_socket,
        "sources": [_source(s) for s in cfg.sources],
        "broker": broker, "outbox": asdict(cfg.outbox), "windows": asdict(cfg.windows),
        "fusion": {name: value for (name, *_rest), value in zip(PARAMS, cfg.fusion, strict=True)},
        "alarms": alarms,
        "reporting": dict({BY_ID[sid].name: config.policy_table(mode, deadband)
                           for sid, mode, deadband in cfg.reporting},
                          raw_sources=[cfg.sources[i].name for i in cfg.raw_sources], raw_block_s=cfg.raw_block_s),
        "commands": dict(commands, revoked=list(cfg.commands.revoked), keys=_fingerprints(cfg.commands.keys),
                         ack_keys=_fingerprints(cfg.commands.ack_keys)),
        "power": asdict(cfg.power), "update": asdict(cfg.update), "uplink": asdict(cfg.uplink),
    }


def _source(src: config.SourceConfig) -> dict[str, Any]:
    """A source's keys that apply to its kind (and polling, to a polled protocol)."""
    keys = ("name", "kind", "protocol", *KINDS[src.kind].keys)
    if src.protocol not in config.POLLED_PROTOCOLS:
        keys = tuple(k for k in keys if not k.startswith("poll_"))
    return {k: getattr(src, k) for k in keys}


def _fingerprints(keys: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {kid: f"public key, sha256 {hashlib.sha256(pem.encode()).hexdigest()[:16]}" for kid, pem in keys}


def _show(args: argparse.Namespace) -> int:
    import tomli_w

    cfg = config.load(args.config)
    doc = effective(cfg)
    if args.json:
        view.print_json(doc)
    else:
        print(f"# {cfg.path}: the configuration in effect, defaults filled in, secrets hidden")
        print(tomli_w.dumps(doc), end="")
    return 0


# --- check ----------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    cfg = config.load(path)
    sock = control_socket(args, cfg)
    status = checks.agent_state(sock)
    if not args.json:
        print(checks.agent_line(sock, status, "the ports it holds open are not opened again" if status else ""))
    rep = checks.Report(quiet=args.json)
    rep.add(True, "configuration", f"{path}: device {cfg.device_id}, {len(cfg.sources)} sources")
    for src in cfg.sources:
        rep.put(_source_check(src, checks.agents_source(status, src)))
    for result in _dbc_checks(cfg):
        rep.put(result)
    rep.put(checks.writable("outbox directory", cfg.outbox.path, "outbox.path"))
    rep.put(_socket_check(cfg.control_socket, status is not None and sock == cfg.control_socket))
    if args.json:
        view.print_json({"file": path, "agent": {"running": status is not None, "socket": sock},
                         "ok": not rep.failed, "checks": rep.as_json()})
    if rep.failed:
        raise CheckFailed(f"config check: {rep.failed} of {len(rep.checks)} checks failed")
    if not args.json:
        print(f"ok: {path}: device {cfg.device_id}, {len(cfg.sources)} sources; {len(rep.checks)} checks, none "
              "failed")
    return 0


def _source_check(src: config.SourceConfig, theirs: dict[str, Any] | None) -> checks.Check:
    """A source's port looked at, never listened to (selftest listens): a serial port
    opened and closed, unless the running agent holds it (then its word stands)."""
    what = f"source {src.name} ({src.kind})"
    if theirs is not None:
        return checks.held_port(what, src, theirs)
    if src.kind in checks.SERIAL_KINDS:
        return checks.serial_open(what, src)
    return checks.device_check(what, src)


def _dbc_checks(cfg: config.Config) -> list[checks.Check]:
    """Each DBC of the CAN sources found and compiled, as the agent compiles it."""
    from agent.dbc.compile import compile_isolated
    from agent.feed import dbc_for

    out: list[checks.Check] = []
    seen: dict[str, str] = {}
    for src in cfg.sources:
        if src.kind not in config.CAN_KINDS:
            continue
        key = f"sources.{src.name}.protocol"
        what = f"DBC of {src.name}"
        try:
            path = dbc_for(src.protocol)
        except ConfigError as e:
            out.append(checks.Check(False, what, f"{e.path}: {e.reason}",
                                    f"copy the DBC to {e.path}, or set {key} = \"dbc:<its path>\""))
            continue
        if path in seen:
            continue
        seen[path] = src.name
        try:
            dbc = compile_isolated(path)
        except ConfigError as e:
            out.append(checks.Check(False, what, f"{path}: {e.key}: {e.reason}",
                                    "fix the DBC (cantools must load it strictly)"))
            continue
        out.append(checks.Check(True, what, f"{path}: {len(dbc.msg_names)} messages, {len(dbc.sig_names)} signals"))
    if len(seen) > 1:
        out.append(checks.Check(False, "DBC", f"the CAN sources use {len(seen)} DBCs ({', '.join(seen.values())})",
                                "give every CAN source the same DBC (the agent holds one)"))
    return out


def _socket_check(sock: str, answered: bool) -> checks.Check:
    what = f"control socket {sock}"
    if answered:
        return checks.Check(True, what, "the running agent answers on it")
    if os.path.lexists(sock) and not stat.S_ISSOCK(os.lstat(sock).st_mode):
        return checks.Check(False, what, "exists and is not a socket", "remove that file, or set control_socket "
                                                                        "elsewhere")
    return checks.writable("control socket directory", sock, "control_socket")


# --- set ------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A TOML value when ``text`` is one (``1883``, ``0.5``, ``true``, ``"x"``, ``[1, 2]``),
    else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def key_path(path: str, key: str) -> list[str]:
    """A dotted TOML key (``broker.host``, ``reporting."Vehicle.Speed".mode``) as its parts."""
    try:
        doc: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, key, "is not a dotted key (e.g. broker.host, sources.can0.bitrate)") from e
    parts = []
    while isinstance(doc, dict):
        (part, doc), = doc.items()
        parts.append(part)
    return parts


def _place(path: str, doc: dict[str, Any], key: str, parts: list[str]) -> tuple[dict[str, Any], str, int | None]:
    """The table of ``doc`` that the key's last part goes in, that part, and the index of
    the [[sources]] entry when the key names one (``sources.<name>.<key>``)."""
    table: dict[str, Any] = doc
    index = None
    if parts[0] == "sources":
        found = doc.get("sources")
        sources: list[Any] = found if isinstance(found, list) else []
        names = [s.get("name") if isinstance(s, dict) else None for s in sources]
        if len(parts) < 3 or parts[1] not in names:
            raise ConfigError(path, key, f"sources.<name>.<key> must name a [[sources]] entry "
                                         f"(names: {', '.join(str(n) for n in names if n) or 'none'})")
        index = names.index(parts[1])
        table, parts = sources[index], parts[2:]
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(path, key, f"{part} is not a table")
    return table, parts[-1], index


def _set(args: argparse.Namespace) -> int:
    import tomli_w

    path = args.config
    raw = config.read_raw(path)
    try:
        sock = control_socket(args)
    except ConfigError:
        sock = None  # the file in place is broken: the agent did not start on it
    parts = key_path(path, args.key)
    value = parse_value(args.value)
    new = copy.deepcopy(raw)
    table, last, index = _place(path, new, args.key, parts)
    old = table.get(last)
    table[last] = value
    whole = config.render_config(path, new)  # validates: a bad value names the key, nothing is written
    with open(path, encoding="utf-8") as f:
        text = f.read()
    edited = _line_edit(text, parts, index, tomli_w.dumps({last: value}))
    kept = edited is not None and _parses_to(edited, new)
    config.install_config(path, edited.encode() if kept and edited is not None else whole)
    new_sock = control_socket(args)
    reload = _reload(sock or new_sock, new_sock, args.no_reload)
    if args.json:
        view.print_json({"file": path, "key": args.key, "old": old, "new": value,
                         "previous": path + config.PREVIOUS_SUFFIX, "comments_kept": kept, "reload": reload})
        return 0
    was = "(not set: its default)" if old is None else tomli_w.dumps({"v": old})[4:].strip()
    print(f"{args.key}: {was} -> {tomli_w.dumps({'v': value})[4:].strip()} in {path}")
    print(f"previous file kept as {path}{config.PREVIOUS_SUFFIX}"
          + ("" if kept else "; the file was rewritten whole: its comments are not kept"))
    print({"reloaded": "agent: reloaded on the new configuration",
           "not running": checks.agent_line(sock or new_sock, None, "the change takes effect at its next start"),
           "not asked": "agent: not asked to reload (--no-reload): the change takes effect at its next start",
           }[reload])
    return 0


def _line_edit(text: str, parts: list[str], index: int | None, rendered: str) -> str | None:
    """``text`` with the key's one line replaced (or added to its table, after the
    table's last key), every other line, comments too, as it was; None when the key's
    table is not there to add it to. The caller checks the result parses to what it
    should: anything this cannot place (a dotted key, an inline table, a value over
    several lines) is then rewritten whole instead."""
    line = rendered.rstrip("\n")
    key = line.split("=", 1)[0].strip()
    if index is not None:
        header, n = "[[sources]]", index
    else:
        header, n = ("[" + ".".join(_quoted(p) for p in parts[:-1]) + "]" if len(parts) > 1 else ""), 0
    lines = text.split("\n")
    start, end = _block(lines, header, n)
    if start < 0:
        if index is not None:
            return None
        return text.rstrip("\n") + f"\n\n{header}\n{line}\n"
    after = start
    for i in range(start, end):
        stripped = lines[i].strip()
        if stripped.startswith(key) and stripped[len(key):].lstrip().startswith("="):
            return "\n".join([*lines[:i], line, *lines[i + 1:]])
        if stripped and not stripped.startswith("#"):
            after = i + 1
    return "\n".join([*lines[:after], line, *lines[after:]])


def _parses_to(text: str, doc: dict[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == doc
    except tomllib.TOMLDecodeError:
        return False


def _quoted(part: str) -> str:
    """A key part as TOML writes it: bare when it may be, else quoted."""
    return part if BARE_KEY.fullmatch(part) else json.dumps(part)


def _block(lines: list[str], header: str, n: int) -> tuple[int, int]:
    """The lines of one table, after its header line (the ``n``-th such header for an
    array of tables; the top of the file for ``""``): ``(first, end)``, or (-1, -1)."""
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("[")]
    if not header:
        return 0, starts[0] if starts else len(lines)
    found = [i for i in starts if lines[i].split("#")[0].strip() == header]
    if len(found) <= n:
        return -1, -1
    first = found[n] + 1
    return first, min([i for i in starts if i >= first], default=len(lines))


def _reload(old_sock: str, new_sock: str, skip: bool) -> str:
    """Ask the running agent (on its socket of the configuration it runs) to reload, and
    wait until it answers again, up since the request."""
    if skip:
        return "not asked"
    asked = time.monotonic()
    try:
        request(old_sock, "reload")
    except AgentUnreachable:
        return "not running"
    except AgentError as e:
        raise AgentError(f"the new configuration is written, but the agent did not reload: {e}") from e
    while time.monotonic() - asked < RELOAD_WAIT_S:
        time.sleep(POLL_S)
        try:
            uptime = request(new_sock)["status"]["uptime"]
        except AgentUnreachable:
            continue
        if uptime < time.monotonic() - asked:
            return "reloaded"
    raise AgentError(f"the new configuration is written, but the agent does not answer on {new_sock} "
                     f"{RELOAD_WAIT_S:g} s after the reload: see its log")


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("config", help="configuration tools: show, check, set")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the configuration in effect, defaults filled in, secrets hidden")
    show.set_defaults(func=_show)
    check = actions.add_parser(
        "check", help="validate a configuration and check it against this unit",
        description="Load the file (a bad one: exit 2), then check that each source's port opens (serial "
                    "ports opened and closed, nothing read or written; a candump log read and parsed; a SocketCAN "
                    "interface present, CAN and up), each DBC compiles, and a file can be written beside the "
                    "outbox and the control socket. A serial port the running agent reads (or retries) is "
                    "not opened again: its status (open, last frame, last error) stands for it. One line per "
                    "check with the fix to try; exit 1 if any failed.")
    check.add_argument("file", nargs="?", help="the TOML file (default: --config)")
    check.set_defaults(func=_check)
    setter = actions.add_parser(
        "set", help="change one key, validated, written atomically; the agent reloads",
        description="Set KEY (dotted: broker.host, outbox.commit_interval, commands.stationary_kmh, "
                    "sources.<name>.bitrate for the [[sources]] entry of that name) to VALUE (a TOML value "
                    "when it is one: 1883, 0.5, true, \"text\"; else the text). The whole file is validated "
                    "first (a bad value: exit 2, file unchanged), then written atomically, the previous file "
                    "kept as FILE.previous. Only the key's line changes when it is a plain key = value line; "
                    "otherwise the file is rewritten whole and its comments are not kept (it says so). A "
                    "running agent is then asked to reload.")
    setter.add_argument("key", metavar="KEY")
    setter.add_argument("value", metavar="VALUE")
    setter.add_argument("--no-reload", action="store_true", help="do not ask the running agent to reload")
    setter.set_defaults(func=_set)
    for action in (show, check, setter):
        agent_options(action, socket=action is not show)
