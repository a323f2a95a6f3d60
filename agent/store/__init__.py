"""The store: every record waits here until the cloud has it.

It owns the SQLite outbox (``outbox``: sequence numbers, lanes, quota, a full disk, a
corrupt file), the one-agent-per-outbox lock (``lock``), the RAM queue the agent runs
from while the file cannot be written (``memory``), the record stage that turns
the kernel's outputs into records and commits them in groups (``recorder``), and the
merge of k closed windows into one that the data budget asks of it (``coalesce``,
standard library only).

``outbox`` and ``lock`` import only agent.errors, each other and the standard library
(the outbox is handed the gap-record encoder as a callback); ``memory`` also imports
agent.wire, to tell the gap records it keeps from others when a lane is purged. ``recorder`` also imports
agent.config, agent.fusion.spec (what the kernel's outputs mean) and agent.wire
(the record format). Nothing here imports the uplink's link, the runtime or the fleet.
The command journal (agent.commands.journal) keeps its tables in the outbox's file,
written through the outbox's ``Transaction``.
"""
