"""A unit flashed from the fleet's one image takes its own identity at first boot.

After flashing, the flashing station writes into the boot partition's ``ebike-agent/``
directory (FAT: whoever holds the card can read it) ``provision.toml`` and the files it
names: certificates, the private key, command trust keys. ``ebike-agent provision``
(systemd runs it before the agent whenever that directory holds a file) merges the
provisioning file into ``/etc/ebike-agent/agent.toml``, copies the files beside it, mode
0600 and owned by the service user (the agent runs as that user and must read its key),
then removes them all from the boot partition. docs/provisioning.md has the format and
the image builders' side.

Everything is checked before anything changes, and the steps are ordered so that a
power cut at any point leaves the old state or the new one, and the next run (the next
boot) finishes the job:

1. check the provisioning file, each file it names (the TLS files loaded as the agent's
   TLS client loads them) and the configuration it makes (config.parse, with the files
   where they are now). A fault names file, key and reason, and nothing changes.
2. write each named file beside its place in the etc directory, mode 0600 and owned
   from the start, fsynced, renamed over; fsync the directory.
3. replace agent.toml with config.install_config (atomic; the old file kept as
   agent.toml.previous) unless it already is the result (a rerun), then make it 0600 for
   the service user, fsynced.
4. remove provision.toml (it holds the password) and fsync the boot directory: the
   commit point. Until here a rerun does everything again, to the same result.
5. remove the named files, fsync the directory. A cut here leaves files without a
   provision.toml: a rerun removes each that is byte for byte its installed copy, and
   refuses (removing nothing) when any is not.

Hidden entries of the boot directory (``.DS_Store``, ``._x``: the writing machine's) are
ignored, as systemd's ConditionDirectoryNotEmpty= ignores them.
"""

from __future__ import annotations

import copy
import os
import pwd
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import config
from agent.errors import ConfigError

PROVISION_FILE = "provision.toml"
MODE = 0o600
TMP_SUFFIX = ".provisioning"
# What a unit's own file sets: its identity. Everything else is the image's agent.toml.
KEYS = ("device_id", "broker", "commands")
TLS_FILES = ("tls_ca", "tls_cert", "tls_key")
KEY_TABLES = ("keys", "ack_keys")

# A value naming a file: (the tables it is in, its key), e.g. (("broker",), "tls_key").
Ref = tuple[tuple[str, ...], str]


@dataclass(frozen=True)
class Plan:
    """A checked provisioning file: what it sets and the bytes of the files it names."""

    device_id: str
    keys: tuple[str, ...]  # the dotted keys it sets (their values stay unsaid: a password)
    files: dict[str, bytes]  # file name -> bytes, as read from the boot directory
    patch: dict[str, Any]  # merged into agent.toml, its file keys pointing into the etc directory


@dataclass
class Outcome:
    """What a run did, for the journal and ``--json``."""

    device_id: str = ""
    keys: list[str] = field(default_factory=list)
    config: str = ""
    config_written: bool = False
    installed: list[str] = field(default_factory=list)
    owner: str = ""  # the user the installed files belong to; "" when there is no such user (root's)
    removed: list[str] = field(default_factory=list)


def provision(boot: str, etc: str, config_path: str, owner: str, check: bool = False) -> Outcome | None:
    """Provision from the directory ``boot`` into ``etc`` and the configuration at
    ``config_path``, the files given to the user ``owner``; None when ``boot`` holds
    nothing (or is absent): nothing done. Every refusal is a ConfigError naming file,
    key and reason, and leaves things as they were. ``check``: step 1 only (a flashing
    station checking a unit's directory before writing it)."""
    entries = _entries(boot)
    if not check:
        if not entries:
            return None
        if PROVISION_FILE not in entries:
            return Outcome(removed=_leftovers(boot, etc, entries))
    plan = _plan(boot, etc, config_path, entries or [])
    ids = _user(owner)
    out = Outcome(device_id=plan.device_id, keys=list(plan.keys), config=config_path, owner=owner if ids else "")
    if check:
        return out
    for name, data in plan.files.items():
        out.installed.append(_write_private(os.path.join(etc, name), data, ids))
    _fsync_dir(etc)
    out.config_written = _install_config(config_path, plan.patch, ids)
    _remove(boot, [PROVISION_FILE])
    out.removed = [os.path.join(boot, PROVISION_FILE), *_remove(boot, list(plan.files))]
    return out


def _entries(boot: str) -> list[str] | None:
    """The boot directory's visible entries; None when it is absent."""
    try:
        names = os.listdir(boot)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(boot, "-", f"cannot read: {e.strerror or e}") from e
    return sorted(n for n in names if not n.startswith("."))


def _plan(boot: str, etc: str, config_path: str, entries: list[str]) -> Plan:
    """Step 1: everything checked, nothing changed."""
    prov = os.path.join(boot, PROVISION_FILE)
    doc = config.read_raw(prov)
    for key in doc:
        if key not in KEYS:
            raise ConfigError(prov, key, "is not set per unit (the image's agent.toml sets it); a provisioning "
                                         f"file sets {', '.join(KEYS)}")
    if "device_id" not in doc:
        raise ConfigError(prov, "device_id", "is required: the unit's own id")
    if not os.path.isdir(etc):
        raise ConfigError(etc, "-", "no such directory (the ebike-agent package makes it)")
    refs = _refs(prov, doc)
    files: dict[str, bytes] = {}
    for where, key in refs:
        name = _get(doc, where)[key]
        files[name] = _read_named(prov, ".".join((*where, key)), name, boot, etc, config_path)
    for name in entries:
        if name != PROVISION_FILE and name not in files:
            raise ConfigError(os.path.join(boot, name), "-", f"is not named by {PROVISION_FILE}, and would stay on "
                              "the boot partition: name it there, or remove it")
    _refuse_links(config_path)
    here = _pointing(doc, refs, boot)
    _check_tls(prov, here.get("broker", {}))
    try:
        config.parse(config_path, config.merged(config.read_raw(config_path), here))
    except ConfigError as e:
        if e.key != "-" and _sets(doc, e.key.split(".")):
            raise ConfigError(prov, e.key, e.reason) from e
        raise
    return Plan(str(doc["device_id"]), tuple(_dotted(doc)), files, _pointing(doc, refs, etc))


def _refuse_links(config_path: str) -> None:
    """The agent's user may write the etc directory (it rewrites its configuration), and
    config.install_config, run here as root, opens the configuration's companions without
    O_NOFOLLOW: a link planted at one of them would have root write through it."""
    for path in (config_path, config_path + config.PREVIOUS_SUFFIX, config_path + ".new"):
        if os.path.islink(path):
            raise ConfigError(path, "-", "is a symbolic link: refused, root does not write through it (remove it)")


def _refs(prov: str, doc: Mapping[str, Any]) -> list[Ref]:
    """The values of ``doc`` that name files: the TLS files, the command trust keys."""
    broker = doc.get("broker", {})
    commands = doc.get("commands", {})
    for key, table in (("broker", broker), ("commands", commands)):
        if not isinstance(table, dict):
            raise ConfigError(prov, key, "must be a table")
    refs: list[Ref] = [(("broker",), key) for key in TLS_FILES if broker.get(key, "") != ""]
    for name in KEY_TABLES:
        keys = commands.get(name, {})
        if not isinstance(keys, dict):
            raise ConfigError(prov, f"commands.{name}", "must be a table of key id = file name")
        refs += [(("commands", name), kid) for kid in keys]
    return refs


def _get(doc: Mapping[str, Any], where: tuple[str, ...]) -> Any:
    for part in where:
        doc = doc[part]
    return doc


def _read_named(prov: str, key: str, name: Any, boot: str, etc: str, config_path: str) -> bytes:
    """The bytes of the file ``key`` names beside the provisioning file."""
    if (not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == PROVISION_FILE
            or name.endswith(TMP_SUFFIX)):
        raise ConfigError(prov, key, f"must name a file beside {PROVISION_FILE} (no '/', not hidden)")
    dest, own = os.path.abspath(os.path.join(etc, name)), os.path.abspath(config_path)
    if dest == own or dest.startswith(own + "."):
        raise ConfigError(prov, key, f"{name} would overwrite the agent's configuration in {etc}")
    path = os.path.join(boot, name)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise ConfigError(prov, key, f"{path} is not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(prov, key, f"cannot read {path}: {e.strerror or e}") from e


def _pointing(doc: Mapping[str, Any], refs: list[Ref], directory: str) -> dict[str, Any]:
    """``doc`` with each file name made the path of that file in ``directory``."""
    out = copy.deepcopy(dict(doc))
    for where, key in refs:
        table = _get(out, where)
        table[key] = os.path.join(directory, table[key])
    return out


def _check_tls(prov: str, broker: Mapping[str, Any]) -> None:
    """The TLS files loaded as the agent's TLS client loads them: a wrong one is refused
    now, at the flashing station's test boot, not found at a unit's first connection in
    the field."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for key in ("tls_ca", "tls_cert"):
        if broker.get(key):
            try:
                ctx.load_verify_locations(cafile=broker[key])
            except ssl.SSLError as e:
                raise ConfigError(prov, f"broker.{key}", f"not a PEM certificate ({e.reason or e})") from e

    def encrypted() -> bytes:
        raise ConfigError(prov, "broker.tls_key", "is encrypted: the agent reads an unencrypted key (its mode "
                                                  "0600 protects it)")

    if broker.get("tls_cert") and broker.get("tls_key"):
        try:
            ctx.load_cert_chain(broker["tls_cert"], broker["tls_key"], password=encrypted)
        except ssl.SSLError as e:
            reason = ("is not the key of broker.tls_cert" if e.reason == "KEY_VALUES_MISMATCH"
                      else f"not a PEM private key ({e.reason or e})")
            raise ConfigError(prov, "broker.tls_key", reason) from e


def _sets(doc: Any, parts: list[str]) -> bool:
    """Whether the dotted key (as split) is one ``doc`` sets."""
    for part in parts:
        if not isinstance(doc, dict) or part not in doc:
            return False
        doc = doc[part]
    return True


def _dotted(doc: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def _user(name: str) -> tuple[int, int] | None:
    """The uid and gid of ``name``; None without such a user (a developer's machine)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write_private(path: str, data: bytes, ids: tuple[int, int] | None) -> str:
    """Step 2 for one file: mode and owner set before a byte is written, fsynced, renamed
    into place. O_NOFOLLOW: a link planted at the temporary name is not written through."""
    tmp = path + TMP_SUFFIX
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, MODE)
        with os.fdopen(fd, "wb") as f:
            _protect(fd, ids)
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(path, "-", f"cannot write: {e.strerror or e}") from e
    return path


def _protect(fd: int, ids: tuple[int, int] | None) -> None:
    """Mode 0600 first, then the owner (once the file is the service user's, changing
    its mode would take CAP_FOWNER)."""
    os.fchmod(fd, MODE)
    if ids is not None:
        os.fchown(fd, *ids)


def _install_config(path: str, patch: Mapping[str, Any], ids: tuple[int, int] | None) -> bool:
    """Step 3; whether the file changed (a rerun finds it done). It holds the broker
    password now: created 0600 (the umask), then given to the service user."""
    text = config.render_config(path, config.merged(config.read_raw(path), patch))
    try:
        with open(path, "rb") as f:
            written = f.read() != text
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read: {e.strerror or e}") from e
    if written:
        umask = os.umask(0o077)
        try:
            config.install_config(path, text)
        finally:
            os.umask(umask)
    for name in (path, path + config.PREVIOUS_SUFFIX):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # no previous file: the configuration was not replaced before
        except OSError as e:
            raise ConfigError(name, "-", f"cannot open: {e.strerror or e}") from e
        try:
            _protect(fd, ids)
            os.fsync(fd)
        except OSError as e:
            raise ConfigError(name, "-", f"cannot protect: {e.strerror or e}") from e
        finally:
            os.close(fd)
    return written


def _leftovers(boot: str, etc: str, entries: list[str]) -> list[str]:
    """A cut during step 5 left files without their provision.toml: each is removed if
    it is byte for byte its installed copy; if any is not, nothing is."""
    for name in entries:
        path, copy_path = os.path.join(boot, name), os.path.join(etc, name)
        content = _content(path)
        if content is None or content != _content(copy_path):
            raise ConfigError(path, "-", f"has no {PROVISION_FILE} beside it and is not a copy of {copy_path}: add "
                                         f"the {PROVISION_FILE} that names it, or remove it")
    return _remove(boot, entries)


def _content(path: str) -> bytes | None:
    """The bytes of a regular file; None for anything else, or nothing."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read: {e.strerror or e}") from e


def _remove(directory: str, names: list[str]) -> list[str]:
    """Remove ``names`` from ``directory`` and make that durable; their paths."""
    paths = [os.path.join(directory, name) for name in names]
    for path in paths:
        try:
            os.unlink(path)
        except OSError as e:
            raise ConfigError(path, "-", f"cannot remove: {e.strerror or e}") from e
    _fsync_dir(directory)
    return paths


def _fsync_dir(path: str) -> None:
    """A directory's entries made durable (renames, removals)."""
    try:
        config.sync_dir(path)
    except OSError as e:
        raise ConfigError(path, "-", f"cannot sync: {e.strerror or e}") from e
