"""The process helpers the end-to-end tests share with ``make run``."""

from devtools.procs import REPO, log_has, open_raw, reap, spawn, start_sim, stop, wait_for, wait_ready

__all__ = ["REPO", "log_has", "open_raw", "reap", "spawn", "start_sim", "stop", "wait_for", "wait_ready"]
