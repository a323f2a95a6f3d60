"""Coarser windows for a data budget: k closed windows of one set merged into one.

The data budget (agent/uplink/budget.py) lowers the resolution of the history windows,
then of the live ones, when the month's pace would overrun it. The kernel keeps closing
windows at its own length; the record stage hands each closed window here first, and a
record is made only of every ``k`` of them, merged by ``merge_rows`` (the one merge
both sets use). A merged window is an ordinary window record whose length spans its
parts, so the wire and the consumer need nothing new.
"""

from __future__ import annotations

from typing import Any

# A kernel window row: (signal id, count, min, max, mean, last, last_time).
Row = tuple[Any, ...]


def merge_rows(windows: list[list[Row]]) -> list[Row]:
    """The rows of consecutive windows as one window's: counts added, min of the mins,
    max of the maxes, the mean weighted by the counts, and the last value of the signal's
    latest sample. A signal keeps the order of its first appearance."""
    merged: dict[int, list[Any]] = {}
    for rows in windows:
        for sid, count, vmin, vmax, mean, last, last_t in rows:
            m = merged.get(sid)
            if m is None:
                merged[sid] = [sid, count, vmin, vmax, mean * count, last, last_t]
                continue
            m[1] += count
            m[2] = min(m[2], vmin)
            m[3] = max(m[3], vmax)
            m[4] += mean * count
            if last_t >= m[6]:
                m[5], m[6] = last, last_t
    return [(sid, count, vmin, vmax, total / count if count else total, last, last_t)
            for sid, count, vmin, vmax, total, last, last_t in merged.values()]


class Coalescer:
    """Windows of one set gathered ``k`` at a time (``k`` = 1: each passes through as is)."""

    def __init__(self) -> None:
        self.k = 1
        self.parts: list[list[Row]] = []
        self.start = 0.0
        self.end = 0.0

    def set_factor(self, k: int) -> tuple[float, float, list[Row], int] | None:
        """A new ``k``; the windows gathered so far come back as one (or None)."""
        self.k = max(1, k)
        return self.flush() if len(self.parts) >= self.k or self.k == 1 else None

    def add(self, start: float, length: float, rows: list[Row]) -> tuple[float, float, list[Row], int] | None:
        """One closed window in; ``(start, length, rows, windows merged)`` out once ``k``
        are gathered, else None."""
        if self.k == 1 and not self.parts:
            return start, length, rows, 1
        if not self.parts:
            self.start = start
        self.parts.append(rows)
        self.end = start + length
        return self.flush() if len(self.parts) >= self.k else None

    def flush(self) -> tuple[float, float, list[Row], int] | None:
        """What is gathered, as one window, even if fewer than ``k`` (at a stop)."""
        if not self.parts:
            return None
        parts, self.parts = self.parts, []
        return self.start, self.end - self.start, merge_rows(parts), len(parts)
