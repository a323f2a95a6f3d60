"""The source kinds, in one table: the class that reads each (agent.sources opens it) and
what its configuration may say (agent.config checks it). A new kind is its module and
one row here.

A leaf: it imports nothing of the agent, because agent.config reads it and every
source module imports agent.config.
"""

from __future__ import annotations

from typing import NamedTuple

_SERIAL = ("port", "baudrate", "bytesize", "parity", "stopbits")
_POLL = ("poll_interval", "poll_timeout")


class Kind(NamedTuple):
    module: str  # imported only when a source of this kind is made
    cls: str
    can: bool  # carries CAN frames (bafang-can, dbc:<path>), not a UART protocol
    keys: tuple[str, ...]  # what it takes besides name, kind and protocol; any other key is refused
    label: str  # the kind in an error message
    hints: dict[str, str]  # key -> why it does not apply, where "it takes ..." would not say


# In the order the configuration's messages list them.
KINDS = {
    "uart": Kind("agent.sources.uart", "UartSource", False, _SERIAL + _POLL, "a UART source", {}),
    "slcan": Kind("agent.sources.slcan", "SlcanSource", True, (*_SERIAL, "bitrate", *_POLL), "an SLCAN adapter",
                  {}),
    "socketcan": Kind("agent.sources.socketcan", "SocketcanSource", True, ("port", *_POLL),
                      "a SocketCAN interface",
                      {"bitrate": "the interface's bitrate is set outside the agent "
                                  "(ip link set can0 type can bitrate N)"}),
    "candump": Kind("agent.sources.candump", "CandumpSource", True, ("port", "replay_speed", "loop", *_POLL),
                    "a candump log", {}),
    "python-can": Kind("agent.sources.pythoncan", "PythonCanSource", True, ("interface", "channel", "bitrate", *_POLL),
                       "a python-can bus", {"port": "python-can takes interface and channel"}),
}
