"""The one stream framer every binary UART protocol uses.

A protocol describes itself with a small spec object and the ``Framer`` does the rest:

- ``starts``: tuple of start markers (bytes); a candidate begins at any of them.
  A spec may instead define ``find(buf, pos) -> index or -1`` (KT display frames are
  anchored on their trailer) together with ``hunt_keep``: how many tail bytes may
  still begin a frame when ``find`` saw none.
- ``head``: bytes needed from the start before ``length`` can be asked.
- ``max_len``: no frame is longer; a length field beyond it is rejected at once.
- ``length(buf, s)``: the frame length; 0 when the length field is bad, or a reason
  string when the header already rules the candidate out (Sur-Ron's address).
- ``check(buf, s, length)``: None for a good frame, a reason string ("checksum",
  "trailer", ...) for a bad one, or a larger int: "check again at this length"
  (JBD's firmware quirk). A spec whose ``check`` can ask that also has
  ``fault(buf, s, length)``: the reason the form of ``length`` bytes failed, counted
  when the line goes quiet before the longer form is complete.

A bad candidate moves the search ONE byte past its start, never past its end, so a
real frame that begins inside garbage or inside a false start is still found. A
candidate whose length says more than has arrived waits, which ``max_len`` bounds.
Every byte fed ends up in exactly one of: a returned frame, ``garbage_bytes``, or
``pending``. Written for MicroPython too: bytearray, find, no typing at run time.
"""


class Framer:
    """Cuts a byte stream into verified frames; bounded and never raises on input."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self._buf = bytearray()
        self._find = getattr(spec, "find", None)
        self._starts = spec.starts if self._find is None else ()
        self._keep = getattr(spec, "hunt_keep", 0)
        if self._find is None:
            for marker in self._starts:
                self._keep = max(self._keep, len(marker) - 1)
        self.frames = 0
        self.garbage_bytes = 0
        self.bad = {}  # type: dict

    @property
    def pending(self) -> int:
        """Bytes held for the next ``feed`` (an unfinished candidate or a partial marker)."""
        return len(self._buf)

    def _count(self, reason: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1

    def _next_start(self, buf, pos: int, cache: list) -> int:
        """Earliest start marker at or after ``pos``; ``cache`` remembers each marker's
        last hit so a marker absent from the buffer is not searched for again."""
        best = -1
        starts = self._starts
        for i in range(len(starts)):
            at = cache[i]
            if at == -2 or (0 <= at < pos):
                at = buf.find(starts[i], pos)
                cache[i] = at
            if at >= 0 and (best < 0 or at < best):
                best = at
        return best

    def feed(self, data) -> list:
        """Frames completed by ``data``, each as ``bytes``, in stream order."""
        self._buf.extend(data)
        return self._scan(False)

    def flush(self) -> list:
        """The line went quiet: a waiting candidate will not complete, so drop its start
        (counted as "truncated", see ``_cut_short``) and frame what follows it. Call on an
        idle gap."""
        return self._scan(True)

    def _cut_short(self, buf, s: int, length: int) -> str:
        """Why a candidate the line left unfinished is dropped: "truncated", unless its
        length field's form was complete and failed, and only a longer form ``check``
        asked for is missing: then that failure is the fault (JBD's bad checksum)."""
        first = self.spec.length(buf, s)
        if length > first:
            return self.spec.fault(buf, s, first)
        return "truncated"

    def _scan(self, idle: bool) -> list:
        buf = self._buf
        spec = self.spec
        find = self._find
        n = len(buf)
        pos = 0
        out = []
        cache = [-2] * len(self._starts)
        while True:
            s = find(buf, pos) if find is not None else self._next_start(buf, pos, cache)
            if s < 0:
                keep = n - self._keep
                if idle or keep < pos:
                    keep = n if idle else pos
                self.garbage_bytes += keep - pos
                pos = keep
                break
            self.garbage_bytes += s - pos
            pos = s
            if n - s < spec.head:
                if idle:
                    self._count("truncated")
                    self.garbage_bytes += 1
                    pos = s + 1
                    continue
                break
            length = spec.length(buf, s)
            if isinstance(length, str) or length <= 0 or length > spec.max_len:
                self._count(length if isinstance(length, str) else "length")
                self.garbage_bytes += 1
                pos = s + 1
                continue
            verdict = None
            while True:
                if n - s < length:
                    verdict = length
                    break
                verdict = spec.check(buf, s, length)
                if verdict is None or isinstance(verdict, str):
                    break
                if verdict <= length or verdict > spec.max_len:
                    verdict = "length"
                    break
                length = verdict
            if verdict is None:
                out.append(bytes(buf[s:s + length]))
                self.frames += 1
                pos = s + length
            elif isinstance(verdict, str):
                self._count(verdict)
                self.garbage_bytes += 1
                pos = s + 1
            elif idle:
                self._count(self._cut_short(buf, s, length))
                self.garbage_bytes += 1
                pos = s + 1
            else:
                break
        if pos:
            del buf[:pos]
        return out
