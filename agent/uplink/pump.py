"""The send stage: acknowledgements in, batches out, between the outbox and the uplink.

Each turn takes what the broker (or the cloud) acknowledged out of the outbox, puts
back the rows of batches that failed, and fills the uplink's window with new batches
leased from the outbox. The first batch after each (re)connect carries alarms and the
newest live window: the vehicle as it is now, before the backlog.
"""

from __future__ import annotations

import time

from agent import wire
from agent.config import BrokerConfig
from agent.store.memory import Storage
from agent.store.outbox import Outbox
from agent.uplink.mqtt import Uplink


def send_batches(outbox: Outbox | Storage, uplink: Uplink, device_id: str, max_records: int,
                 newest_live_first: bool = False, deflate: bool = False) -> None:
    """Fill the uplink's window with batches leased from the outbox, each sized to what the
    broker takes; rows of a batch paho refuses go back to the outbox."""
    first = newest_live_first
    while uplink.can_send():
        batch = outbox.lease(max_records, uplink.batch_bytes() - wire.batch_overhead(device_id),
                             newest_live_first=first, overhead=wire.RECORD_OVERHEAD)
        first = False
        if not batch:
            return
        seqs = [seq for seq, _ in batch]
        if not uplink.publish(seqs, wire.encode_batch(device_id, batch, deflate), sum(len(b) for _, b in batch)):
            outbox.release(seqs)
            return


class Pump:
    """One outbox, one uplink, turned once per loop."""

    def __init__(self, outbox: Outbox | Storage, uplink: Uplink, device_id: str, cfg: BrokerConfig) -> None:
        self.outbox = outbox
        self.uplink = uplink
        self.device_id = device_id
        self.cfg = cfg
        self.seen_connects = 0

    def turn(self) -> None:
        acked, failed = self.uplink.poll()
        self.outbox.ack(acked)
        self.outbox.release(failed)
        fresh = self.uplink.connects != self.seen_connects
        self.seen_connects = self.uplink.connects
        send_batches(self.outbox, self.uplink, self.device_id, self.cfg.max_batch_records, fresh, self.cfg.deflate)

    def drain(self, timeout: float) -> None:
        """Send what the outbox holds for up to ``timeout`` while connected, then a last turn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.outbox.stats()["records"] and self.uplink.connected:
            self.turn()
            time.sleep(0.02)
        self.turn()
