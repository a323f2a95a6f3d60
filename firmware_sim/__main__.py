"""``python -m firmware_sim``: the ebike-sim command."""

import sys

from firmware_sim.cli import main

sys.exit(main())
