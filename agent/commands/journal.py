"""The replay cache and the command journal: tables in the outbox's SQLite file.

An id is committed (synchronous=FULL, so it is on disk), with its journal entry, before
its command may run, and kept until the command could no longer pass the verifier's
validity check; a restart or a power cut therefore cannot make a command run twice. A
command is marked ``running`` durably before it acts: one that finds itself ``running``
after a restart was cut off, and is not run again.
"""

from __future__ import annotations

import os
import sqlite3

from agent import wire
from agent.commands.envelope import MAX_DEPTH, STATUSES, Command
from agent.errors import StoreError
from agent.store.outbox import Transaction

OPEN_STATES = ("accepted", "deferred", "running")


class ReplayCache:
    """Ids of accepted commands, and the journal of what became of each."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE IF NOT EXISTS command_ids (id TEXT PRIMARY KEY, expires REAL NOT NULL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS command_ids_expires ON command_ids (expires)")
            self.db.execute("CREATE TABLE IF NOT EXISTS command_journal (id TEXT PRIMARY KEY, body BLOB NOT NULL, "
                            "state TEXT NOT NULL, reason TEXT NOT NULL, times BLOB NOT NULL, expires REAL NOT NULL)")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the replay cache in {path}: {e}") from e

    def seen(self, command_id: str) -> bool:
        try:
            return self.db.execute("SELECT 1 FROM command_ids WHERE id=?", (command_id,)).fetchone() is not None
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: lookup failed: {e}") from e

    def remember(self, command_id: str, expires: float, now: float | None = None,
                 command: Command | None = None) -> bool:
        """Record the id durably, and with ``command`` its journal entry (``accepted``);
        False if the id was already there. With ``now``, ids and entries that expired
        before it are pruned in the same transaction (one fsync for all)."""
        try:
            with Transaction(self.db):
                if now is not None:
                    self.db.execute("DELETE FROM command_ids WHERE expires < ?", (now,))
                    self.db.execute("DELETE FROM command_journal WHERE expires < ? AND state NOT IN (?, ?, ?)",
                                    (now, *OPEN_STATES))
                cur = self.db.execute("INSERT OR IGNORE INTO command_ids (id, expires) VALUES (?, ?)",
                                      (command_id, expires))
                if command is not None and cur.rowcount == 1:
                    t = now or 0.0
                    self.db.execute("INSERT OR REPLACE INTO command_journal VALUES (?, ?, ?, ?, ?, ?)",
                                    (command_id, _command_body(command), "accepted", "",
                                     wire.dumps({"received": t, "accepted": t}), expires))
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: cannot record {command_id!r}: {e}") from e
        return cur.rowcount == 1

    def set_state(self, command_id: str, state: str, reason: str, t: float) -> dict[str, float]:
        """Move a journal entry on, durably (a commit with fsync); its times so far."""
        if state not in OPEN_STATES + STATUSES:
            raise ValueError(f"unknown command state {state!r}")
        try:
            row = self.db.execute("SELECT times FROM command_journal WHERE id=?", (command_id,)).fetchone()
            if row is None:
                raise StoreError(f"replay cache {self.path}: no journal entry for {command_id!r}")
            times = dict(wire.strict_loads(row[0], "journal times", 2))
            if state in STATUSES:  # "running" is not reported: no result says it
                times[state] = t
            self.db.execute("UPDATE command_journal SET state=?, reason=?, times=? WHERE id=?",
                            (state, reason, wire.dumps(times), command_id))
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: cannot update {command_id!r}: {e}") from e
        return times

    def open_entries(self) -> list[tuple[Command, str]]:
        """(command, state) of the entries not yet finished (accepted, deferred, or
        running when the agent stopped), oldest first."""
        try:
            rows = self.db.execute("SELECT body, state FROM command_journal WHERE state IN (?, ?, ?) ORDER BY rowid",
                                   OPEN_STATES).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: cannot read the journal: {e}") from e
        return [(_command_from(body), state) for body, state in rows]

    def state_of(self, command_id: str) -> str | None:
        row = self.db.execute("SELECT state FROM command_journal WHERE id=?", (command_id,)).fetchone()
        return None if row is None else str(row[0])

    def prune(self, now: float) -> int:
        """Forget ids whose commands expired before ``now``; how many were forgotten."""
        try:
            cur = self.db.execute("DELETE FROM command_ids WHERE expires < ?", (now,))
        except sqlite3.Error as e:
            raise StoreError(f"replay cache {self.path}: prune failed: {e}") from e
        return int(cur.rowcount)

    def __len__(self) -> int:
        (n,) = self.db.execute("SELECT count(*) FROM command_ids").fetchone()
        return int(n)

    def close(self) -> None:
        self.db.close()


def _command_body(cmd: Command) -> bytes:
    return wire.dumps([cmd.id, cmd.device, cmd.name, cmd.args, cmd.issued_at, cmd.expires_at, cmd.kid])


def _command_from(body: bytes) -> Command:
    cid, device, name, args, iat, exp, kid = wire.strict_loads(body, "journal entry", MAX_DEPTH + 4)
    return Command(cid, device, name, dict(args), iat, exp, kid)
