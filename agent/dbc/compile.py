"""Compile a DBC file once, at start-up, into the flat tables the fusion kernel reads.

cantools parses the DBC (it is the one module that imports cantools); the hot loop
then never touches a cantools object: per frame it does one dict lookup for the
message and, per signal, a shift, a mask, a multiply and an add.
"""

from __future__ import annotations

import os
from array import array
from importlib import resources
from typing import Any

import cantools
import cantools.database

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
        self.sig_names: list[str] = []
        self.sig_dbc_names: list[str] = []
        self.local_names: dict[int, str] = {}
        self.local_ids: dict[str, int] = {}

    @property
    def id_space(self) -> int:
        """Size of per-signal arrays able to hold every id this DBC produces."""
        return max(ID_SPACE, LOCAL_ID_BASE + len(self.local_names))

    def kernel_tables(self) -> tuple[Any, ...]:
        """The arguments ``Kernel.set_can_tables`` takes, in its order."""
        return (
            self.msg_index, self.msg_len, self.msg_first, self.msg_count,
            self.sig_big_endian, self.sig_shift, self.sig_length, self.sig_signed,
            self.sig_factor, self.sig_offset, self.sig_id, self.sig_no_value,
            self.sig_mux_row, self.sig_mux_value,
        )

    def signal_name(self, sig_id: int) -> str:
        """Name for an id this DBC produces (catalogue or ``<message>.<signal>``)."""
        return self.local_names.get(sig_id) or BY_ID[sig_id].name


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


def compile_dbc(path: str) -> CompiledDbc:
    """Parse ``path`` with cantools and flatten it; a bad file is a ConfigError naming it."""
    try:
        db = load_cantools(path)
    except (OSError, cantools.database.errors.Error, ValueError) as e:
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
    out.sig_names.append(name)
    out.sig_dbc_names.append(sig.name)
    return len(out.sig_id) - 1


def profile_path(name: str) -> str:
    """Path of a DBC shipped in the package (``bafang``), or ``name`` itself if it is a file."""
    if name in PROFILES:
        return str(resources.files("agent.dbc") / "profiles" / f"{name}.dbc")
    if os.path.exists(name):
        return name
    raise ConfigError(name, "dbc", f"no such DBC file or shipped profile (profiles: {', '.join(PROFILES)})")


def load_cantools(path: str) -> Any:
    """The cantools database itself (also for the differential tests and the benchmark)."""
    return cantools.database.load_file(path, database_format="dbc", strict=True)
