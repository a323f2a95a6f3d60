"""CAN frames in: the formats a read delivers them in, which message each is, and each
message's health; every frame goes on to the state's decoder as it is parsed.

Owns the parsers (SLCAN text, ``candump -L`` text, SocketCAN's 16-byte ``struct
can_frame`` records, already-split frames) with the counts of what was not a data frame,
the DBC's message index (message key -> row, an open-addressing table probed without
Python), and the health slots that count each message's arrivals. A frame that carries
its own time stops the parse when the fusion clock is due first: it is held for the
kernel, which runs the clock, decodes it and resumes. Index and health sit here so that a
frame's way from its bytes to its samples crosses one module boundary, into the state.
Imports agent.fusion.spec and the period estimate of agent.fusion._state_py.
"""

from array import array

from agent.fusion._state_py import _learn
from agent.fusion.spec import (
    MAX_SOURCES,
    MAX_UART_SLOTS,
    P_HEALTH_MIN,
    P_HEALTH_PERIODS,
    _check_source,
    _filled,
    _zeros,
)

EFF_FLAG = 0x80000000
RTR_FLAG = 0x40000000
ERR_FLAG = 0x20000000
EFF_MASK = 0x1FFFFFFF
# Linux CAN error classes are bits 0-9 of an error frame's id.
ERR_CLASS_MASK = 0x3FF
PACKED_SIZE = 16
_CR = 13
_LF = 10
_BEL = 7
_HASH_EMPTY = -1
# The message index grows up to this many slots (48 KiB) to save probes.
_HASH_MAX = 4096
_ONES = 0xFFFFFFFFFFFFFFFF


def _hex_table():
    table = _filled("b", -1, 256)
    for i in range(10):
        table[48 + i] = i  # 0-9
    for i in range(6):
        table[65 + i] = 10 + i  # A-F
        table[97 + i] = 10 + i  # a-f
    return table


def _hash(key, mask):
    return (key ^ (key >> 15) ^ (key >> 27)) & mask


def _hash_table(msg_index, size):
    """``msg_index`` in an open-addressing table of ``size`` slots (linear probing):
    keys, rows, and the probes that finding every key once takes."""
    keys = array("q", [_HASH_EMPTY] * size)
    rows = array("i", [0] * size)
    probes = 0
    for key in msg_index:
        h = _hash(key, size - 1)
        probes += 1
        while keys[h] != _HASH_EMPTY:
            h = (h + 1) & (size - 1)
            probes += 1
        keys[h] = key
        rows[h] = msg_index[key]
    return keys, rows, probes


def _skip_blanks(buf, p, end):
    while p < end and (buf[p] == 32 or buf[p] == 9):
        p += 1
    return p


def _token_end(buf, p, end):
    while p < end and buf[p] != 32 and buf[p] != 9:
        p += 1
    return p


def _le(buf, off, size):
    """``size`` bytes of ``buf`` from ``off`` read as a little-endian number: how the
    decoder takes a frame's payload."""
    v = 0
    for i in range(size):
        b = buf[off + i]  # widened to 64 bits before the shift (typed in the .pxd)
        v |= b << (8 * i)
    return v


class Health:
    """Per message, when it was last heard, its learned period, its timeouts and its
    checksum and rolling-counter errors; per source whether any of its messages still
    arrives (the ``communication_lost`` alarm reads that). A slot per CAN message of the
    DBC (its row), sized by ``size`` whenever the tables change, then those UART sources
    ask for."""

    def __init__(self, params):
        self.params = params
        self.src_seen = _zeros("i", MAX_SOURCES)
        self.src_live = _zeros("i", MAX_SOURCES)
        self.src_top = 0
        self.size(0)

    def size(self, n_msgs):
        """Fresh slots for ``n_msgs`` CAN messages and the UART sources' to come."""
        self.n_msgs = n_msgs
        self.n_slots = n_msgs
        size = n_msgs + MAX_UART_SLOTS
        self.m_src = _zeros("b", size)
        self.m_seen = _zeros("b", size)
        self.m_t = _zeros("d", size)
        self.m_period = _zeros("d", size)
        self.m_frames = _zeros("q", size)
        self.m_timeouts = _zeros("i", size)
        self.m_out = _zeros("b", size)
        self.m_checksum = _zeros("i", size)
        self.m_counter = _zeros("i", size)
        return 0

    def set_can_source(self, source):
        """See ``Kernel.set_can_source``."""
        _check_source(source)
        for m in range(self.n_msgs):
            self.m_src[m] = source

    def health_slot(self, source):
        """See ``Kernel.health_slot``."""
        _check_source(source)
        if self.n_slots >= self.n_msgs + MAX_UART_SLOTS:
            raise ValueError("no health slot left")
        slot = self.n_slots
        self.n_slots += 1
        self.m_src[slot] = source
        return slot

    def note_frames(self, slot, times):
        """See ``Kernel.note_frames``."""
        if slot < self.n_msgs or slot >= self.n_slots:
            raise ValueError("not a UART health slot")
        for i in range(len(times)):
            self.heard(slot, times[i])

    def note_errors(self, slot, checksum, counter):
        """See ``Kernel.note_errors``."""
        if slot < 0 or slot >= self.n_slots:
            raise ValueError("no such health slot")
        self.m_checksum[slot] += checksum
        self.m_counter[slot] += counter

    def heard(self, slot, t):
        """A frame of the message in ``slot`` arrived at ``t``."""
        if self.m_seen[slot]:
            dt = t - self.m_t[slot]
            if dt > 0.0:
                self.m_period[slot] = _learn(self.m_period[slot], dt)
                self.m_t[slot] = t
        else:
            self.m_seen[slot] = 1
            self.m_t[slot] = t
        self.m_frames[slot] += 1
        if self.m_out[slot]:
            self.m_out[slot] = 0
        return 0

    def step(self, t):
        """Time out messages not heard for ``health_periods`` learned periods; a source
        is lost when every message it has sent is timed out. ``src_top``: one past the
        highest source heard from, so the alarms look at no more."""
        for s in range(self.src_top):
            self.src_seen[s] = 0
            self.src_live[s] = 0
        self.src_top = 0
        for m in range(self.n_slots):
            if not self.m_seen[m]:
                continue
            limit = self.params[P_HEALTH_PERIODS] * self.m_period[m]
            if limit < self.params[P_HEALTH_MIN]:
                limit = self.params[P_HEALTH_MIN]
            if not self.m_out[m] and t - self.m_t[m] > limit:
                self.m_out[m] = 1
                self.m_timeouts[m] += 1
            s = self.m_src[m]
            self.src_seen[s] += 1
            if s >= self.src_top:
                self.src_top = s + 1
            if not self.m_out[m]:
                self.src_live[s] += 1

    def health(self, now):
        """See ``Kernel.health``."""
        out = []
        for m in range(self.n_slots):
            if self.m_seen[m]:
                out.append((m, self.m_src[m], self.m_frames[m], self.m_period[m], self.m_timeouts[m],
                            self.m_out[m], self.m_checksum[m], self.m_counter[m], now - self.m_t[m]))
        return out



class Frames:
    """The parsers and message index of one kernel, feeding its state (``st``) and
    health (``hs``)."""

    def __init__(self, st, hs):
        self.st = st
        self.hs = hs
        self.index({}, 0)
        self.hexval = _hex_table()
        self.bad_lines = 0
        self.remote_frames = 0
        self.error_frames = 0
        self.fd_frames = 0
        self.adapter_errors = 0
        # The frame held back for the clock (``held``): key, payload, length, time.
        self.held = 0
        self.key = 0
        self.le = 0
        self.size = 0
        self.t = 0.0

    def index(self, msg_index, n_msgs):
        """The message index: ``msg_index`` (message key, id | 0x80000000 for 29-bit
        ids, -> row of ``n_msgs``) as an open-addressing table at most half full, made
        larger (up to ``_HASH_MAX`` slots) while that saves probes: each probe of a
        frame's lookup is a branch the CPU may mispredict."""
        for key in msg_index:
            if key < 0 or key > 0xFFFFFFFF:
                raise ValueError("message key out of range")
            if msg_index[key] < 0 or msg_index[key] >= n_msgs:
                raise ValueError("message row out of range")
        size = 16
        while size < 2 * len(msg_index):
            size *= 2
        best = _hash_table(msg_index, size)
        while best[2] > len(msg_index) and size < _HASH_MAX:
            size *= 2
            table = _hash_table(msg_index, size)
            if table[2] < best[2]:
                best = table
        self.h_keys = best[0]
        self.h_vals = best[1]
        self.h_mask = len(best[0]) - 1
        return 0

    def message(self, key):
        """The row of message ``key``, -1 if the DBC lacks it."""
        h = _hash(key, self.h_mask)
        while self.h_keys[h] != _HASH_EMPTY:
            if self.h_keys[h] == key:
                return self.h_vals[h]
            h = (h + 1) & self.h_mask
        return -1

    def _take(self, key, le, size, t, timed):
        """A data frame, decoded at once; but with its own time (``timed``) and the clock
        due first, held instead (the caller stops the parse after its line)."""
        if timed and self.st.due(t):
            self.held = 1
            self.key = key
            self.le = le
            self.size = size
            self.t = t
            return 0
        return self._decode(key, le, size, t)

    def _decode(self, key, le, size, t):
        m = self.st.frame(self.message(key), le, size, t)
        if m >= 0:
            self.hs.heard(m, t)
        return 0

    def release(self):
        """Decode the held frame (the caller has run the clock to its time)."""
        self.held = 0
        return self._decode(self.key, self.le, self.size, self.t)

    def split(self, keys, datas, times, i):
        """Frames already split by the source, from the ``i``-th on; the index to resume
        from after a held frame, or the count."""
        self.held = 0
        n = len(keys)
        while i < n:
            data = datas[i]
            size = len(data)
            self._take(keys[i], _le(data, 0, size) if size <= 8 else 0, size, times[i], True)
            i += 1
            if self.held:
                return i
        return n

    def packed(self, buf, t):
        """Linux ``struct can_frame`` records (16 bytes each, little-endian id), as a
        SocketCAN read delivers them, all stamped ``t``."""
        n = len(buf) // PACKED_SIZE
        if len(buf) % PACKED_SIZE:
            self.bad_lines += 1
        for i in range(n):
            off = i * PACKED_SIZE
            raw_id = buf[off] | (buf[off + 1] << 8) | (buf[off + 2] << 16) | (buf[off + 3] << 24)
            dlc = buf[off + 4]
            if raw_id & ERR_FLAG:
                self.error_frames += 1
            elif raw_id & RTR_FLAG:
                self.remote_frames += 1
            elif dlc > 8:
                self.bad_lines += 1
            else:
                # The record always holds 8 data bytes: all read (no loop on ``dlc`` to
                # mispredict), ``dlc`` of them kept. Typed 64-bit in the .pxd.
                b0 = buf[off + 8]
                b1 = buf[off + 9]
                b2 = buf[off + 10]
                b3 = buf[off + 11]
                b4 = buf[off + 12]
                b5 = buf[off + 13]
                b6 = buf[off + 14]
                b7 = buf[off + 15]
                le = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24) | (b4 << 32) | (b5 << 40) | (b6 << 48) | (b7 << 56)
                if dlc < 8:
                    le = le & (_ONES >> (64 - 8 * dlc)) if dlc else 0
                self._take((raw_id & EFF_MASK) | EFF_FLAG if raw_id & EFF_FLAG else raw_id & 0x7FF, le, dlc, t, False)
        return 0

    def slcan(self, buf, t):
        """The complete SLCAN lines in ``buf`` (each ends in CR; a lone BEL is the adapter
        refusing a command), all stamped ``t``; how many bytes they took (the caller keeps
        the rest, an unfinished line, for the next read)."""
        n = len(buf)
        start = 0
        for i in range(n):
            c = buf[i]
            if c == _CR or c == _BEL:
                if c == _BEL:
                    self.adapter_errors += 1
                if i > start:
                    self._slcan_line(buf, start, i, t)
                start = i + 1
        return start

    def _slcan_line(self, buf, start, end, t):
        c = buf[start]
        if c == 116 or c == 84:  # t T: data frame
            id_len = 3 if c == 116 else 8
        elif c == 114 or c == 82:  # r R: remote frame
            if end - start >= (5 if c == 114 else 10) and self._hex_run(buf, start + 1, end):
                self.remote_frames += 1
            else:
                self.bad_lines += 1
            return 0
        elif c == 122 or c == 90:  # z Z: the adapter acknowledging a transmission
            return 0
        else:
            self.bad_lines += 1
            return 0
        head = start + 1 + id_len
        if end - start < 2 + id_len or not self._hex_run(buf, start + 1, end):
            self.bad_lines += 1
            return 0
        can_id = self._hex_number(buf, start + 1, head)
        dlc = self.hexval[buf[head]]
        size = end - head - 1
        if dlc > 8 or (size != 2 * dlc and size != 2 * dlc + 4):
            self.bad_lines += 1
            return 0
        if id_len == 3:
            if can_id > 0x7FF:
                self.bad_lines += 1
                return 0
            key = can_id
        else:
            if can_id > EFF_MASK:
                self.bad_lines += 1
                return 0
            key = can_id | EFF_FLAG
        le = 0
        for k in range(dlc):
            b = self.hexval[buf[head + 1 + 2 * k]] * 16 + self.hexval[buf[head + 2 + 2 * k]]
            le |= b << (8 * k)
        return self._take(key, le, dlc, t, False)

    def candump(self, buf, start, t_offset):
        """The complete ``candump -L`` lines in ``buf`` from ``start`` on, each stamped with
        its own time plus ``t_offset``; where the next line starts, after a held frame's
        line or, at the end, how many bytes they took (as ``slcan`` says)."""
        self.held = 0
        n = len(buf)
        for i in range(start, n):
            if buf[i] == _LF:
                end = i
                if end > start and buf[end - 1] == _CR:
                    end -= 1
                if end > start:
                    self._candump_line(buf, start, end, t_offset)
                start = i + 1
                if self.held:
                    return start
        return start

    def _candump_line(self, buf, start, end, t_offset):
        # (<sec>.<usec>) <iface> <id>#<data>[ R|T], fields split by runs of blanks
        a0 = _skip_blanks(buf, start, end)
        b0 = _token_end(buf, a0, end)
        a1 = _skip_blanks(buf, b0, end)
        b1 = _token_end(buf, a1, end)
        p = _skip_blanks(buf, b1, end)
        tail = _token_end(buf, p, end)
        a3 = _skip_blanks(buf, tail, end)
        b3 = _token_end(buf, a3, end)
        if (b1 == a1 or tail == p or _skip_blanks(buf, b3, end) < end
                or (b3 > a3 and (b3 - a3 != 1 or (buf[a3] != 82 and buf[a3] != 84)))):
            self.bad_lines += 1
            return 0
        sec = self._stamp(buf, a0, b0)
        if sec < 0.0:
            self.bad_lines += 1
            return 0
        id_start = p
        while p < tail and buf[p] != 35:  # #
            if self.hexval[buf[p]] < 0:
                self.bad_lines += 1
                return 0
            p += 1
        id_len = p - id_start
        if p >= tail or (id_len != 3 and id_len != 8):
            self.bad_lines += 1
            return 0
        can_id = self._hex_number(buf, id_start, p)
        p += 1
        if id_len == 8 and can_id & ERR_FLAG and not can_id & ~(ERR_FLAG | ERR_CLASS_MASK):
            if self._hex_pairs(buf, p, tail):
                self.error_frames += 1
            else:
                self.bad_lines += 1
            return 0
        if (id_len == 3 and can_id > 0x7FF) or (id_len == 8 and can_id > EFF_MASK):
            self.bad_lines += 1
            return 0
        if p < tail and buf[p] == 35:  # ## CAN FD: counted, not decoded
            self.fd_frames += 1
            return 0
        if p < tail and (buf[p] == 82 or buf[p] == 114):  # R remote, optional dlc digit
            if tail - p == 1 or (tail - p == 2 and 48 <= buf[p + 1] <= 56):
                self.remote_frames += 1
            else:
                self.bad_lines += 1
            return 0
        size = 0
        le = 0
        while p < tail:
            if buf[p] == 46:  # . separator
                p += 1
                continue
            if p + 1 >= tail or size >= 8:
                self.bad_lines += 1
                return 0
            hi = self.hexval[buf[p]]
            lo = self.hexval[buf[p + 1]]
            if hi < 0 or lo < 0:
                self.bad_lines += 1
                return 0
            b = hi * 16 + lo
            le |= b << (8 * size)
            size += 1
            p += 2
        return self._take(can_id | EFF_FLAG if id_len == 8 else can_id, le, size, sec + t_offset, True)

    def _stamp(self, buf, a, b):
        """The seconds of a ``(<sec>.<usec>)`` token from ``a`` to ``b``; -1 if it is not one."""
        if b - a < 5 or buf[a] != 40 or buf[b - 1] != 41:  # ( )
            return -1.0
        q = a + 1
        sec = 0.0
        digits = 0
        while q < b - 1 and 48 <= buf[q] <= 57:
            sec = sec * 10.0 + (buf[q] - 48)
            q += 1
            digits += 1
        if digits == 0 or buf[q] != 46:  # .
            return -1.0
        q += 1
        frac = 0.0
        div = 1.0
        digits = 0
        while q < b - 1 and 48 <= buf[q] <= 57:
            frac = frac * 10.0 + (buf[q] - 48)
            div *= 10.0
            q += 1
            digits += 1
        if digits == 0 or q != b - 1:
            return -1.0
        return sec + frac / div

    def _hex_run(self, buf, start, end):
        for p in range(start, end):
            if self.hexval[buf[p]] < 0:
                return False
        return True

    def _hex_pairs(self, buf, start, end):
        size = 0
        p = start
        while p < end:
            if buf[p] == 46:
                p += 1
                continue
            if p + 1 >= end or self.hexval[buf[p]] < 0 or self.hexval[buf[p + 1]] < 0:
                return False
            size += 1
            p += 2
        return size <= 8

    def _hex_number(self, buf, start, end):
        v = 0
        for p in range(start, end):
            v = v * 16 + self.hexval[buf[p]]
        return v


def new_frames(st, hs):
    """Parsers feeding ``st`` and ``hs``. The compiled modules construct each other's types
    through such factories: a ``.py`` cannot import by name a type its ``.pxd`` cimports."""
    return Frames(st, hs)


def new_health(params):
    """Health with no CAN message yet (see ``new_frames``)."""
    return Health(params)
