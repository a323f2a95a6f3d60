"""The Debian package on a unit: built by ``make deb`` (devtools/deb.py), installed with
``dpkg -i`` into a fresh Debian 12 root (debootstrap) and run there as the ``ebike-agent``
user against the simulator's ptys and the real broker, as systemd would run it: a small
supervisor stands in for systemd (no systemd runs here), restarting the agent when it exits
and passing it a ``NOTIFY_SOCKET`` the test listens on. Then SIGTERM mid-ride, an upgrade,
and a broken upgrade rolled back by packaging/update-guard.

Needs root (debootstrap, chroot, mounts in a private namespace): CI and this machine are."""

from __future__ import annotations

import grp
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from agent import __version__, config
from devtools import deb, debroot
from devtools.broker import Mosquitto
from tests.helpers import stop, wait_for
from tests.test_notify import Manager
from tests.workshop import DEVICE, SIM_SPEED, Workshop

pytestmark = [pytest.mark.e2e, pytest.mark.package]

# make deb ARCH=arm64 runs this module on the arm64 package (devtools/deb_proof.py); its
# agent then runs under qemu, several times slower: the update timeout grows with it.
ARCH = os.environ.get("EBIKE_AGENT_DEB_ARCH") or debroot.host_arch()
SLOWER = 1 if debroot.host_arch() == ARCH else 4
# Stands in for systemd's Restart=always, RuntimeDirectory= and User=: the agent as
# ebike-agent (with its groups), started again a second after it exits; its pid in a file.
SUPERVISOR = """#!/bin/sh
install -d -o ebike-agent -g ebike-agent -m 0750 /run/ebike-agent
trap 'kill -TERM $(cat /run/agent.pid); wait; exit 0' TERM
while :; do
    setpriv --reuid=ebike-agent --regid=ebike-agent --init-groups -- /usr/bin/env NOTIFY_SOCKET=/run/notify.sock \\
        WATCHDOG_USEC=2000000 /usr/bin/ebike-agent run --config /etc/ebike-agent/agent.toml \\
        >>/var/lib/ebike-agent/agent.log 2>&1 &
    echo $! > /run/agent.pid
    wait $!
    sleep 1
done
"""


@pytest.fixture(scope="session")
def package() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the package tests make Debian roots: run them as root (CI does)")
    return deb.package(ARCH)


class Unit:
    """A fresh Debian 12 root standing for a unit's SD card."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.supervisor: subprocess.Popen[bytes] | None = None

    def run(self, *argv: str, user: str | None = None, timeout: float = 300) -> str:
        return debroot.run_in(self.root, argv, user=user, timeout=timeout)

    def install(self, package: Path) -> str:
        shutil.copy2(package, self.root / "tmp" / package.name)
        return self.run("dpkg", "-i", f"/tmp/{package.name}")

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def start(self) -> None:
        self.path("/usr/local/sbin/supervise").write_text(SUPERVISOR)
        self.supervisor = subprocess.Popen(debroot.chroot_argv(self.root, ["/bin/sh", "/usr/local/sbin/supervise"]),
                                           start_new_session=True, stdin=subprocess.DEVNULL)

    def agent_pid(self) -> int:
        return int(self.path("/run/agent.pid").read_text())

    def status(self) -> dict[str, object] | None:
        from agent.control.client import request
        from agent.errors import AgentError

        try:
            st: dict[str, object] = request(str(self.path("/run/ebike-agent/control.sock")), "status")["status"]
        except AgentError:
            return None
        return st

    def close(self) -> None:
        if self.supervisor is not None:
            stop(self.supervisor, timeout=10)
        for log in ("/var/lib/ebike-agent/agent.log", "/var/lib/ebike-agent/update-guard.log"):
            if self.path(log).exists():  # shown by pytest when the test failed
                print(f"--- {log} (tail)\n" + self.path(log).read_text(errors="replace")[-3000:])


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Unit]:
    u = Unit(debroot.fresh_root("run", ARCH, tmp_path / "root"))
    yield u
    u.close()
    debroot.remove_root(u.root)


def repack(package: Path, version: str, out: Path, break_it: bool = False) -> Path:
    """The package as another version; ``break_it``: one that cannot start at all."""
    tree = out / f"tree-{version}"
    subprocess.run(["dpkg-deb", "-R", str(package), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    control.write_text(control.read_text().replace(f"Version: {__version__}", f"Version: {version}"))
    postinst = tree / "DEBIAN/postinst"
    postinst.write_text(postinst.read_text().replace(f'--to "{__version__}"', f'--to "{version}"'))
    if break_it:
        runtime = next(tree.glob("opt/ebike-agent/venv/lib/python3*/site-packages/agent/runtime.py"))
        runtime.write_text('raise SystemExit("this build is broken on purpose")\n')
    new = out / f"ebike-agent_{version}_{ARCH}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(new)], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return new


def test_the_package_holds_the_venv_the_unit_and_the_conffile(package: Path) -> None:
    info = subprocess.run(["dpkg-deb", "--info", str(package)], check=True, capture_output=True, text=True).stdout
    assert f"Version: {__version__}" in info and f"Architecture: {ARCH}" in info
    assert "Depends: python3 (>= 3.11), python3 (<< 3.12)" in info
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(package)], check=True, capture_output=True).stdout
    assert b"/etc/ebike-agent/agent.toml" in conffiles
    listing = subprocess.run(["dpkg-deb", "--contents", str(package)], check=True, capture_output=True,
                             text=True).stdout
    for path in ("./lib/systemd/system/ebike-agent.service", "./lib/systemd/system/ebike-agent-provision.service",
                 "./etc/ebike-agent/agent.toml", "./usr/lib/ebike-agent/update-guard",
                 "./usr/bin/ebike-agent -> /opt/ebike-agent/venv/bin/ebike-agent",
                 "./opt/ebike-agent/venv/bin/python3 -> /usr/bin/python3"):
        assert path in listing, path
    kernel = [line for line in listing.splitlines() if "/site-packages/agent/fusion/_kernel.cpython-311" in line]
    assert kernel, "the compiled kernel is not in the package"
    for wheel in ("paho", "serial", "cbor2", "cantools", "cryptography", "rich", "can", "gpiod"):
        assert f"/site-packages/{wheel}/" in listing, f"{wheel} is not inside the package"


def _seqs(db: Path, query: str) -> set[int]:
    if not db.exists():
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0) as c:
        return {int(seq) for (seq,) in c.execute(query)}


def _committed(outbox: Path) -> int:
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5.0) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    return int(next_seq) - 1


def _nothing_lost(unit: Unit, cloud: Path) -> int:
    """Every record the unit ever committed is either still in its outbox or in the cloud."""
    outbox = unit.path("/var/lib/ebike-agent/outbox.sqlite")
    committed = _committed(outbox)
    held = _seqs(outbox, "SELECT seq FROM records") | _seqs(cloud, f"SELECT seq FROM records WHERE device='{DEVICE}'")
    assert committed > 0
    missing = set(range(1, committed + 1)) - held
    assert not missing, f"{len(missing)} committed records lost: {sorted(missing)[:10]}"
    return committed


def _config(bench: Workshop, broker: Mosquitto) -> str:
    """The image's configuration for this bench: the simulator's ptys as its serial ports,
    the supervisor's restart for update-guard, a short health timeout; no identity and no
    broker yet (provisioning brings them)."""
    ports = {name: os.path.realpath(bench.tmp / name) for name in ("gps", "can", "bms")}
    dialout = grp.getgrnam("dialout").gr_gid
    for port in ports.values():  # as udev gives a USB serial adapter: root:dialout 0660
        os.chown(port, 0, dialout)
        os.chmod(port, 0o660)
    return f"""device_id = "unprovisioned"
control_socket = "/run/ebike-agent/control.sock"

[[sources]]
name = "gnss"
kind = "uart"
port = "{ports['gps']}"
protocol = "nmea"
baudrate = 9600

[[sources]]
name = "can0"
kind = "slcan"
port = "{ports['can']}"
protocol = "bafang-can"
bitrate = 250000

[[sources]]
name = "bms"
kind = "uart"
port = "{ports['bms']}"
protocol = "jbd"
baudrate = 9600
poll_interval = 0.5

[outbox]
path = "/var/lib/ebike-agent/outbox.sqlite"
commit_interval = 0.5

[fusion]
rate_scale = {SIM_SPEED}

[update]
timeout_s = {20 * SLOWER}
restart = "kill $(cat /run/agent.pid)"
"""


def _systemd_accepts(unit: Unit, tmp: Path) -> None:
    """The installed unit files pass ``systemd-analyze verify`` (checked on the host's
    systemd with ExecStart pointing into the root: the root has no systemd of its own) and
    score OK (<= 3.0) in ``systemd-analyze security``."""
    units = []
    for name in ("ebike-agent.service", "ebike-agent-provision.service"):
        text = unit.path(f"/lib/systemd/system/{name}").read_text()
        (tmp / name).write_text(text.replace("ExecStart=/opt/", f"ExecStart={unit.root}/opt/"))
        units.append(str(tmp / name))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for name in ("ebike-agent.service", "ebike-agent-provision.service"):
        score = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={unit.root}",
                                "--threshold=30", f"/lib/systemd/system/{name}"], capture_output=True, text=True)
        assert score.returncode == 0 and "OK" in score.stdout.splitlines()[-1], score.stdout[-500:]


def _acked_since_start(unit: Unit) -> bool:
    st = unit.status()
    if st is None:
        return False
    acked = st["uplink"].get("last_ack_at")  # type: ignore[union-attr]
    return bool(acked) and float(acked) >= float(st["started_at"])  # type: ignore[arg-type]


def test_install_ride_stop_upgrade_and_roll_back(package: Path, unit: Unit, tmp_path: Path,
                                                 mosquitto: Mosquitto) -> None:
    unit.install(package)
    assert "dialout" in unit.run("id", "-nG", "ebike-agent").split()
    uid = int(unit.run("id", "-u", "ebike-agent"))
    assert unit.path("/var/lib/ebike-agent").stat().st_uid == uid
    assert unit.path("/etc/systemd/system/multi-user.target.wants/ebike-agent.service").is_symlink()
    assert "usage: ebike-agent" in unit.run("ebike-agent", "--help", user="ebike-agent")
    # As shipped, the conffile is a valid configuration.
    config.load(str(unit.path("/etc/ebike-agent/agent.toml")))
    _systemd_accepts(unit, tmp_path)

    (tmp_path / "bench").mkdir()
    bench = Workshop(tmp_path / "bench", mosquitto)
    try:
        conffile = unit.path("/etc/ebike-agent/agent.toml")
        conffile.write_text(_config(bench, mosquitto))
        # First boot: the identity from the boot partition, secrets moved, the FAT side emptied.
        boot = unit.path("/boot/firmware/ebike-agent")
        boot.mkdir(parents=True)
        (boot / "provision.toml").write_text(f'device_id = "{DEVICE}"\n[broker]\nhost = "{mosquitto.host}"\n'
                                             f'port = {mosquitto.port}\nusername = "{DEVICE}"\npassword = "s3cret"\n')
        assert DEVICE in unit.run("ebike-agent", "provision")
        assert not list(boot.iterdir())
        assert conffile.stat().st_mode & 0o077 == 0 and conffile.stat().st_uid == uid
        manager = Manager(unit.path("/run/notify.sock"))
        os.chmod(manager.path, 0o777)
        unit.start()
        wait_for("READY=1 from the installed agent", lambda: manager.messages("READY=1"), 60 * SLOWER)
        wait_for("WATCHDOG=1 pings", lambda: len(manager.messages("WATCHDOG=1")) >= 2, 10 * SLOWER)
        cloud = bench.tmp / "cloud.sqlite"
        wait_for("records in the cloud", lambda: len(_seqs(cloud, "SELECT seq FROM records")) >= 10, 60 * SLOWER,
                 interval=0.5)
        st = unit.status()
        assert st is not None and st["kernel"] == "c" and st["version"] == __version__

        # SIGTERM mid-ride: gone within 2 s, nothing committed lost.
        pid = unit.agent_pid()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_for("the agent to exit", lambda: not Path(f"/proc/{pid}").exists()
                 or "zombie" in Path(f"/proc/{pid}/status").read_text(), 5, interval=0.02)
        assert time.monotonic() - t0 < 2.0 * SLOWER  # under qemu: emulated, not a unit's speed
        _nothing_lost(unit, cloud)
        wait_for("the supervisor's restart", lambda: unit.agent_pid() != pid and unit.status() is not None, 30 * SLOWER)

        # An upgrade keeps the outbox and the configuration, and update-guard sees it healthy.
        config_before = hashlib.sha256(conffile.read_bytes()).hexdigest()
        committed_before = _committed(unit.path("/var/lib/ebike-agent/outbox.sqlite"))
        unit.install(repack(package, f"{__version__}+1", tmp_path))
        guard_log = unit.path("/var/lib/ebike-agent/update-guard.log")
        wait_for("update-guard to pass the new version", lambda: "is healthy" in guard_log.read_text()
                 if guard_log.exists() else False, 60 * SLOWER, interval=0.5)
        assert hashlib.sha256(conffile.read_bytes()).hexdigest() == config_before
        assert _committed(unit.path("/var/lib/ebike-agent/outbox.sqlite")) > committed_before
        assert f"Version: {__version__}+1" in unit.run("dpkg", "-s", "ebike-agent")
        _nothing_lost(unit, cloud)

        # A version that cannot start: rolled back to the one before, and the cloud told.
        unit.install(repack(package, f"{__version__}+2", tmp_path, break_it=True))
        wait_for("update-guard to roll back", lambda: "rolling back" in guard_log.read_text(), 60 * SLOWER,
                 interval=0.5)
        assert "broken on purpose" in unit.path("/var/lib/ebike-agent/agent.log").read_text()
        wait_for("the previous version running again", lambda: _acked_since_start(unit), 60 * SLOWER, interval=0.5)
        wait_for("the rollback reported to the cloud",
                 lambda: _seqs(cloud, "SELECT seq FROM records WHERE kind='upd'"), 30, interval=0.5)
        with sqlite3.connect(f"file:{cloud}?mode=ro", uri=True) as c:
            (body,) = c.execute("SELECT body FROM records WHERE kind='upd'").fetchone()
        report = cbor2.loads(body)
        assert report["failed"] == f"{__version__}+2" and report["running"] == f"{__version__}+1"
        assert not unit.path("/var/lib/ebike-agent/update-failed.json").exists()
        assert not unit.path("/opt/ebike-agent/previous").exists()
        _nothing_lost(unit, cloud)
        manager.close()
    finally:
        bench.close()
