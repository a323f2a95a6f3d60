"""Sources: where bytes come from. Classes are imported lazily by kind, so a missing
optional dependency fails only the source that needs it, with a clear error."""

from __future__ import annotations

import importlib

from agent.config import SourceConfig
from agent.errors import SourceError
from agent.sources.base import Source

_REGISTRY = {
    "uart": ("agent.sources.uart", "UartSource"),
    "slcan": ("agent.sources.slcan", "SlcanSource"),
    "socketcan": ("agent.sources.socketcan", "SocketcanSource"),
    "candump": ("agent.sources.candump", "CandumpSource"),
    "python-can": ("agent.sources.pythoncan", "PythonCanSource"),
}


def make_source(cfg: SourceConfig) -> Source:
    """The source for ``cfg.kind``; an import failure names the kind and the cause."""
    module, cls = _REGISTRY[cfg.kind]
    try:
        return getattr(importlib.import_module(module), cls)(cfg)  # type: ignore[no-any-return]
    except ImportError as e:
        raise SourceError(f"source {cfg.name!r} ({cfg.kind}) cannot load: {e}") from e
