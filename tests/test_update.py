"""The rollback note packaging/update-guard leaves (agent/update.py): read into an ``upd``
record that passes docs/wire.cddl, and reported even when it does not parse. The whole path
(a broken upgrade rolled back, the record at the cloud) is tests/test_package.py's."""

from __future__ import annotations

import json
from pathlib import Path

import cbor2

from agent import update, wire


def _record(body: bytes) -> dict[str, object]:
    # encode_batch is checked against docs/wire.cddl in every test (conftest.py); the
    # decoder checks the record against its kind's rule.
    _device, records = wire.decode_batch(wire.encode_batch("bike-1", [(1, body)]))
    record: dict[str, object] = records[0][1]
    return record


def test_no_note_nothing_to_report(tmp_path: Path) -> None:
    assert update.failed_update(str(tmp_path / "outbox.sqlite"), "0.1.0") is None


def test_a_note_becomes_an_update_record_and_goes_once_reported(tmp_path: Path) -> None:
    outbox = str(tmp_path / "outbox.sqlite")
    (tmp_path / update.NOTE).write_text(json.dumps({"failed": "0.2.0", "running": "0.1.0",
                                                    "why": "no batch acknowledged since it started",
                                                    "t": 1796400000.25}))
    t, body = update.failed_update(outbox, "0.1.0") or (0.0, b"")
    assert t == 1796400000.25
    assert _record(body) == {"k": "upd", "t": 1796400000250, "failed": "0.2.0", "running": "0.1.0",
                             "why": "no batch acknowledged since it started"}
    update.reported(outbox)
    assert not (tmp_path / update.NOTE).exists()
    update.reported(outbox)  # twice is harmless


def test_a_note_that_does_not_parse_is_still_reported_with_its_text(tmp_path: Path) -> None:
    outbox = str(tmp_path / "outbox.sqlite")
    (tmp_path / update.NOTE).write_text('{"failed": "0.2.0"')
    _t, body = update.failed_update(outbox, "0.1.0") or (0.0, b"")
    record = cbor2.loads(body)
    assert record["failed"] == "unknown" and record["running"] == "0.1.0"
    assert "unreadable rollback note" in record["why"] and '{"failed": "0.2.0"' in record["why"]
