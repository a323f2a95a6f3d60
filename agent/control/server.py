"""The technicians' door into a running agent: a Unix socket answering one JSON
request per connection (``{"cmd": "status", ...}``), served from the agent's own loop.
The requests and their replies are docs/control.md; what answers them is a table of
handlers the runtime hands in."""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError, AlreadyRunning

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 0.5
MAX_REQUEST = 4096
# A reply (a tap's reads) may be a few MB: the client has this long to take it.
REPLY_TIMEOUT = 2.0

# A request's arguments -> the reply's fields (``ok`` is added); an AgentError is the
# client's fault or a refusal, answered as ``{"ok": false, "error": ...}``.
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Listens on a Unix socket; each request is answered within REQUEST_TIMEOUT."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.sock: socket.socket | None = None

    def start(self, selector: selectors.BaseSelector) -> None:
        """A socket left by a dead agent is removed; one that answers belongs to a live
        agent (of another outbox: the outbox lock keeps out those of the same) and is
        never touched."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise AgentError(f"control_socket {self.path} exists and is not a socket: not removed")
            if _answers(self.path):
                raise AlreadyRunning(f"another ebike-agent is serving the control socket {self.path}")
            os.unlink(self.path)
        # Bound and listening under a temporary name, then renamed into place: a client
        # that sees the path never meets a socket that refuses connections yet.
        staging = self.path + ".new"
        if os.path.lexists(staging):
            os.unlink(staging)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(staging)
        os.chmod(staging, 0o660)
        self.sock.listen(4)
        os.replace(staging, self.path)
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, "control")

    def handle(self, listener: Any) -> None:
        """Answer one client; a slow or broken client costs at most REQUEST_TIMEOUT."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                request = json.loads(_read_line(conn) or b"{}")
                reply = self._dispatch(request)
                conn.settimeout(REPLY_TIMEOUT)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except (OSError, ValueError) as e:
                log.info("control: dropped a client: %s", e)

    def _dispatch(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is a JSON object"}
        cmd = request.get("cmd", "status")
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown request {cmd!r} (known: {', '.join(sorted(self.handlers))})"}
        try:
            return {"ok": True, **handler(request)}
        except AgentError as e:
            return {"ok": False, "error": str(e)}

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if os.path.exists(self.path):
                os.unlink(self.path)


def _answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(REQUEST_TIMEOUT)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_REQUEST:
        chunk = conn.recv(1024)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0]
