"""UART protocols by name, so the agent and ``ebike-agent decode`` treat them alike.

    p = protocol("jbd")                      # or protocol("kt-lcd3", circumference_mm=2100)
    fr = p.framer()                          # .feed(bytes) -> [frame], .frames, .bad, .garbage_bytes
    for frame in fr.feed(chunk):
        if not p.understood(frame): ...      # count "not understood"
        signals = p.decode(frame)            # {} if nothing for the catalogue; DecodeError if malformed
    if p.polled: poller = p.poller(interval=1.0, timeout=0.5)

Modules are imported on first use, so one protocol's problem fails only that one.

The package owns the byte-level protocols that are not a DBC: the UART framers,
decoders and pollers, the candump log format, Bafang's CAN writes; and the one list of
UART protocol names (UART_PROTOCOLS: the configuration's checks and ``ebike-agent
decode`` derive from it, so a new protocol is a module and a line here). Written for
MicroPython too, it imports nothing of the agent but agent.errors, and only the
standard library.
"""

from agent.protocols.poll import Poller

# name -> (module under agent.protocols, polled: the agent asks for what it reads, on
# poll_interval). The flag is here so a configuration is checked without importing every
# protocol; a test holds it equal to each module's poll requests.
UART_PROTOCOLS = {
    "nmea": ("nmea", False),
    "jbd": ("jbd", True),
    "daly": ("daly", True),
    "ninebot": ("ninebot", True),
    "kt-lcd3": ("kt", False),
    "surron": ("surron", False),
}


class NmeaStreamFramer:
    """nmea.NmeaFramer behind the common framer face: ``bad`` holds its overlong
    lines. Checksums stay with the decoder (a bad one is a DecodeError), as in nmea.py."""

    def __init__(self) -> None:
        from agent.protocols.nmea import NmeaFramer

        self._inner = NmeaFramer()

    def feed(self, data) -> list:
        return self._inner.feed(data)

    @property
    def frames(self) -> int:
        return self._inner.frames

    @property
    def garbage_bytes(self) -> int:
        return self._inner.garbage_bytes

    @property
    def pending(self) -> int:
        return self._inner.pending

    @property
    def bad(self) -> dict:
        n = self._inner.overlong
        return {"length": n} if n else {}


def _nmea_understood(sentence) -> bool:
    from agent.errors import DecodeError
    from agent.protocols.nmea import SUPPORTED, sentence_type

    try:
        return sentence_type(sentence) in SUPPORTED
    except DecodeError:
        return False


def _pick(options: dict, names, used: list) -> dict:
    picked = {}
    for key in names:
        if key in options:
            picked[key] = options[key]
            used.append(key)
    return picked


class UartProtocol:
    """One UART protocol with its options applied: framer factory, decoder, poll list."""

    def __init__(self, name: str, options: dict) -> None:
        if name not in UART_PROTOCOLS:
            raise KeyError("unknown UART protocol %r (known: %s)" % (name, ", ".join(sorted(UART_PROTOCOLS))))
        self.name = name
        mod = __import__("agent.protocols." + UART_PROTOCOLS[name][0], None, None, ("decode",))
        used = []  # type: list
        self._framer_options = _pick(options, getattr(mod, "FRAMER_OPTIONS", ()), used)
        self._decode_options = _pick(options, getattr(mod, "DECODE_OPTIONS", ()), used)
        poll_options = _pick(options, getattr(mod, "POLL_OPTIONS", ()), used)
        for key in options:
            if key not in used:
                raise ValueError("protocol %r has no option %r" % (name, key))
        if name == "nmea":
            self._make_framer = NmeaStreamFramer
            self._decode = mod.decode_sentence
            self._understood = _nmea_understood
        else:
            self._make_framer = mod.framer
            self._decode = mod.decode
            self._understood = mod.understood
        make_requests = getattr(mod, "poll_requests", None)
        if make_requests is not None:
            self.poll_requests = make_requests(**poll_options)
        else:
            self.poll_requests = getattr(mod, "POLL_REQUESTS", ())
        self.match = getattr(mod, "match", None)
        self.polled = bool(self.poll_requests)

    def framer(self):
        """A new framer for one stream (framers keep per-stream state)."""
        return self._make_framer(**self._framer_options)

    def decode(self, frame) -> dict:
        """Catalogue name -> value; {} for a frame without signals; DecodeError if malformed."""
        return self._decode(frame, **self._decode_options)

    def understood(self, frame) -> bool:
        """Whether this frame is of a kind the decoder knows (even with no signals)."""
        return self._understood(frame)

    def poller(self, interval: float, timeout: float) -> Poller:
        if not self.polled:
            raise ValueError("protocol %r is not polled" % self.name)
        return Poller(self.poll_requests, interval, timeout, self.match)


def protocol(name: str, **options) -> UartProtocol:
    """The UART protocol ``name`` (a key of UART_PROTOCOLS) with its options."""
    return UartProtocol(name, options)
