"""Shared fixtures: both kernels, the real captures, a real mosquitto, CDDL checks."""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import wire
from agent.fusion.kernel import KERNELS
from devtools.broker import Mosquitto
from devtools.postgres import Postgres

# devtools/deb_proof.py runs the kernel tests, which encode no batch, in an arm64 root where
# pycddl cannot be installed (it has no aarch64 wheel, and a source build needs Rust):
# EBIKE_AGENT_TEST_CDDL=0 there. Anywhere else pycddl is required.
CDDL_CHECKS = os.environ.get("EBIKE_AGENT_TEST_CDDL", "1") != "0"
if CDDL_CHECKS:
    import pycddl

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUILD_REQUIRED = os.environ.get("EBIKE_AGENT_BUILD_EXT", "") == "1"
WIRE_CDDL = (REPO / "docs" / "wire.cddl").read_text()
# The technician's bench (``workshop``, ``workshop_down``): a running agent on the simulator.
pytest_plugins = ["tests.workshop"]


def assert_same_outputs(a: Any, b: Any, where: str = "output") -> None:
    """The two kernel builds' outputs agree: same structure, equal ints and bools, floats
    within 1e-9 relative (the C compiler may contract a multiply-add the interpreter
    rounds twice)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_outputs(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(params=["c", "py"])
def kernel_cls(request: pytest.FixtureRequest) -> Any:
    """Each kernel build in turn; the compiled one must exist when the build was required."""
    if request.param not in KERNELS:
        if BUILD_REQUIRED:
            pytest.fail("EBIKE_AGENT_BUILD_EXT=1 but the compiled kernel is not importable")
        pytest.skip("the compiled kernel was not built (EBIKE_AGENT_BUILD_EXT unset)")
    return KERNELS[request.param]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real captures not found at {SHARED_DATA} (../shared beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A real broker on a free loopback port; a missing mosquitto fails the test."""
    broker = Mosquitto(str(tmp_path_factory.mktemp("mosquitto")))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL cluster of this worker's own (initdb in a temporary directory, run
    as an unprivileged user, on loopback and a free port), removed afterwards; a missing
    server fails the test (make test installs it)."""
    cluster = Postgres().start()
    yield cluster
    cluster.remove()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A new, empty database in the worker's cluster, for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.psql(f"CREATE DATABASE {name}")
    return postgres.dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's own are root's alone), root's to write:
    for what runs as an unprivileged user."""
    path = Path(tempfile.mkdtemp(prefix="ebike-shared-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own (its log holds only the test's clients; the test may
    stop, kill or freeze it): resumed if frozen, then stopped."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(str(workdir)).start()
    yield broker
    if broker.proc is not None and broker.proc.poll() is None:
        broker.proc.send_signal(signal.SIGCONT)
    broker.stop()


class WireSchema:
    """docs/wire.cddl as pycddl can check it. pycddl 0.6 only ever accepts one side of a
    choice between map or array types (``window-record / gap-record``, ``fixed-row /
    float-row``), so the batch is checked with record bodies left open, then each body
    against its own kind's rule, and a window's rows each against the row rule it fits;
    pycddl also checks only the first element of a ``[* x]`` array, which checking each
    body and row covers too."""

    def __init__(self, cddl: str) -> None:
        self.batch = pycddl.Schema(
            "root = [version: 1, device: tstr, records: [* [seq: 1..18446744073709551615, body: any]]]\n" + cddl)
        self.deflated = pycddl.Schema("root = batch-deflated\n" + cddl)
        self.rows = [pycddl.Schema(f"root = {rule}\n" + cddl) for rule in ("fixed-row", "float-row")]
        open_rows = cddl.replace("signal-row = fixed-row / float-row", "signal-row = any")
        self.bodies = {kind: pycddl.Schema(f"root = {rule}\n" + open_rows)
                       for kind, rule in (("win", "window-record"), ("gap", "gap-record"),
                                          ("chg", "change-record"), ("alm", "alarm-record"),
                                          ("snap", "snapshot-record"), ("res", "result-record"),
                                          ("upd", "update-record"), ("raw", "raw-record"))}
        self.raw_columns = pycddl.Schema("root = raw-columns\n" + cddl)

    def validate_cbor(self, payload: bytes) -> None:
        try:
            batch = cbor2.loads(payload)
        except (cbor2.CBORDecodeError, ValueError, EOFError):
            batch = None  # the CDDL check below refuses it
        if isinstance(batch, list) and len(batch) == 3 and batch[0] == wire.VERSION_DEFLATE:
            # The envelope against its rule, then the inflated records as a plain batch.
            self.deflated.validate_cbor(payload)
            payload = cbor2.dumps([wire.VERSION, batch[1], cbor2.loads(zlib.decompress(batch[2], -15))])
        self.batch.validate_cbor(payload)
        for _seq, body in cbor2.loads(payload)[2]:
            kind = body.get("k") if isinstance(body, dict) else None
            self.bodies.get(kind, self.bodies["win"]).validate_cbor(cbor2.dumps(body))
            for row in body["s"] if kind == "win" else ():
                self._row(cbor2.dumps(row))
            if kind == "raw":
                self.raw_columns.validate_cbor(wire.raw_columns(body))

    def _row(self, row: bytes) -> None:
        try:
            self.rows[0].validate_cbor(row)
        except pycddl.ValidationError:
            self.rows[1].validate_cbor(row)


@pytest.fixture(scope="session")
def batch_schema() -> WireSchema:
    return WireSchema(WIRE_CDDL)


@pytest.fixture(autouse=True)
def _every_batch_matches_cddl(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Every batch encoded in this process during a test is checked against docs/wire.cddl,
    and by the reference decoder: pycddl 0.6 checks only the first element of a ``[* x]``
    array, the decoder (which agrees with the CDDL, tests/test_wire.py) checks them all.
    Without the checks (CDDL_CHECKS), encoding a batch fails the test."""
    encode = wire.encode_batch
    if not CDDL_CHECKS:
        def unchecked(*args: Any, **kwargs: Any) -> bytes:
            pytest.fail("this test encodes batches, and EBIKE_AGENT_TEST_CDDL=0 turned their CDDL checks off")

        monkeypatch.setattr(wire, "encode_batch", unchecked)
        return
    batch_schema: WireSchema = request.getfixturevalue("batch_schema")

    def checked(device_id: str, records: list[tuple[int, bytes]], deflate: bool = False) -> bytes:
        payload = encode(device_id, records, deflate)
        batch_schema.validate_cbor(payload)
        wire.decode_batch(payload)
        return payload

    monkeypatch.setattr(wire, "encode_batch", checked)
