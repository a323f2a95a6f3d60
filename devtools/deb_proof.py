"""``make deb ARCH=arm64`` (devtools/deb.py, for an architecture other than this machine's):
the package built and proven there.

1. devtools/deb.py builds it in a Debian 12 root of ARCH (debootstrap; every binary run
   through qemu-user-static), so the Cython kernel is compiled by that root's gcc.
2. The package is installed with ``dpkg -i`` into a fresh ARCH root, and the kernel tests
   (tests/test_kernel.py, tests/test_fusion.py) run there against the installed agent,
   once with the compiled kernel and once with the pure one.
3. tests/test_package.py runs with EBIKE_AGENT_DEB_ARCH=ARCH: in another fresh ARCH root the
   installed agent rides against the simulator and the broker as the ebike-agent user, is
   stopped with SIGTERM, upgraded, and a broken upgrade rolled back.

Prints each step's duration (the README quotes them). Run as root; slow (qemu).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devtools import deb, debroot

KERNEL_TESTS = ("tests/test_kernel.py", "tests/test_fusion.py")
# The MicroPython run of the kernel needs the MicroPython unix port (a dev wheel for x86_64
# only); the developers' machines and CI run it.
NOT_HERE = "not micropython"
# What the kernel tests import beyond the package; not pycddl (no aarch64 wheel): they encode
# no batch, and tests/conftest.py's CDDL checks are off there (EBIKE_AGENT_TEST_CDDL=0).
TEST_REQUIREMENTS = ("pytest>=8,<10", "hypothesis>=6.100,<7")


def step(name: str, started: float) -> float:
    now = time.monotonic()
    print(f"make deb: {name}: {now - started:.0f} s", file=sys.stderr, flush=True)
    return now


def kernel_tests(root: Path, log: Path) -> None:
    """The kernel tests in ``root`` against the installed venv, compiled and pure."""
    where = root / "srv/ebike-edge"
    for rel in deb.sources():
        if rel.startswith(("tests/", "devtools/", "docs/")) or rel == "pyproject.toml":
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(deb.REPO / rel, where / rel)
    python = f"{deb.VENV}/bin/python"
    debroot.run_in(root, [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *TEST_REQUIREMENTS],
                   env=deb.pip_environment(root), log=log)
    for pure in ("0", "1"):
        out = debroot.run_in(root, ["sh", "-c", f"cd /srv/ebike-edge && {python} -m pytest -q -p no:cacheprovider "
                                    + f"-k '{NOT_HERE}' " + " ".join(KERNEL_TESTS)],
                             env={"EBIKE_AGENT_PUREPYTHON": pure, "EBIKE_AGENT_BUILD_EXT": "1",
                                  "EBIKE_AGENT_TEST_CDDL": "0"}, timeout=7200,
                             log=log)
        print(f"kernel tests ({'pure' if pure == '1' else 'compiled'}): {out.strip().splitlines()[-1]}",
              file=sys.stderr)


def prove(arch: str) -> None:
    started = time.monotonic()
    log = debroot.WORK / f"proof-{arch}.log"
    log.write_text("")
    package = deb.package(arch)
    t = step(f"{package.name} built", started)
    root = debroot.fresh_root("run", arch, debroot.WORK / f"proof-{arch}")
    try:
        shutil.copy2(package, root / "tmp" / package.name)
        debroot.run_in(root, ["dpkg", "-i", f"/tmp/{package.name}"], log=log)
        if debroot.run_in(root, [f"{deb.VENV}/bin/python", "-c",
                                 "from agent.fusion import kernel; print(kernel.BUILD)"]).strip() != "c":
            raise debroot.RootError("the installed package's kernel is not the compiled one")
        t = step("installed in a fresh root", t)
        kernel_tests(root, log)
        t = step("kernel tests, both builds", t)
    finally:
        debroot.remove_root(root)
    ride = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_package.py"],
                          cwd=deb.REPO, env={**os.environ, "EBIKE_AGENT_DEB_ARCH": arch}, check=False)
    if ride.returncode != 0:
        raise debroot.RootError(f"tests/test_package.py failed for {arch} (exit {ride.returncode})")
    step("install, ride, SIGTERM, upgrade and rollback (tests/test_package.py)", t)
    step("all", started)
