"""The technicians' control socket: a Unix socket beside the outbox, no TCP port.

It owns the server the agent runs (``status`` and the other local requests, answered
from a callable it is handed) and the client the CLI uses. It imports only
agent.errors and the standard library; what it serves is wired in by agent.runtime.
Remote (signed) commands are not here: they are agent.commands.
"""
