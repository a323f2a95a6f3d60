"""A private mosquitto for tests and ``make run``: loopback only, a free port, a
generated config, started and stopped by pid. Nothing here touches a system broker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

START_TIMEOUT = 10.0
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


class BrokerMissing(RuntimeError):
    """mosquitto is not installed; the message says how to get it."""


def mosquitto_path() -> str:
    path = shutil.which("mosquitto", path=SEARCH_PATH)
    if path is None:
        raise BrokerMissing("mosquitto is not installed: run 'sudo apt-get install mosquitto' "
                            "(make test and make run do it themselves when run as root)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process on 127.0.0.1:<free port>, with its own config and log.
    ``users`` (name -> password): only they may connect (a password file, no anonymous
    clients)."""

    def __init__(self, workdir: str | None = None, extra_config: str = "", users: dict[str, str] | None = None) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="ebike-mosquitto-")
        self.extra_config = extra_config
        self.users = users or {}
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.workdir, "mosquitto.log")

    def start(self) -> Mosquitto:
        binary = mosquitto_path()
        auth = self._password_file() if self.users else "allow_anonymous true\n"
        for _attempt in range(3):
            self.port = free_port()
            conf = os.path.join(self.workdir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {self.port} 127.0.0.1\n{auth}persistence false\n"
                        f"log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
                        f"{self.extra_config}")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([binary, "-c", conf], stdout=log, stderr=log, start_new_session=True)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"mosquitto did not start; see {self.log_path}")

    def _password_file(self) -> str:
        """Write the users' password file with mosquitto_passwd; the config lines using it."""
        passwd = shutil.which("mosquitto_passwd", path=SEARCH_PATH)
        if passwd is None:
            raise BrokerMissing("mosquitto_passwd is not installed (it comes with the mosquitto package)")
        path = os.path.join(self.workdir, "passwords")
        for i, (name, password) in enumerate(self.users.items()):
            subprocess.run([passwd, "-b", *(["-c"] if i == 0 else []), path, name, password], check=True,
                           capture_output=True, timeout=30)
        # As root, mosquitto drops to its own user, which may not read a private work dir.
        return f"allow_anonymous false\npassword_file {path}\n" + ("user root\n" if os.geteuid() == 0 else "")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
