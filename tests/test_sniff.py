"""agent.protocols.sniff names what a byte stream speaks: on the real captures of
../shared/data, and on bytes the simulator's encoders make (what a swapped cable puts on
a port); random bytes, and a few frames lost in them, name nothing."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocols import UART_PROTOCOLS, protocol
from agent.protocols.sniff import identify, reader
from agent.protocols.surron import read_surron_log
from firmware_sim.encoders import bafang, daly, jbd, kt, ninebot, nmea, surron
from firmware_sim.vehicle import Vehicle

WINDOW = 4096


def middle(data: bytes, size: int = WINDOW) -> bytes:
    """``size`` bytes from the middle of ``data``: a window cut mid-frame at both ends,
    as the runtime's last bytes of a source are."""
    start = max(0, (len(data) - size) // 2)
    return data[start:start + size]


def answers(name: str, serve: Callable[[Any, bytes], Any], rounds: int = 6) -> bytes:
    """What the simulated device answers to the agent's own poll requests of ``name``."""
    v = Vehicle(seed=3)
    out = b""
    for _ in range(rounds):
        for req in protocol(name).poll_requests:
            got = serve(v, req)
            if got is not None:
                out += got[0]
    return out


def nmea_fixes(n: int = 20) -> bytes:
    out = b""
    for i in range(n):
        out += nmea.gga(1000 + i, 48.137, 11.575, 1, 9, 0.9, 520.0)[0]
        out += nmea.rmc(1000 + i, 48.137, 11.575, 21.5, 93.0)[0]
    return out


def streamed(encode: Callable[[Vehicle], tuple[bytes, Any]], n: int = 30) -> bytes:
    v = Vehicle(seed=5)
    return b"".join(encode(v)[0] for _ in range(n))


SIMULATED = {
    "nmea": nmea_fixes,
    "jbd": lambda: answers("jbd", jbd.serve),
    "daly": lambda: answers("daly", daly.serve),
    "ninebot": lambda: answers("ninebot", ninebot.serve),
    "kt-lcd3": lambda: streamed(kt.from_vehicle),
    "surron": lambda: streamed(surron.from_vehicle),
}


def test_every_uart_protocol_has_a_simulated_stream() -> None:
    assert set(SIMULATED) == set(UART_PROTOCOLS)


@pytest.mark.parametrize("name", sorted(SIMULATED))
def test_each_simulated_protocol_is_named_first(name: str) -> None:
    data = SIMULATED[name]()
    found = identify(data)
    assert found, f"{name}: nothing named"
    assert found[0][0] == name
    assert found[0][1] >= 5


@pytest.mark.parametrize("capture", ["beidou-bd.log", "beidou-gb.log", "haicom-305N.log"])
def test_real_nmea_captures_are_nmea(shared_data: Path, capture: str) -> None:
    found = identify(middle((shared_data / "nmea_gpsd" / capture).read_bytes()))
    assert found[0][0] == "nmea"
    assert found[0][1] > 20


def test_real_candump_logs_are_candump(shared_data: Path) -> None:
    for log in sorted((shared_data / "bafang_can").glob("ride-*.log")):
        found = identify(middle(log.read_bytes()))
        assert found and found[0][0] == "candump", log.name


def test_real_surron_bus_bytes_are_surron(shared_data: Path) -> None:
    log = shared_data / "surron_lightbee_bms_rs485" / "output_2024-03-05_22-15-39_standup_gas_standown.log"
    data = b"".join(read_surron_log(log.read_text().splitlines()))
    found = identify(middle(data))
    assert found and found[0][0] == "surron"


def test_slcan_text_is_slcan() -> None:
    lines = b"".join(bafang.slcan_frame(0x82F83201 + i % 3, bytes((i, 1, 2, 3, 4, 5, 6, 7)),
                                        timestamp_ms=i * 10 if i % 2 else None) for i in range(60))
    assert identify(b"67\r" + lines + b"T0000") == [("slcan", 60)]


def test_the_jbd_answers_on_a_port_beside_their_requests() -> None:
    """A one-wire bus echoes the host's requests: the answers still name JBD."""
    polls = protocol("jbd").poll_requests
    found = identify(b"".join(polls) * 6 + answers("jbd", jbd.serve))
    assert found[0] == ("jbd", 6 * len(polls))


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_name_nothing(seed: int) -> None:
    rng = random.Random(seed)
    assert identify(bytes(rng.getrandbits(8) for _ in range(WINDOW))) == []


def test_a_few_frames_in_much_garbage_name_nothing() -> None:
    """Frames that explain under a quarter of the bytes could be chance (a wrong baud
    rate's garbage): not named. Above it, they are."""
    frames = answers("jbd", jbd.serve, rounds=1)
    rng = random.Random(7)
    noise = bytes(rng.getrandbits(8) for _ in range(len(frames) * 4))
    assert identify(noise[:len(frames) * 3] + frames) != []
    assert identify(noise + frames) == []


def test_nothing_and_a_cut_line_name_nothing() -> None:
    assert identify(b"") == []
    sentence = nmea.gga(1000, 48.137, 11.575, 1, 9, 0.9, 520.0)[0]
    assert identify(sentence) == [("nmea", 1)]
    assert identify(sentence[:-2]) == []


def test_it_is_cheap_on_a_few_kilobytes(shared_data: Path) -> None:
    data = middle((shared_data / "nmea_gpsd" / "haicom-305N.log").read_bytes())
    noise = bytes(random.Random(1).getrandbits(8) for _ in range(WINDOW))
    start = time.perf_counter()
    for _ in range(10):
        identify(data)
        identify(noise)
    assert (time.perf_counter() - start) / 20 < 0.05


@pytest.mark.parametrize("name", ["nmea", "jbd", "slcan"])
def test_a_reader_fed_in_pieces_finds_what_it_finds_in_one(name: str) -> None:
    """selftest reads a port in whatever pieces arrive: a frame cut between two reads counts once."""
    data = {"nmea": nmea_fixes(), "jbd": SIMULATED["jbd"](),
            "slcan": b"".join(bafang.slcan_frame(0x82F83201, bytes((i,) * 8)) for i in range(40))}[name]
    whole = reader(name).feed(data)
    pieces = reader(name)
    got = [frame for i in range(0, len(data), 7) for frame in pieces.feed(data[i:i + 7])]
    assert got == whole
    assert len(got) >= 12
