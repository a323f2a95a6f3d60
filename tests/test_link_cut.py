"""A link that dies without the broker noticing (a cellular dead zone, a NAT dropping
state): no FIN, no RST, packets just stop. The agent must notice within 2 x keepalive
+ 1 s, keep its rows, and recover when the path comes back. A small TCP proxy of the
test black-holes the stream (this kernel has no netem)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import wire
from agent.config import BrokerConfig
from agent.store.outbox import LANE_LIVE, Outbox
from agent.uplink.mqtt import Uplink
from agent.uplink.pump import send_batches
from devtools.broker import Mosquitto
from tests.helpers import wait_for

KEEPALIVE = 2


class BlackHoleProxy:
    """Forwards 127.0.0.1:<port> to the broker until ``cut()``; then holds every
    connection open and forwards nothing either way, until ``heal()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_now = threading.Event()
        self.stop = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ, None)
        while not self.stop.is_set():
            for key, _ in sel.select(0.05):
                if key.data is None:
                    client, _ = self.listener.accept()
                    upstream = socket.create_connection(self.target, timeout=5)
                    self.pairs.append((client, upstream))
                    sel.register(client, selectors.EVENT_READ, upstream)
                    sel.register(upstream, selectors.EVENT_READ, client)
                    continue
                src, dst = key.fileobj, key.data
                assert isinstance(src, socket.socket)
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for s in (src, dst):
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(s)
                        s.close()
                    continue
                if not self.cut_now.is_set():
                    dst.sendall(data)
        sel.close()

    def cut(self) -> None:
        self.cut_now.set()

    def heal(self) -> None:
        """New connections flow again (the dead ones stay dead, as after a real outage)."""
        self.cut_now.clear()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for a, b in self.pairs:
            a.close()
            b.close()
        self.listener.close()


@pytest.fixture
def proxy(mosquitto: Mosquitto) -> Iterator[BlackHoleProxy]:
    p = BlackHoleProxy((mosquitto.host, mosquitto.port))
    yield p
    p.close()


def test_a_black_holed_link_is_noticed_and_recovered(tmp_path: Path, proxy: BlackHoleProxy) -> None:
    device = f"bike-{uuid.uuid4().hex[:8]}"
    cfg = BrokerConfig(host="127.0.0.1", port=proxy.port, keepalive=KEEPALIVE, ack="broker", max_batch_records=5)
    outbox = Outbox(str(tmp_path / "outbox.sqlite"), 1 << 30)
    uplink = Uplink(device, cfg, f"ebike/v1/{device}/", birth=b"\xa0", death=b"\xa0")

    def step() -> None:
        acked, failed = uplink.poll()
        outbox.ack(acked)
        outbox.release(failed)
        send_batches(outbox, uplink, device, cfg.max_batch_records)

    def body(i: int) -> bytes:
        return wire.window_record(1.7e9 + i, 1.0, [(1, 1, 1.0, 1.0, 1.0, 1.0, 0.0)])

    try:
        uplink.start()
        wait_for("the uplink to connect", lambda: (step(), uplink.connected)[1], 10)
        outbox.append([(LANE_LIVE, float(i), body(i)) for i in range(5)])
        wait_for("the first rows delivered", lambda: (step(), outbox.stats()["records"] == 0)[1], 10)

        proxy.cut()
        cut_at = time.monotonic()
        outbox.append([(LANE_LIVE, float(i), body(i)) for i in range(5, 15)])
        wait_for("the dead link to be noticed", lambda: (step(), not uplink.connected)[1], 2 * KEEPALIVE + 3)
        noticed = time.monotonic() - cut_at
        assert noticed <= 2 * KEEPALIVE + 1, f"noticed after {noticed:.1f} s"
        assert outbox.stats()["records"] == 10, "rows sent into the black hole were deleted"

        proxy.heal()
        wait_for("reconnected and drained", lambda: (step(), outbox.stats()["records"] == 0)[1], 30)
        assert uplink.connects >= 2
    finally:
        uplink.client.loop_stop()
        uplink.client.disconnect()
        outbox.close()
