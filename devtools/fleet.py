"""A fleet load generator: many virtual devices publishing real batches through the real
broker, so the consumers (``ebike-agent ingest``) are measured against a fleet, not one
agent.

Each virtual device rides a ride of its own and closes one live window every period
(``rate`` windows/s), encoded by the agent's own wire encoder (agent/wire.py). It numbers
its records from 1 and publishes them in batches (one record each by default) at QoS 1
on ``ebike/v1/<device>/telemetry``; it keeps each batch until an ack on
``ebike/v1/<device>/ack`` names the batch's digest and the sequence numbers stored, and
publishes it again, byte for byte (same digest, same ack), when none came within
``ack_timeout``: what an agent's uplink does. The devices' publish times are spread
evenly over the period, so the fleet offers a steady ``devices x rate`` records/s, not a
burst once a second.

A real fleet has one MQTT connection per device; 1,000 paho clients with a thread each
would measure this process rather than the consumers. The devices share ``connections``
clients instead (MQTT 5, clean sessions, each subscribed to its own devices' ack topics
only; as many as the devices for a broker loaded like a real fleet's), all driven from
one thread by epoll through paho's external-loop calls (``loop_read``, ``loop_write``,
``loop_misc``), so the generator's cost hardly depends on their number: it is mostly the
encoder's, about a tenth of a millisecond a record. A connection that drops is replaced
after RECONNECT_S; the batches it had in flight go out again when their ack is due, the
ones made while it was down once it is back (their latency counts from then).

mosquitto leaves Nagle's algorithm on unless ``set_tcp_nodelay true``: each ack then
waits about 40 ms for the TCP ack of the message before it on the broker's connection
to the device, and the latencies measured say so.

The report (``run``'s dict; ``--json`` prints it):

- ``records_sent``: records made (each device's sequence numbers 1..n); ``publishes``
  (batches, with resends) and ``resends``;
- ``records_acked``, ``unacked`` (records no ack ever named), ``acked_per_s`` (records
  acked while producing, over the producing time; ``offered_per_s`` beside it) and
  ``drain_s`` (from the end of producing to the last ack);
- ``ack_latency_p50_s`` / ``_p99_s`` / ``_max_s``: the first publish of a record to the
  ack naming it (monotonic clock), over the records acked; None when none was;
- ``behind_s`` / ``behind_p99_s``: how late the generator made and published a record
  against its schedule, the largest and the 99th percentile: large when this process,
  not the consumers, is the bottleneck (``cpu_s``, ``cpu_share`` say what it used);
- ``stray_acks`` (acks of a batch no longer waiting: the second ack of a resent batch),
  ``bad_acks`` (not an ack, or naming none of its batch's numbers), ``disconnects``;
- with ``db``, the consumers' store read back after the drain: ``lost`` and
  ``stored_twice`` (see ``check_store``); None without.

Run alone: ``python -m devtools.fleet --broker HOST:PORT [--db DB] [--json]``; exit 1 if
a record was lost, stored twice or left unacknowledged.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import random
import select
import socket
import sys
import time
from typing import Any

from agent import wire
from agent.cli.common import broker_address
from agent.errors import AgentError, ConfigError, DecodeError, UplinkError
from agent.fleet import ingest
from agent.signals import signal_id
from agent.uplink.mqtt import LinkClient, LinkFailures, is_failure, session_properties

log = logging.getLogger(__name__)

TOPIC_PREFIX = "ebike/v1/"
SAMPLE_HZ = 10  # readings a window aggregates per second, as a 10 Hz bus gives them
CONNECT_TIMEOUT_S = 15.0  # every connection up and subscribed, or the run fails
RECONNECT_S = 1.0
KEEPALIVE_S = 30
MISC_EVERY_S = 1.0  # paho's keepalive bookkeeping (loop_misc), every connection
# Records made in one turn of the loop before the sockets are served again: a generator
# running late catches up without starving its acks.
MAX_BURST = 200
POLL_MAX_S = 0.05

# What each virtual device reports: catalogue id (agent/signals.py) -> decimals, the grid
# its sensor reads on (a window row then travels in fixed point, as real readings do).
_BATTERY = "Vehicle.Powertrain.TractionBattery."
SPEED, ODOMETER, GNSS_SPEED, SATELLITES, HDOP = (signal_id(n) for n in (
    "Vehicle.Speed", "Vehicle.TraveledDistance", "Vehicle.LEV.GNSS.Speed", "Vehicle.LEV.GNSS.Satellites",
    "Vehicle.LEV.GNSS.HDOP"))
LATITUDE, LONGITUDE, ALTITUDE, HEADING = (signal_id("Vehicle.CurrentLocation." + n)
                                          for n in ("Latitude", "Longitude", "Altitude", "Heading"))
VOLTAGE, CURRENT, POWER, SOC, CELL_MIN, CELL_MAX, TEMP_MIN, TEMP_MAX = (signal_id(_BATTERY + n) for n in (
    "CurrentVoltage", "CurrentCurrent", "CurrentPower", "StateOfCharge.Current", "CellVoltage.Min",
    "CellVoltage.Max", "Temperature.Min", "Temperature.Max"))
MOTOR_TEMP, CONTROLLER_TEMP, CADENCE, TRIP = (signal_id(n) for n in (
    "Vehicle.Powertrain.ElectricMotor.Temperature", "Vehicle.LEV.Controller.Temperature", "Vehicle.LEV.Pedal.Cadence",
    "Vehicle.LEV.TripDistance"))
DECIMALS = {
    SPEED: 1, ODOMETER: 2, LATITUDE: 6, LONGITUDE: 6, ALTITUDE: 1, HEADING: 1, GNSS_SPEED: 1, SATELLITES: 0,
    HDOP: 2, VOLTAGE: 2, CURRENT: 2, POWER: 1, SOC: 0, CELL_MIN: 3, CELL_MAX: 3, TEMP_MIN: 1, TEMP_MAX: 1,
    MOTOR_TEMP: 0, CONTROLLER_TEMP: 0, CADENCE: 0, TRIP: 2,
}
# How far a window's readings stray beyond its start and end values (standard deviation,
# in the signal's unit); the rest move only between them (odometer, position, charge).
NOISE = {SPEED: 0.4, GNSS_SPEED: 0.5, VOLTAGE: 0.15, CURRENT: 0.8, POWER: 30.0, CADENCE: 4.0, HDOP: 0.05}
NON_NEGATIVE = frozenset({SPEED, GNSS_SPEED, CADENCE, HDOP})

Row = tuple[int, int, float, float, float, float, float]


class Ride:
    """One device's ride: a speed chasing a target that changes now and then (lights, a
    stop, a hill), and what follows from it: distance, position, pack current, voltage
    and charge, temperatures. Each window's row per signal starts where the last one
    ended, so consecutive records read like one ride."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cells = rng.choice((10, 13))  # a 36 V or a 48 V pack
        self.capacity_ah = rng.choice((10.4, 13.0, 17.5))
        self.soc = rng.uniform(40.0, 100.0)
        self.speed = 0.0
        self.target = rng.uniform(12.0, 27.0)
        self.lat = rng.uniform(45.0, 52.0)
        self.lon = rng.uniform(-1.0, 12.0)
        self.alt = rng.uniform(20.0, 400.0)
        self.heading = rng.uniform(0.0, 360.0)
        self.odometer = rng.uniform(50.0, 9000.0)
        self.trip = 0.0
        self.pack_temp = rng.uniform(12.0, 25.0)
        self.motor_temp = self.pack_temp
        self.controller_temp = self.pack_temp
        self.satellites = rng.randint(7, 14)
        self.last: dict[int, float] = {}  # each signal's last reading: where its next window starts

    def window(self, length: float) -> list[Row]:
        """The rows of the next window of ``length`` s, for ``wire.window_record``."""
        rng = self.rng
        if rng.random() < length / 30.0:
            self.target = 0.0 if rng.random() < 0.2 else rng.uniform(12.0, 27.0)
        v0 = self.speed
        change = max(-4.0 * length, min(1.5 * length, self.target - v0))  # km/h: brisk braking, gentle pull
        self.speed = max(0.0, v0 + change + rng.gauss(0.0, 0.2))
        mean_speed = (v0 + self.speed) / 2
        km = mean_speed * length / 3600.0
        self.odometer += km
        self.trip += km
        self.heading = (self.heading + rng.gauss(0.0, 3.0)) % 360.0
        rad = math.radians(self.heading)
        self.lat += km / 111.2 * math.cos(rad)
        self.lon += km / (111.2 * math.cos(math.radians(self.lat))) * math.sin(rad)
        self.alt += rng.gauss(0.0, 0.3)
        power = 6.0 * mean_speed + 0.012 * mean_speed ** 3 + 40.0 * max(0.0, change / length)  # W drawn
        ocv = self.cells * (3.3 + 0.0085 * self.soc)
        current = -power / ocv  # A, + = charging
        voltage = ocv + current * 0.008 * self.cells
        self.soc = max(0.0, self.soc + current * length / 3600.0 / self.capacity_ah * 100.0)
        self.pack_temp += (0.002 * abs(current) - 0.001 * (self.pack_temp - 20.0)) * length
        self.motor_temp += (0.0008 * power - 0.01 * (self.motor_temp - self.pack_temp)) * length
        self.controller_temp += (0.0004 * power - 0.01 * (self.controller_temp - self.pack_temp)) * length
        if rng.random() < 0.05 * length:
            self.satellites = max(4, min(16, self.satellites + rng.choice((-1, 1))))
        cell = voltage / self.cells
        values = {
            SPEED: self.speed, ODOMETER: self.odometer, LATITUDE: self.lat, LONGITUDE: self.lon,
            ALTITUDE: self.alt, HEADING: self.heading, GNSS_SPEED: max(0.0, self.speed + rng.gauss(0.0, 0.3)),
            SATELLITES: self.satellites, HDOP: 2.2 - 0.08 * self.satellites, VOLTAGE: voltage, CURRENT: current,
            POWER: voltage * current, SOC: self.soc, CELL_MIN: cell - 0.012, CELL_MAX: cell + 0.009,
            TEMP_MIN: self.pack_temp - 0.8, TEMP_MAX: self.pack_temp + 1.1, MOTOR_TEMP: self.motor_temp,
            CONTROLLER_TEMP: self.controller_temp, CADENCE: rng.uniform(55.0, 85.0) if self.speed > 3.0 else 0.0,
            TRIP: self.trip,
        }
        count = max(1, round(SAMPLE_HZ * length))
        return [self._row(sid, count, value) for sid, value in values.items()]

    def _row(self, sid: int, count: int, value: float) -> Row:
        """A window's row from its first and last reading on the signal's grid: min and max
        around them (plus noise), the mean their midpoint, so its sum lies on the grid too.
        ``+ 0.0`` turns a -0.0 into 0.0, which fixed point can carry."""
        d = DECIMALS[sid]
        end = round(value, d) + 0.0
        start = self.last.get(sid, end)
        self.last[sid] = end
        spread = abs(self.rng.gauss(0.0, NOISE[sid])) if sid in NOISE else 0.0
        lo = round(min(start, end) - spread, d) + 0.0
        if sid in NON_NEGATIVE:
            lo = max(0.0, lo)
        hi = round(max(start, end) + spread, d) + 0.0
        return (sid, count, lo, hi, round((start + end) / 2, d + 1) + 0.0, end, 0.0)


class Batch:
    """A batch awaiting its ack: the exact payload (a resend is the same bytes, so the
    same digest), the sequence numbers no ack named yet, its first publish (once
    ``sends`` > 0)."""

    __slots__ = ("first_sent", "payload", "sends", "waiting")

    def __init__(self, payload: bytes, seqs: list[int]) -> None:
        self.payload = payload
        self.waiting = set(seqs)
        self.first_sent = 0.0
        self.sends = 0


class Device:
    """One virtual device: its ride, its sequence, its batches awaiting an ack (by digest)."""

    __slots__ = ("conn", "name", "next_seq", "pending", "ride", "topic", "unbatched")

    def __init__(self, name: str, conn: Connection, ride: Ride) -> None:
        self.name = name
        self.topic = f"{TOPIC_PREFIX}{name}/telemetry"
        self.conn = conn
        self.ride = ride
        self.next_seq = 1
        self.unbatched: list[tuple[int, bytes]] = []
        self.pending: dict[bytes, Batch] = {}


class Connection:
    """One MQTT client that some devices share, subscribed to their ack topics; replaced
    by a new client (no message of the old one carried over) when it drops."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.client_id = f"fleet-gen-{os.getpid()}-{index}"
        self.devices: list[Device] = []
        self.client: LinkClient | None = None
        self.fd = -1
        self.mask = 0
        self.up = False  # connected and subscribed: publishes may go
        self.retry_at = 0.0
        self.backlog: list[tuple[Device, bytes]] = []  # batches due while down: published once up

    def start(self) -> None:
        """Open a new connection (a blocking TCP connect, at most the client's connect
        timeout); a failure is told once per cause and retried after RECONNECT_S."""
        client = LinkClient(self.client_id, self.fleet.link)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = lambda c, u, msg: self.fleet.on_ack(msg.topic, bytes(msg.payload))
        try:
            client.connect(self.fleet.host, self.fleet.port, KEEPALIVE_S, clean_start=True,
                           properties=session_properties(0))
        except OSError as e:
            self.fleet.link.connect_failed(e)
            self.retry_at = time.monotonic() + RECONNECT_S
            return
        sock = client.socket()
        if not isinstance(sock, socket.socket):
            raise UplinkError(f"paho connected to {self.fleet.host}:{self.fleet.port} without a plain socket")
        # A connection carries many devices' publishes: Nagle would hold one back until the
        # broker's TCP ack of the one before, a wait a device with its own link never has.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = client
        self.fd = sock.fileno()
        self.mask = select.EPOLLIN
        self.fleet.poller.register(self.fd, self.mask)
        self.fleet.by_fd[self.fd] = self

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if is_failure(rc):
            self.fleet.link.connect_failed(rc)
            self.drop()
            self.fleet.link.refused = False  # the close that follows is ours, told to no one
            return
        self.fleet.link.connected()
        client.subscribe([(f"{TOPIC_PREFIX}{d.name}/ack", 1) for d in self.devices])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: list[Any], props: Any) -> None:
        refused = [str(rc) for rc in rcs if is_failure(rc)]
        if refused:
            self.fleet.refused = f"the broker refused {len(refused)} ack subscriptions: {refused[0]}"
            return
        self.up = True
        backlog, self.backlog = self.backlog, []
        now = time.monotonic()
        for device, digest in backlog:
            self.fleet.publish(device, digest, now)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if client is self.client:
            self.fleet.link.ended(flags, rc)
            self.drop()

    def drop(self) -> None:
        """Forget the client (its socket closed, or closing) and come back after RECONNECT_S."""
        client, self.client = self.client, None
        if client is None:
            return
        del self.fleet.by_fd[self.fd]
        if self.up:
            self.fleet.disconnects += 1
        self.up = False
        self.retry_at = time.monotonic() + RECONNECT_S
        if client.socket() is not None:  # else paho closed it, and epoll forgot it with its fd
            self.fleet.poller.unregister(self.fd)
            client.disconnect()

    def serve(self, events: int) -> None:
        """epoll said the socket is readable (or broken) or writable."""
        if (events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP) and self.client is not None
                and is_failure(self.client.loop_read())):
            self.drop()
        if self.client is not None and self.client.want_write() and is_failure(self.client.loop_write()):
            self.drop()
        self.watch()

    def watch(self) -> None:
        """Ask epoll for writability only while paho has bytes it could not write (after
        anything that writes: paho writes at once what the socket takes)."""
        if self.client is not None:
            mask = select.EPOLLIN | (select.EPOLLOUT if self.client.want_write() else 0)
            if mask != self.mask:
                self.mask = mask
                self.fleet.poller.modify(self.fd, mask)

    def misc(self, now: float) -> None:
        """Keepalive for a live client; a new one when it is time to come back."""
        if self.client is not None:
            if is_failure(self.client.loop_misc()):
                self.drop()
            self.watch()
        elif now >= self.retry_at:
            self.start()


class Fleet:
    """The virtual devices and their connections, turned by one loop (``run``)."""

    def __init__(self, host: str, port: int, devices: int, rate: float, connections: int, ack_timeout: float,
                 records_per_batch: int, device_prefix: str, seed: int) -> None:
        self.host = host
        self.port = port
        self.rate = rate
        self.length = 1.0 / rate
        self.ack_timeout = ack_timeout
        self.per_batch = records_per_batch
        self.poller = select.epoll()
        # One for all the connections: a failure they share (the broker down) is told once.
        self.link = LinkFailures("fleet", host, port)
        self.refused = ""  # the broker refused the ack subscriptions: the run cannot go on
        self.conns = [Connection(self, k) for k in range(min(connections, devices))]
        width = max(4, len(str(devices)))
        self.devices: list[Device] = []
        for i in range(devices):
            conn = self.conns[i % len(self.conns)]
            device = Device(f"{device_prefix}{i + 1:0{width}d}", conn, Ride(random.Random(seed * 1_000_003 + i)))
            conn.devices.append(device)
            self.devices.append(device)
        self.by_name = {d.name: d for d in self.devices}
        # (ack due, device, digest, the publish it is for): appended in time order, one
        # timeout for all, so the oldest is always first.
        self.timers: collections.deque[tuple[float, Device, bytes, int]] = collections.deque()
        self.by_fd: dict[int, Connection] = {}
        self.waiting = 0  # records in batches no ack completed
        self.publishes = self.resends = self.records_acked = 0
        self.stray_acks = self.bad_acks = self.disconnects = 0
        self.latencies: list[float] = []
        self.lateness: list[float] = []
        self.last_ack_at = 0.0

    # --- acks -----------------------------------------------------------------------
    def on_ack(self, topic: str, payload: bytes) -> None:
        """An ack: the records of the batch it names that it says are stored are done;
        the batch too once all are."""
        device = self.by_name.get(topic[len(TOPIC_PREFIX):-len("/ack")])
        try:
            digest, ranges = wire.decode_ack(payload)
        except DecodeError:
            self.bad_acks += 1
            return
        batch = device.pending.get(digest) if device is not None else None
        if device is None or batch is None:
            self.stray_acks += 1
            return
        now = time.monotonic()
        done = [seq for seq in batch.waiting if any(first <= seq <= last for first, last in ranges)]
        if not done:
            self.bad_acks += 1
            return
        self.latencies.extend([now - batch.first_sent] * len(done))
        batch.waiting.difference_update(done)
        self.records_acked += len(done)
        self.waiting -= len(done)
        self.last_ack_at = now
        if not batch.waiting:
            del device.pending[digest]

    # --- publishing -----------------------------------------------------------------
    def publish(self, device: Device, digest: bytes, now: float) -> None:
        """Publish a waiting batch (again), its ack due ``ack_timeout`` later; while its
        connection is down, once it is up again."""
        batch = device.pending[digest]
        conn = device.conn
        if not conn.up or conn.client is None:
            conn.backlog.append((device, digest))
            return
        if is_failure(conn.client.publish(device.topic, batch.payload, qos=1).rc):
            conn.drop()
            conn.backlog.append((device, digest))
            return
        conn.watch()
        self.publishes += 1
        if batch.sends:
            self.resends += 1
        else:
            batch.first_sent = now
        batch.sends += 1
        self.timers.append((now + self.ack_timeout, device, digest, batch.sends))

    def _send_batch(self, device: Device, now: float) -> None:
        records, device.unbatched = device.unbatched, []
        payload = wire.encode_batch(device.name, records)
        digest = wire.batch_digest(payload)
        device.pending[digest] = Batch(payload, [seq for seq, _ in records])
        self.waiting += len(records)
        self.publish(device, digest, now)

    def _expire(self, now: float) -> None:
        """Publish again every batch whose ack is overdue (each timer once)."""
        timers = self.timers
        for _ in range(len(timers)):
            if timers[0][0] > now:
                return
            _, device, digest, sends = timers.popleft()
            batch = device.pending.get(digest)
            if batch is not None and batch.sends == sends:
                self.publish(device, digest, now)

    # --- producing ------------------------------------------------------------------
    def _produce(self, t0: float, wall0: float, slot: int, total: int) -> int:
        """Make and publish the records due by now, from ``slot`` on (device ``slot % n``'s
        window number ``slot // n``, due at ``t0 + slot / (n x rate)``), at most MAX_BURST;
        the next slot."""
        n = len(self.devices)
        spacing = self.length / n
        for _ in range(MAX_BURST):
            if slot >= total:
                break
            due = t0 + slot * spacing
            now = time.monotonic()
            if due > now:
                break
            self.lateness.append(now - due)
            device = self.devices[slot % n]
            # The window closes when due: it began a period before, on the wall clock.
            body = wire.window_record(wall0 + (due - t0) - self.length, self.length, device.ride.window(self.length))
            device.unbatched.append((device.next_seq, body))
            device.next_seq += 1
            if len(device.unbatched) >= self.per_batch:
                self._send_batch(device, now)
            slot += 1
        return slot

    # --- the loop -------------------------------------------------------------------
    def _turn(self, wake_by: float, misc_at: float) -> float:
        """Serve the sockets until something is readable or writable, or ``wake_by``;
        every MISC_EVERY_S, paho's keepalive and the reconnects. The next ``misc_at``."""
        now = time.monotonic()
        if now >= misc_at:
            for conn in self.conns:
                conn.misc(now)
            misc_at = now + MISC_EVERY_S
        if self.timers:
            wake_by = min(wake_by, self.timers[0][0])
        timeout = max(0.0, min(POLL_MAX_S, wake_by - now, misc_at - now))
        for fd, events in self.poller.poll(timeout):
            serving = self.by_fd.get(fd)
            if serving is not None:
                serving.serve(events)
        if self.refused:
            raise UplinkError(f"{self.host}:{self.port}: {self.refused}")
        return misc_at

    def connect(self, timeout: float) -> None:
        """Every connection up and subscribed, within ``timeout`` s, or UplinkError with
        the last failure in words."""
        for conn in self.conns:
            conn.start()
        deadline = time.monotonic() + timeout
        misc_at = time.monotonic() + MISC_EVERY_S
        while not all(c.up for c in self.conns):
            if time.monotonic() >= deadline:
                raise UplinkError(f"{sum(not c.up for c in self.conns)} of {len(self.conns)} connections to "
                                  f"{self.host}:{self.port} not up and subscribed after {timeout:g} s"
                                  + (f": {self.link.cause}" if self.link.cause else ""))
            misc_at = self._turn(deadline, misc_at)

    def run(self, duration: float, drain_timeout: float) -> dict[str, Any]:
        """Produce for ``duration`` s, then resend until every record is acked or
        ``drain_timeout`` s more have passed; the figures (without the store's)."""
        rounds = max(1, round(duration * self.rate))
        total = rounds * len(self.devices)
        cpu0, t0, wall0 = time.process_time(), time.monotonic(), time.time()
        produce_end = t0 + rounds * self.length
        slot, misc_at = 0, t0 + MISC_EVERY_S
        spacing = self.length / len(self.devices)
        while slot < total or time.monotonic() < produce_end:
            slot = self._produce(t0, wall0, slot, total)
            self._expire(time.monotonic())
            misc_at = self._turn(t0 + slot * spacing if slot < total else produce_end, misc_at)
        now = time.monotonic()
        for device in self.devices:  # the last, partial batches
            if device.unbatched:
                self._send_batch(device, now)
        acked_producing, produced_at = self.records_acked, time.monotonic()
        drain_end = produced_at + drain_timeout
        while self.waiting and time.monotonic() < drain_end:
            self._expire(time.monotonic())
            misc_at = self._turn(drain_end, misc_at)
        finished = time.monotonic()
        cpu = time.process_time() - cpu0
        latencies, lateness = sorted(self.latencies), sorted(self.lateness)
        return {
            "devices": len(self.devices), "connections": len(self.conns), "rate": self.rate,
            "records_per_batch": self.per_batch, "duration_s": round(produced_at - t0, 3),
            "offered_per_s": round(len(self.devices) * self.rate, 1),
            "records_sent": sum(d.next_seq - 1 for d in self.devices), "publishes": self.publishes,
            "resends": self.resends, "records_acked": self.records_acked, "unacked": self.waiting,
            "acked_per_s": round(acked_producing / (produced_at - t0), 1),
            "drain_s": round(max(0.0, self.last_ack_at - produced_at), 3) if not self.waiting else None,
            "ack_latency_p50_s": _quantile(latencies, 0.50), "ack_latency_p99_s": _quantile(latencies, 0.99),
            "ack_latency_max_s": _quantile(latencies, 1.0),
            "behind_s": _quantile(lateness, 1.0), "behind_p99_s": _quantile(lateness, 0.99),
            "cpu_s": round(cpu, 3), "cpu_share": round(cpu / (finished - t0), 3),
            "stray_acks": self.stray_acks, "bad_acks": self.bad_acks, "disconnects": self.disconnects,
        }

    def close(self) -> None:
        """Disconnect every client (paho writes the DISCONNECT at once and closes)."""
        for conn in self.conns:
            client, conn.client = conn.client, None
            if client is not None:
                del self.by_fd[conn.fd]
                if client.socket() is not None:
                    self.poller.unregister(conn.fd)
                    client.disconnect()
        self.poller.close()


def _quantile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``ordered`` by nearest rank, rounded to 0.1 ms; None if empty."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 4)


def check_store(report: dict[str, Any], sent: dict[str, int]) -> tuple[int, int]:
    """``(lost, stored_twice)``: the consumers' store (its ``report()``) against what each
    device sent (``sent``: device -> n, its records being 1..n), exactly.

    The report gives per device the rows (``records``), the lowest and highest sequence
    number (``first``, ``last``), and in ``gaps`` every run of numbers missing between
    them (less those the device announced dropping: these devices announce none). So the
    numbers stored are [first, last] less the gaps, and for each device:

    - lost = n - (numbers stored within 1..n): sent, never stored; all n if the device
      has no row at all;
    - stored_twice = (rows - numbers stored) + (numbers stored beyond n): a second row
      of a number (a store without the unique (device, sequence) key), or a row this run
      never sent (a record made up, or one of an earlier run: ``run`` refuses a store
      that already holds these devices, so that cannot hide a loss)."""
    lost = twice = 0
    devices, gaps = report.get("devices", {}), report.get("gaps", {})
    for name, n in sent.items():
        row = devices.get(name)
        if row is None:
            lost += n
            continue
        first, last, rows = int(row["first"]), int(row["last"]), int(row["records"])
        runs = [(int(a), int(b)) for a, b in gaps.get(name, [])]
        stored = last - first + 1 - sum(b - a + 1 for a, b in runs)
        within = max(0, min(last, n) - first + 1) - sum(max(0, min(b, n) - a + 1) for a, b in runs)
        lost += n - within
        twice += (rows - stored) + (stored - within)
    return lost, twice


def _stored(db: str) -> dict[str, Any]:
    """The report of the consumers' store ``db`` (a SQLite path or a postgresql:// URL),
    opened as the consumers open it."""
    store = ingest.Ingest(db)
    try:
        return store.report()
    finally:
        store.close()


def run(host: str, port: int, devices: int = 1000, rate: float = 1.0, duration: float = 30.0,
        connections: int = 20, ack_timeout: float = 5.0, drain_timeout: float = 30.0, db: str | None = None,
        records_per_batch: int = 1, device_prefix: str = "fleet-", seed: int = 1) -> dict[str, Any]:
    """Drive ``devices`` virtual devices against the broker at ``host``:``port`` for
    ``duration`` s, then wait up to ``drain_timeout`` s for the acks still due; the
    report (module docstring). With ``db``, the consumers' store is checked before (it
    must not hold these devices yet: a record of an earlier run would pass for one of
    this run) and after the drain (``lost``, ``stored_twice``): a record acked is stored
    (a consumer acks after its commit), so when every record was acked a loss is real;
    with records unacked, one still on its way to the store counts as lost."""
    for key, ok in (("devices", devices >= 1), ("rate", rate > 0), ("duration", duration > 0),
                    ("connections", connections >= 1), ("ack_timeout", ack_timeout > 0),
                    ("drain_timeout", drain_timeout >= 0), ("records_per_batch", records_per_batch >= 1)):
        if not ok:
            raise ConfigError("fleet", key, "must be positive")
    fleet = Fleet(host, port, devices, rate, connections, ack_timeout, records_per_batch, device_prefix, seed)
    try:
        if db is not None:
            already = sorted(set(_stored(db).get("devices", {})) & set(fleet.by_name))
            if already:
                raise ConfigError("command line", "--db", f"{db} already holds records of {len(already)} of "
                                  f"these devices ({already[0]}...): a fresh store, or another device prefix")
        fleet.connect(CONNECT_TIMEOUT_S)
        report = fleet.run(duration, drain_timeout)
    finally:
        fleet.close()
    report["lost"] = report["stored_twice"] = None
    if db is not None:
        report["lost"], report["stored_twice"] = check_store(
            _stored(db), {d.name: d.next_seq - 1 for d in fleet.devices})
    return report


def failed(report: dict[str, Any]) -> bool:
    """A record lost, stored twice or never acknowledged."""
    return bool(report["lost"] or report["stored_twice"] or report["unacked"])


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def summary(r: dict[str, Any]) -> str:
    """The report in a few lines."""
    store = "not checked (no --db)" if r["lost"] is None else f"{r['lost']} lost, {r['stored_twice']} stored twice"
    return "\n".join([
        f"fleet: {r['devices']} devices on {r['connections']} connections, {r['rate']:g} window/s each for "
        f"{r['duration_s']:g} s ({r['offered_per_s']:g} records/s offered)",
        f"sent {r['records_sent']} records in {r['publishes']} publishes ({r['resends']} resends); "
        f"acked {r['records_acked']}, {r['acked_per_s']:g}/s while producing; {r['unacked']} unacked"
        + (f"; drained in {r['drain_s']:g} s" if r["drain_s"] is not None else ""),
        f"ack latency p50 {_ms(r['ack_latency_p50_s'])}, p99 {_ms(r['ack_latency_p99_s'])}, "
        f"max {_ms(r['ack_latency_max_s'])}",
        f"generator: behind schedule by at most {_ms(r['behind_s'])} (p99 {_ms(r['behind_p99_s'])}), "
        f"CPU {r['cpu_share']:.0%} of a core; {r['stray_acks']} stray acks, {r['bad_acks']} bad, "
        f"{r['disconnects']} disconnects",
        f"store: {store}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True, type=broker_address, help="HOST:PORT")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1.0, help="windows per second per device")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of producing")
    p.add_argument("--connections", type=int, default=20, help="MQTT connections the devices share")
    p.add_argument("--records-per-batch", type=int, default=1)
    p.add_argument("--ack-timeout", type=float, default=5.0, help="publish a batch again after S s without its ack")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="wait at most S s for the last acks")
    p.add_argument("--device-prefix", default="fleet-", help="device ids: PREFIX0001, ...")
    p.add_argument("--seed", type=int, default=1, help="the rides' random seed")
    p.add_argument("--db", help="the consumers' store to check afterwards: a SQLite path or a postgresql:// URL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    host, port = args.broker
    try:
        report = run(host, port, devices=args.devices, rate=args.rate, duration=args.duration,
                     connections=args.connections, ack_timeout=args.ack_timeout, drain_timeout=args.drain_timeout,
                     db=args.db, records_per_batch=args.records_per_batch, device_prefix=args.device_prefix,
                     seed=args.seed)
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(json.dumps(report) if args.json else summary(report))
    return 1 if failed(report) else 0


if __name__ == "__main__":
    raise SystemExit(main())
