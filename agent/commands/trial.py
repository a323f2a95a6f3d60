"""The marker of a remote configuration on trial (set_config), beside the config file.

It outlives the restart into the new configuration, so the agent that comes up knows
it is on trial, and an agent that cannot come up at all with the new file (``ebike-agent
run`` catches that) knows to put the previous one back. It names the command, and the
SHA-256 of the file the command wrote: if the file is not that one, the command was cut
off before its configuration was in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from agent.errors import ConfigError

SUFFIX = ".trial"


def marker_path(config_path: str) -> str:
    return config_path + SUFFIX


def file_hash(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read: {e.strerror or e}") from e


def begin(config_path: str, command_id: str, new_text_hash: str) -> None:
    """Written (and fsynced) before the new configuration replaces the old one."""
    _write(config_path, {"id": command_id, "sha256": new_text_hash, "failed": None})


def read(config_path: str) -> dict[str, Any] | None:
    """The marker, or None when no trial is on."""
    try:
        with open(marker_path(config_path), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(marker_path(config_path), "-", f"unreadable trial marker: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ConfigError(marker_path(config_path), "id", "a trial marker names its command")
    return data


def fail(config_path: str, why: str) -> None:
    """The new configuration did not come up: say why, for the agent that the rollback
    starts to report."""
    data = read(config_path)
    if data is not None:
        _write(config_path, dict(data, failed=why))


def end(config_path: str) -> None:
    try:
        os.unlink(marker_path(config_path))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(marker_path(config_path), "-", f"cannot remove: {e.strerror or e}") from e


def _write(config_path: str, data: dict[str, Any]) -> None:
    path = marker_path(config_path)
    try:
        with open(path + ".new", "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".new", path)
    except OSError as e:
        raise ConfigError(path, "-", f"cannot write: {e.strerror or e}") from e
