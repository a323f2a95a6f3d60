"""Replay a recorded ride into the pure fusion kernel and print every output as JSON:
the same script runs under CPython and the MicroPython unix port.

    micropython devtools/mp_kernel_run.py FIXTURE   (MICROPYPATH=repo root)
    python -m devtools.mp_kernel_run FIXTURE

FIXTURE is JSON lines: first the kernel's set-up ``{"id_space", "tables", "codes",
"sources", "limits"}`` (devtools/ride.py ``save``), then one kernel call a line. Each output line
is one kernel output (tuples as lists), then ``state``, ``alarms`` and ``health``.

MicroPython-safe.
"""

import json
import sys
from array import array

from agent.fusion import _kernel_py, spec


def _tables(setup):
    raw = setup["tables"]
    index = {}
    for key, row in raw[0]:
        index[key] = row
    args = [index]
    for k in range(1, len(raw)):
        args.append(array(setup["codes"][k], raw[k]))
    return args


def _emit(items):
    for item in items:
        print(json.dumps(item))


def main(path):
    with open(path) as f:
        setup = json.loads(f.readline())
        k = _kernel_py.Kernel(setup["id_space"], 1.0)
        k.set_can_tables(*_tables(setup))
        lo, hi, rate = setup["limits"]
        k.set_limits([-spec.INF if v is None else v for v in lo],
                     [spec.INF if v is None else v for v in hi], rate)
        k.set_can_source(0)
        slots = [-1]
        for src in range(1, setup["sources"]):
            slots.append(k.health_slot(src))
        tail = b""
        t = 0.0
        for line in f:
            call = json.loads(line)
            if call[0] == "can":
                k.source = 0
                buf = tail + bytes.fromhex(call[2])
                consumed, out = k.feed_slcan(buf, call[1])
                tail = buf[consumed:]
                t = call[1]
            elif call[0] == "uart":
                k.source = call[1]
                t = call[2]
                k.note_frames(slots[call[1]], [t] * call[3])
                out = k.feed_values(call[4], [t] * len(call[4]), call[5])
            else:
                t = call[1]
                out = k.close_due(t)
            _emit(out)
        _emit(k.flush())
        print(json.dumps(["state", k.state(t)]))
        print(json.dumps(["alarms", k.alarms()]))
        print(json.dumps(["health", k.health(t)]))


if __name__ == "__main__":
    main(sys.argv[1])
