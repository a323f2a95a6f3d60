"""``ebike-sim``: ride a simulated e-bike and expose its buses on pseudo-terminals.

CPython only. Wires the MicroPython-safe scenario core to ptys (an SLCAN adapter
and a GNSS receiver), a candump log file and the JSON Lines manifest, paces sim
time against the wall clock, and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import IO, Any, NoReturn

from firmware_sim import scenario
from firmware_sim.encoders.bafang import candump_line
from firmware_sim.encoders.nmea import SIM_EPOCH_ISO, SIM_EPOCH_UNIX
from firmware_sim.link import SLCAN_BITRATES, IoLoop, LinkError, PtyPort, SlcanAdapter, UartBus
from firmware_sim.manifest import Manifest

BUS_BITRATE = 250000
CAN_IFACE = "can0"
TALKER = "GN"
# --can-fill pads with the Bafang messages that carry no rolling counter (31/00 does), so
# repeating them at any rate leaves every frame valid for a receiver that checks counters.
FILL_KINDS = ("32/01", "32/00", "34/01", "34/00", "32/03")
FILL_CAN = tuple(m for m in scenario.COMMUTE_CAN if m[0] in FILL_KINDS)


class UsageError(Exception):
    """Bad command line; reported as ``error: ...`` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Raise instead of exiting so main() keeps the ``error:`` format and returns 2."""
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``ebike-sim``."""
    p = _Parser(prog="ebike-sim", description="Simulated e-bike buses on pseudo-terminals.",
                epilog="Each bus gets its own pty, linked at PATH; point the agent's source at "
                       "PATH. JBD, Daly and Ninebot answer the requests the host writes; KT, "
                       "Sur-Ron (57 to the display; 47 answers to 46 polls) and NMEA stream. "
                       "Closing the loop: JBD write to register E1 (MOS control) opens the FETs; "
                       "an SLCAN 'T' write to the controller of 32/03 sets the cut-off speed; a "
                       "KT display frame with B4 bit 7 set locks the motor. Ground truth and "
                       "injected faults go to --manifest (firmware_sim/MANIFEST.md).")
    p.add_argument("--scenario", default="commute",
                   help=f"ride to simulate, compose with '+' ({', '.join(scenario.scenario_names())})")
    p.add_argument("--seed", type=int, default=1, help="PRNG seed; same seed, same bytes")
    p.add_argument("--duration", type=float, default=120.0, help="sim seconds to ride")
    p.add_argument("--speed", type=float, default=1.0,
                   help="sim time runs this many times faster than real time; 0 = flat out")
    p.add_argument("--slcan", metavar="PATH", help="create an SLCAN adapter pty linked at PATH")
    p.add_argument("--nmea", metavar="PATH", help="create an NMEA receiver pty linked at PATH")
    p.add_argument("--nmea-rate", type=int, default=5, metavar="HZ", help="GNSS epochs/s, 1-10")
    p.add_argument("--nmea-sentences", default="GGA,RMC", metavar="LIST",
                   help="sentences per GNSS epoch, in order, from GGA,RMC,VTG,GSA")
    p.add_argument("--talker", default=TALKER, choices=scenario.TALKERS, help="NMEA talker id")
    p.add_argument("--jbd", metavar="PATH", help="JBD BMS pty (answers DD A5 03/04/05, write E1)")
    p.add_argument("--daly", metavar="PATH", help="Daly BMS pty (answers cmd 90)")
    p.add_argument("--ninebot", metavar="PATH", help="Ninebot bus pty (BMS reg 31, ESC reg 25)")
    p.add_argument("--kt", metavar="PATH", help="KT controller->display pty, 10 Hz (reads display frames)")
    p.add_argument("--surron", metavar="PATH", help="Sur-Ron RS-485 pty (57 at 2 Hz, answers 46 polls)")
    p.add_argument("--noise-rate", type=float, default=0.02, metavar="P",
                   help="with the noisy-line scenario: chance per frame (UART, NMEA, and CAN "
                        "on the SLCAN line) of a bit error, and of a garbage burst before it; "
                        "a corrupted SLCAN line never decodes as a frame")
    p.add_argument("--can-noise-share", type=float, default=0.1, metavar="P",
                   help="with the can-noise scenario: share of the CAN frames (the scenario's and "
                        "--can-fill's) replaced on the bus by a frame with the same id and length "
                        "and random data, 0 < P <= 1")
    p.add_argument("--wheel-circumference", type=int, default=2200, metavar="MM",
                   help="wheel circumference, 1000-3000 mm (the KT wheel period and Bafang 32/03 follow it)")
    p.add_argument("--fault-at", type=float, metavar="S",
                   help="sim second the scenario's fault starts (theft, overheat, "
                        "thermal-runaway, cell-imbalance, gnss-outage, gnss-stuck, "
                        "gnss-negative, gnss-frozen, wheel-magnet, bms-fault, controller-fault, "
                        "unplug, can-noise) instead of 0.2 or 0.3 x --duration (can-noise: 0); "
                        "faults that end do so 0.3 x --duration later")
    p.add_argument("--unplug-bus", choices=scenario.PORT_BUSES, metavar="BUS",
                   help="with the unplug scenario: the bus whose port is pulled (its pty "
                        "closed and link removed) and later replugged as a new pty at the "
                        "same path (a replugged SLCAN adapter starts closed); "
                        f"{', '.join(scenario.PORT_BUSES)}; default the first with a pty "
                        "in that order")
    p.add_argument("--can-bitrate", type=int, default=BUS_BITRATE, metavar="BPS",
                   choices=sorted(SLCAN_BITRATES.values()),
                   help=f"bit rate of the simulated CAN bus; the host must open the SLCAN adapter "
                        f"at the same (Sn); default {BUS_BITRATE} (Bafang's)")
    p.add_argument("--can-fill", type=int, metavar="FRAMES_PER_S",
                   help="load the CAN bus: pad it up to FRAMES_PER_S frames per sim second (the "
                        "scenario's own included) with extra " + ", ".join(FILL_KINDS) + " frames "
                        "(Bafang messages without a rolling counter), spread evenly over each "
                        "second, encoded from the current state, never hit by noisy-line (can-noise "
                        "replaces its share of them); the "
                        "manifest marks them \"fill\": true. The load must fit in --can-bitrate "
                        "(frames counted without stuff bits): about 8,400 frames/s saturate a "
                        "1000000 bit/s bus")
    p.add_argument("--out", metavar="PATH", help="also write the CAN traffic as a candump -L log")
    p.add_argument("--manifest", metavar="FILE", help="JSON Lines record of what was delivered")
    p.add_argument("--linger", type=float, default=2.0, metavar="S",
                   help="keep the ptys open S real seconds after the ride")
    p.add_argument("--wait-open", type=float, default=30.0, metavar="S",
                   help="with --slcan, start the ride when the host opens the channel; "
                        "give up after S real seconds (0 = start at once)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and cross-check the flags; UsageError on nonsense."""
    args = build_parser().parse_args(argv)
    if args.duration <= 0:
        raise UsageError("--duration must be > 0")
    if not 1000 <= args.wheel_circumference <= 3000:
        raise UsageError("--wheel-circumference must be 1000-3000 mm")
    if args.speed < 0:
        raise UsageError("--speed must be >= 0")
    if not 1 <= args.nmea_rate <= 10:
        raise UsageError("--nmea-rate must be 1-10")
    if args.linger < 0 or args.wait_open < 0:
        raise UsageError("--linger and --wait-open must be >= 0")
    try:
        scenario.check_scenario(args.scenario)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    args.sentences = tuple(x.strip().upper() for x in args.nmea_sentences.split(",") if x.strip())
    if not args.sentences or any(x not in scenario.NMEA_SENTENCES for x in args.sentences):
        raise UsageError("--nmea-sentences: a comma list of GGA, RMC, VTG, GSA")
    if not 0.0 <= args.noise_rate <= 1.0:
        raise UsageError("--noise-rate must be 0-1")
    if not 0.0 < args.can_noise_share <= 1.0:
        raise UsageError("--can-noise-share must be > 0 and <= 1")
    if not (args.slcan or args.nmea or args.out or any(getattr(args, b) for b in scenario.UART_BUSES)):
        raise UsageError("nothing to emit: give --slcan, --nmea, --out and/or a UART bus "
                         "(--jbd, --daly, --ninebot, --kt, --surron)")
    if args.fault_at is not None and not 0.0 <= args.fault_at < args.duration:
        raise UsageError("--fault-at must be >= 0 and below --duration")
    if args.can_fill is not None:
        _check_fill(args)
    with_port = port_buses(args)
    if "unplug" in args.scenario.split("+"):
        if args.unplug_bus is None:
            if not with_port:
                raise UsageError("the unplug scenario needs a bus on a pty (--slcan, --nmea, "
                                 "--jbd, ...)")
            args.unplug_bus = with_port[0]
        elif args.unplug_bus not in with_port:
            flag = "--slcan" if args.unplug_bus == "can" else "--" + args.unplug_bus
            raise UsageError(f"--unplug-bus {args.unplug_bus} needs {flag}")
    elif args.unplug_bus is not None:
        raise UsageError("--unplug-bus needs the unplug scenario")
    return args


def frame_bits(data_len: int) -> int:
    """Bits an extended (29-bit) data frame holds the bus for, interframe space included
    and stuff bits not: the least it can take, so the bus check errs on the generous side."""
    return 67 + 8 * data_len


def can_load(name: str) -> tuple[int, float, float]:
    """For scenario ``name``: its own CAN frames per second, their bits per second, and
    the mean bits of one fill frame (the fill messages are sent in turn)."""
    ride = scenario.Ride(name)
    state = {"counter": 0}
    own = 0
    bits = 0.0
    for _kind, period, _offset, enc in ride.can:
        rate = scenario.STEPS_PER_S / period
        own += round(rate)
        bits += rate * frame_bits(len(enc(ride.vehicle, state)[1]))
    fill_bits = [frame_bits(len(enc(ride.vehicle, state)[1])) for _kind, _period, _offset, enc in FILL_CAN]
    return own, bits, sum(fill_bits) / len(fill_bits)


def _check_fill(args: argparse.Namespace) -> None:
    """--can-fill needs a CAN sink, more than the scenario sends itself, and room on the bus."""
    if not (args.slcan or args.out):
        raise UsageError("--can-fill needs --slcan or --out")
    own, bits, fill_bits = can_load(args.scenario)
    if args.can_fill <= own:
        raise UsageError(f"--can-fill must be above the {own} frames/s the scenario sends itself")
    need = bits + (args.can_fill - own) * fill_bits
    if need > args.can_bitrate:
        most = own + int((args.can_bitrate - bits) / fill_bits)
        raise UsageError(f"--can-fill {args.can_fill} needs {need:,.0f} bit/s, more than the "
                         f"{args.can_bitrate} bit/s bus carries (at most {most} frames/s; see --can-bitrate)")


def port_buses(args: argparse.Namespace) -> list[str]:
    """Buses that get a pty, in the order of ``scenario.PORT_BUSES``."""
    return [b for b in scenario.PORT_BUSES if getattr(args, "slcan" if b == "can" else b)]


class Sim:
    """The writer the scenario core talks to, plus the ports, files and pacing."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Remember the settings; nothing is opened until :meth:`open`."""
        self.args = args
        self.io = IoLoop()
        self.ports: list[PtyPort] = []
        self.slcan: SlcanAdapter | None = None
        self.uart: dict[str, UartBus] = {}
        self.ride: scenario.Ride | None = None
        self.out: IO[str] | None = None
        self.manifest: Manifest | None = None
        self.delivered = {"can": 0, "nmea": 0}
        self.dropped = {"can": 0, "nmea": 0}
        self.adapter_closed = 0
        self.unplugged: dict[str, int] = {}     # bus -> frames produced while unplugged
        self.stop_reason: str | None = None
        self.fill_per_s = 0 if args.can_fill is None else args.can_fill - can_load(args.scenario)[0]
        self._fill_next = 0                     # index into FILL_CAN of the next fill frame
        self.t = 0.0
        self._wall0 = 0.0
        self._ticks = 0

    def open(self) -> list[str]:
        """Create ports, files and the manifest header; return the lines to announce."""
        a = self.args
        lines = []
        buses: dict[str, Any] = {}
        if a.slcan or a.out:
            buses["can"] = {"bitrate": a.can_bitrate, "iface": CAN_IFACE,
                            "slcan": None, "file": a.out}
        if a.slcan:
            port = PtyPort(a.slcan)
            self.ports.append(port)
            self.slcan = SlcanAdapter(port, a.can_bitrate)
            self.io.add(port, self.slcan.feed)
            buses["can"]["slcan"] = {"path": a.slcan, "tty": port.tty_name}
            lines.append(f"slcan {a.slcan} {port.tty_name}")
        for name in ("nmea", *scenario.UART_BUSES):
            path = getattr(a, name)
            if not path:
                continue
            port = PtyPort(path)
            self.ports.append(port)
            bus = UartBus(name, port)
            self.uart[name] = bus
            self.io.add(port, bus.feed)
            self.delivered[name] = 0
            self.dropped[name] = 0
            buses[name] = {"path": path, "tty": port.tty_name}
            if name == "nmea":
                buses[name].update(rate_hz=a.nmea_rate, talker=a.talker, sentences=list(a.sentences))
            lines.append(f"{name} {path} {port.tty_name}")
        if a.out:
            self.out = open(a.out, "w", encoding="ascii")  # noqa: SIM115 - lives for the run
        if a.manifest:
            self.manifest = Manifest(a.manifest)
            self.manifest.write({
                "type": "header", "scenario": a.scenario, "seed": a.seed, "speed": a.speed,
                "duration": a.duration, "noise_rate": a.noise_rate,
                "can_noise_share": a.can_noise_share, "fault_at": a.fault_at,
                "unplug_bus": a.unplug_bus, "can_fill": a.can_fill, "sim_epoch": SIM_EPOCH_ISO,
                "sim_epoch_unix": SIM_EPOCH_UNIX, "buses": buses,
            })
        return lines

    def _input(self, name: str, data: bytes) -> None:
        """Host bytes on a UART bus: requests to the BMS, display frames to the KT
        controller. The GNSS receiver ignores what the host sends."""
        if self.ride is not None and name in scenario.POLLED:
            self.ride.serve(name, data)

    def _can_tx(self, can_id: int, data: bytes) -> None:
        """A frame the host transmitted through the SLCAN adapter."""
        if self.ride is not None and self.ride.can_write(can_id, data) and self.manifest is not None:
            self.manifest.write({"type": "command", "bus": "can", "t": self.ride.t,
                                 "id": f"{can_id:08X}", "data": data.hex(), "what": "speed-limit",
                                 "speed_limit_kmh": self.ride.vehicle.speed_limit_kmh})

    # Writer interface used by scenario.run ---------------------------------

    def attach(self, ride: scenario.Ride) -> None:
        """The ride has started: route host input to it."""
        self.ride = ride
        if self.slcan is not None:
            self.slcan.on_tx = self._can_tx
        for bus in self.uart.values():
            bus.connect(self._input)

    def fault(self, record: dict[str, Any]) -> None:
        """A scenario's injection, recorded when it takes effect."""
        if record["what"] == "unplug":
            record = self._unplug(record)
        elif record["what"] == "replug":
            record = self._replug(record)
        if self.manifest is not None:
            self.manifest.write(record)

    def _port(self, bus: str) -> PtyPort:
        """The pty of ``bus`` now."""
        if bus == "can":
            assert self.slcan is not None
            return self.slcan.port
        return self.uart[bus].port

    def _unplug(self, record: dict[str, Any]) -> dict[str, Any]:
        """Pull the bus's adapter: close its pty and remove its link."""
        bus = record["bus"]
        port = self._port(bus)
        unread = port.unread()
        self.io.remove(port)
        self.dropped[bus] += port.close()
        self.unplugged[bus] = self.unplugged.get(bus, 0)
        rec = dict(record)
        rec.update(wall=time.time(), tty=port.tty_name, unread_bytes=unread)
        return rec

    def _replug(self, record: dict[str, Any]) -> dict[str, Any]:
        """Plug a new adapter in: a new pty, linked at the same path (as udev would)."""
        bus = record["bus"]
        a = self.args
        rec = dict(record)
        path = a.slcan if bus == "can" else getattr(a, bus)
        try:
            port = PtyPort(path)
        except (LinkError, OSError) as exc:
            rec.update(wall=time.time(), error=str(exc))    # stays unplugged
            return rec
        if bus == "can":
            self.slcan = SlcanAdapter(port, a.can_bitrate)  # a new adapter starts closed
            self.slcan.on_tx = self._can_tx
            self.io.add(port, self.slcan.feed)
        else:
            uart = UartBus(bus, port)
            self.uart[bus] = uart
            if self.ride is not None:
                self.ride.parsers.pop(bus, None)            # a new device: no half request
                uart.connect(self._input)
            self.io.add(port, uart.feed)
        rec.update(wall=time.time(), tty=port.tty_name)
        return rec

    def _is_unplugged(self, bus: str) -> bool:
        """Whether ``bus``'s port is pulled now (its frames reach no host)."""
        return bus in self.unplugged and self._port(bus).closed

    def frame(self, bus: str, t: float, payload: tuple[int, bytes] | bytes, kind: str,
              values: dict[str, Any], fill: bool = False) -> None:
        """Deliver one frame to every sink of ``bus`` and account for it; ``fill`` marks
        a --can-fill frame in the manifest."""
        if bus == "can" and isinstance(payload, tuple):
            can_id, data = payload[0], payload[1]
            edit = payload[2] if len(payload) > 2 else None
            wire: dict[str, Any] = {"id": f"{can_id:08X}", "data": data.hex()}
            if edit is not None and self.slcan is not None:
                wire["corrupted"] = True
            if fill:
                wire["fill"] = True
            record = self._recorder("can", t, kind, values, **wire)
            if self.out is not None:
                self.out.write(candump_line(SIM_EPOCH_UNIX + t, CAN_IFACE, can_id, data) + "\n")
                if self.slcan is None:
                    record()
            if self.slcan is not None:
                if self._is_unplugged("can"):
                    self.unplugged["can"] += 1
                    return
                status = self.slcan.frame(t, can_id, data, record, edit)
                if status == "dropped":
                    self.dropped["can"] += 1
                elif status == "closed":
                    self.adapter_closed += 1
        elif bus == "can" and isinstance(payload, bytes):
            # Garbage on the SLCAN serial line; the --out log and the bus stay clean.
            if self.slcan is None:
                return
            if self._is_unplugged("can"):
                self.unplugged["can"] += 1
                return
            record = self._recorder("can", t, kind, values, data=payload.hex())
            if self.slcan.noise(payload, record) == "dropped":
                self.dropped["can"] += 1
        elif isinstance(payload, bytes) and bus in self.uart:
            if self._is_unplugged(bus):
                self.unplugged[bus] += 1
                return
            if bus == "nmea" and kind != "garbage":
                wire = {"sentence": payload.decode("latin-1").rstrip("\r\n")}
            else:
                wire = {"data": payload.hex()}
            record = self._recorder(bus, t, kind, values, **wire)
            if not self.uart[bus].send(payload, record):
                self.dropped[bus] += 1

    def _recorder(self, bus: str, t: float, kind: str, values: dict[str, Any],
                  **wire: Any) -> Callable[[], None]:
        """A callback that counts the frame and writes its manifest line when delivered."""
        def delivered() -> None:
            self.delivered[bus] += 1
            if self.manifest is not None:
                rec = {"type": "frame", "bus": bus, "t": t, "wall": time.time(), "kind": kind}
                rec.update(wire)
                rec["values"] = values
                self.manifest.write(rec)
        return delivered

    def truth(self, t: float, state: dict[str, Any]) -> None:
        """Record the true state (1 Hz sim) for judging what the agent made of it."""
        if self.manifest is not None:
            rec: dict[str, Any] = {"type": "truth"}
            rec.update(state)
            rec["t"] = t
            self.manifest.write(rec)

    def tick(self, t: float) -> bool:
        """Pace sim time against the wall clock, service the ports and send this step's
        fill frames; False = stop."""
        self.t = t
        self._ticks += 1
        if self._ticks == 1:
            self._wall0 = time.monotonic()
        if self.stop_reason is not None:
            return False
        speed = self.args.speed
        if speed <= 0:
            if self._ticks % 16 == 0:
                self.io.poll(0.0)
        else:
            target = self._wall0 + t / speed
            remaining = target - time.monotonic()
            if remaining <= 0 and self._ticks % 16 == 0:
                self.io.poll(0.0)
            while remaining > 0 and self.stop_reason is None:
                self.io.poll(remaining)
                remaining = target - time.monotonic()
        if self.fill_per_s and self.stop_reason is None:
            self._fill(t)
        return self.stop_reason is None

    def _fill(self, t: float) -> None:
        """This step's share of --can-fill: step n sends the frames that bring the count
        to floor((n + 1) x rate / steps per s), so every sim second carries exactly the rate;
        the fill messages take turns across steps."""
        assert self.ride is not None
        n = int(t * scenario.STEPS_PER_S + 0.5)
        rate, steps = self.fill_per_s, scenario.STEPS_PER_S
        count = (n + 1) * rate // steps - n * rate // steps
        if not count:
            return
        encoded = [(kind, enc(self.ride.vehicle, {})) for kind, _period, _offset, enc in FILL_CAN]
        for _ in range(count):
            kind, (can_id, data, values) = encoded[self._fill_next]
            self._fill_next = (self._fill_next + 1) % len(encoded)
            kind, data, values = self.ride.noisy_bus(kind, data, values)
            self.frame("can", t, (can_id, data), kind, values, fill=True)

    # Phases around the ride --------------------------------------------------

    def wait_open(self, limit: float) -> bool:
        """Serve adapter commands until the host opens the channel; False on timeout."""
        assert self.slcan is not None
        deadline = time.monotonic() + limit
        while self.slcan.open_count == 0 and self.stop_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.io.poll(min(remaining, 0.1))
        return True

    def linger(self, seconds: float) -> None:
        """Keep serving the ports so the host can drain what is queued."""
        deadline = time.monotonic() + seconds
        while self.stop_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.io.poll(min(remaining, 0.1))

    def finish(self, reason: str) -> None:
        """Close everything; frames still queued count as dropped; write the end record."""
        self.io.close()
        if self.slcan is not None:
            self.dropped["can"] += self.slcan.port.close()
        for name, bus in self.uart.items():
            self.dropped[name] += bus.port.close()
        if self.out is not None:
            self.out.close()
        if self.manifest is not None:
            self.manifest.write({
                "type": "end", "frames": dict(self.delivered), "dropped": dict(self.dropped),
                "adapter_closed": {"can": self.adapter_closed}, "unplugged": dict(self.unplugged),
                "t": self.t, "reason": reason,
            })
            self.manifest.close()

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: finish the current step, then wind down normally."""
        self.stop_reason = signal.Signals(signum).name


def _say(line: str) -> None:
    """Announce on stdout at once: a parent process waits for these lines."""
    print(line, flush=True)


def _error(message: str) -> int:
    """Report an error the way every ebike tool does and give the exit status."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run ``ebike-sim``; returns the process exit status."""
    try:
        args = parse_args(argv)
    except UsageError as exc:
        return _error(str(exc))
    except SystemExit as exc:          # --help
        return exc.code if isinstance(exc.code, int) else 0

    sim = Sim(args)
    reason = "done"
    old_handlers = {s: signal.signal(s, sim.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            lines = sim.open()
        except (LinkError, OSError) as exc:
            reason = "setup failed"
            return _error(str(exc))
        for line in lines:
            _say(line)
        _say("ready")
        if sim.slcan is not None and args.wait_open > 0 and not sim.wait_open(args.wait_open):
            reason = "wait-open timeout"
            return _error(f"the SLCAN channel was not opened (O or L) within {args.wait_open:g} s")
        streamed: list[str] = [b for b in ("nmea", "kt", "surron") if b in sim.uart]
        if args.slcan or args.out:
            streamed.append("can")
        scenario.run(sim, args.scenario, args.seed, args.duration, args.nmea_rate, args.talker,
                     buses=streamed, noise_rate=args.noise_rate, sentences=args.sentences,
                     fault_at=args.fault_at, unplug_bus=args.unplug_bus or "can",
                     wheel_circ_mm=args.wheel_circumference, can_noise_share=args.can_noise_share)
        if sim.stop_reason is None and sim.ports:
            sim.linger(args.linger)
        if sim.stop_reason is not None:
            reason = sim.stop_reason
        return 0
    finally:
        sim.finish(reason)
        for s, handler in old_handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
