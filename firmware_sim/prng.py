"""Deterministic pseudo-random numbers (xorshift32).

Python's random module differs between CPython and MicroPython, so the simulator
carries its own generator: the same seed gives the same integer sequence on both.
"""

import math

_MASK = 0xFFFFFFFF
_TWO_PI = 2.0 * math.pi


def _mix(seed):
    # One round of a 32-bit integer hash so that small, close seeds (1, 2, 3)
    # start far apart; xorshift needs a non-zero state.
    x = (seed & _MASK) ^ 0x9E3779B9
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK
    x ^= x >> 16
    if x == 0:
        x = 0x6D2B79F5
    return x


class Prng:
    """xorshift32 (Marsaglia 2003, triple 13/17/5); period 2**32 - 1."""

    def __init__(self, seed):
        self.state = _mix(int(seed))
        self._spare = None

    def next_u32(self):
        x = self.state
        x ^= (x << 13) & _MASK
        x ^= x >> 17
        x ^= (x << 5) & _MASK
        self.state = x
        return x

    def random(self):
        """Uniform float in [0, 1)."""
        return self.next_u32() / 4294967296.0

    def uniform(self, a, b):
        return a + (b - a) * self.random()

    def randint(self, a, b):
        """Integer in [a, b], both ends included."""
        return a + self.next_u32() % (b - a + 1)

    def gauss(self, mu=0.0, sigma=1.0):
        """Normal deviate by Box-Muller; the second value of each pair is kept."""
        if self._spare is not None:
            z = self._spare
            self._spare = None
            return mu + sigma * z
        u1 = (self.next_u32() + 1) / 4294967297.0
        u2 = self.random()
        r = math.sqrt(-2.0 * math.log(u1))
        self._spare = r * math.sin(_TWO_PI * u2)
        return mu + sigma * r * math.cos(_TWO_PI * u2)
