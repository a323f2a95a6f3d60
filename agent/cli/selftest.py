"""``ebike-agent selftest``: is the wiring, the broker, the storage and the clock right?
One line per check, each FAIL with the fix to try; exit 1 when any failed.

Works with the agent stopped or running, and says which. The checks it shares with
``config check`` (a port opens, a log file parses, a CAN interface is up, a file can be
written beside the outbox, the running agent's ports) are agent.cli.checks; unlike
``config check``, selftest listens. A port the agent does not hold is opened here at
its configured rate and listened to (a polled BMS is asked); when no valid frame of
its protocol comes, the captured bytes are named (agent.protocols.sniff), a silent port
is asked in every polled protocol, and a real serial port is tried at the common rates,
so that a swapped cable or a wrong baud rate is named. The running agent's ports are
not opened a second time (checks.agents_source): its own reads come through the ``tap``
request instead, and what only an open port can tell (other rates, polling a silent
port) asks for the agent to be stopped.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent import config
from agent.cli import checks, view
from agent.cli.checks import SERIAL_KINDS, Report
from agent.cli.common import agent_options, control_socket
from agent.config import POLLED_PROTOCOLS, Config, SourceConfig
from agent.control.client import follow_tap
from agent.errors import AgentError, CheckFailed, DecodeError

if TYPE_CHECKING:
    from agent.sources.base import Source

LISTEN_S = 3.0
# Listening ends early once this many valid frames came (and a GNSS time, from NMEA).
ENOUGH_FRAMES = 5
# Each polled protocol tried on a silent port, and each rate on a garbled one, this long.
PROBE_S = 1.0
PROBE_FRAMES = 2
POLL_INTERVAL_S = 0.25
COMMON_RATES = (9600, 115200, 38400, 19200, 57600, 4800)
CAPTURE_MAX = 1 << 16
CLOCK_TOLERANCE_S = 2.0
NET_TIMEOUT_S = 5.0
# The write-speed check: 1 MiB fsynced writes, at most SPEED_BYTES or SPEED_S.
SPEED_CHUNK = 1 << 20
SPEED_BYTES = 8 << 20
SPEED_S = 1.0
MIN_MB_S = 1.0
MIB = 1024 * 1024
STOP_AGENT = "stop the agent (systemctl stop ebike-agent), run selftest again: it tries other protocols, rates"


class Heard:
    """What one source said while listened to: its bytes (the newest CAPTURE_MAX), the
    valid frames of the protocol it is read as, and GNSS time offsets from NMEA RMC."""

    def __init__(self, read_as: str) -> None:
        from agent.protocols.sniff import reader

        self.read_as = read_as
        self.reader = reader(read_as)
        self.data = bytearray()
        self.frames = 0
        self.seconds = 0.0
        self.gnss_offsets: list[float] = []

    def add(self, data: bytes, t: float) -> list[bytes]:
        """Take one read made at epoch ``t``; the valid frames it completed."""
        from agent.protocols.nmea import rmc_utc

        self.data += data
        del self.data[:-CAPTURE_MAX]
        frames = self.reader.feed(data)
        self.frames += len(frames)
        if self.read_as == "nmea":
            for sentence in frames:
                try:
                    utc = rmc_utc(sentence)
                except DecodeError:
                    continue
                if utc is not None:
                    self.gnss_offsets.append(utc - t)
        return frames


def own(src: SourceConfig) -> str:
    """What a source's bytes are read as: its UART protocol, or its CAN framing."""
    return src.kind if src.kind in ("slcan", "candump") else src.protocol


def label(name: str) -> str:
    return name if name == "candump" else name.upper()


def is_pty(port: str) -> bool:
    """A pseudo-terminal (the simulator's ports): its baud rate changes nothing."""
    return os.path.realpath(port).startswith("/dev/pts/")


def swap_fix(src: SourceConfig, sources: tuple[SourceConfig, ...], heard_as: str) -> str:
    """The fix when ``src``'s port carries ``heard_as``: the source configured for that
    protocol has its cable swapped with this one, or the configuration names the wrong port."""
    others = [s for s in sources if s.name != src.name and own(s) == heard_as]
    if others:
        return f"{others[0].name.upper()} and {src.name.upper()} cables swapped?"
    return f"wrong port? or set protocol = \"{heard_as}\" for source {src.name}"


# --- listening to a port the agent does not hold ------------------------------------


def opened(cfg: SourceConfig) -> tuple[Source | None, str]:
    """The source opened as the agent opens it (an SLCAN adapter's handshake too), or
    None and why not."""
    from agent.sources import make_source

    try:
        src = make_source(cfg)
    except AgentError as e:
        return None, str(e)
    if src.poll_open():
        return src, ""
    return None, src.last_error


def listen(src: Source, heard: Heard, seconds: float, poll: str | None = None, enough: int = ENOUGH_FRAMES,
           timeout: float = 1.0) -> Heard:
    """Read ``src`` into ``heard`` for up to ``seconds`` (less once ``enough`` valid
    frames, and a GNSS time from NMEA, came), asking in protocol ``poll`` if given."""
    from agent.protocols import protocol

    poller = protocol(poll).poller(POLL_INTERVAL_S, timeout) if poll else None
    start = time.monotonic()
    deadline = start + seconds
    try:
        while src.is_open:
            now = time.monotonic()
            if now >= deadline or (heard.frames >= enough and (heard.read_as != "nmea" or heard.gnss_offsets)):
                break
            if poller is not None:
                req = poller.due(now)
                if req is not None:
                    src.write(req)
            select.select([src.fileno()], [], [], min(0.05, deadline - now))
            for frame in heard.add(src.read(), time.time()):
                if poller is not None:
                    poller.answered(frame)
    except AgentError:
        pass  # the device went away: what was heard stands, and says so
    heard.seconds = time.monotonic() - start
    return heard


def attempt(cfg: SourceConfig, read_as: str, poll: str | None, seconds: float = PROBE_S) -> Heard | None:
    """Open ``cfg``'s port, listen for ``read_as`` (asking in ``poll``); None if it does not open."""
    src, _error = opened(cfg)
    if src is None:
        return None
    try:
        return listen(src, Heard(read_as), seconds, poll, PROBE_FRAMES, min(cfg.poll_timeout, seconds / 2))
    finally:
        src.close()


def named(heard: Heard) -> str | None:
    """The protocol ``heard`` is in: its own when valid frames came, else the bytes' best guess."""
    from agent.protocols.sniff import identify

    if heard.frames:
        return heard.read_as
    found = identify(bytes(heard.data))
    return found[0][0] if found else None


def diagnose(cfg: SourceConfig, sources: tuple[SourceConfig, ...], heard: Heard, probe: bool = True) -> tuple[str, str]:
    """(what the port does instead, the fix) for a source of which no valid frame came;
    with ``probe``, a silent port is polled in each protocol and a real serial port tried
    at the common rates (the port must be closed, and not the agent's)."""
    from agent.protocols.sniff import identify

    base, mine = os.path.basename(cfg.port), own(cfg)
    others = [p for p, _n in identify(bytes(heard.data)) if p != mine]
    if others:
        return f"{base} speaks {label(others[0])} at {cfg.baudrate} Bd, not {label(mine)}", \
            swap_fix(cfg, sources, others[0])
    if probe and cfg.kind == "uart" and not heard.data:
        for proto in POLLED_PROTOCOLS:
            got = attempt(cfg, proto, proto) if proto != mine else None
            if got is not None and got.frames:
                return f"{base} silent as {label(mine)}; answers {label(proto)} polls at {cfg.baudrate} Bd", \
                    swap_fix(cfg, sources, proto)
    pty = is_pty(cfg.port)
    if probe and cfg.kind == "uart" and not pty:
        for rate in COMMON_RATES:
            got = attempt(replace(cfg, baudrate=rate), mine, mine if mine in POLLED_PROTOCOLS else None) \
                if rate != cfg.baudrate else None
            heard_as = named(got) if got is not None else None
            if heard_as == mine:
                return f"wrong baud rate: speaks {label(mine)} at {rate} Bd, configured {cfg.baudrate}", \
                    f"set baudrate = {rate} for source {cfg.name}"
            if heard_as is not None:
                return f"{base} speaks {label(heard_as)} at {rate} Bd, not {label(mine)} at {cfg.baudrate}", \
                    swap_fix(cfg, sources, heard_as)
    secs = f"{heard.seconds:.0f} s"
    if heard.data:
        tried = " (a pty: rates not tried)" if pty else " at any common rate" if probe else ""
        return f"{view.number(len(heard.data))} bytes in {secs}, no valid {label(mine)} frame{tried}", \
            "wrong port or protocol? noisy line?"
    if cfg.kind == "slcan":
        return f"adapter open, no CAN frame in {secs}", f"bus powered? bitrate {cfg.bitrate} right?"
    if mine in POLLED_PROTOCOLS:
        return f"no answer to {label(mine)} polls in {secs}", "BMS awake? TX/RX swapped?"
    return f"no bytes in {secs}", "device powered? cable in? TX/RX swapped?"


def serial_source(rep: Report, cfg: SourceConfig, sources: tuple[SourceConfig, ...], seconds: float) -> Heard | None:
    """A UART or SLCAN source the agent does not hold: its port opens (checks.serial_open),
    then its frames, as the agent opens it (an SLCAN adapter greeted too)."""
    what = cfg.name
    if not rep.put(checks.serial_open(f"{what} port", cfg)).ok:
        return None
    src, error = opened(cfg)
    if src is None:
        fault = checks.open_fault(f"{what} data", cfg, error)
        raw = attempt(replace(cfg, kind="uart"), "nmea", None, seconds) if cfg.kind == "slcan" else None
        heard_as = named(raw) if raw is not None else None
        if heard_as is not None:
            fault = checks.Check(False, fault.what, f"{fault.detail}; it speaks {label(heard_as)} at {cfg.baudrate} "
                                                    "Bd", swap_fix(cfg, sources, heard_as))
        rep.put(fault)
        return None
    mine = own(cfg)
    try:
        heard = listen(src, Heard(mine), seconds, mine if mine in POLLED_PROTOCOLS else None,
                       timeout=cfg.poll_timeout)
    finally:
        src.close()
    data_line(rep, cfg, sources, heard, probe=True)
    return heard


def data_line(rep: Report, cfg: SourceConfig, sources: tuple[SourceConfig, ...], heard: Heard, probe: bool) -> None:
    """The ``data`` line of a source listened to, here (``probe``) or through the agent's tap."""
    what = f"{cfg.name} data"
    if heard.frames:
        rep.add(True, what, f"{heard.frames} valid {label(heard.read_as)} frames in {heard.seconds:.1f} s")
        return
    detail, fix = diagnose(cfg, sources, heard, probe)
    rep.add(False, what, detail, fix if probe else f"{fix}; or {STOP_AGENT}")


# The name of the line of a source that is not a serial port, after the source's name.
DEVICE_NOUN = {"candump": "file", "socketcan": "interface"}


def tapped(path: str, theirs: dict[str, SourceConfig], seconds: float) -> dict[str, Heard]:
    """What the running agent read over ``seconds`` from its sources named in ``theirs``
    (each read as the configuration's source on that port), through its tap."""
    heard = {name: Heard(own(src)) for name, src in theirs.items()}
    start = time.monotonic()
    for chunks, _lost in follow_tap(path, list(heard), seconds):
        for chunk in chunks:
            heard[chunk["source"]].add(chunk["data"], chunk["t"])
    for h in heard.values():
        h.seconds = time.monotonic() - start
    return heard


def all_sources(rep: Report, cfg: Config, path: str, st: dict[str, Any] | None, seconds: float) -> list[float]:
    """Every source: the running agent's ports through its word and its tap, the other
    serial ports opened and listened to here, the rest looked at; the GNSS time offsets heard."""
    theirs = {src.name: t for src in cfg.sources if (t := checks.agents_source(st, src)) is not None}
    reading = {t["name"]: src for src in cfg.sources if (t := theirs.get(src.name)) is not None and t.get("open")}
    why = ""
    try:
        tap = tapped(path, reading, seconds) if reading else {}
    except AgentError as e:
        tap, why = {}, f"not read through the agent's tap: {e}"
    offsets: list[float] = []
    for src in cfg.sources:
        held = theirs.get(src.name)
        if held is not None:
            if rep.put(checks.held_port(f"{src.name} port", src, held)).ok:  # else: no data to tell of
                h = tap.get(held["name"])
                if h is None:
                    rep.add(None, f"{src.name} data", why)
                else:
                    offsets += h.gnss_offsets
                    data_line(rep, src, cfg.sources, h, probe=False)
        elif src.kind in SERIAL_KINDS:
            heard = serial_source(rep, src, cfg.sources, seconds)
            offsets += heard.gnss_offsets if heard is not None else []
        else:
            rep.put(checks.device_check(f"{src.name} {DEVICE_NOUN.get(src.kind, 'bus')}", src))
    return offsets


# --- broker, storage, clock ------------------------------------------------------------


def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host``, within NET_TIMEOUT_S (getaddrinfo has no timeout of its own)."""
    got: list[Any] = []

    def run() -> None:
        try:
            got.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            got.append(e)

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + NET_TIMEOUT_S
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    if not got:
        raise TimeoutError(f"no answer from the DNS in {NET_TIMEOUT_S:.0f} s")
    if isinstance(got[0], OSError):
        raise got[0]
    return sorted({str(a[4][0]) for a in got[0]})


def broker(rep: Report, cfg: Config) -> None:
    """DNS, TCP, TLS and the MQTT CONNECT, each its own line; a failure skips what follows."""
    import ssl

    from agent.uplink.mqtt import _client, connection_error

    b = cfg.broker
    tls = bool(b.tls_ca or b.tls_cert)
    steps = ["dns", "tcp", "tls", "mqtt"]

    def failed(step: str, words: str, fix: str) -> None:
        rep.add(False, f"broker {step}", words, fix)
        for later in steps[steps.index(step) + 1:]:
            rep.add(None, f"broker {later}", f"not tried: {step} failed")

    try:
        addresses = resolve(b.host, b.port)
    except TimeoutError as e:
        return failed("dns", str(e), "DNS servers (/etc/resolv.conf)? link up?")
    except OSError as e:
        return failed("dns", connection_error(e, b.host, b.port), "[broker] host right? DNS (/etc/resolv.conf)?")
    rep.add(True, "broker dns", f"{b.host} is {', '.join(addresses[:2])}")
    start = time.monotonic()
    try:
        socket.create_connection((b.host, b.port), timeout=NET_TIMEOUT_S).close()
    except OSError as e:
        return failed("tcp", connection_error(e, b.host, b.port),
                      "broker running on that port? firewall? link up?")
    rep.add(True, "broker tcp", f"{b.host}:{b.port} answers ({(time.monotonic() - start) * 1000:.0f} ms)")
    client = _client(f"{cfg.device_id}-selftest-{os.getpid()}", b)
    client.connect_timeout = NET_TIMEOUT_S
    try:
        client.connect(b.host, b.port, keepalive=b.keepalive)
    except OSError as e:
        words = connection_error(e, b.host, b.port)
        if isinstance(e, ssl.SSLError):
            return failed("tls", words, "tls_ca and host right? the clock?")
        return failed("mqtt", words, "broker running on that port? firewall?")
    if tls:
        rep.add(True, "broker tls", f"handshake verified ({os.path.basename(b.tls_ca or b.tls_cert)})")
    else:
        rep.add(None, "broker tls", "not configured: plain MQTT")
    answers: list[Any] = []
    client.on_connect = lambda _c, _u, _flags, rc, _props: answers.append(rc)
    client.on_disconnect = lambda _c, _u, _flags, _rc, _props: answers.append(None)
    deadline = time.monotonic() + NET_TIMEOUT_S
    try:
        while not answers and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        if answers and answers[0] is not None and not answers[0].is_failure:
            user = f"as {b.username}" if b.username else "anonymous"
            rep.add(True, "broker mqtt", f"CONNECT accepted ({user}, MQTT {b.protocol})")
        elif answers:
            words = connection_error(answers[0], b.host, b.port)
            fix = "[broker] username and password right?" if "authentication" in words else "see the broker's log"
            rep.add(False, "broker mqtt", words, fix)
        else:
            rep.add(False, "broker mqtt", f"no CONNACK from {b.host}:{b.port} in {NET_TIMEOUT_S:.0f} s",
                    "an MQTT broker there? overloaded?")
    finally:
        client.disconnect()
        client.loop(timeout=0.1)


def write_test(path: str, limit: int, seconds: float) -> tuple[int, float]:
    """Write ``path`` in SPEED_CHUNK pieces, each fsynced, up to ``limit`` bytes or
    ``seconds``; remove it. The bytes written and the time taken."""
    chunk = os.urandom(min(SPEED_CHUNK, max(limit, 1)))
    start = time.monotonic()
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            written += os.write(fd, chunk)
            os.fsync(fd)
            if written >= limit or time.monotonic() - start >= seconds:
                break
    finally:
        os.close(fd)
        os.unlink(path)
    return written, time.monotonic() - start


def outbox(rep: Report, cfg: Config) -> None:
    """The outbox's directory: writable (checks.writable), room for the quota, fast enough."""
    from agent.store.outbox import FREE_SHARE

    path = cfg.outbox.path
    if not rep.put(checks.writable("outbox writable", path, "outbox.path")).ok:
        for later in ("space", "speed"):
            rep.add(None, f"outbox {later}", "not tried: not writable")
        return
    directory = checks.existing(os.path.dirname(os.path.abspath(path)))  # the agent makes it there
    disk = os.statvfs(directory)
    free = disk.f_bavail * disk.f_frsize
    held = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    quota = cfg.outbox.quota_mb * MIB
    room = FREE_SHARE * (free + held)
    rep.add(room >= quota, "outbox space",
            f"{free / MIB:,.0f} MB free; holds {held / MIB:,.1f} of {quota / MIB:,.0f} MB quota",
            f"free space, or quota_mb = {room / MIB:,.0f}")
    written, took = write_test(os.path.join(directory, f".selftest-{os.getpid()}"), min(SPEED_BYTES, free // 4),
                               SPEED_S)
    rate = written / MIB / max(took, 1e-6)
    rep.add(rate >= MIN_MB_S, "outbox speed", f"{rate:,.1f} MB/s ({written / MIB:.0f} MB, synced per MB)",
            "the card is slow or failing: replace it")


def clock(rep: Report, offsets: list[float], st: dict[str, Any] | None) -> None:
    """The system clock against GNSS time, heard here or by the running agent."""
    offset = offsets[-1] if offsets else None
    if offset is None and st is not None:
        offset = (st.get("clock") or {}).get("gnss_offset_s")
    if offset is None:
        rep.add(None, "clock", "no GNSS time to compare with (no RMC with a fix heard)")
        return
    side = "behind" if offset > 0 else "ahead of"
    rep.add(abs(offset) < CLOCK_TOLERANCE_S, "clock", f"system {view.age(abs(offset))} {side} GNSS time",
            "set the clock; enable NTP")


# --- the command ---------------------------------------------------------------------


def run(cfg: Config, path: str, seconds: float, quiet: bool) -> tuple[Report, dict[str, Any]]:
    """Every check, in order; the report and what was found out about the agent."""
    st = checks.agent_state(path)
    if st is None:
        agent = {"running": False, "socket": path, "text": checks.agent_line(path, st, "ports opened here")}
    else:
        held = [s["port"] for s in st.get("sources", []) if s.get("open")]
        agent = {"running": True, "socket": path, "ports": held,
                 "text": checks.agent_line(path, st, f"the {len(held)} ports it holds are read through its tap")}
    if not quiet:
        print(agent["text"])
    rep = Report(quiet)
    offsets = all_sources(rep, cfg, path, st, seconds)
    broker(rep, cfg)
    outbox(rep, cfg)
    clock(rep, offsets, st)
    return rep, agent


def _selftest(args: argparse.Namespace) -> int:
    import logging

    if not args.debug:
        # A port that does not open is a FAIL line here, not a warning about retries.
        logging.getLogger("agent").setLevel(logging.ERROR)
    cfg = config.load(args.config)
    rep, agent = run(cfg, control_socket(args, cfg), args.listen, args.json)
    if args.json:
        view.print_json({"agent": agent, "failed": rep.failed, "checks": rep.as_json()})
    if rep.failed:
        raise CheckFailed(f"selftest: {rep.failed} check(s) failed")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("selftest", help="check ports, broker, storage and clock; the fix for each fault",
                       description="One line per check (PASS, FAIL with the fix to try, SKIP); exit 1 if any "
                                   "failed. Works with the agent stopped (ports opened here) or running (the "
                                   "ports it holds read through its tap, the others opened here).")
    agent_options(p)
    p.add_argument("--listen", type=float, default=LISTEN_S, metavar="S",
                   help="listen to each port this long for valid frames (default %(default)s s)")
    p.set_defaults(func=_selftest)

