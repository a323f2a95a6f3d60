"""ebike-edge: the vehicle-side agent of connected electric two-wheelers.

The packages follow the data path, each importing only those below it:

    sources -> protocols / dbc -> fusion -> store -> uplink
                                   (feed)              (pump)

with runtime.py wiring the stages, commands/ (the downlink: verify, journal, act),
control/ (the technicians' socket) and diagnostics.py (what it answers: verdicts,
live values, the tap) beside them, capture.py (a recorded capture through the same
stages, for ``replay`` and ``plot``), config.py, errors.py, signals.py and wire.py as
the common ground, cli/ on top, and fleet/ (the cloud side) apart: no vehicle package
imports it. tests/test_layout.py holds the graph free of circles.
"""

__version__ = "0.1.0"
