"""Selects the fusion kernel: the Cython build when it is there, the pure twin when
``EBIKE_AGENT_PUREPYTHON=1`` or the build is absent (msgpack's and cbor2's pattern).

Both classes stay importable (``KERNELS``) so tests can run each and compare them.
``KernelApi`` is the kernel as the agent sees it, whichever build: what the runtime,
the CLI and devtools call (agent/fusion/_kernel_py.py documents each method, and
agent/fusion/spec.py the codes in the tuples they hand back).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from agent.fusion import _kernel_py

# A kernel output: a tuple whose first item is one of spec's OUT_* codes.
Output = tuple[Any, ...]
Bytes = bytes | bytearray | memoryview


class KernelApi(Protocol):
    """The public face of ``Kernel`` (both builds)."""

    id_space: int
    # The index the agent gave the port it feeds next.
    source: int
    # False: every alarm judged in full at every fusion step (the tests' reference).
    incremental: bool

    @property
    def frames(self) -> int: ...

    def set_params(self, values: Sequence[float]) -> None: ...

    def set_ocv(self, curve: Sequence[tuple[float, float]]) -> None: ...

    def set_alarms(self, rows: Sequence[tuple[Any, ...]]) -> None: ...

    def set_policy(self, sid: int, mode: int, deadband: float) -> None: ...

    def set_source_raw(self, source: int, on: bool) -> None: ...

    def set_can_tables(self, msg_index: dict[int, int], msg_len: Sequence[int], msg_first: Sequence[int],
                       msg_count: Sequence[int], big_endian: Sequence[int], shift: Sequence[int],
                       length: Sequence[int], signed: Sequence[int], factor: Sequence[float],
                       offset: Sequence[float], sig_id: Sequence[int], no_value: Sequence[int],
                       mux_row: Sequence[int], mux_value: Sequence[int], row_min: Sequence[float],
                       row_max: Sequence[float]) -> None: ...

    def set_limits(self, lo: Sequence[float], hi: Sequence[float], rate: Sequence[float]) -> None: ...

    def set_can_source(self, source: int) -> None: ...

    def health_slot(self, source: int) -> int: ...

    def set_condition(self, code: int, value: float) -> None: ...

    def restore(self, values: Sequence[float]) -> None: ...

    def note_frames(self, slot: int, times: list[float]) -> None: ...

    def note_errors(self, slot: int, checksum: int, counter: int) -> None: ...

    def feed_values(self, ids: list[int], times: list[float], values: list[float]) -> list[Output]: ...

    def feed_frames(self, keys: list[int], datas: list[bytes], times: list[float]) -> list[Output]: ...

    def feed_packed(self, buf: Bytes, t: float) -> list[Output]: ...

    def feed_slcan(self, buf: Bytes, t: float) -> tuple[int, list[Output]]: ...

    def feed_candump(self, buf: Bytes, t_offset: float) -> tuple[int, list[Output]]: ...

    def close_due(self, now: float) -> list[Output]: ...

    def flush(self) -> list[Output]: ...

    def decode_frame(self, key: int, data: Bytes) -> list[tuple[int, float]] | None: ...

    def snapshot(self, now: float) -> Output: ...

    def latest(self) -> list[tuple[int, float, float]]: ...

    def state(self, now: float) -> list[tuple[int, float, float, int, bool]]: ...

    def persistent(self) -> list[float]: ...

    def alarms(self) -> list[tuple[int, int, int, float, float]]: ...

    def health(self, now: float) -> list[tuple[int, int, int, float, int, int, int, int, float]]: ...

    def counters(self) -> dict[str, int]: ...

    def refusals(self, source: int) -> list[tuple[int, int, int]]: ...

    def motion(self, now: float, still_kmh: float) -> tuple[int, int, float, int, float, int, float, int, float,
                                                             float]: ...


class KernelClass(Protocol):
    """A kernel build's class: ``Kernel(id_space, window, history, ring)``."""

    def __call__(self, id_space: int, window: float, history: float = ..., ring: int = ...) -> KernelApi: ...


KERNELS: dict[str, KernelClass] = {"py": _kernel_py.Kernel}
try:
    from agent.fusion import _kernel  # type: ignore[attr-defined]
except ImportError:
    pass
else:
    KERNELS["c"] = _kernel.Kernel

PURE_REQUESTED = os.environ.get("EBIKE_AGENT_PUREPYTHON", "") == "1"
BUILD = "py" if PURE_REQUESTED or "c" not in KERNELS else "c"
Kernel = KERNELS[BUILD]
