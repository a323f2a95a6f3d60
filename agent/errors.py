"""The agent's one error tree, so callers can catch by meaning rather than by origin.

    AgentError
     +-- ConfigError            bad configuration: names the file, key and reason
     +-- SourceError            a device or capture could not be used
     |    +-- SourceUnavailableError   the device is absent now; retried with backoff
     +-- DecodeError (+ValueError)     a frame or sentence is malformed
     +-- StoreError             the outbox could not be read or written
     |    +-- StorageUnwritable        its filesystem refuses writes: read-only, denied, full
     |    +-- StoreUnavailable         the consumers' database is unreachable now; retried with backoff
     +-- AlreadyRunning         another agent holds this outbox
     +-- AgentUnreachable       no agent answers on the control socket (CLI exit 3)
     +-- CheckFailed            a technician's check found a fault (CLI exit 1, said already)
     +-- UplinkError            the broker link or a batch failed
     +-- CommandRejected        a cloud command failed verification
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration file or value is unusable; the agent refuses to start."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(f"{path}:{key}: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


class SourceError(AgentError):
    """A source (serial port, CAN interface, capture file) failed."""


class SourceUnavailableError(SourceError):
    """The device is not there now; the source retries with backoff."""


class DecodeError(AgentError, ValueError):
    """Input bytes do not form a valid frame; counted and skipped, never fatal."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreError(AgentError):
    """The durable outbox could not do what was asked."""


class StorageUnwritable(StoreError):
    """The outbox's file or directory cannot be written for a reason of the storage's
    (``cause``, in words), not of the file's content: the agent runs from memory."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"outbox {path} cannot be written: {cause}")
        self.path = path
        self.cause = cause


class StoreUnavailable(StoreError):
    """The consumers' database does not answer now (down, restarting, connection lost):
    nothing of the batches in hand is acknowledged; the consumer reconnects with backoff
    and the devices send again what no ack covered."""


class AlreadyRunning(AgentError):
    """Another agent holds the outbox's lock: this one must not touch anything."""


class AgentUnreachable(AgentError):
    """No agent answers on the control socket: it is stopped, or this is the wrong socket.
    The CLI exits 3 for it, so a script tells "agent down" from "check failed"."""


class CheckFailed(AgentError):
    """A check (``selftest``, ``config check``, ``sync`` that timed out) found a fault; the
    command has already said which, line by line, so main() prints nothing more."""


class UplinkError(AgentError):
    """Publishing to, or talking with, the broker failed."""


class CommandRejected(AgentError):
    """A command from the cloud failed verification and was not run.

    ``reason`` is a machine-readable code (agent.commands.envelope.REASONS) that goes back
    to the cloud on ``cmd/result``; ``command_id`` is the command's id when it could be read.
    """

    def __init__(self, reason: str, command_id: str | None = None, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.command_id = command_id
        self.detail = detail
