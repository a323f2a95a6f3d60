"""Fusion: the kernel that turns frames into a live state, windows, alarms and events.

It owns the kernel's parts (``_frames_py``, ``_tables_py``, ``_state_py``,
``_speed_py``, ``_battery_py``, ``_alarms_py``, composed by ``_kernel_py``), each
one ``.py`` source that CPython, Cython (typed by its ``.pxd``) and MicroPython all
run; the codes and tables that say what its outputs mean (``spec``); the build
selector and the typed face the rest of the agent uses (``kernel``); and the
stationary decision's words (``motion``). The kernel imports nothing of the agent and
only ``array`` and ``math``: every other package may import ``spec`` and ``kernel``,
none the private parts.
"""
