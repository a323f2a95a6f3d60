"""Request/response polling for BMSes that speak only when asked (JBD, Daly, Ninebot).

One request at a time: these buses are half duplex or the BMS drops a request that
arrives while it is answering, so a new request waits for the answer or the timeout.
Time is passed in (``now``, seconds, any monotonic clock), so the caller's selector
loop drives it and tests need no sleeping.
"""


class Poller:
    """Round-robin over ``requests``; ``match(request, frame)`` says whether a frame
    answers a request (the protocol module's ``match``).

    A request is due ``interval`` s after the previous one was sent, and not before
    the previous one was answered or ``timeout`` s passed. The answer counter is
    ``answers`` (``answered`` is the method); ``stats()`` gives all counters by name.
    """

    def __init__(self, requests, interval: float, timeout: float, match) -> None:
        if not requests:
            raise ValueError("a poller needs at least one request")
        if interval < 0 or timeout <= 0:
            raise ValueError("interval must be >= 0 and timeout > 0")
        self.requests = tuple(bytes(r) for r in requests)
        self.interval = interval
        self.timeout = timeout
        self._match = match
        self._next = 0
        self._sent_at = 0.0
        self.outstanding = None  # type: bytes | None
        self.sent = 0
        self.answers = 0
        self.timeouts = 0
        self.unsolicited = 0
        self.echoes = 0

    def due(self, now: float):
        """The request to send now, or None; a request unanswered for ``timeout`` s
        is counted as a timeout and given up."""
        if self.outstanding is not None:
            if now - self._sent_at < self.timeout:
                return None
            self.timeouts += 1
            self.outstanding = None
        if self.sent and now - self._sent_at < self.interval:
            return None
        req = self.requests[self._next]
        self._next = (self._next + 1) % len(self.requests)
        self.outstanding = req
        self._sent_at = now
        self.sent += 1
        return req

    def answered(self, frame) -> bool:
        """True if ``frame`` answers the outstanding request (which it then clears).

        A frame equal to the outstanding request is our own echo (one-wire buses) and
        counted in ``echoes``; anything else that does not match is ``unsolicited``.
        """
        req = self.outstanding
        if req is not None:
            if bytes(frame) == req:
                self.echoes += 1
                return False
            if self._match(req, frame):
                self.answers += 1
                self.outstanding = None
                return True
        self.unsolicited += 1
        return False

    def stats(self) -> dict:
        return {
            "sent": self.sent,
            "answered": self.answers,
            "timeouts": self.timeouts,
            "unsolicited": self.unsolicited,
            "echoes": self.echoes,
        }
