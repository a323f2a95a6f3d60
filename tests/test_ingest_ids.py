"""``ebike-agent ingest`` with its default client id (issue 14, item 6): a unique id per
process, so any number of consumers run side by side. Two with one id would knock each
other off the broker in turn (a reconnect storm); the broker's log shows every takeover."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from agent.cli.ingest import default_client_id
from devtools.broker import Mosquitto
from tests.helpers import log_has, spawn, stop, wait_for
from tests.test_uplink import Link, pump

RECORDS = 100
# paho reconnects within a second or two: a storm shows well within this.
WATCH_S = 4.0




def takeovers(broker: Mosquitto) -> list[str]:
    return [line for line in Path(broker.log_path).read_text().splitlines() if "already connected" in line]


def test_default_client_id_names_host_and_process() -> None:
    cid = default_client_id()
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
    assert cid.startswith(f"ebike-ingest-{host}-") and cid.endswith(f"-{os.getpid()}")
    assert re.fullmatch(r"[A-Za-z0-9-]+", cid) and len(cid) <= 64


@pytest.mark.parametrize("group", [None, "g1"], ids=["each-all", "shared"])
def test_three_consumers_with_default_ids_stay_connected(tmp_path: Path, own_broker: Mosquitto,
                                                         group: str | None) -> None:
    """Three ``ingest`` processes with the default id: each connects once and stays, and
    the records are stored, by each (plain subscription, its own database) or once
    between them (``--group``, one database)."""
    logs = [tmp_path / f"ingest{i}.log" for i in range(3)]
    dbs = [tmp_path / ("cloud.sqlite" if group else f"cloud{i}.sqlite") for i in range(3)]
    extra = ["--group", group] if group else []
    consumers = [spawn(["agent", "ingest", "--broker", own_broker.address, "--db", str(db), *extra], log)
                 for db, log in zip(dbs, logs, strict=True)]
    link = None
    try:
        wait_for("the consumers to subscribe", lambda: all(log_has(log, "subscribed to") for log in logs), 20)
        link = Link(tmp_path, own_broker, max_batch=5)
        link.uplink.start()
        pump("the uplink to connect", link, None, lambda: link.uplink.connected, 10)
        link.append(RECORDS)
        pump("every record acknowledged by the cloud", link, None, lambda: link.outbox.stats()["records"] == 0, 30)
        end = time.monotonic() + WATCH_S
        pump("the watch to end", link, None, lambda: time.monotonic() > end, WATCH_S + 5)
    finally:
        codes = [stop(c) for c in consumers]
        if link is not None:
            link.close()
    assert codes == [0, 0, 0], [log.read_text() for log in logs]
    texts = [log.read_text() for log in logs]
    ids = [re.search(r"client id (\S+)", text)[1] for text in texts]  # type: ignore[index]
    assert len(set(ids)) == 3
    for cid, proc in zip(ids, consumers, strict=True):
        assert cid.startswith("ebike-ingest-") and cid.endswith(f"-{proc.pid}")
    assert takeovers(own_broker) == [], "consumers knocked each other off the broker"
    connects = [line for line in Path(own_broker.log_path).read_text().splitlines()
                if "New client connected" in line and " as ebike-ingest-" in line]
    assert len(connects) == 3, connects
    assert all(text.count("subscribed to") == 1 for text in texts), "a consumer reconnected"
    reports = [json.loads(text.strip().splitlines()[-1]) for text in texts]
    assert all(r["batches"] > 0 for r in reports)
    for db in sorted(set(dbs)):
        with sqlite3.connect(db) as c:
            seqs = [s for (s,) in c.execute("SELECT seq FROM records WHERE device=? ORDER BY seq", (link.device,))]
        assert seqs == list(range(1, RECORDS + 1))


def test_one_client_id_twice_is_the_storm_this_avoids(tmp_path: Path, own_broker: Mosquitto) -> None:
    """The check above can fail: two consumers given one id take the connection from
    each other, again and again, and the broker logs each takeover."""
    logs = [tmp_path / f"ingest{i}.log" for i in range(2)]
    consumers = [spawn(["agent", "ingest", "--broker", own_broker.address, "--db", str(tmp_path / f"c{i}.sqlite"),
                        "--client-id", "ebike-ingest"], log) for i, log in enumerate(logs)]
    try:
        wait_for("takeovers in the broker's log", lambda: len(takeovers(own_broker)) >= 3, 20)
    finally:
        for c in consumers:
            stop(c)
