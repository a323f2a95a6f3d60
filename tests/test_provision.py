"""Provisioning a unit flashed from the fleet's one image (agent/provision.py): real files
in directories standing for the boot partition's ``ebike-agent/`` and /etc/ebike-agent,
certificates made with openssl.

A good provisioning file makes a configuration the agent loads, its files installed mode
0600 for the service user and gone from the boot directory; a bad one changes nothing
and says file, key and reason (exit 2); a run cut short at any durable step (a raised
error on plain directories, a power cut on devtools/lossyfs.py that forgets what was not
fsynced) leaves the old state or the new one and the next run finishes; a second run
does nothing. Then a provisioned agent connects to a mutual-TLS mosquitto with the
installed certificate and sends."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config, wire
from agent.cli import main
from agent.errors import ConfigError
from agent.fleet.signing import generate_key_pair
from agent.provision import Outcome, provision
from devtools.broker import Mosquitto
from tests.helpers import REPO, spawn, stop, wait_for
from tests.test_power_loss import fuse_unavailable
from tests.test_tls import GRANTED_QOS_1, Peer, make_pki, openssl, peer, tls_broker  # noqa: F401 - the fixtures

PASSWORD = "right horse battery staple"
IMAGE = """# The image's configuration: the same on every unit until it is provisioned.
device_id = "unprovisioned"

[[sources]]
name = "gnss"
kind = "uart"
port = "/dev/ttyUSB0"
protocol = "nmea"

[broker]
ack = "broker"
"""
GOOD = f"""device_id = "bike-7"

[broker]
host = "mqtt.fleet.invalid"
port = 8883
username = "bike-7"
password = "{PASSWORD}"
topic_prefix = "fleet/eu/{{device_id}}/"
tls_ca = "ca.crt"
tls_cert = "client.crt"
tls_key = "client.key"

[commands.keys]
fleet-2025 = "fleet-2025.pub.pem"
"""
# The files beside provision.toml: name -> the PKI file it is.
FILES = {"ca.crt": "ca.pem", "client.crt": "bike-7.pem", "client.key": "bike-7.key",
         "fleet-2025.pub.pem": "fleet.pub.pem"}
# The keys GOOD sets, as the output lists them.
SET = ("device_id, broker.host, broker.port, broker.username, broker.password, broker.topic_prefix, broker.tls_ca, "
       "broker.tls_cert, broker.tls_key, commands.keys.fleet-2025")
OWNER = "nobody"
# More durable steps than a provisioning of FILES takes (the loops below stop there).
MAX_STEPS = 40


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and client certificates for bike-7 and bike-8, bike-7's key encrypted too,
    and a fleet command key."""
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, ["bike-7", "bike-8"])
    openssl("pkey", "-in", str(d / "bike-7.key"), "-aes256", "-passout", "pass:x", "-out", str(d / "encrypted.key"))
    (d / "fleet.pub.pem").write_bytes(generate_key_pair()[1])
    return d


def put(path: Path, data: bytes) -> None:
    """Write and fsync, as a flashing station's writes are durable before the card is pulled."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Unit:
    """A unit's boot directory and etc directory, the image's agent.toml in etc."""

    def __init__(self, boot: Path, etc: Path, pki: Path) -> None:
        self.boot, self.etc, self.pki = boot, etc, pki
        self.config = etc / "agent.toml"
        boot.mkdir(parents=True, exist_ok=True)
        etc.mkdir(parents=True, exist_ok=True)

    def flash(self, provision_toml: str = GOOD, files: dict[str, str] | None = None, image: str = IMAGE) -> None:
        """Both directories as a freshly flashed unit's, with this provisioning written."""
        for d in (self.boot, self.etc):
            for name in os.listdir(d):
                os.unlink(d / name)
        put(self.config, image.encode())
        put(self.boot / "provision.toml", provision_toml.encode())
        for name, source in (FILES if files is None else files).items():
            put(self.boot / name, (self.pki / source).read_bytes())
        sync_dir(self.etc)
        sync_dir(self.boot)

    def run(self) -> Outcome | None:
        return provision(str(self.boot), str(self.etc), str(self.config), OWNER)

    def cli(self, capsys: pytest.CaptureFixture[str], *more: str) -> tuple[int, str, str]:
        rc = main(["provision", "--boot", str(self.boot), "--etc", str(self.etc), "--config", str(self.config),
                   "--owner", OWNER, *more])
        out, err = capsys.readouterr()
        return rc, out, err

    def visible(self) -> list[str]:
        return sorted(n for n in os.listdir(self.boot) if not n.startswith("."))

    def tree(self) -> dict[str, tuple[bytes, int, int, int]]:
        """Every file of both directories: bytes, mode, owner, mtime."""
        out = {}
        for d in (self.boot, self.etc):
            for name in os.listdir(d):
                st = os.lstat(d / name)
                out[str(d / name)] = ((d / name).read_bytes(), st.st_mode, st.st_uid, st.st_mtime_ns)
        return out


@pytest.fixture
def unit(tmp_path: Path, pki: Path) -> Unit:
    u = Unit(tmp_path / "boot" / "ebike-agent", tmp_path / "etc", pki)
    u.flash()
    return u


def assert_provisioned(u: Unit, modes: bool = True) -> None:
    """The new state, complete: the configuration loads with the unit's identity and the
    installed files, byte for byte; nothing left on the boot partition; the image's
    file kept as agent.toml.previous."""
    cfg = config.load(str(u.config))
    assert (cfg.device_id, cfg.topic_prefix) == ("bike-7", "fleet/eu/bike-7/")
    b = cfg.broker
    assert (b.host, b.port, b.username, b.password, b.ack) == ("mqtt.fleet.invalid", 8883, "bike-7", PASSWORD, "broker")
    assert (b.tls_ca, b.tls_cert, b.tls_key) == tuple(str(u.etc / n) for n in ("ca.crt", "client.crt", "client.key"))
    assert dict(cfg.commands.keys) == {"fleet-2025": (u.pki / "fleet.pub.pem").read_text()}
    for name, source in FILES.items():
        assert (u.etc / name).read_bytes() == (u.pki / source).read_bytes(), name
    assert u.visible() == []
    assert (u.etc / "agent.toml.previous").read_text() == IMAGE
    assert sorted(os.listdir(u.etc)) == sorted([*FILES, "agent.toml", "agent.toml.previous"]), "temporary files left"
    if modes:
        nobody = pwd.getpwnam(OWNER).pw_uid
        for name in [*FILES, "agent.toml", "agent.toml.previous"]:
            st = os.stat(u.etc / name)
            assert (oct(st.st_mode & 0o7777), st.st_uid) == (oct(0o600), nobody), name


def test_a_good_provisioning(unit: Unit, capsys: pytest.CaptureFixture[str]) -> None:
    """The configuration the agent loads, the secrets 0600 for the service user in etc and
    gone from the boot directory; the journal is told what, never the password. The
    writing machine's hidden files are left alone, as systemd's condition ignores them."""
    put(unit.boot / ".DS_Store", b"Finder's")
    rc, out, err = unit.cli(capsys)
    assert (rc, err) == (0, "")
    assert_provisioned(unit)
    assert sorted(os.listdir(unit.boot)) == [".DS_Store"]
    lines = out.splitlines()
    assert lines[0] == f"provisioned bike-7 from {unit.boot}/provision.toml: {SET}"
    assert lines[1] == f"{unit.config}: written, the previous file kept as {unit.config}.previous"
    assert lines[2] == f"installed, mode 0600, owner {OWNER}: " + ", ".join(str(unit.etc / n) for n in FILES)
    assert lines[3] == f"removed from {unit.boot}: provision.toml, " + ", ".join(FILES)
    assert PASSWORD not in out


def test_a_second_run_does_nothing(unit: Unit, capsys: pytest.CaptureFixture[str]) -> None:
    assert unit.cli(capsys)[0] == 0
    before = unit.tree()
    assert unit.cli(capsys) == (0, "", "")
    assert unit.tree() == before
    rc, out, _ = unit.cli(capsys, "--json")
    assert rc == 0 and '"provisioned": false' in out and '"removed": []' in out


def test_check_only(unit: Unit, capsys: pytest.CaptureFixture[str]) -> None:
    """``--check``: the checks alone, for a flashing station before it writes a card. A
    good directory: ok, nothing changed; a bad one refused as at boot; none at all is a
    fault here, not nothing to do."""
    before = unit.tree()
    assert unit.cli(capsys, "--check") == (0, f"ok: {unit.boot}/provision.toml: bike-7: {SET}; nothing changed "
                                              "(--check)\n", "")
    assert unit.tree() == before
    put(unit.boot / "client.key", (unit.pki / "bike-8.key").read_bytes())
    assert unit.cli(capsys, "--check") == (2, "", f"error: {unit.boot}/provision.toml:broker.tls_key: is not the key "
                                                  "of broker.tls_cert\n")
    for name in os.listdir(unit.boot):
        os.unlink(unit.boot / name)
    os.rmdir(unit.boot)
    assert unit.cli(capsys, "--check") == (2, "", f"error: {unit.boot}/provision.toml: cannot read: No such file or "
                                                  "directory\n")


def test_nothing_to_provision(tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No directory, an empty one, or one with only hidden files: exit 0, nothing said,
    nothing touched."""
    u = Unit(tmp_path / "boot" / "ebike-agent", tmp_path / "etc", pki)
    os.rmdir(u.boot)
    put(u.config, IMAGE.encode())
    assert u.cli(capsys) == (0, "", "")
    u.boot.mkdir()
    assert u.cli(capsys) == (0, "", "")
    put(u.boot / "._client.key", b"AppleDouble")
    before = u.tree()
    assert u.cli(capsys) == (0, "", "")
    assert u.tree() == before


def _with(files: dict[str, str | None]) -> dict[str, str]:
    """FILES with some replaced (by another PKI file) or left out (None)."""
    out = {**FILES, **files}
    return {name: source for name, source in out.items() if source is not None}


# (id, provision.toml, files beside it, the image's agent.toml, the error's line: {boot}, {etc} filled in)
BAD = [
    ("port", GOOD.replace("8883", "70000"), FILES, IMAGE,
     "{boot}/provision.toml:broker.port: must be a TCP port, 1-65535"),
    ("device-id", GOOD.replace('"bike-7"', '"bike/7"', 1), FILES, IMAGE,
     "{boot}/provision.toml:device_id: must be 1-64 of A-Z a-z 0-9 _ . - (no MQTT wildcards)"),
    ("no-device-id", GOOD.replace('device_id = "bike-7"', ""), FILES, IMAGE,
     "{boot}/provision.toml:device_id: is required: the unit's own id"),
    ("not-identity", GOOD + "\n[outbox]\nquota_mb = 1\n", FILES, IMAGE,
     "{boot}/provision.toml:outbox: is not set per unit (the image's agent.toml sets it); a provisioning file sets "
     "device_id, broker, commands"),
    ("missing-file", GOOD, _with({"client.key": None}), IMAGE,
     "{boot}/provision.toml:broker.tls_key: cannot read {boot}/client.key: No such file or directory"),
    ("path", GOOD.replace('"ca.crt"', '"../ca.crt"'), FILES, IMAGE,
     "{boot}/provision.toml:broker.tls_ca: must name a file beside provision.toml (no '/', not hidden)"),
    ("overwrite", GOOD.replace('"ca.crt"', '"agent.toml.previous"'), _with({"agent.toml.previous": "ca.pem"}),
     IMAGE, "{boot}/provision.toml:broker.tls_ca: agent.toml.previous would overwrite the agent's configuration "
            "in {etc}"),
    ("ca-not-pem", GOOD, _with({"ca.crt": "bike-7.key"}), IMAGE,
     "{boot}/provision.toml:broker.tls_ca: not a PEM certificate (NO_CERTIFICATE_OR_CRL_FOUND)"),
    ("wrong-key", GOOD, _with({"client.key": "bike-8.key"}), IMAGE,
     "{boot}/provision.toml:broker.tls_key: is not the key of broker.tls_cert"),
    ("encrypted-key", GOOD, _with({"client.key": "encrypted.key"}), IMAGE,
     "{boot}/provision.toml:broker.tls_key: is encrypted: the agent reads an unencrypted key (its mode 0600 "
     "protects it)"),
    ("command-key", GOOD, _with({"fleet-2025.pub.pem": "bike-8.pem"}), IMAGE,
     "{boot}/provision.toml:commands.keys.fleet-2025: {boot}/fleet-2025.pub.pem: not "),
    ("stray-file", GOOD, _with({"notes.txt": "bike-8.key"}), IMAGE,
     "{boot}/notes.txt: is not named by provision.toml, and would stay on the boot partition: name it there, or "
     "remove it"),
    ("not-toml", "device_id = ", FILES, IMAGE, "{boot}/provision.toml: line 1, column 13: not valid TOML: "),
    ("image-fault", GOOD, FILES, IMAGE + "\n[outbox]\nquota_mb = 0\n", "{etc}/agent.toml:outbox.quota_mb: must be > 0"),
]


@pytest.mark.parametrize(("provision_toml", "files", "image", "error"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_a_bad_provisioning_changes_nothing(tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str],
                                            provision_toml: str, files: dict[str, str], image: str,
                                            error: str) -> None:
    """Exit 2 and ``error: <file>:<key>: <reason>``, the provisioning file blamed for what
    it sets and the image's file for the rest; not a byte changed in either directory, so
    the agent starts on its old configuration."""
    u = Unit(tmp_path / "boot" / "ebike-agent", tmp_path / "etc", pki)
    u.flash(provision_toml, files, image)
    before = u.tree()
    rc, out, err = u.cli(capsys)
    assert (rc, out) == (2, "")
    assert err.startswith("error: " + error.format(boot=u.boot, etc=u.etc)), err
    assert err.count("\n") == 1
    assert u.tree() == before


def test_a_link_planted_beside_the_configuration(unit: Unit, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's user may write the etc directory: a link it left where root writes the
    configuration's previous copy is refused, and nothing is written through it."""
    victim = tmp_path / "shadow"
    put(victim, b"root:*:19000:0:99999:7:::\n")
    (unit.etc / "agent.toml.previous").symlink_to(victim)
    before = unit.tree()
    rc, out, err = unit.cli(capsys)
    assert (rc, out) == (2, "")
    assert err == (f"error: {unit.etc}/agent.toml.previous: is a symbolic link: refused, root does not write "
                   "through it (remove it)\n")
    assert victim.read_bytes() == b"root:*:19000:0:99999:7:::\n"
    assert unit.tree() == before


def test_files_left_without_their_provisioning_file(unit: Unit, capsys: pytest.CaptureFixture[str]) -> None:
    """What a cut between removing provision.toml and removing the files leaves: each
    file that is byte for byte its installed copy goes; if one is not, none goes."""
    assert unit.cli(capsys)[0] == 0
    put(unit.boot / "client.key", (unit.pki / "bike-7.key").read_bytes())
    put(unit.boot / "ca.crt", (unit.pki / "bike-8.pem").read_bytes())
    before = unit.tree()
    rc, out, err = unit.cli(capsys)
    assert (rc, out) == (2, "")
    assert err == (f"error: {unit.boot}/ca.crt: has no provision.toml beside it and is not a copy of "
                   f"{unit.etc}/ca.crt: add the provision.toml that names it, or remove it\n")
    assert unit.tree() == before
    os.unlink(unit.boot / "ca.crt")
    rc, out, err = unit.cli(capsys)
    assert (rc, err) == (0, "")
    assert out == f"removed from {unit.boot} (left by a provisioning cut short, installed already): client.key\n"
    assert_provisioned(unit)


class Cut(BaseException):
    """The power goes: a BaseException, so nothing under test catches it."""


def cut_at(monkeypatch: pytest.MonkeyPatch, k: int, power: Callable[[], None]) -> list[str]:
    """The k-th (from 1) os.replace, os.unlink or os.fsync does not happen: ``power``
    runs instead, and Cut is raised. The calls made, by name."""
    calls: list[str] = []

    def cutting(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            calls.append(name)
            if len(calls) == k:
                power()
                raise Cut(f"cut before {name} #{k}")
            return real(*args)
        return wrapper

    for name in ("replace", "unlink", "fsync"):
        monkeypatch.setattr(os, name, cutting(name, getattr(os, name)))
    return calls


def assert_old_or_new(u: Unit, modes: bool) -> None:
    """After a cut: the configuration is whole and the old one (everything still on the
    boot partition) or the new one (everything it names installed); no file lost; and
    (``modes``) no file of etc but the image's own readable by others at any moment."""
    cfg = config.load(str(u.config))
    if modes:
        for name in os.listdir(u.etc):
            if (u.etc / name).read_text(errors="replace") != IMAGE:
                assert os.stat(u.etc / name).st_mode & 0o077 == 0, name
    expected = {name: (u.pki / source).read_bytes() for name, source in FILES.items()}
    if cfg.device_id == "unprovisioned":
        assert u.config.read_text() == IMAGE
        assert u.visible() == sorted(["provision.toml", *FILES])
        assert all((u.boot / n).read_bytes() == data for n, data in expected.items())
    else:
        assert cfg.device_id == "bike-7"
        assert all((u.etc / n).read_bytes() == data for n, data in expected.items())


def cut_everywhere(u: Unit, monkeypatch: pytest.MonkeyPatch, power: Callable[[], None],
                   restore: Callable[[], None], modes: bool) -> int:
    """Provision, cut at the first durable step, check, run again to the end, check;
    then the same cut one step later, until a run needs no rerun. The steps cut."""
    for k in range(1, MAX_STEPS):
        u.flash()
        with monkeypatch.context() as m:
            calls = cut_at(m, k, power)
            try:
                u.run()
            except (Cut, ConfigError):  # ConfigError: the dead mount's answer to what followed the cut
                assert len(calls) >= k, "the run failed before the cut"
            else:
                assert len(calls) == k - 1
                assert_provisioned(u, modes)
                return k - 1
        restore()
        assert_old_or_new(u, modes)
        u.run()
        assert_provisioned(u, modes)
        assert u.run() is None, f"a third run after a cut at step {k} still found work"
    pytest.fail(f"provisioning took more than {MAX_STEPS} durable steps")


def test_interrupted_at_every_step_then_finished(unit: Unit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain directories: the run fails at each durable step in turn (what a full disk or
    a killed process leaves), and the next run finishes the job."""
    steps = cut_everywhere(unit, monkeypatch, power=lambda: None, restore=lambda: None, modes=True)
    assert steps >= 2 * len(FILES) + 6, steps


@pytest.fixture
def lossy_unit(tmp_path: Path, pki: Path) -> Iterator[tuple[Unit, Any, Any]]:
    """The unit's boot and etc directories each on its own lossyfs mount."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    from devtools.lossyfs import LossyMount

    mounts = [LossyMount(tmp_path / f"{name}-disk", tmp_path / name, tmp_path / f"{name}.log")
              for name in ("boot", "etc")]
    try:
        for m in mounts:
            m.start()
    except OSError as e:
        for m in mounts:
            m.stop()
        pytest.skip(f"FUSE mounts are not allowed here: {e}")
    yield Unit(tmp_path / "boot", tmp_path / "etc", pki), mounts[0], mounts[1]
    for m in mounts:
        m.stop()


def test_power_cut_at_every_step_then_finished(lossy_unit: tuple[Unit, Any, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both directories on lossyfs, which forgets every write and every name change not
    yet fsynced when the power goes: cut at each durable step in turn, both at once; what
    survived is the old state or the new one, and the next boot's run finishes. (lossyfs
    keeps no modes or owners across a cut: those are checked above.)"""
    u, boot, etc = lossy_unit

    def power() -> None:
        boot.cut()
        etc.cut()

    def restore() -> None:
        boot.start()
        etc.start()

    steps = cut_everywhere(u, monkeypatch, power, restore, modes=False)
    assert steps >= 2 * len(FILES) + 6, steps


E2E_IMAGE = """device_id = "unprovisioned"
control_socket = "{tmp}/control.sock"

[[sources]]
name = "replay"
kind = "candump"
port = "{tmp}/ride.log"
protocol = "bafang-can"
loop = true

[broker]
ack = "broker"
keepalive = 5

[outbox]
path = "{tmp}/outbox.sqlite"
commit_interval = 0.2

[windows]
live = 0.5
"""


@pytest.mark.e2e
def test_a_provisioned_unit_connects_and_sends(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The image's configuration knows no broker; ``ebike-agent provision`` (as systemd
    runs it) gives the unit bike-a's identity and certificate, and the agent started on
    the result connects to a mutual-TLS mosquitto whose ACL lets only bike-a's certificate
    write bike-a's topics, and sends: the cloud receives bike-a's telemetry."""
    broker: Mosquitto
    broker, pki = request.getfixturevalue("tls_broker")
    connect: Callable[[str], Peer] = request.getfixturevalue("peer")
    tmp = tmp_path / "unit"
    u = Unit(tmp / "boot", tmp / "etc", pki)
    speed = bytes([0xD0, 0x07, 0xF4, 0x01, 0xC0, 0x12, 0x41, 0xFF])  # 20.00 km/h
    (tmp / "ride.log").write_text("".join(f"({1.7e9 + i * 0.25:.6f}) can0 02F83201#{speed.hex().upper()}\n"
                                          for i in range(16)))
    u.flash(f"""device_id = "bike-a"\n[broker]\nhost = "127.0.0.1"\nport = {broker.port}\ntls_ca = "ca.crt"
tls_cert = "client.crt"\ntls_key = "client.key"\n""",
            {"ca.crt": "ca.pem", "client.crt": "bike-a.pem", "client.key": "bike-a.key"},
            E2E_IMAGE.format(tmp=tmp))
    cloud = connect("cloud")
    assert cloud.subscribe("ebike/v1/bike-a/telemetry") == [GRANTED_QOS_1]
    done = subprocess.run([sys.executable, "-m", "agent", "provision", "--boot", str(u.boot), "--etc", str(u.etc),
                           "--config", str(u.config)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert u.visible() == []
    log = tmp / "agent.log"
    agent = spawn(["agent", "run", "--config", str(u.config)], log)
    try:
        wait_for("bike-a's telemetry at the cloud", lambda: cloud.received, 20)
        device, records = wire.decode_batch(cloud.received[0][1])
        assert (cloud.received[0][0], device) == ("ebike/v1/bike-a/telemetry", "bike-a")
        assert records
    finally:
        assert stop(agent) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
