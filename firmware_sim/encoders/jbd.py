"""JBD / Xiaoxiang BMS (PROTOCOLS.md, "JBD"): answers read requests like a real BMS.

Request ``DD A5 reg len data chkH chkL 77`` (A5 read, 5A write); response
``DD reg status len data chkH chkL 77``, chk = 0x10000 - sum(status..data), big endian.
Registers answered: 03 basic info, 04 cell voltages, 05 hardware name; write E1
(MOS control: data ``00 XX``, bit 0 = charge off, bit 1 = discharge off).

MicroPython-safe.
"""

import struct

from firmware_sim.encoders.wire import Hunter, cell_block, q

START = 0xDD
END = 0x77
READ = 0xA5
WRITE = 0x5A
REG_BASIC = 0x03
REG_CELLS = 0x04
REG_NAME = 0x05
REG_MOS = 0xE1
STATUS_OK = 0x00
STATUS_ERROR = 0x80
HW_NAME = b"SIM-JBD-10S36V"
PROD_DATE = ((2024 - 2000) << 9) | (5 << 5) | 17

VOLTAGE = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
CURRENT = "Vehicle.Powertrain.TractionBattery.CurrentCurrent"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
REMAINING = "Vehicle.LEV.Battery.RemainingCapacity"
FULL = "Vehicle.LEV.Battery.FullCapacity"
CYCLES = "Vehicle.LEV.Battery.CycleCount"
PROTECTION = "Vehicle.LEV.Battery.ProtectionFlags"
CHARGE_ON = "Vehicle.LEV.Battery.ChargeEnabled"
DISCHARGE_ON = "Vehicle.LEV.Battery.DischargeEnabled"
TEMP_MIN = "Vehicle.Powertrain.TractionBattery.Temperature.Min"
TEMP_MAX = "Vehicle.Powertrain.TractionBattery.Temperature.Max"


def checksum(body):
    return (0x10000 - sum(body)) & 0xFFFF


def response(reg, data, status=STATUS_OK):
    body = bytes((status, len(data))) + bytes(data)
    c = checksum(body)
    return bytes((START, reg)) + body + bytes((c >> 8, c & 0xFF, END))


def request(reg, data=b"", write=False):
    """A host's request (the simulator's tests and bench tools build them with this)."""
    body = bytes((reg, len(data))) + bytes(data)
    c = checksum(body)
    return bytes((START, WRITE if write else READ)) + body + bytes((c >> 8, c & 0xFF, END))


def basic_info(pack_v, pack_i, remaining_mah, full_mah, cycles, protection, soc,
               charge_on, discharge_on, cells, ntc_temps, balance=0):
    """Register 03 answer and its values. Temperatures in C, sent as 0.1 K."""
    volt = q(pack_v, 100, 0, 0xFFFF)
    cur = q(pack_i, 100, -0x8000, 0x7FFF)
    rem = q(remaining_mah, 0.1, 0, 0xFFFF)
    full = q(full_mah, 0.1, 0, 0xFFFF)
    cyc = q(cycles, 1, 0, 0xFFFF)
    prot = int(protection) & 0xFFFF
    rsoc = q(soc, 1, 0, 100)
    fet = (1 if charge_on else 0) | (2 if discharge_on else 0)
    data = struct.pack(">HhHHHHHHHBBBBB", volt, cur, rem, full, cyc, PROD_DATE,
                       balance & 0xFFFF, (balance >> 16) & 0xFFFF, prot, 0x20, rsoc, fet,
                       cells, len(ntc_temps))
    values = {
        VOLTAGE: volt / 100.0, CURRENT: cur / 100.0, REMAINING: rem / 100.0,
        FULL: full / 100.0, CYCLES: cyc, PROTECTION: prot, SOC: rsoc,
        CHARGE_ON: fet & 1, DISCHARGE_ON: fet >> 1,
    }
    temps = []
    k = 1
    for t in ntc_temps:
        raw = q(t + 273.15, 10, 0, 0xFFFF)
        data += struct.pack(">H", raw)
        c = (raw - 2731.5) / 10
        values["Vehicle.LEV.Battery.Temperature.%d" % k] = c
        temps.append(c)
        k += 1
    if temps:
        values[TEMP_MIN] = min(temps)
        values[TEMP_MAX] = max(temps)
    return response(REG_BASIC, data), values


def cell_voltages(volts):
    """Register 04 answer: one u16 per cell in mV, big-endian."""
    data, values = cell_block(volts, ">")
    return response(REG_CELLS, data), values


def from_vehicle(v, reg):
    """The BMS's answer to a read of ``reg`` from the vehicle's pack: (bytes, kind, values)."""
    if reg == REG_BASIC:
        frame, values = basic_info(v.pack_v, v.pack_i, v.remaining_mah, v.full_mah, v.cycles,
                                   v.protection, v.soc, v.charge_on, v.discharge_on,
                                   v.cells, v.ntc_temps())
        return frame, "03", values
    if reg == REG_CELLS:
        frame, values = cell_voltages(v.cell_volts())
        return frame, "04", values
    if reg == REG_NAME:
        return response(REG_NAME, HW_NAME), "05", {}
    return response(reg, b"", STATUS_ERROR), "%02X" % reg, {}


def _size(buf):
    if buf[1] not in (READ, WRITE):
        return 0
    return buf[3] + 7


def _ok(frame):
    n = len(frame)
    return frame[-1] == END and checksum(frame[2:n - 3]) == (frame[n - 3] << 8) | frame[n - 2]


def parser():
    """Finds host requests ``DD A5|5A reg len data chkH chkL 77`` in a byte stream."""
    return Hunter(bytes((START,)), 4, _size, _ok, 7 + 255)


def serve(v, req):
    """Answer one checked request: (bytes, kind, values); a MOS write switches the FETs."""
    reg = req[2]
    if req[1] == READ:
        return from_vehicle(v, reg)
    if reg == REG_MOS and req[3] == 2:
        bits = req[5]
        v.charge_on = not (bits & 1)
        v.discharge_on = not (bits & 2)
        return response(REG_MOS, b""), "E1", {}
    return response(reg, b"", STATUS_ERROR), "%02X" % reg, {}
