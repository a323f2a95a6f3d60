# The README's commands: `make run` (agent + simulator + local broker) and `make test`.
# Both set everything up from a fresh clone: venv, the Cython kernel, mosquitto.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
KERNEL := $(VENV)/.kernel-built
# Every module of the kernel: agent/fusion/_<part>_py.py typed by agent/fusion/_<part>.pxd.
KERNEL_SRC := $(wildcard agent/fusion/_*_py.py agent/fusion/_*.pxd)
# The compiled kernel is required unless the caller says otherwise (EBIKE_AGENT_BUILD_EXT=0).
export EBIKE_AGENT_BUILD_EXT ?= 1

# package-tools: debootstrap and, for another ARCH, qemu-user-static and binfmt-support.
.PHONY: package-tools bench-tools db-tools setup broker run test test-compiled test-pure bench fuzz soak lint clean deb

setup: $(KERNEL)

$(INSTALLED): setup.py pyproject.toml
	PYTHON=$(PYTHON) sh devtools/ensure-system.sh build
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,plot,fleet]'
	touch $@

$(KERNEL): $(INSTALLED) $(KERNEL_SRC) setup.py
	rm -f agent/fusion/_*_py.c  # Cython's own check misses changed compiler directives and .pxd files
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c 'from agent.fusion import kernel; print("fusion kernel in use:", kernel.BUILD)'
	touch $@

broker:
	sh devtools/ensure-system.sh broker

# The broker's packages and valgrind: tests/test_bench.py runs `make bench`'s smoke run.
bench-tools:
	sh devtools/ensure-system.sh bench

# PostgreSQL's server: the ingest tests and the fleet bench make their own throwaway
# cluster with initdb (devtools/postgres.py); no system cluster is used or started.
db-tools:
	sh devtools/ensure-system.sh postgres

run: setup broker
	$(PY) -m devtools.demo

test: test-compiled test-pure

# Most tests wait on real processes (simulator, agent, broker), not the CPU: each half runs
# on TEST_WORKERS pytest-xdist workers, each test handed to the next idle one.
TEST_WORKERS ?= 4
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test-compiled: setup bench-tools db-tools package-tools
	$(PYTEST) tests

# The package tests (tests/test_package.py) install the compiled package into Debian
# roots: they run once, in the compiled half.
test-pure: setup bench-tools db-tools
	EBIKE_AGENT_PUREPYTHON=1 $(PYTEST) -m "not package" tests

# ebike-agent_<version>_<arch>.deb in dist/, built in a Debian 12 root of ARCH (as root).
# ARCH=arm64 (or any other than this machine's) also proves it: the package installed into a
# fresh arm64 root under qemu, its kernel tests with both builds and a ride run there.
ARCH ?= $(shell dpkg --print-architecture)

package-tools:
	sh devtools/ensure-system.sh package $(ARCH)

deb: setup package-tools
	$(PY) -m devtools.deb --arch $(ARCH)

bench: setup bench-tools db-tools
	$(PY) -m devtools.bench

# >= 10^6 random and mutated streams per UART framer (make fuzz FUZZ_ARGS="--streams 20000" for a quick one).
# atheris (coverage-guided) when it installs; otherwise the fuzzer's own mutation loop.
fuzz: setup
	$(PY) -m pip install -q 'atheris>=2.3' || echo "atheris did not install: using the built-in mutation loop"
	$(PY) -m devtools.fuzz $(FUZZ_ARGS)

# Long runs: 200 power cuts (SIGKILL at random moments) instead of make test's 20, and 50
# power losses (unsynced writes dropped by devtools/lossyfs.py) instead of 5.
soak: setup broker
	EBIKE_POWER_CUTS=200 EBIKE_POWER_LOSSES=50 $(PY) -m pytest tests/test_power_cut.py tests/test_power_loss.py

lint: setup
	$(PY) -m ruff check agent firmware_sim devtools tests setup.py
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build dist .debroots *.egg-info agent/fusion/_*_py.c agent/fusion/*.so bench-results.json
