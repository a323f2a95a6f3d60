"""Talks to a running agent's control socket (``ebike-agent status``, the demo)."""

from __future__ import annotations

import json
import socket
from typing import Any

from agent.errors import AgentError

TIMEOUT = 2.0


def request(path: str, cmd: str = "status") -> dict[str, Any]:
    """Send one request and return the agent's answer; an absent agent is an AgentError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise AgentError(f"no agent answering on {path}: {e.strerror or e}") from e
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError as e:
        raise AgentError(f"agent on {path} answered garbage: {e}") from e
    if not reply.get("ok"):
        raise AgentError(f"agent on {path}: {reply.get('error', 'request failed')}")
    return reply
