"""The fusion kernel, pure Python: the one source of truth for both builds.

setup.py compiles this very file with Cython (types come from ``_kernel.pxd``), so the
compiled and the pure kernel cannot drift apart. It must also run under MicroPython:
no dataclasses, enum or typing here, only ``array`` and plain classes.

Python calls the kernel once per read of a port, with every frame of that read; the
kernel updates preallocated arrays and hands back only the windows that closed.
A closed window is ``(start, length, rows)`` with one row per signal seen in it:
``(signal_id, count, min, max, mean, last, last_time)``.
"""

from array import array


def _zeros(code, n):
    return array(code, [0] * n)


class Kernel:
    """Latest value and per-window aggregates of every signal, fed in batches."""

    def __init__(self, id_space, window):
        if window <= 0:
            raise ValueError("window must be > 0 s")
        self.id_space = id_space
        self.window = float(window)
        self.last = _zeros("d", id_space)
        self.last_time = _zeros("d", id_space)
        self.seen = _zeros("b", id_space)
        self.w_min = _zeros("d", id_space)
        self.w_max = _zeros("d", id_space)
        self.w_sum = _zeros("d", id_space)
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
        self.closed = []
        self.set_can_tables({}, _zeros("i", 0), _zeros("i", 0), _zeros("i", 0),
                            _zeros("b", 0), _zeros("i", 0), _zeros("i", 0), _zeros("b", 0),
                            _zeros("d", 0), _zeros("d", 0), _zeros("i", 0), _zeros("q", 0))

    def set_can_tables(self, msg_index, msg_len, msg_first, msg_count, big_endian, shift,
                       length, signed, factor, offset, sig_id, no_value):
        """Install the flat tables of a compiled DBC (see agent/dbc/compile.py)."""
        n = len(sig_id)
        for i in range(n):
            if sig_id[i] < 0 or sig_id[i] >= self.id_space:
                raise ValueError("signal id out of the kernel's id space")
            if length[i] < 1 or length[i] > 64 or shift[i] < 0 or shift[i] + length[i] > 64:
                raise ValueError("signal bits outside a 64-bit frame")
        masks = array("Q", [(1 << length[i]) - 1 for i in range(n)])
        has_na = array("b", [1 if no_value[i] >= 0 else 0 for i in range(n)])
        na = array("Q", [no_value[i] if no_value[i] >= 0 else 0 for i in range(n)])
        self.msg_index = msg_index
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
        self.sig_has_na = has_na
        self.sig_na = na
        self.sig_mask = masks

    def feed_frames(self, keys, datas, times):
        """Decode a batch of CAN frames (key = id | 0x80000000 for 29-bit ids)."""
        n = len(keys)
        for i in range(n):
            m = self.msg_index.get(keys[i], -1)
            if m < 0:
                self.unknown += 1
                continue
            data = datas[i]
            size = len(data)
            if size < self.msg_len[m] or size > 8:
                self.truncated += 1
                continue
            self.frames += 1
            t = times[i]
            self._advance(t)
            self._decode(m, data, t, None)
        return self._take_closed()

    def decode_frame(self, key, data):
        """Signals of one frame as ``[(signal_id, value)]``, None if the DBC lacks the
        message, for tools that show frames one by one; the state is not touched."""
        m = self.msg_index.get(key, -1)
        if m < 0:
            return None
        if len(data) < self.msg_len[m] or len(data) > 8:
            raise ValueError("frame has %d bytes, the message needs %d to 8" % (len(data), self.msg_len[m]))
        out = []  # type: list
        self._decode(m, data, 0.0, out)
        return out

    def _decode(self, m, data, t, out):
        size = len(data)
        le = int.from_bytes(data, "little")
        be = int.from_bytes(data, "big") << (8 * (8 - size))
        first = self.msg_first[m]
        for s in range(first, first + self.msg_count[m]):
            if self.sig_big_endian[s]:
                raw = (be >> self.sig_shift[s]) & self.sig_mask[s]
            else:
                raw = (le >> self.sig_shift[s]) & self.sig_mask[s]
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
                out.append((sid, self.last[sid], self.last_time[sid]))
        return out

    def counters(self):
        """Counters for status and health reporting."""
        return {"frames": self.frames, "samples": self.samples, "unknown": self.unknown,
                "truncated": self.truncated, "no_value": self.no_value, "late": self.late}

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
        self.last[sid] = value
        self.last_time[sid] = t
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
