"""Sources: where bytes come from. Classes are imported lazily by kind, so a missing
optional dependency fails only the source that needs it, with a clear error.

The package owns the device drivers (serial UART, SLCAN, SocketCAN, candump replay,
python-can) and the one table of kinds (kinds.py). A source may import agent.config
(its SourceConfig), agent.errors and its own driver library (pyserial, python-can),
nothing of the stages above it. This module imports agent.config only for type
checking: agent.config reads kinds.py, which runs this module first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from agent.errors import SourceError
from agent.sources.kinds import KINDS

if TYPE_CHECKING:
    from agent.config import SourceConfig
    from agent.sources.base import Source


def make_source(cfg: SourceConfig) -> Source:
    """The source for ``cfg.kind``; an import failure names the kind and the cause."""
    kind = KINDS[cfg.kind]
    try:
        return getattr(importlib.import_module(kind.module), kind.cls)(cfg)  # type: ignore[no-any-return]
    except ImportError as e:
        raise SourceError(f"source {cfg.name!r} ({cfg.kind}) cannot load: {e}") from e
