"""What the agent tells a technician beside the data path: each source's rates and a
plain verdict, message health by CAN id and name, the vehicle's newest values, the
clock against GNSS time, and a tap of the raw bytes each source reads.

The runtime hands every read to ``Diagnostics.read`` (a bytearray append, and a deque
append only while a technician follows the tap) and calls ``tick`` once a second; the
rest runs only when the control socket asks. Nothing here is on the cloud's path.
"""

from __future__ import annotations

import base64
import collections
import time
from typing import Any

from agent.config import CAN_KINDS, Config
from agent.dbc.compile import CompiledDbc
from agent.errors import AgentError, DecodeError
from agent.feed import Feed, UartFeed
from agent.fusion.kernel import KernelApi
from agent.fusion.spec import SRC_FUSION
from agent.protocols import nmea, sniff
from agent.protocols.slcan import EXTENDED_FLAG
from agent.signals import BY_ID
from agent.sources.base import Source

# Rates and verdicts look back this far.
WINDOW_S = 10.0
# The newest bytes of each source kept for a verdict's guess and the GNSS time.
TAIL_BYTES = 4096
# A tap request keeps it running this long; what a source read beyond PER_SOURCE is
# dropped oldest first, and one reply carries at most REPLY_BYTES of data.
TAP_ARMED_S = 5.0
TAP_PER_SOURCE = 4 << 20
# Reads older than this are dropped whatever their size: a follower asks every 0.2 s,
# and each request scans what is kept, so what is kept stays a few seconds' worth.
TAP_KEEP_S = 10.0
TAP_REPLY_BYTES = 1 << 20
# Bad frames above this share of the frames in the window make a verdict "noisy".
NOISY_SHARE = 0.2
# The drain estimate's ack rate looks back this far.
ACK_WINDOW_S = 60.0
# adjtimex(2)'s clock state when the kernel's clock is not synchronised.
TIME_ERROR = 5


class Tap:
    """The raw reads of every source while a technician follows them (``frames``, the
    diagnostics bundle): kept only for TAP_ARMED_S after the last request, each read for
    at most TAP_KEEP_S."""

    def __init__(self, n_sources: int) -> None:
        self.until = 0.0
        self.n = 0
        self.chunks: list[collections.deque[tuple[int, float, bytes]]] = [collections.deque()
                                                                          for _ in range(n_sources)]
        self.size = [0] * n_sources
        self.dropped_upto = [0] * n_sources

    def record(self, i: int, t: float, data: bytes) -> None:
        if self.until < time.monotonic():
            if self.size[i]:
                self._clear()
            return
        self.n += 1
        q = self.chunks[i]
        q.append((self.n, t, data))
        self.size[i] += len(data)
        while self.size[i] > TAP_PER_SOURCE or q[0][1] < t - TAP_KEEP_S:
            n, _, old = q.popleft()
            self.size[i] -= len(old)
            self.dropped_upto[i] = n

    def _clear(self) -> None:
        for q in self.chunks:
            q.clear()
        self.size = [0] * len(self.size)

    def take(self, since: int | None, wanted: list[int]) -> tuple[int, list[tuple[int, int, float, bytes]], bool]:
        """Arm the tap; the reads of ``wanted`` sources after ``since`` (at most
        TAP_REPLY_BYTES of them), the cursor to ask from next, and whether reads after
        ``since`` were dropped unseen. No ``since``: from now on."""
        self.until = time.monotonic() + TAP_ARMED_S
        if since is None or since > self.n:  # from now, or a cursor of an agent before a restart
            return self.n, [], False
        out = sorted((n, i, t, data) for i in wanted for n, t, data in self.chunks[i] if n > since)
        taken: list[tuple[int, int, float, bytes]] = []
        size = 0
        for row in out:
            if taken and size + len(row[3]) > TAP_REPLY_BYTES:
                break
            taken.append(row)
            size += len(row[3])
        cursor = taken[-1][0] if len(taken) < len(out) else self.n
        lost = any(self.dropped_upto[i] > since for i in wanted)
        return cursor, taken, lost


class _Meter:
    """One source's counts once a second over the last WINDOW_S, and its newest bytes."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self.tail = bytearray()
        self.tail_t = 0.0

    def add(self, data: bytes, t: float) -> None:
        self.tail += data
        self.tail_t = t
        if len(self.tail) > 2 * TAIL_BYTES:
            del self.tail[:-TAIL_BYTES]

    def sample(self, mono: float, read: int, frames: int, bad: int) -> None:
        self.samples.append((mono, read, frames, bad))
        while self.samples and mono - self.samples[0][0] > WINDOW_S + 0.5:
            self.samples.popleft()

    def window(self) -> tuple[float, int, int, int]:
        """Seconds covered, and the bytes, valid frames and bad frames in them."""
        if len(self.samples) < 2:
            return 0.0, 0, 0, 0
        (t0, b0, f0, x0), (t1, b1, f1, x1) = self.samples[0], self.samples[-1]
        return t1 - t0, b1 - b0, f1 - f0, x1 - x0


class Diagnostics:
    """The technician's view of the running agent: built by the runtime from its stages."""

    def __init__(self, cfg: Config, sources: list[Source], feeds: list[Feed], kernel: KernelApi,
                 dbc: CompiledDbc | None) -> None:
        self.cfg = cfg
        self.sources = sources
        self.feeds = feeds
        self.kernel = kernel
        self.dbc = dbc
        self.names = [c.name for c in cfg.sources]
        self.tap = Tap(len(sources))
        self.meters = [_Meter() for _ in sources]
        self.acks: collections.deque[tuple[float, int]] = collections.deque()
        # Health slot -> (message name, CAN id); a UART source's slot is named by its protocol.
        self.messages: dict[int, tuple[str, str | None]] = {}
        if dbc is not None:
            for key, m in dbc.msg_index.items():
                can_id = key & ~EXTENDED_FLAG
                self.messages[m] = (dbc.msg_names[m], f"0x{can_id:08X}" if key & EXTENDED_FLAG else f"0x{can_id:03X}")
        for feed in feeds:
            if isinstance(feed, UartFeed):
                self.messages[feed.slot] = (feed.proto.name, None)

    def read(self, i: int, t: float, data: bytes) -> None:
        """Every read of source ``i``."""
        self.meters[i].add(data, t)
        self.tap.record(i, t, data)

    def tick(self, mono: float, records_acked: int) -> None:
        """Once a second: each source's counts, for its rates over the last WINDOW_S, and
        the records the cloud acknowledged, for the drain estimate."""
        counts = self._counts()
        for meter, src, (frames, bad) in zip(self.meters, self.sources, counts, strict=True):
            meter.sample(mono, src.bytes_read, frames, bad)
        self.acks.append((mono, records_acked))
        while mono - self.acks[0][0] > ACK_WINDOW_S:
            self.acks.popleft()

    def drain(self, buffered: int) -> dict[str, Any]:
        """The ack rate over the last minute and how long the backlog takes at it."""
        if len(self.acks) < 2:
            return {"ack_rate": None, "drain_s": None}
        (t0, n0), (t1, n1) = self.acks[0], self.acks[-1]
        rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return {"ack_rate": rate, "drain_s": buffered / rate if rate > 0 else None}

    def _counts(self) -> list[tuple[int, int]]:
        """Valid and bad frames of each source so far."""
        can_frames: dict[int, int] = collections.Counter()
        for _slot, i, frames, *_ in self.kernel.health(time.time()):
            can_frames[i] += frames
        out = []
        for i, feed in enumerate(self.feeds):
            if isinstance(feed, UartFeed):
                out.append((feed.ok, sum(self.bad_frames(i).values())))
            else:
                out.append((can_frames.get(i, 0), sum(self.bad_frames(i).values())))
        return out

    def bad_frames(self, i: int) -> dict[str, int]:
        """Source ``i``'s refused frames by reason, since the start. The kernel counts a
        CAN source's bad lines for every CAN source together."""
        feed = self.feeds[i]
        if isinstance(feed, UartFeed):
            fr = feed.framer
            bad = {**{f"framing: {k}": v for k, v in fr.bad.items()}, **feed.bad,
                   "not understood": feed.not_understood, "garbage bytes": fr.garbage_bytes}
        else:
            c = self.kernel.counters()
            bad = {"bad lines": c["bad_lines"], "error frames": c["error_frames"], "truncated": c["truncated"],
                   "adapter errors": c["adapter_errors"], "unknown ids": c["unknown"]}
            bad["overlong lines"] = feed.status().get("overlong_lines", 0)
        return {k: v for k, v in bad.items() if v}

    def sources_status(self, now: float, uptime: float) -> list[dict[str, Any]]:
        """What ``status`` adds to each source: rates, newest frame, bad frames, verdict."""
        newest: dict[int, float] = {}
        for _slot, i, _frames, _period, _touts, _out, _cs, _ctr, age in self.kernel.health(now):
            newest[i] = min(newest.get(i, age), age)
        out = []
        for i, (src, meter) in enumerate(zip(self.sources, self.meters, strict=True)):
            span, nbytes, frames, bad = meter.window()
            heard = self._guess(i) if src.is_open and nbytes and not frames else []
            out.append({
                "frames_per_s": frames / span if span else 0.0, "bytes_per_s": nbytes / span if span else 0.0,
                "last_frame_at": now - newest[i] if i in newest else None, "bad_frames": self.bad_frames(i),
                "verdict": self._verdict(i, span, nbytes, frames, bad, heard, uptime), "heard": heard,
            })
        return out

    def _guess(self, i: int) -> list[dict[str, Any]]:
        """The protocols a source's newest bytes look like, when none of its own came."""
        return [{"protocol": p, "frames": n} for p, n in sniff.identify(bytes(self.meters[i].tail[-TAIL_BYTES:]))]

    def _verdict(self, i: int, span: float, nbytes: int, frames: int, bad: int, heard: list[dict[str, Any]],
                 uptime: float) -> dict[str, Any]:
        src, cfg = self.sources[i], self.cfg.sources[i]
        if src.finished:
            return {"ok": True, "text": "replay finished"}
        if not src.is_open:
            why = src.last_error or "not opened yet"
            return {"ok": False, "text": f"not open: {why} (device plugged in? right port in the configuration?)"}
        if span < 2.0:
            return {"ok": True, "text": "just opened"}
        secs = f"{min(span, WINDOW_S):.0f} s"
        if not nbytes:
            if cfg.poll_interval > 0:
                return {"ok": False, "text": f"no answer to polls in {secs}: device off, wrong address, or "
                                             "TX/RX swapped?"}
            return {"ok": False, "text": f"no bytes in {secs}: device off or cable loose?"}
        if not frames:
            text = f"no valid frame in {secs}: {nbytes:,} bytes of something else"
            own = "slcan" if cfg.kind in CAN_KINDS else cfg.protocol
            others = [h["protocol"] for h in heard if h["protocol"] != own]
            if others:
                text += f" that look like {others[0]}: cable of another device?"
            else:
                text += " — wrong port or baud rate?"
            return {"ok": False, "text": text}
        rate = f"{frames / span:.0f} frames/s" if frames >= span else f"{frames} frames in {secs}"
        if bad > NOISY_SHARE * (frames + bad):
            return {"ok": False, "text": f"{rate}, but {bad:,} bad in {secs}: noisy line or loose contact?"}
        return {"ok": True, "text": f"ok: {rate}"}

    def health(self, now: float) -> list[dict[str, Any]]:
        """The kernel's health rows by message name and CAN id."""
        rows = []
        for slot, src, frames, period, timeouts, out, checksum, counter, age in self.kernel.health(now):
            message, can_id = self.messages.get(slot, (f"slot {slot}", None))
            rows.append({"slot": slot, "source": self.names[src], "message": message, "can_id": can_id,
                         "frames": frames, "period_s": period, "timeouts": timeouts, "timed_out": bool(out),
                         "checksum_errors": checksum, "counter_errors": counter, "age_s": age})
        return rows

    def live(self, now: float) -> dict[str, Any]:
        """Every signal the kernel has seen, newest value first-class: ``watch``."""
        signals = {}
        for sid, value, t, src, stale in self.kernel.state(now):
            name = self.dbc.signal_name(sid) if self.dbc is not None else BY_ID[sid].name
            unit = BY_ID[sid].unit if sid in BY_ID else ""
            signals[name] = {"value": value, "unit": unit, "at": t, "stale": bool(stale),
                             "source": "fusion" if src == SRC_FUSION else self.names[src]}
        return {"t": now, "signals": signals}

    def clock(self) -> dict[str, Any]:
        """The system clock, and the GNSS receiver's time against it (newest RMC)."""
        out: dict[str, Any] = {"source": "system", "synchronized": _synchronized(), "gnss_offset_s": None,
                               "gnss_source": None, "gnss_at": None}
        for i, cfg in enumerate(self.cfg.sources):
            if cfg.kind in CAN_KINDS or cfg.protocol != "nmea":
                continue
            meter = self.meters[i]
            utc = _newest_rmc(bytes(meter.tail[-TAIL_BYTES:]))
            if utc is not None:
                out.update(gnss_offset_s=utc - meter.tail_t, gnss_source=self.names[i], gnss_at=meter.tail_t)
                break
        return out

    def take(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ``tap`` request: raw reads after the cursor ``since``."""
        since = request.get("since")
        names = request.get("sources") or self.names
        if not isinstance(since, int | None) or not isinstance(names, list):
            raise AgentError("tap: since is a number, sources a list of names")
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise AgentError(f"tap: no source named {', '.join(map(str, unknown))} (sources: {', '.join(self.names)})")
        wanted = [self.names.index(n) for n in names]
        cursor, taken, lost = self.tap.take(since, wanted)
        chunks = [{"n": n, "t": t, "source": self.names[i], "format": self.sources[i].frame_format,
                   "protocol": self.cfg.sources[i].protocol, "data": base64.b64encode(data).decode()}
                  for n, i, t, data in taken]
        return {"cursor": cursor, "chunks": chunks, "lost": lost}


def _newest_rmc(data: bytes) -> float | None:
    """The UTC time of the newest valid RMC sentence in ``data``."""
    for line in reversed(data.split(b"\n")):
        if b"RMC," not in line:
            continue
        start = line.rfind(b"$")
        if start < 0:
            continue
        try:
            utc = nmea.rmc_utc(line[start:].strip())
        except DecodeError:
            continue
        if utc is not None:
            return float(utc)
    return None


def _synchronized() -> bool | None:
    """Whether the kernel's clock is synchronised (NTP, chrony, GNSS PPS), from adjtimex(2)
    in the C library the process already has; None where it cannot be asked. ctypes is
    imported here, on a technician's request, not with the agent."""
    import ctypes

    try:
        adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state = adjtimex(buf)
    return None if state < 0 else bool(state != TIME_ERROR)
