"""The power-loss input (agent/power.py, ``[power]``): its configuration, each kind of
input on real files, FIFOs and (where the kernel has gpio-sim) GPIO lines, and the
agent riding against the simulator that stops on it as on SIGTERM: within 2 s, exit 0,
nothing committed lost, its last state published."""

from __future__ import annotations

import os
import selectors
import sqlite3
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.config import PowerConfig, load
from agent.errors import ConfigError
from agent.power import FILE_POLL_S, FifoInput, FileInput, LossInput, gpiod_problem, open_input
from devtools.broker import Mosquitto
from tests.helpers import log_has, stop, wait_for
from tests.test_notify import _retained_state
from tests.workshop import DEVICE, Workshop

GPIO_SIM = Path("/sys/kernel/config/gpio-sim")


def load_power(tmp_path: Path, table: str) -> PowerConfig:
    path = tmp_path / "agent.toml"
    path.write_text(f"""device_id = "bike-1"
[[sources]]
name = "gnss"
kind = "uart"
port = "/dev/ttyGNSS"
protocol = "nmea"

[power]
{table}
""")
    return load(str(path)).power


def refusal(tmp_path: Path, table: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_power(tmp_path, table)
    assert info.value.path == str(tmp_path / "agent.toml")
    return info.value


@pytest.fixture
def gpiod_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config checks only that libgpiod's v2 bindings import: a stand-in with their entry point."""
    monkeypatch.setitem(sys.modules, "gpiod", types.SimpleNamespace(request_lines=None, __file__="fake"))


def test_no_power_section_means_no_input(tmp_path: Path) -> None:
    power = load_power(tmp_path, "")
    assert power == PowerConfig() and power.kind == ""
    assert type(open_input(power, "agent.toml")) is LossInput


def test_file_inputs_are_made_absolute_beside_the_config(tmp_path: Path) -> None:
    assert load_power(tmp_path, 'loss_input = "file:/run/ebike-agent/power-lost"').path == \
        "/run/ebike-agent/power-lost"
    power = load_power(tmp_path, 'loss_input = "file:run/power-lost"')
    assert (power.kind, power.path) == ("file", str(tmp_path / "run" / "power-lost"))
    assert power.loss_input == f"file:{tmp_path}/run/power-lost"


@pytest.mark.usefixtures("gpiod_v2")
def test_gpio_inputs_take_a_chip_a_line_active_low_and_a_bias(tmp_path: Path) -> None:
    power = load_power(tmp_path, 'loss_input = "gpio:gpiochip0:17"')
    assert (power.kind, power.path, power.line, power.active_low, power.bias) == \
        ("gpio", "/dev/gpiochip0", "17", False, "as-is")
    power = load_power(tmp_path, 'loss_input = "gpio:/dev/gpiochip4:GPIO17"\nactive_low = true\nbias = "pull-up"')
    assert (power.path, power.line, power.active_low, power.bias) == ("/dev/gpiochip4", "GPIO17", True, "pull-up")


@pytest.mark.parametrize(("table", "key", "reason"), [
    ('loss_input = "/run/power-lost"', "power.loss_input", '"file:<path>" or "gpio:<chip>:<line>"'),
    ('loss_input = "usb:3"', "power.loss_input", "not 'usb:3'"),
    ("loss_input = 17", "power.loss_input", "must be str, not int"),
    ('loss_input = "file:"', "power.loss_input", "file: needs a path"),
    ('loss_input = "file"', "power.loss_input", "file: needs a path"),
    ('loss_input = "gpio:/dev/gpiochip0"', "power.loss_input", "gpio: needs a chip and a line"),
    ('loss_input = "gpio::17"', "power.loss_input", "gpio: needs a chip and a line"),
    ('loss_input = "file:/run/x"\nactive_low = true', "power.active_low", 'applies to a "gpio:" loss_input'),
    ('bias = "pull-up"', "power.bias", 'applies to a "gpio:" loss_input'),
    ('loss_input = "gpio:gpiochip0:17"\nbias = "up"', "power.bias", "must be one of as-is, pull-up"),
    ('loss_input = "gpio:gpiochip0:17"\nactive_low = "yes"', "power.active_low", "must be bool, not str"),
    ('loss_inputs = "file:/run/x"', "power.loss_inputs", "unknown key (known: active_low, bias, loss_input)"),
])
@pytest.mark.usefixtures("gpiod_v2")
def test_bad_power_values_name_the_key(tmp_path: Path, table: str, key: str, reason: str) -> None:
    err = refusal(tmp_path, table)
    assert err.key == key and reason in err.reason, str(err)


def test_a_power_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "b"\npower = "gpio"\n[[sources]]\nname = "g"\nkind = "uart"\nport = "/dev/x"\n'
                    'protocol = "nmea"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (info.value.key, info.value.reason) == ("power", "must be a table")


def test_gpio_without_libgpiod_refuses_the_start_and_says_what_to_install(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiod", None)  # import gpiod raises ImportError
    err = refusal(tmp_path, 'loss_input = "gpio:gpiochip0:17"')
    assert err.key == "power.loss_input"
    assert "pip install gpiod" in err.reason and "python3-libgpiod" in err.reason, err.reason
    load_power(tmp_path, 'loss_input = "file:/run/x"')  # only a gpio: input needs it


def test_libgpiod_version_1_bindings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's python3-libgpiod is libgpiod 1.6: no request_lines, another API."""
    monkeypatch.setitem(sys.modules, "gpiod", types.SimpleNamespace(Chip=None, __file__="/usr/lib/gpiod.so"))
    err = refusal(tmp_path, 'loss_input = "gpio:gpiochip0:17"')
    assert err.key == "power.loss_input" and "version 1" in err.reason and "gpiod>=2" in err.reason, err.reason


# --- the inputs, on real files ----------------------------------------------------------

def test_a_file_fires_when_it_appears_checked_every_poll(tmp_path: Path) -> None:
    path = tmp_path / "power-lost"
    watch = open_input(PowerConfig(loss_input=f"file:{path}"), "agent.toml")
    assert isinstance(watch, FileInput) and watch.fileno() is None
    assert not watch.lost(100.0)
    path.touch()
    assert not watch.lost(100.0 + FILE_POLL_S / 2)  # checked at most every FILE_POLL_S
    assert watch.lost(100.0 + FILE_POLL_S)
    assert watch.lost(200.0)  # said once, stays said


def test_a_file_there_at_the_start_is_stale_until_touched_or_made_again(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "power-lost"
    path.write_text("")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    watch = FileInput(str(path))
    assert "there at the start" in caplog.text
    assert not watch.lost(1.0) and not watch.lost(2.0)
    os.utime(path)  # touched now
    assert watch.lost(3.0)
    again = FileInput(str(path))
    path.unlink()
    assert not again.lost(1.0)
    path.write_text("lost")
    assert again.lost(2.0)


def test_a_fifo_fires_on_a_byte_through_the_selector(tmp_path: Path) -> None:
    path = tmp_path / "power-lost"
    os.mkfifo(path)
    watch = open_input(PowerConfig(loss_input=f"file:{path}"), "agent.toml")
    assert isinstance(watch, FifoInput)
    with selectors.DefaultSelector() as sel:
        watch.register(sel)
        assert sel.select(0.05) == []  # no writer: neither readable nor end-of-file
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # opens: the agent holds it open
        os.close(writer)
        assert sel.select(0.05) == [] and not watch.lost(1.0)  # a writer that wrote nothing says nothing
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"\n")
        os.close(writer)
        ready = sel.select(1.0)
        assert [key.data for key, _ in ready] == [watch]
        watch.read()
        assert watch.lost(1.0)
        assert sel.select(0.05) == []  # drained: the loop does not spin on it
    watch.close()
    watch.close()


def test_bytes_left_in_a_fifo_before_the_start_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "power-lost"
    os.mkfifo(path)
    holder = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a daemon that keeps it open and wrote before
    os.write(holder, b"x")
    try:
        watch = FifoInput(str(path))
        assert "held bytes" in caplog.text
        watch.read()
        assert not watch.lost(1.0)
        os.write(holder, b"x")
        watch.read()
        assert watch.lost(1.0)
        watch.close()
    finally:
        os.close(holder)


needs_gpiod = pytest.mark.skipif(gpiod_problem() is not None,
                                 reason=f"libgpiod's v2 Python bindings absent: {gpiod_problem()}")


@needs_gpiod
@pytest.mark.parametrize(("chip", "reason"), [
    ("/dev/no-such-gpiochip", "/dev/no-such-gpiochip: No such file or directory"),
    ("/dev/null", "/dev/null: No such device"),
])
def test_a_gpio_chip_that_is_not_there_refuses_the_start(chip: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_input(PowerConfig(loss_input=f"gpio:{chip}:3"), "agent.toml")
    assert (info.value.key, info.value.reason) == ("power.loss_input", reason)


# --- the agent riding, its power cut -------------------------------------------------------

@pytest.fixture
def bench(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Callable[[str], Workshop]]:
    """The workshop bench with ``extra`` in the agent's configuration (the agent not started)."""
    made: list[Workshop] = []

    def make(extra: str) -> Workshop:
        made.append(Workshop(tmp_path, mosquitto, extra=extra))
        return made[-1]

    yield make
    for b in made:
        b.close()


def _seqs(bench: Workshop) -> tuple[set[int], set[int], set[int]]:
    """(every seq the outbox ever gave, those it holds, those the cloud stored)."""
    with sqlite3.connect(f"file:{bench.outbox}?mode=ro", uri=True, timeout=2.0) as c:
        (next_seq,) = c.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        held = {seq for (seq,) in c.execute("SELECT seq FROM records")}
    with sqlite3.connect(f"file:{bench.tmp / 'cloud.sqlite'}?mode=ro", uri=True, timeout=2.0) as c:
        cloud = {seq for (seq,) in c.execute("SELECT seq FROM records WHERE device = ?", (DEVICE,))}
    return set(range(1, int(next_seq))), held, cloud


def _cut_power(bench: Workshop, cut: Callable[[], None]) -> None:
    """``cut()`` under the riding agent: it exits 0 within 2 s, having said why, and its
    last state (offline) is the broker's retained one."""
    agent = bench.agent
    assert agent is not None and agent.poll() is None
    t0 = time.monotonic()
    cut()
    rc = agent.wait(10)
    took = time.monotonic() - t0
    bench.agent = None
    assert rc == 0, rc
    assert took < 2.0, took
    assert log_has(bench.log, "power lost") and log_has(bench.log, "agent stopped")
    assert _retained_state(bench)["online"] is False


@pytest.mark.e2e
def test_a_power_loss_file_stops_the_agent_with_a_backlog_in_flight(bench: Callable[[str], Workshop],
                                                                     tmp_path: Path) -> None:
    """The worst case, as for SIGTERM: connected, a backlog out, a cloud that never
    acknowledges. Within 2 s of the file appearing the agent is gone, and every record it
    ever committed is still in its outbox."""
    lost = tmp_path / "run" / "power-lost"  # its directory made only later
    b = bench('\n[power]\nloss_input = "file:run/power-lost"\n')
    stop(b.consumer)
    b.start_agent()
    wait_for("a backlog of 5 records", lambda: len(_seqs(b)[1]) >= 5, 30, interval=0.2)
    lost.parent.mkdir()
    _cut_power(b, lost.touch)
    committed, held, cloud = _seqs(b)
    assert held == committed and not cloud, (len(committed), len(held), len(cloud))


@pytest.mark.e2e
def test_a_byte_on_a_power_loss_fifo_stops_the_agent_and_nothing_is_lost(bench: Callable[[str], Workshop],
                                                                          tmp_path: Path) -> None:
    """With the cloud acknowledging: what the agent committed is in its outbox or in the cloud."""
    fifo = tmp_path / "power-fifo"
    os.mkfifo(fifo)
    b = bench(f'\n[power]\nloss_input = "file:{fifo}"\n')
    b.start_agent()
    wait_for("records in the cloud", lambda: len(_seqs(b)[2]) >= 5, 30, interval=0.2)

    def write() -> None:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO if the agent did not hold it open
        os.write(fd, b"1")
        os.close(fd)

    _cut_power(b, write)
    committed, held, cloud = _seqs(b)
    assert committed <= held | cloud, sorted(committed - held - cloud)[:10]
    assert log_has(b.log, f"power lost (a byte on {fifo})")


def _gpio_sim_missing() -> str | None:
    if gpiod_problem():
        return f"libgpiod's v2 Python bindings absent: {gpiod_problem()}"
    if not GPIO_SIM.is_dir():
        return (f"no gpio-sim: {GPIO_SIM} does not exist (a kernel without CONFIG_GPIO_SIM, the module not "
                "loaded (modprobe gpio-sim), or configfs not mounted at /sys/kernel/config)")
    if not os.access(GPIO_SIM, os.W_OK):
        return f"gpio-sim chips are made by root: {GPIO_SIM} is not writable"
    return None


@contextmanager
def sim_chip(name: str) -> Iterator[tuple[str, Path]]:
    """A simulated GPIO chip of 8 lines: its device, and the sysfs directory whose
    ``sim_gpio<N>/pull`` drives line N (Documentation/admin-guide/gpio/gpio-sim.rst)."""
    dev = GPIO_SIM / name
    bank = dev / "gpio-bank0"
    dev.mkdir()
    try:
        bank.mkdir()
        try:
            (bank / "num_lines").write_text("8")
            (dev / "live").write_text("1")
            try:
                chip = (bank / "chip_name").read_text().strip()
                platform = (dev / "dev_name").read_text().strip()
                yield f"/dev/{chip}", Path("/sys/devices/platform") / platform / chip
            finally:
                (dev / "live").write_text("0")
        finally:
            bank.rmdir()
    finally:
        dev.rmdir()


@pytest.mark.e2e
@pytest.mark.parametrize("active_low", [False, True])
def test_a_gpio_line_going_active_stops_the_agent(bench: Callable[[str], Workshop], tmp_path: Path,
                                                   active_low: bool) -> None:
    """gpio-sim's line 3 pulled into its active level (up; down when active low)."""
    missing = _gpio_sim_missing()
    if missing:
        pytest.skip(missing)
    with sim_chip(f"ebike-power-{os.getpid()}-{tmp_path.name}") as (chip, sysfs):
        pull = sysfs / "sim_gpio3" / "pull"
        pull.write_text("pull-up" if active_low else "pull-down")  # inactive: power good
        b = bench(f'\n[power]\nloss_input = "gpio:{chip}:3"\nactive_low = {str(active_low).lower()}\n')
        b.start_agent()
        _cut_power(b, lambda: pull.write_text("pull-down" if active_low else "pull-up"))
        committed, held, cloud = _seqs(b)
        assert committed <= held | cloud
