"""What a decoded value is and when it is believed: a compiled DBC's flat tables and each
signal's limits.

Owns each message's length and rows, each row's bit layout and scaling (agent/dbc/compile.py
builds them), each signal id's believable range and rate (``set_limits``) and each row's
range narrowed by both, down to the raw values the decode loop tests. The decoder
(agent.fusion._state_py) reads these arrays and writes none; the message index is the
frame parser's (agent.fusion._frames_py). A leaf: imports only agent.fusion.spec.
"""

from array import array

from agent.fusion.spec import INF, _filled, _zeros


class Tables:
    """The decode tables, empty until ``install``; every signal believed until
    ``set_limits``."""

    def __init__(self, id_space):
        self.id_space = id_space
        self.lim_lo = _filled("d", -INF, id_space)
        self.lim_hi = _filled("d", INF, id_space)
        self.lim_rate = _zeros("d", id_space)
        self.install(_zeros("i", 0), _zeros("i", 0), _zeros("i", 0), _zeros("b", 0), _zeros("i", 0),
                     _zeros("i", 0), _zeros("b", 0), _zeros("d", 0), _zeros("d", 0), _zeros("i", 0),
                     _zeros("q", 0), _zeros("i", 0), _zeros("q", 0), _zeros("d", 0), _zeros("d", 0))

    def install(self, msg_len, msg_first, msg_count, big_endian, shift, length, signed, factor, offset, sig_id,
                no_value, mux_row, mux_value, row_min, row_max):
        """The flat tables of a compiled DBC (``Kernel.set_can_tables`` says what they are)."""
        n = len(sig_id)
        for i in range(n):
            if sig_id[i] < 0 or sig_id[i] >= self.id_space:
                raise ValueError("signal id out of the kernel's id space")
            if length[i] < 1 or length[i] > 64 or shift[i] < 0 or shift[i] + length[i] > 64:
                raise ValueError("signal bits outside a 64-bit frame")
            if mux_row[i] >= n or (mux_row[i] >= 0 and mux_row[mux_row[i]] >= 0):
                raise ValueError("multiplexer row out of range or itself multiplexed")
        self.msg_len = msg_len
        self.msg_first = msg_first
        self.msg_count = msg_count
        self.sig_big_endian = big_endian
        self.sig_shift = shift
        self.sig_length = length
        self.sig_signed = signed
        self.sig_factor = factor
        self.sig_offset = offset
        self.sig_id = sig_id
        self.sig_mask = array("Q", [(1 << length[i]) - 1 for i in range(n)])
        self.sig_has_na = array("b", [1 if no_value[i] >= 0 else 0 for i in range(n)])
        self.sig_na = array("Q", [no_value[i] if no_value[i] >= 0 else 0 for i in range(n)])
        self.sig_mux_row = mux_row
        self.sig_mux_value = array("Q", [mux_value[i] if mux_value[i] >= 0 else 0 for i in range(n)])
        self.sig_min = array("d", [float(v) for v in row_min])
        self.sig_max = array("d", [float(v) for v in row_max])
        if len(self.sig_min) != n or len(self.sig_max) != n:
            raise ValueError("a range is needed for every signal row")
        self._row_limits()

    def set_limits(self, lo, hi, rate):
        """What is believed of each signal id: a value in ``[lo, hi]`` that moved at most
        ``rate`` per second (0: any) from the last one believed."""
        n = self.id_space
        if len(lo) != n or len(hi) != n or len(rate) != n:
            raise ValueError("limits must cover the kernel's id space (%d ids)" % n)
        for i in range(n):
            if not lo[i] <= hi[i] or not rate[i] >= 0.0:
                raise ValueError("signal %d: the range must not be empty and the rate >= 0" % i)
        self.lim_lo = array("d", [float(v) for v in lo])
        self.lim_hi = array("d", [float(v) for v in hi])
        self.lim_rate = array("d", [float(v) for v in rate])
        self._row_limits()

    def _row_limits(self):
        """Each CAN table row's range: its signal's limits, narrowed by the DBC's range of
        the row. The decode loop tests the raw bits against ``row_raw_lo``-``row_raw_hi``
        (no float, no "no value", multiplexer or rate test): the raw values of a believable
        value, for an unsigned row, not multiplexed, of a signal without a rate, whose "no
        value" lies outside them; an empty span (1 to 0) sends every value of any other row
        to the decoder's slow path."""
        n = len(self.sig_id)
        self.row_lo = _zeros("d", n)
        self.row_hi = _zeros("d", n)
        self.row_raw_lo = _filled("Q", 1, n)
        self.row_raw_hi = _zeros("Q", n)
        for s in range(n):
            sid = self.sig_id[s]
            lo = self.lim_lo[sid] if self.lim_lo[sid] > self.sig_min[s] else self.sig_min[s]
            hi = self.lim_hi[sid] if self.lim_hi[sid] < self.sig_max[s] else self.sig_max[s]
            if lo > hi:
                raise ValueError("signal row %d (id %d): its DBC range holds no believable value" % (s, sid))
            self.row_lo[s] = lo
            self.row_hi[s] = hi
            if not self.sig_signed[s] and self.sig_mux_row[s] < 0 and self.lim_rate[sid] == 0.0:
                span = self._raw_span(s, lo, hi)
                if span[0] <= span[1] and not (self.sig_has_na[s] and span[0] <= self.sig_na[s] <= span[1]):
                    self.row_raw_lo[s] = span[0]
                    self.row_raw_hi[s] = span[1]
        return 0

    def _raw_span(self, s, lo, hi):
        """The raw values of unsigned row ``s`` whose value (as the decoder computes it) lies
        in ``[lo, hi]``: one span, the value being monotonic in the raw; (1, 0) if none."""
        f = self.sig_factor[s]
        o = self.sig_offset[s]
        top = self.sig_mask[s]
        if f == 0.0:
            return (0, top) if lo <= o <= hi else (1, 0)
        a = (lo - o) / f
        b = (hi - o) / f
        if f < 0.0:
            a, b = b, a
        r_lo = 0 if not a > 0.0 else (top if a >= top else int(a))
        r_hi = top if not b < top else (0 if b <= 0.0 else int(b))
        # Float rounding: settle both ends on exactly what the decoder gives.
        while r_lo <= r_hi and not lo <= float(r_lo) * f + o <= hi:
            r_lo += 1
        while r_lo > 0 and lo <= float(r_lo - 1) * f + o <= hi:
            r_lo -= 1
        while r_hi >= r_lo and not lo <= float(r_hi) * f + o <= hi:
            r_hi -= 1
        while r_hi < top and lo <= float(r_hi + 1) * f + o <= hi:
            r_hi += 1
        return (r_lo, r_hi) if r_lo <= r_hi else (1, 0)


def new_tables(id_space):
    """Empty tables for ``id_space`` signal ids (see agent.fusion._frames_py.new_frames)."""
    return Tables(id_space)
