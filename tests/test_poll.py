"""The poller: one request outstanding, round robin, timeouts, answers matched per protocol."""

import pytest

from agent.protocols import jbd, protocol
from agent.protocols.poll import Poller

R3 = bytes.fromhex("DDA50300FFFD77")
R4 = bytes.fromhex("DDA50400FFFC77")
# register 04 answer with one cell of 3300 mV: chk = 0x10000 - (00 + 02 + 0C + E4) = FF0E
ANSWER4 = bytes.fromhex("DD0400020CE4FF0E77")
ANSWER3_ERROR = bytes.fromhex("DD038000FF8077")


def test_round_robin_one_outstanding_and_timeouts():
    p = Poller([R3, R4], interval=1.0, timeout=0.5, match=jbd.match)
    assert p.due(0.0) == R3
    assert p.due(0.2) is None  # outstanding
    assert p.answered(ANSWER3_ERROR)  # an error reply still answers the request
    assert p.due(0.5) is None  # answered, but the interval has not passed
    assert p.due(1.0) == R4
    assert p.due(1.49) is None
    assert p.due(1.5) is None  # timed out at 1.5 but next due at 2.0
    assert p.timeouts == 1
    assert p.due(2.0) == R3
    assert not p.answered(ANSWER4)  # answers 04, but 03 is outstanding
    assert p.stats() == {"sent": 3, "answered": 1, "timeouts": 1, "unsolicited": 1, "echoes": 0}


def test_timeout_longer_than_interval_waits_for_the_timeout():
    p = Poller([R3], interval=0.1, timeout=1.0, match=jbd.match)
    assert p.due(0.0) == R3
    assert p.due(0.5) is None
    assert p.due(1.0) == R3
    assert (p.sent, p.timeouts) == (2, 1)


def test_echo_of_own_request_is_not_unsolicited():
    p = protocol("ninebot").poller(interval=0.2, timeout=0.1)
    req = p.due(0.0)
    assert req == bytes.fromhex("55AA0322013 10A9EFF".replace(" ", ""))  # BMS read of 31, 10 bytes
    assert not p.answered(req)
    assert (p.echoes, p.unsolicited) == (1, 0)


def test_registry_pollers():
    assert protocol("jbd").poller(1.0, 0.5).requests == (R3, R4)
    assert protocol("daly").poll_requests[0][:3] == b"\xa5\x80\x90"
    with pytest.raises(ValueError):
        protocol("surron").poller(1.0, 0.5)
    with pytest.raises(ValueError):
        Poller([], 1.0, 0.5, jbd.match)
    with pytest.raises(ValueError):
        protocol("jbd", circumference_mm=2000)
    with pytest.raises(KeyError):
        protocol("can-open")
