"""The kernel's stationary decision (``Kernel.motion``) in words and in JSON, for the
interlock's reasons and ``ebike-agent status``: a technician and the fleet operator see
which source said what, not just "waiting"."""

from __future__ import annotations

from typing import Any

from agent.fusion.spec import MOTION_MOVING, MOTION_STILL, VOTE_ABSENT, VOTE_MOVING, VOTE_NAMES, VOTE_STILL

VERDICTS = {MOTION_STILL: "still", MOTION_MOVING: "moving"}
# (label in words, key in JSON, unit, format) of each input, in the kernel's order.
INPUTS = (("wheel", "wheel_kmh", "km/h", "{:.1f}"), ("GNSS", "gnss_kmh", "km/h", "{:.1f}"),
          ("motor", "motor_a", "A", "{:.1f}"), ("cadence", "cadence_rpm", "rpm", "{:.0f}"))


def _inputs(motion: tuple[Any, ...]) -> list[tuple[str, str, str, str, int, float]]:
    return [(label, key, unit, fmt, motion[1 + 2 * k], motion[2 + 2 * k])
            for k, (label, key, unit, fmt) in enumerate(INPUTS)]


def words(motion: tuple[Any, ...]) -> str:
    """``wheel 21.4 km/h, GNSS 0.0 km/h disagree``: each input heard and the decision."""
    parts = []
    votes = set()
    for label, _key, unit, fmt, vote, value in _inputs(motion):
        if vote == VOTE_ABSENT:
            continue
        votes.add(vote)
        if vote in (VOTE_STILL, VOTE_MOVING):
            parts.append(f"{label} {fmt.format(value)} {unit}")
        else:
            parts.append(f"{label} {VOTE_NAMES[vote]}")
    heard = ", ".join(parts) or "no source"
    if motion[0] == MOTION_MOVING:
        return f"{heard} disagree" if VOTE_STILL in votes else f"{heard}: moving"
    if motion[0] == MOTION_STILL:
        return f"{heard}: still"
    return f"{heard}: no wheel or GNSS speed to tell"


def to_json(motion: tuple[Any, ...], still_s: float) -> dict[str, Any]:
    """The decision, how long it has been still, and each input's value and vote."""
    out: dict[str, Any] = {"verdict": VERDICTS.get(motion[0], "unknown"), "still_s": still_s,
                           "top_kmh": motion[9] if motion[9] >= 0 else None, "why": words(motion)}
    for _label, key, _unit, _fmt, vote, value in _inputs(motion):
        out[key.rsplit("_", 1)[0]] = {"vote": VOTE_NAMES[vote], key: None if vote == VOTE_ABSENT else value}
    return out
