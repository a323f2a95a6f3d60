"""How long a busy turn of the agent's loop lasts (agent/runtime.py ``busy_turn``): short
enough that the busiest source never brings more than READ_AHEAD bytes a turn (a tty
buffers 4 KiB), long enough that a slow stream is read in few turns."""

from __future__ import annotations

import pytest

from agent.runtime import MAX_BUSY_TURN, MIN_BUSY_TURN, READ_AHEAD, busy_turn

SATURATED_SLCAN = 8400 * 27  # bytes/s: a saturated 1 Mbit/s bus as SLCAN text
COMMUTE_SLCAN = 64 * 27      # the commute's own 64 CAN frames/s
UART_115200 = 11520          # a saturated 115200-baud UART


@pytest.mark.parametrize("bytes_per_s", [SATURATED_SLCAN, COMMUTE_SLCAN, UART_115200, 1.0, 1e9, READ_AHEAD * 40])
def test_a_turn_never_lets_the_busiest_source_pass_its_read_ahead(bytes_per_s: float) -> None:
    turn = busy_turn(bytes_per_s)
    assert MIN_BUSY_TURN <= turn <= MAX_BUSY_TURN
    assert turn * bytes_per_s <= READ_AHEAD or turn == MIN_BUSY_TURN


def test_a_saturated_bus_keeps_short_turns_and_a_commute_long_ones() -> None:
    assert busy_turn(SATURATED_SLCAN) == MIN_BUSY_TURN
    assert busy_turn(COMMUTE_SLCAN) == MAX_BUSY_TURN
    assert busy_turn(0.0) == MAX_BUSY_TURN, "nothing read in the last second: the longest turn"
    assert MIN_BUSY_TURN < busy_turn(READ_AHEAD * 40) < MAX_BUSY_TURN
