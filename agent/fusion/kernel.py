"""Selects the fusion kernel: the Cython build when it is there, the pure twin when
``EBIKE_AGENT_PUREPYTHON=1`` or the build is absent (msgpack's and cbor2's pattern).

Both classes stay importable (``KERNELS``) so tests can run each and compare them.
"""

from __future__ import annotations

import os
from typing import Any

from agent.fusion import _kernel_py

KERNELS: dict[str, Any] = {"py": _kernel_py.Kernel}
try:
    from agent.fusion import _kernel  # type: ignore[attr-defined]
except ImportError:
    pass
else:
    KERNELS["c"] = _kernel.Kernel

PURE_REQUESTED = os.environ.get("EBIKE_AGENT_PUREPYTHON", "") == "1"
BUILD = "py" if PURE_REQUESTED or "c" not in KERNELS else "c"
Kernel = KERNELS[BUILD]
