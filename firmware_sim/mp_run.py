"""Print a ride's frames as hex lines: the same script runs under CPython and MicroPython.

    micropython firmware_sim/mp_run.py [scenario] [seed] [duration]   (MICROPYPATH=repo root)
    python -m firmware_sim.mp_run [scenario] [seed] [duration]

Each line: ``<bus> <centiseconds> <kind> <hex bytes>`` (CAN: 8 hex digits of id, ``#``,
data). Used by the test that checks MicroPython's bytes equal CPython's.

MicroPython-safe.
"""

import sys

from firmware_sim import scenario

_HEX = "0123456789abcdef"


def _hex(data):
    out = []
    for b in data:
        out.append(_HEX[b >> 4])
        out.append(_HEX[b & 15])
    return "".join(out)


class HexWriter:
    def __init__(self, out):
        self.out = out
        self.ride = None

    def attach(self, ride):
        self.ride = ride

    def frame(self, bus, t, payload, kind, values):
        if bus == "can" and kind != "garbage":
            data = "%08x#%s" % (payload[0], _hex(payload[1]))
            if len(payload) > 2:        # its SLCAN line corrupted by noisy-line
                data += " %s/%d/%d" % payload[2]
        else:
            data = _hex(payload)
        self.out.write("%s %d %s %s\n" % (bus, int(t * 100 + 0.5), kind, data))

    def fault(self, rec):
        self.out.write("fault %d %s\n" % (int(rec["t"] * 100 + 0.5), rec["what"]))

    def tick(self, t):
        # Poll the JBD BMS once a second, as a host would, so its answers are compared too.
        n = int(t * 100 + 0.5)
        ride = self.ride
        if ride is not None and n % 100 == 50:
            ride.serve("jbd", b"\xdd\xa5\x03\x00\xff\xfd\x77\xdd\xa5\x04\x00\xff\xfc\x77")
        return True


def main(argv):
    name = argv[1] if len(argv) > 1 else "commute"
    seed = int(argv[2]) if len(argv) > 2 else 1
    duration = float(argv[3]) if len(argv) > 3 else 10.0
    scenario.run(HexWriter(sys.stdout), name, seed, duration,
                 buses=("can", "nmea", "kt", "surron"), sentences=("GGA", "RMC", "VTG", "GSA"))


if __name__ == "__main__":
    main(sys.argv)
