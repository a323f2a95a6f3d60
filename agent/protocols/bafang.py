"""Bafang CAN writes: the frames the agent puts on the bus to act on the vehicle.

Reading the bus needs no code here (the DBC profile, compiled into the kernel's tables,
decodes it); a signed cloud command that changes a setting needs the frame built. Ids
are 29-bit: ``source[28:24] target[23:19] op[18:16] code[15:8] subcode[7:0]``; values
little endian. Written for MicroPython too, like the other protocol modules.
"""

import struct

NODE_SERVICE_TOOL = 0x05  # we write settings as the service tool does; the simulator obeys any source
NODE_CONTROLLER = 0x02
OP_WRITE = 0
CODE_SETTINGS = 0x32
SUB_SPEED_LIMIT = 0x03
SPEED_LIMIT_MAX_KMH = 655.35  # u16 in 0.01 km/h

_U16 = struct.Struct("<H")


def make_id(source: int, target: int, op: int, code: int, subcode: int) -> int:
    """The 29-bit id of a message from ``source`` to ``target``."""
    return (((source & 0x1F) << 24) | ((target & 0x1F) << 19) | ((op & 0x07) << 16)
            | ((code & 0xFF) << 8) | (subcode & 0xFF))


ID_SPEED_LIMIT_WRITE = make_id(NODE_SERVICE_TOOL, NODE_CONTROLLER, OP_WRITE, CODE_SETTINGS, SUB_SPEED_LIMIT)


def speed_limit_write(kmh: float) -> tuple[int, bytes]:
    """(29-bit id, data) of a write of the controller's assistance cut-off speed
    (32/03, u16 LE in 0.01 km/h); ValueError outside 0-655.35 km/h, never clamped."""
    if not 0.0 <= kmh <= SPEED_LIMIT_MAX_KMH:
        raise ValueError("speed limit must be 0-%.2f km/h, not %r" % (SPEED_LIMIT_MAX_KMH, kmh))
    return ID_SPEED_LIMIT_WRITE, _U16.pack(round(kmh * 100))
