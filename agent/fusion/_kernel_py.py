"""The fusion kernel, pure Python: the one source of truth for both builds.

setup.py compiles this very file with Cython (types come from ``_kernel.pxd``), so the
compiled and the pure kernel cannot drift apart. It must also run under MicroPython:
no dataclasses, enum or typing here, only ``array`` and plain classes.

Python calls the kernel once per read of a port, with every frame of that read, in
the form the port delivers it: SLCAN text, candump text, packed ``struct can_frame``
records, or already-split frames. The kernel parses, decodes through the compiled DBC
tables, updates preallocated arrays and hands back only the windows that closed.
A closed window is ``(start, length, rows)`` with one row per signal seen in it:
``(signal_id, count, min, max, mean, last, last_time)``.
"""

from array import array

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
_M8 = 0x00FF00FF00FF00FF
_M16 = 0x0000FFFF0000FFFF
_M32 = 0x00000000FFFFFFFF


def _zeros(code, n):
    return array(code, [0] * n)


def _hex_table():
    table = array("b", [-1] * 256)
    for i in range(10):
        table[48 + i] = i  # 0-9
    for i in range(6):
        table[65 + i] = 10 + i  # A-F
        table[97 + i] = 10 + i  # a-f
    return table


def _hash(key, mask):
    return (key ^ (key >> 15) ^ (key >> 27)) & mask


def _bswap64(x):
    """The frame read big-endian, from the frame read little-endian (zero-padded to 8)."""
    x = ((x & _M8) << 8) | ((x >> 8) & _M8)
    x = ((x & _M16) << 16) | ((x >> 16) & _M16)
    return ((x & _M32) << 32) | (x >> 32)


def _skip_blanks(buf, p, end):
    while p < end and (buf[p] == 32 or buf[p] == 9):
        p += 1
    return p


def _token_end(buf, p, end):
    while p < end and buf[p] != 32 and buf[p] != 9:
        p += 1
    return p


def _le(buf, off, size):
    v = 0
    for i in range(size):
        b = buf[off + i]  # widened to 64 bits before the shift (typed in the .pxd)
        v |= b << (8 * i)
    return v


class Kernel:
    """Latest value and per-window aggregates of every signal, fed in batches."""

    def __init__(self, id_space, window):
        if window <= 0:
            raise ValueError("window must be > 0 s")
        self.id_space = id_space
        self.window = float(window)
        self.seen = _zeros("b", id_space)
        self.w_min = _zeros("d", id_space)
        self.w_max = _zeros("d", id_space)
        self.w_sum = _zeros("d", id_space)
        # The last value and its time are never reset when a window closes: they are
        # also the signal's latest state.
        self.w_last = _zeros("d", id_space)
        self.w_last_time = _zeros("d", id_space)
        self.w_count = _zeros("i", id_space)
        self.touched = _zeros("i", id_space)
        self.n_touched = 0
        self.w_index = -1
        self.frames = 0
        self.samples = 0
        self.unknown = 0
        self.truncated = 0
        self.no_value = 0
        self.late = 0
        self.bad_lines = 0
        self.remote_frames = 0
        self.error_frames = 0
        self.fd_frames = 0
        self.adapter_errors = 0
        self.hexval = _hex_table()
        self.closed = []
        self.set_can_tables({}, _zeros("i", 0), _zeros("i", 0), _zeros("i", 0),
                            _zeros("b", 0), _zeros("i", 0), _zeros("i", 0), _zeros("b", 0),
                            _zeros("d", 0), _zeros("d", 0), _zeros("i", 0), _zeros("q", 0),
                            _zeros("i", 0), _zeros("q", 0))

    def set_can_tables(self, msg_index, msg_len, msg_first, msg_count, big_endian, shift,
                       length, signed, factor, offset, sig_id, no_value, mux_row, mux_value):
        """Install the flat tables of a compiled DBC (see agent/dbc/compile.py).

        ``msg_index`` maps a message key (id | 0x80000000 for 29-bit ids) to its row;
        the kernel turns it into an open-addressing table it can probe without Python.
        A signal with ``mux_row[s] >= 0`` is present only when the multiplexer signal in
        that row has the raw value ``mux_value[s]``.
        """
        n = len(sig_id)
        for i in range(n):
            if sig_id[i] < 0 or sig_id[i] >= self.id_space:
                raise ValueError("signal id out of the kernel's id space")
            if length[i] < 1 or length[i] > 64 or shift[i] < 0 or shift[i] + length[i] > 64:
                raise ValueError("signal bits outside a 64-bit frame")
            if mux_row[i] >= n or (mux_row[i] >= 0 and mux_row[mux_row[i]] >= 0):
                raise ValueError("multiplexer row out of range or itself multiplexed")
        size = 16
        while size < 2 * len(msg_index):
            size *= 2
        h_keys = array("q", [_HASH_EMPTY] * size)
        h_vals = array("i", [0] * size)
        for key in msg_index:
            if key < 0 or key > 0xFFFFFFFF:
                raise ValueError("message key out of range")
            h = _hash(key, size - 1)
            while h_keys[h] != _HASH_EMPTY:
                h = (h + 1) & (size - 1)
            h_keys[h] = key
            h_vals[h] = msg_index[key]
        self.h_keys = h_keys
        self.h_vals = h_vals
        self.h_mask = size - 1
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

    def _message(self, key):
        h = _hash(key, self.h_mask)
        while self.h_keys[h] != _HASH_EMPTY:
            if self.h_keys[h] == key:
                return self.h_vals[h]
            h = (h + 1) & self.h_mask
        return -1

    def feed_frames(self, keys, datas, times):
        """Decode a batch of already-split CAN frames (key = id | 0x80000000 for 29-bit ids)."""
        n = len(keys)
        for i in range(n):
            data = datas[i]
            size = len(data)
            self._advance(times[i])
            self._frame(keys[i], _le(data, 0, size) if size <= 8 else 0, size, times[i])
        return self._take_closed()

    def feed_packed(self, buf, t):
        """Decode Linux ``struct can_frame`` records (16 bytes each, little-endian id), as a
        SocketCAN read delivers them, all stamped ``t``."""
        self._advance(t)
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
                le = 0
                for k in range(dlc):
                    b = buf[off + 8 + k]
                    le |= b << (8 * k)
                self._frame((raw_id & EFF_MASK) | EFF_FLAG if raw_id & EFF_FLAG else raw_id & 0x7FF, le, dlc, t)
        return self._take_closed()

    def feed_slcan(self, buf, t):
        """Decode the complete SLCAN lines in ``buf`` (each ends in CR; a lone BEL is the
        adapter refusing a command). Returns ``(consumed, closed)``: the caller keeps
        ``buf[consumed:]``, an unfinished line, for the next read."""
        self._advance(t)
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
        return start, self._take_closed()

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
        self._frame(key, le, dlc, t)
        return 0

    def feed_candump(self, buf, t_offset):
        """Decode the complete ``candump -L`` lines in ``buf``, each stamped with its own
        time plus ``t_offset``. Returns ``(consumed, closed)`` as ``feed_slcan`` does."""
        n = len(buf)
        start = 0
        for i in range(n):
            if buf[i] == _LF:
                end = i
                if end > start and buf[end - 1] == _CR:
                    end -= 1
                if end > start:
                    self._candump_line(buf, start, end, t_offset)
                start = i + 1
        return start, self._take_closed()

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
        if b0 - a0 < 5 or buf[a0] != 40 or buf[b0 - 1] != 41:  # ( )
            self.bad_lines += 1
            return 0
        q = a0 + 1
        sec = 0.0
        digits = 0
        while q < b0 - 1 and 48 <= buf[q] <= 57:
            sec = sec * 10.0 + (buf[q] - 48)
            q += 1
            digits += 1
        if digits == 0 or buf[q] != 46:  # .
            self.bad_lines += 1
            return 0
        q += 1
        frac = 0.0
        div = 1.0
        digits = 0
        while q < b0 - 1 and 48 <= buf[q] <= 57:
            frac = frac * 10.0 + (buf[q] - 48)
            div *= 10.0
            q += 1
            digits += 1
        if digits == 0 or q != b0 - 1:
            self.bad_lines += 1
            return 0
        sec += frac / div
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
        t = sec + t_offset
        self._advance(t)
        self._frame(can_id | EFF_FLAG if id_len == 8 else can_id, le, size, t)
        return 0

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

    def _frame(self, key, le, size, t):
        m = self._message(key)
        if m < 0:
            self.unknown += 1
        elif size < self.msg_len[m] or size > 8:
            self.truncated += 1
        else:
            self.frames += 1
            self._decode(m, le, t, None)

    def decode_frame(self, key, data):
        """Signals of one frame as ``[(signal_id, value)]``, None if the DBC lacks the
        message, for tools that show frames one by one; the state is not touched."""
        m = self._message(key)
        if m < 0:
            return None
        if len(data) < self.msg_len[m] or len(data) > 8:
            raise ValueError("frame has %d bytes, the message needs %d to 8" % (len(data), self.msg_len[m]))
        out = []  # type: list
        self._decode(m, _le(data, 0, len(data)), 0.0, out)
        return out

    def _decode(self, m, le, t, out):
        be = _bswap64(le)
        first = self.msg_first[m]
        for s in range(first, first + self.msg_count[m]):
            mux = self.sig_mux_row[s]
            if mux >= 0 and self._raw(mux, le, be) != self.sig_mux_value[s]:
                continue
            # _raw() written out: this is the hottest line of the agent.
            raw = ((be if self.sig_big_endian[s] else le) >> self.sig_shift[s]) & self.sig_mask[s]
            if self.sig_has_na[s] and raw == self.sig_na[s]:
                self.no_value += 1
                continue
            if self.sig_signed[s] and (raw >> (self.sig_length[s] - 1)) & 1:
                value = -float((~raw & self.sig_mask[s]) + 1)
            else:
                value = float(raw)
            value = value * self.sig_factor[s] + self.sig_offset[s]
            if out is None:
                self._sample(self.sig_id[s], t, value)
            else:
                out.append((self.sig_id[s], value))

    def _raw(self, s, le, be):
        if self.sig_big_endian[s]:
            return (be >> self.sig_shift[s]) & self.sig_mask[s]
        return (le >> self.sig_shift[s]) & self.sig_mask[s]

    def feed_values(self, ids, times, values):
        """Record already-decoded samples (NMEA, UART protocols)."""
        n = len(ids)
        for i in range(n):
            sid = ids[i]
            if sid < 0 or sid >= self.id_space:
                self.unknown += 1
                continue
            t = times[i]
            self._advance(t)
            self._sample(sid, t, values[i])
        return self._take_closed()

    def close_due(self, now):
        """Close the open window once ``now`` is past its end, so a quiet bus still reports."""
        if self.w_index >= 0 and now >= (self.w_index + 1) * self.window:
            self._close(int(now // self.window))
        return self._take_closed()

    def flush(self):
        """Close the open window whatever the time, at shutdown."""
        if self.w_index >= 0 and self.n_touched > 0:
            self._close(self.w_index + 1)
        return self._take_closed()

    def latest(self):
        """``(signal_id, value, time)`` of every signal seen so far."""
        out = []
        for sid in range(self.id_space):
            if self.seen[sid]:
                out.append((sid, self.w_last[sid], self.w_last_time[sid]))
        return out

    def counters(self):
        """Counters for status and health reporting."""
        return {"frames": self.frames, "samples": self.samples, "unknown": self.unknown,
                "truncated": self.truncated, "no_value": self.no_value, "late": self.late,
                "bad_lines": self.bad_lines, "remote_frames": self.remote_frames,
                "error_frames": self.error_frames, "fd_frames": self.fd_frames,
                "adapter_errors": self.adapter_errors}

    def _advance(self, t):
        w = int(t // self.window)
        if self.w_index < 0:
            self.w_index = w
        elif w > self.w_index:
            self._close(w)
        elif w < self.w_index:
            self.late += 1

    def _sample(self, sid, t, value):
        self.samples += 1
        self.seen[sid] = 1
        if self.w_count[sid] == 0:
            self.touched[self.n_touched] = sid
            self.n_touched += 1
            self.w_min[sid] = value
            self.w_max[sid] = value
            self.w_sum[sid] = value
        else:
            if value < self.w_min[sid]:
                self.w_min[sid] = value
            if value > self.w_max[sid]:
                self.w_max[sid] = value
            self.w_sum[sid] += value
        self.w_count[sid] += 1
        self.w_last[sid] = value
        self.w_last_time[sid] = t

    def _close(self, next_index):
        if self.n_touched > 0:
            rows = []
            for k in range(self.n_touched):
                sid = self.touched[k]
                c = self.w_count[sid]
                rows.append((sid, c, self.w_min[sid], self.w_max[sid], self.w_sum[sid] / c,
                             self.w_last[sid], self.w_last_time[sid]))
                self.w_count[sid] = 0
            self.n_touched = 0
            self.closed.append((self.w_index * self.window, self.window, rows))
        self.w_index = next_index

    def _take_closed(self):
        out = self.closed
        self.closed = []
        return out
