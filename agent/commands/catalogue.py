"""The commands the agent knows: per name, its argument schema, when it may act on a
vehicle that might be moving, and whether it spans a restart.

The one list of command names: the verifier, the executor, the signing tool and the
vehicle's actions (agent/commands/actions.py, held equal by a test) all read it. Adding a
command is an entry here and its action there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import REPORT_MODES
from agent.errors import CommandRejected
from agent.signals import BY_NAME

LEGAL_SPEED_KMH = 25.0
MAX_REPORTING = 64
# A patch must not move what the command state itself hangs on: the device's identity
# (topics, the verifier's target) and the outbox (the replay cache and the journal).
FROZEN_CONFIG_KEYS = (("device_id",), ("outbox", "path"))

# Interlocks: what a command waits for before it acts.
AT_ONCE = ""
STANDING = "standing"      # the vehicle standing still for [commands] stationary_s
NOT_FASTER = "not_faster"  # a known speed at most the command's ``kmh``, or standing


@dataclass(frozen=True)
class CommandSpec:
    """What the verifier, the executor and the actions need to know of one command."""

    arguments: Callable[[Mapping[str, Any]], dict[str, Any]]  # normalised, or ValueError saying why
    interlock: str = AT_ONCE
    # Acts on the vehicle: runs in arrival order with the others that do, so an unlock
    # cannot overtake a lock still waiting for the vehicle to stop.
    in_order: bool = False
    # A restart would otherwise catch it half-way; its journal entry says so.
    spans_restart: bool = False


def _no_arguments(args: Mapping[str, Any]) -> dict[str, Any]:
    if args:
        raise ValueError(f"takes no arguments, got {sorted(args)}")
    return {}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _only(args: Mapping[str, Any], *keys: str) -> None:
    extra = set(args) - set(keys)
    if extra:
        raise ValueError(f"unknown arguments {sorted(extra)}")


def _set_speed_limit(args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, "kmh", "allow_above_legal")
    kmh: Any = args.get("kmh")
    if not _number(kmh) or not 5 <= kmh <= 45:
        raise ValueError("kmh must be a number from 5 to 45")
    above = args.get("allow_above_legal", False)
    if not isinstance(above, bool):
        raise ValueError("allow_above_legal must be true or false")
    if kmh > LEGAL_SPEED_KMH and not above:
        raise ValueError(f"kmh above {LEGAL_SPEED_KMH:g} needs allow_above_legal = true")
    return {"kmh": float(kmh), "allow_above_legal": above}


def _set_reporting(args: Mapping[str, Any]) -> dict[str, Any]:
    """``{"signals": {"<signal>": {"mode": ..., "deadband": ..., "raw": ...}}, "raw_sources":
    [...]}``: the [reporting] table of the configuration, for some signals and/or the
    sources sent raw (the names are checked against the configuration when it runs)."""
    _only(args, "signals", "raw_sources")
    if "signals" not in args and "raw_sources" not in args:
        raise ValueError("set_reporting needs signals, raw_sources or both")
    out: dict[str, Any] = {}
    if "signals" in args:
        out["signals"] = _signal_policies(args["signals"])
    if "raw_sources" in args:
        names = args["raw_sources"]
        if (not isinstance(names, list) or len(names) > MAX_REPORTING
                or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in names)):
            raise ValueError(f"raw_sources must be a list of at most {MAX_REPORTING} source names")
        out["raw_sources"] = list(names)
    return out


def _signal_policies(signals: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(signals, Mapping) or not 0 < len(signals) <= MAX_REPORTING:
        raise ValueError(f"signals must be a map of 1 to {MAX_REPORTING} signals")
    out = {}
    for name, policy in signals.items():
        if name not in BY_NAME:
            raise ValueError(f"unknown signal {name!r}")
        if not isinstance(policy, Mapping) or set(policy) - {"mode", "deadband", "raw"} or "mode" not in policy:
            raise ValueError(f"{name}: a policy is {{mode, deadband, raw}}")
        if policy["mode"] not in REPORT_MODES:
            raise ValueError(f"{name}: mode must be one of {', '.join(REPORT_MODES)}")
        deadband = policy.get("deadband", 0.0)
        if not _number(deadband) or deadband < 0:
            raise ValueError(f"{name}: deadband must be a number >= 0")
        out[name] = {"mode": policy["mode"], "deadband": float(deadband)}
        if "raw" in policy:
            if not isinstance(policy["raw"], bool):
                raise ValueError(f"{name}: raw must be true or false")
            out[name]["raw"] = policy["raw"]
    return out


def _set_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """``{"patch": {...}}``: tables merge key by key into the configuration file, any
    other value (arrays too) replaces. Checked in full against the schema when it runs."""
    _only(args, "patch")
    patch = args.get("patch")
    if not isinstance(patch, Mapping) or not patch:
        raise ValueError("patch must be a non-empty map")
    for keys in FROZEN_CONFIG_KEYS:
        node: Any = patch
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            raise ValueError(f"{'.'.join(keys)} cannot be changed remotely")
    return {"patch": dict(patch)}


CATALOGUE = {
    "ping": CommandSpec(_no_arguments),
    "lock": CommandSpec(_no_arguments, interlock=STANDING, in_order=True),
    "unlock": CommandSpec(_no_arguments, in_order=True),
    "set_speed_limit": CommandSpec(_set_speed_limit, interlock=NOT_FASTER, in_order=True),
    "snapshot": CommandSpec(_no_arguments),
    "diagnostics": CommandSpec(_no_arguments),
    "restart_agent": CommandSpec(_no_arguments),
    "set_reporting": CommandSpec(_set_reporting),
    "set_config": CommandSpec(_set_config, spans_restart=True),
}
# A journal entry of a command this agent no longer knows (written by an older one):
# nothing to wait for; its action fails, naming it.
_FORGOTTEN = CommandSpec(_no_arguments)


def spec(name: str) -> CommandSpec:
    return CATALOGUE.get(name, _FORGOTTEN)


def check_arguments(name: str, args: Mapping[str, Any], command_id: str | None = None) -> dict[str, Any]:
    """The command's arguments, normalised; for the verifier and for the signing tool alike."""
    entry = CATALOGUE.get(name)
    if entry is None:
        raise CommandRejected("unknown_command", command_id, f"{name!r} is not a known command")
    try:
        return entry.arguments(args)
    except ValueError as e:
        raise CommandRejected("bad_arguments", command_id, f"{name}: {e}") from e
