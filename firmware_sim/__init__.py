"""Vehicle simulator: emits the bus traffic of an e-bike so the agent runs without hardware.

The core (prng, vehicle, encoders, scenario) uses only what MicroPython has, so the
same seed gives the same frames on a desktop and on a microcontroller. The pty and
command-line glue (link, manifest, cli) is CPython only.
"""
