"""The note packaging/update-guard leaves beside the outbox when a new version failed its
health check and the previous one was put back: the version running again turns it into
an ``upd`` record (docs/wire.cddl) in the outbox, so the cloud hears of it at the next
connection, however long that takes, and removes the note only once that is committed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from agent import wire

log = logging.getLogger(__name__)

NOTE = "update-failed.json"


def note_path(outbox_path: str) -> str:
    return os.path.join(os.path.dirname(outbox_path) or ".", NOTE)


def failed_update(outbox_path: str, running: str) -> tuple[float, bytes] | None:
    """The rollback note as (time, record body), or None when there is none. A note that
    does not parse is still reported, with its text: the cloud must hear of the rollback."""
    path = note_path(outbox_path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(65536)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s: cannot read the rollback note (%s); not reported", path, e)
        return None
    try:
        note = json.loads(text)
        t = float(note["t"])
        body = wire.update_record(t, str(note["failed"]), str(note["running"]), str(note["why"]))
    except (ValueError, KeyError, TypeError) as e:
        t = time.time()
        body = wire.update_record(t, "unknown", running, f"unreadable rollback note ({e}): {text[:200]}")
    log.warning("the last upgrade was rolled back: reporting it to the cloud (%s)", path)
    return t, body


def reported(outbox_path: str) -> None:
    """The note's record is committed in the outbox: the note goes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(note_path(outbox_path))
