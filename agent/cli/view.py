"""How the technicians' commands speak: one module, so every command looks and behaves
alike on a terminal and in a pipe.

- On a terminal: rich tables, live views and progress bars, at most 80 columns wide
  (a console on the unit's serial line, an SSH window on a phone).
- Piped, or with ``--json``: plain text or one JSON document, no colour, no cursor
  movement, so ``grep`` and scripts read it.
- Times as the technician's local clock with an age: ``12:03:41, 2 s ago``.

rich is imported inside the functions that draw, so ``ebike-agent --help`` does not
load it.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

WIDTH = 80


def is_tty(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (stdout by default) is a terminal a person looks at."""
    s = stream if stream is not None else sys.stdout
    try:
        return s.isatty()
    except (AttributeError, ValueError):
        return False


def console(stream: IO[str] | None = None) -> Any:
    """A rich Console no wider than WIDTH; plain (no colour, no markup codes) when piped."""
    from rich.console import Console

    tty = is_tty(stream)
    c = Console(file=stream or sys.stdout, highlight=False, soft_wrap=False,
                force_terminal=tty, no_color=not tty, emoji=False)
    c.width = min(c.width, WIDTH) if tty else WIDTH
    return c


def age(seconds: float | None) -> str:
    """A duration as a person says it: ``2 s``, ``4 min``, ``3 h 20 min``, ``2 d 5 h``."""
    if seconds is None:
        return "never"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s" if s < 1 else f"{s:.0f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def when(t: float | None, now: float | None = None) -> str:
    """An epoch time as the local wall clock and its age: ``12:03:41, 2 s ago``; the date
    too when it is not today; ``never`` for None."""
    if t is None:
        return "never"
    now = time.time() if now is None else now
    local, today = time.localtime(t), time.localtime(now)
    clock = time.strftime("%H:%M:%S", local)
    if local[:3] != today[:3]:
        clock = time.strftime("%Y-%m-%d ", local) + clock
    dt = now - t
    return f"{clock}, {age(dt)} ago" if dt >= 0 else f"{clock}, in {age(-dt)}"


def number(n: float) -> str:
    """An integer count with thousands separators, as in ``1,240 bytes``."""
    return f"{int(n):,}"


def print_json(obj: Any) -> None:
    """``--json`` output: one document, keys as the command's JSON contract names them."""
    print(json.dumps(obj, indent=1, default=str))


# A line of a view: its text and a rich style ("" for none; the style is dropped when piped).
Line = tuple[str, str]


def lines(rows: Sequence[Line], stream: IO[str] | None = None) -> None:
    """Lines no wider than WIDTH, a long one wrapped with its indentation kept (and two
    more); styled by rich on a terminal."""
    out = stream or sys.stdout
    con = console(out) if is_tty(out) else None
    if con is not None:
        from rich.text import Text
    for text, style in rows:
        indent = " " * (len(text) - len(text.lstrip(" ")) + 2)
        for part in textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]:
            if con is None:
                print(part, file=out)
            else:
                con.print(Text(part, style=style))


class LiveView:
    """A view redrawn in place on a terminal (``watch``): rich's Live, started on entry
    and stopped on exit, so Ctrl-C leaves the terminal as it was."""

    def __init__(self) -> None:
        from rich.live import Live

        self._live = Live(console=console(), auto_refresh=False, transient=False)

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()

    def show(self, rows: Sequence[Line]) -> None:
        from rich.console import Group
        from rich.text import Text

        self._live.update(Group(*(Text(text, style=style) for text, style in rows)), refresh=True)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]],
          stream: IO[str] | None = None) -> None:
    """A table: rich's box on a terminal; piped, the columns space-aligned with a header
    line, so ``awk`` can read them. Cells are printed with ``str``."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    if is_tty(stream):
        from rich.table import Table

        t = Table(title=title, title_justify="left", expand=False, pad_edge=False)
        for col in columns:
            t.add_column(col, overflow="fold")
        for row in cells:
            t.add_row(*row)
        console(stream).print(t)
        return
    out = stream or sys.stdout
    if title:
        print(title, file=out)
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    for row in [list(columns), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def check(ok: bool | None, what: str, detail: str = "", fix: str = "", stream: IO[str] | None = None) -> None:
    """One line of a check list: ``PASS``, ``FAIL`` (with the fix to try) or ``SKIP``
    (``ok`` None: the check could not be made, and ``detail`` says why)."""
    word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    text = what + (f": {detail}" if detail else "")
    fix = f"-> {fix}" if fix and ok is False else ""
    if not is_tty(stream):  # one line per check, for grep
        print(f"{word}  {text}" + (f" {fix}" if fix else ""), file=stream or sys.stdout)
        return
    from rich.text import Text

    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}[word]
    c = console(stream)
    # On a terminal the fix goes on its own line when the check's does not fit; every
    # line wrapped under the text, not under the word.
    one = f"{word}  {text}" + (f" {fix}" if fix else "")
    parts = [one] if len(one) <= c.width else [f"{word}  {text}", *([" " * 6 + fix] if fix else [])]
    for n, part in enumerate(parts):
        for k, piece in enumerate(textwrap.wrap(part, c.width, subsequent_indent=" " * 6, break_on_hyphens=False)):
            if n == 0 and k == 0:
                c.print(Text.assemble((word, style), piece[len(word):]))
            else:
                c.print(Text(piece))


class Progress:
    """A progress bar on a terminal; piped, nothing until ``done`` prints one line."""

    def __init__(self, bar: Any, task: Any) -> None:
        self._bar = bar
        self._task = task

    def update(self, completed: float, total: float | None = None, note: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total, note=note)


@contextmanager
def progress(description: str, total: float | None) -> Iterator[Progress]:
    """``with progress("export", n) as p: p.update(done)``; stderr, so a pipe of stdout
    carries only the data."""
    if not is_tty(sys.stderr):
        yield Progress(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             TextColumn("{task.fields[note]}"), console=console(sys.stderr), transient=False) as bar:
        yield Progress(bar, bar.add_task(description, total=total, note=""))
