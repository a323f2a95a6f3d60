"""The run manifest: JSON Lines ground truth of what the simulator delivered.

CPython only. Format in MANIFEST.md. Every line is flushed as written so a killed
simulator leaves a readable prefix.
"""

from __future__ import annotations

import json
from typing import IO, Any


class Manifest:
    """Writes header, frame, truth and end records to a JSON Lines file."""

    def __init__(self, path: str) -> None:
        """Create (truncate) ``path``; records follow one per line."""
        self._f: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - lives for the run

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS."""
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Close the file (after the end record)."""
        self._f.close()
