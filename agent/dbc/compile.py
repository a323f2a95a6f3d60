"""Compile a DBC file once, at start-up, into the flat tables the fusion kernel reads.

cantools parses the DBC (this is the one module that imports cantools); the hot loop
then never touches a cantools object: per frame it does one dict lookup for the
message and, per signal, a shift, a mask, a multiply and an add. The agent compiles in
a child process (``compile_isolated``, ``python -m agent.dbc.compile PATH``), so the
~15 MB cantools and its parser take stay out of a process that runs for months.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from array import array
from typing import Any

from agent.errors import ConfigError
from agent.signals import BY_ID, BY_NAME, ID_SPACE

EXTENDED_FLAG = 0x80000000
# Signals of a DBC that maps them to no catalogue name get device-local ids from
# here up, so they never collide with catalogue ids.
LOCAL_ID_BASE = 1000
# A DBC signal attribute naming the catalogue signal it carries.
NAME_ATTRIBUTE = "SignalName"
# A DBC signal attribute: a raw value that means "no value" (e.g. FF = no sensor).
NO_VALUE_ATTRIBUTE = "NoValueRaw"

PROFILES = ("bafang",)
# The CompiledDbc arrays, in the order they are written to JSON.
_ARRAYS = ("msg_len", "msg_first", "msg_count", "sig_big_endian", "sig_shift", "sig_length", "sig_signed",
           "sig_factor", "sig_offset", "sig_id", "sig_no_value", "sig_mux_row", "sig_mux_value", "sig_min", "sig_max")
# The bound of a DBC signal range the DBC leaves open (beyond any value; JSON-safe).
NO_LIMIT = 1e300


class CompiledDbc:
    """Flat tables of one DBC: message key -> signal rows, as the kernel wants them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.msg_index: dict[int, int] = {}
        self.msg_names: list[str] = []
        self.msg_len = array("i")
        self.msg_first = array("i")
        self.msg_count = array("i")
        self.sig_big_endian = array("b")
        self.sig_shift = array("i")
        self.sig_length = array("i")
        self.sig_signed = array("b")
        self.sig_factor = array("d")
        self.sig_offset = array("d")
        self.sig_id = array("i")
        self.sig_no_value = array("q")
        self.sig_mux_row = array("i")
        self.sig_mux_value = array("q")
        # The DBC's own [minimum|maximum] of each row, +-NO_LIMIT where it gives none.
        self.sig_min = array("d")
        self.sig_max = array("d")
        self.sig_names: list[str] = []
        self.sig_dbc_names: list[str] = []
        self.local_names: dict[int, str] = {}
        self.local_ids: dict[str, int] = {}

    @property
    def id_space(self) -> int:
        """Size of per-signal arrays able to hold every id this DBC produces."""
        return max(ID_SPACE, LOCAL_ID_BASE + len(self.local_names))

    def decimals(self) -> dict[int, int]:
        """Decimals each signal id's raw samples are sent with: the finest grid of its rows'
        factor and offset (agent/raw.py)."""
        out: dict[int, int] = {}
        for sid, factor, offset in zip(self.sig_id, self.sig_factor, self.sig_offset, strict=True):
            out[sid] = max(out.get(sid, 0), decimals_of(factor, offset))
        return out

    def kernel_tables(self) -> tuple[Any, ...]:
        """The arguments ``Kernel.set_can_tables`` takes, in its order."""
        return (
            self.msg_index, self.msg_len, self.msg_first, self.msg_count,
            self.sig_big_endian, self.sig_shift, self.sig_length, self.sig_signed,
            self.sig_factor, self.sig_offset, self.sig_id, self.sig_no_value,
            self.sig_mux_row, self.sig_mux_value, self.sig_min, self.sig_max,
        )

    def ranges(self) -> dict[int, tuple[float, float]]:
        """Signal id -> the range its rows declare (their union, where several rows carry
        one signal), for tools that show a frame's values by signal; the kernel applies
        each row's own range to the values of that row."""
        out: dict[int, tuple[float, float]] = {}
        for sid, lo, hi in zip(self.sig_id, self.sig_min, self.sig_max, strict=True):
            old = out.get(sid)
            out[sid] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return out

    def signal_name(self, sig_id: int) -> str:
        """Name for an id this DBC produces (catalogue or ``<message>.<signal>``)."""
        return self.local_names.get(sig_id) or BY_ID[sig_id].name

    def to_json(self) -> dict[str, Any]:
        """Everything but the path, as JSON types (floats round-trip exactly)."""
        out: dict[str, Any] = {name: list(getattr(self, name)) for name in _ARRAYS}
        out.update(msg_index=sorted(self.msg_index.items()), msg_names=self.msg_names, sig_names=self.sig_names,
                   sig_dbc_names=self.sig_dbc_names, local_names=sorted(self.local_names.items()))
        return out

    @classmethod
    def from_json(cls, path: str, data: dict[str, Any]) -> CompiledDbc:
        out = cls(path)
        for name in _ARRAYS:
            getattr(out, name).extend(data[name])
        out.msg_index = {int(k): int(v) for k, v in data["msg_index"]}
        out.msg_names = list(data["msg_names"])
        out.sig_names = list(data["sig_names"])
        out.sig_dbc_names = list(data["sig_dbc_names"])
        out.local_names = {int(k): str(v) for k, v in data["local_names"]}
        out.local_ids = {v: k for k, v in out.local_names.items()}
        return out


# The finest grid a raw sample is sent on (agent/wire.py raw_record): 1e-9.
_MAX_DECIMALS = 9


def decimals_of(factor: float, offset: float = 0.0) -> int:
    """Decimals of a DBC signal's grid ``offset + raw x factor``: the fewest (0-9) that
    write both exactly (0.5 -> 1, 0.0625 -> 4); 9 if none do."""
    for d in range(_MAX_DECIMALS + 1):
        scale = 10.0 ** d
        if all(abs(x * scale - round(x * scale)) <= 1e-9 * max(1.0, abs(x * scale)) for x in (factor, offset)):
            return d
    return _MAX_DECIMALS


def frame_key(can_id: int, extended: bool) -> int:
    """The kernel's message key: the id with bit 31 set for 29-bit frames, as in DBC files."""
    return can_id | EXTENDED_FLAG if extended else can_id


def _shift(signal: Any) -> int:
    """Right shift that brings the signal's lsb to bit 0 of the frame read as a u64.

    Little-endian signals are read from the frame as a little-endian u64, big-endian
    (Motorola) ones from the frame as a big-endian u64, where the DBC start bit names
    the msb in sawtooth numbering.
    """
    if signal.byte_order == "little_endian":
        return int(signal.start)
    msb_from_top = 8 * (signal.start // 8) + (7 - signal.start % 8)
    return int(63 - (msb_from_top + signal.length - 1))


def _attribute(signal: Any, name: str) -> Any:
    attrs = signal.dbc.attributes if signal.dbc is not None else {}
    return attrs[name].value if name in attrs else None


def _cantools() -> Any:
    """cantools, imported on first use: the agent's own process never needs it."""
    import cantools.database

    return cantools


def compile_dbc(path: str) -> CompiledDbc:
    """Parse ``path`` with cantools and flatten it; a bad file is a ConfigError naming it."""
    try:
        db = load_cantools(path)
    except (OSError, _cantools().database.errors.Error, ValueError) as e:
        raise ConfigError(path, "dbc", f"cannot load DBC: {e}") from e
    out = CompiledDbc(path)
    for msg in db.messages:
        if msg.is_container:
            raise ConfigError(path, msg.name, "container messages are not supported")
        key = frame_key(msg.frame_id, msg.is_extended_frame)
        out.msg_index[key] = len(out.msg_names)
        out.msg_names.append(msg.name)
        out.msg_len.append(msg.length)
        out.msg_first.append(len(out.sig_id))
        rows: dict[str, int] = {}
        plain = [s for s in msg.signals if not s.multiplexer_ids]
        muxed = [s for s in msg.signals if s.multiplexer_ids]
        for sig in plain:
            rows[sig.name] = _add_signal(out, path, msg.name, sig, -1, -1)
        for sig in muxed:
            where = f"{msg.name}.{sig.name}"
            if sig.multiplexer_signal not in rows:
                raise ConfigError(path, where, "nested multiplexing is not supported")
            for value in sig.multiplexer_ids:
                _add_signal(out, path, msg.name, sig, rows[sig.multiplexer_signal], value)
        out.msg_count.append(len(out.sig_id) - out.msg_first[-1])
    return out


def _add_signal(out: CompiledDbc, path: str, msg_name: str, sig: Any, mux_row: int, mux_value: int) -> int:
    """Append one table row; a multiplexed signal gets a row per multiplexer value."""
    where = f"{msg_name}.{sig.name}"
    if sig.is_float:
        raise ConfigError(path, where, "IEEE float signals are not supported yet")
    name = _attribute(sig, NAME_ATTRIBUTE) or ""
    if name:
        if name not in BY_NAME:
            raise ConfigError(path, where, f"{NAME_ATTRIBUTE} {name!r} is not in the catalogue")
        sig_id = BY_NAME[name].id
    else:
        name = where
        sig_id = out.local_ids.setdefault(name, LOCAL_ID_BASE + len(out.local_ids))
        out.local_names[sig_id] = name
    lo = -NO_LIMIT if sig.minimum is None else float(sig.minimum)
    hi = NO_LIMIT if sig.maximum is None else float(sig.maximum)
    if sig_id in BY_ID and (lo > BY_ID[sig_id].maximum or hi < BY_ID[sig_id].minimum or lo > hi):
        cat = BY_ID[sig_id]
        raise ConfigError(path, where, f"range [{lo:g}|{hi:g}] holds no value {name} can have "
                                       f"({cat.minimum:g} to {cat.maximum:g} {cat.unit})")
    no_value = _attribute(sig, NO_VALUE_ATTRIBUTE)
    out.sig_big_endian.append(0 if sig.byte_order == "little_endian" else 1)
    out.sig_shift.append(_shift(sig))
    out.sig_length.append(sig.length)
    out.sig_signed.append(1 if sig.is_signed else 0)
    out.sig_factor.append(float(sig.scale))
    out.sig_offset.append(float(sig.offset))
    out.sig_id.append(sig_id)
    out.sig_no_value.append(-1 if no_value is None else int(no_value))
    out.sig_mux_row.append(mux_row)
    out.sig_mux_value.append(mux_value)
    out.sig_min.append(lo)
    out.sig_max.append(hi)
    out.sig_names.append(name)
    out.sig_dbc_names.append(sig.name)
    return len(out.sig_id) - 1


def profile_path(name: str) -> str:
    """Path of a DBC shipped in the package (``bafang``), or ``name`` itself if it is a file.
    The package is installed as files (wheel, .deb), so the profiles sit beside this
    module: importlib.resources would cost the running agent ~0.5 MB of RSS (it brings
    zipfile, tempfile, shutil, random) for the same path."""
    if name in PROFILES:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", f"{name}.dbc")
    if os.path.exists(name):
        return name
    raise ConfigError(name, "dbc", f"no such DBC file or shipped profile (profiles: {', '.join(PROFILES)})")


def load_cantools(path: str) -> Any:
    """The cantools database itself (also for the differential tests and the benchmark)."""
    return _cantools().database.load_file(path, database_format="dbc", strict=True)


def compile_isolated(path: str) -> CompiledDbc:
    """``compile_dbc`` in a child process: the same tables (and the same ConfigError for
    a bad file), without cantools in this process."""
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.dbc.compile", path], capture_output=True, text=True,
                              timeout=300)
        result = json.loads(proc.stdout) if proc.stdout else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        raise ConfigError(path, "dbc", f"the DBC compiler did not run: {e}") from e
    if proc.returncode != 0:
        if "reason" in result:
            raise ConfigError(path, result["key"], result["reason"])
        raise ConfigError(path, "dbc", f"the DBC compiler failed: {proc.stderr.strip()[-500:]}")
    return CompiledDbc.from_json(path, result)


def main(argv: list[str]) -> int:
    """``python -m agent.dbc.compile PATH``: the tables as JSON on stdout; a ConfigError
    as ``{"key", "reason"}`` and exit status 1."""
    try:
        out = compile_dbc(argv[0])
    except ConfigError as e:
        print(json.dumps({"key": e.key, "reason": e.reason}))
        return 1
    print(json.dumps(out.to_json()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
