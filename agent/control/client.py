"""Talks to a running agent's control socket: the technicians' commands and the demo."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

from agent.errors import AgentError, AgentUnreachable

TIMEOUT = 2.0
# How often a follower of the tap asks for more: well inside the tap's 5 s arming, and
# few enough requests that the agent's loop does not notice them.
TAP_INTERVAL = 0.2


def request(path: str, cmd: str = "status", timeout: float = TIMEOUT, **args: Any) -> dict[str, Any]:
    """Send one request (``{"cmd": cmd, **args}``) and return the agent's answer. No agent
    on ``path`` is AgentUnreachable (exit 3); a refused request is an AgentError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
    except OSError as e:
        raise AgentUnreachable(f"no agent answering on {path}: {e.strerror or e} (is ebike-agent running?)") from e
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as e:
        raise AgentError(f"agent on {path} answered garbage: {e}") from e
    if not reply.get("ok"):
        raise AgentError(f"agent on {path}: {reply.get('error', 'request failed')}")
    return reply


def follow_tap(path: str, sources: list[str] | None = None, seconds: float | None = None,
               interval: float = TAP_INTERVAL) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """The reads the agent makes of ``sources`` (every source: None) from now on, one
    poll at a time: the chunks (docs/control.md, ``data`` decoded to bytes) and whether
    reads were dropped before they were fetched. For ``seconds``, or until the caller
    stops iterating (None)."""
    asked: dict[str, Any] = {"sources": sources} if sources else {}
    start = time.monotonic()
    cursor = request(path, "tap", **asked)["cursor"]
    while seconds is None or (left := seconds - (time.monotonic() - start)) > 0:
        time.sleep(interval if seconds is None else min(interval, left))
        reply = request(path, "tap", since=cursor, **asked)
        cursor = reply["cursor"]
        yield [dict(c, data=base64.b64decode(c["data"])) for c in reply["chunks"]], bool(reply["lost"])
