"""The fusion kernel, compiled and pure: decoding through compiled DBC tables (against
cantools), window aggregation, and the two builds against each other on random input."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from agent.dbc.compile import compile_dbc, frame_key, load_cantools, profile_path
from agent.fusion import kernel as kernel_module
from agent.fusion.kernel import KERNELS
from agent.signals import ID_SPACE, signal_id
from tests.conftest import BUILD_REQUIRED

KINDS_DBC = str(Path(__file__).parent / "data" / "kinds.dbc")
SPEED = signal_id("Vehicle.Speed")
VOLTAGE = signal_id("Vehicle.Powertrain.TractionBattery.CurrentVoltage")


def make(kernel_cls: Any, path: str, window: float = 1.0) -> tuple[Any, Any]:
    dbc = compile_dbc(path)
    k = kernel_cls(dbc.id_space, window)
    k.set_can_tables(*dbc.kernel_tables())
    return k, dbc


def random_frames(db: Any, n: int, seed: int) -> list[tuple[int, bytes, Any]]:
    """(kernel key, payload, cantools message) for random payloads of the DBC's messages."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choice(db.messages)
        out.append((frame_key(m.frame_id, m.is_extended_frame), rng.randbytes(rng.randint(m.length, 8)), m))
    return out


def test_selected_kernel_matches_the_environment() -> None:
    """EBIKE_AGENT_PUREPYTHON=1 selects the pure twin; a required build must be the one in
    use otherwise, so a silent fallback to the pure kernel cannot pass CI."""
    if kernel_module.PURE_REQUESTED:
        assert kernel_module.BUILD == "py" and kernel_module.Kernel is KERNELS["py"]
    elif BUILD_REQUIRED:
        assert kernel_module.BUILD == "c" and kernel_module.Kernel is KERNELS["c"]
    else:
        assert kernel_module.Kernel is KERNELS[kernel_module.BUILD]


@pytest.mark.parametrize("path", [KINDS_DBC, profile_path("bafang")], ids=["kinds", "bafang"])
def test_decode_matches_cantools_on_random_frames(kernel_cls: Any, path: str) -> None:
    """Every signal of 20,000 random frames decodes to exactly what cantools decodes."""
    k, dbc = make(kernel_cls, path)
    db = load_cantools(path)
    for key, data, msg in random_frames(db, 20000, seed=7):
        scaled = msg.decode(data, decode_choices=False, scaling=True)
        raw = msg.decode(data, decode_choices=False, scaling=False)
        first = dbc.msg_first[dbc.msg_index[key]]
        expected = [
            (dbc.sig_id[first + j], float(scaled[sig.name]))
            for j, sig in enumerate(msg.signals)
            if dbc.sig_no_value[first + j] < 0 or raw[sig.name] != dbc.sig_no_value[first + j]
        ]
        assert k.decode_frame(key, data) == expected, (msg.name, data.hex())


def test_windows_aggregate_min_max_mean_last_count(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    assert k.feed_values([SPEED, SPEED, VOLTAGE], [10.1, 10.5, 10.7], [20.0, 22.0, 36.5]) == []
    closed = k.feed_values([SPEED], [10.9], [24.0])
    assert closed == []
    closed = k.feed_values([SPEED], [11.2], [30.0])
    assert len(closed) == 1
    start, length, rows = closed[0]
    assert (start, length) == (10.0, 1.0)
    by_id = {r[0]: r for r in rows}
    assert by_id[SPEED] == (SPEED, 3, 20.0, 24.0, 22.0, 24.0, 10.9)
    assert by_id[VOLTAGE] == (VOLTAGE, 1, 36.5, 36.5, 36.5, 36.5, 10.7)
    assert k.flush() == [(11.0, 1.0, [(SPEED, 1, 30.0, 30.0, 30.0, 30.0, 11.2)])]
    assert k.flush() == []


def test_quiet_bus_window_closes_on_time(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.feed_values([SPEED], [5.5], [1.0])
    assert k.close_due(5.99) == []
    closed = k.close_due(6.0)
    assert [c[0] for c in closed] == [5.0]
    assert k.close_due(9.0) == []


def test_late_sample_goes_to_open_window_and_is_counted(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.feed_values([SPEED], [5.5], [1.0])
    k.feed_values([SPEED], [4.2], [3.0])
    assert k.counters()["late"] == 1
    assert k.flush()[0][2][0][1] == 2


def test_unknown_short_and_no_value_frames_are_counted(kernel_cls: Any) -> None:
    k, _ = make(kernel_cls, profile_path("bafang"))
    ctrl = frame_key(0x02F83201, True)
    k.feed_frames([frame_key(0x123, False), ctrl, ctrl], [b"\x00", b"\x01\x02", bytes.fromhex("6C091F05840D40FF")],
                  [1.0, 1.0, 1.0])
    c = k.counters()
    assert (c["unknown"], c["truncated"], c["frames"], c["no_value"]) == (1, 1, 1, 1)
    latest = {sid: v for sid, v, _ in k.latest()}
    assert latest[SPEED] == 24.12
    assert signal_id("Vehicle.Powertrain.ElectricMotor.Temperature") not in latest


def test_decode_frame_rejects_short_and_ignores_unknown(kernel_cls: Any) -> None:
    k, _ = make(kernel_cls, profile_path("bafang"))
    assert k.decode_frame(0x7FF, b"") is None
    with pytest.raises(ValueError, match="needs 8"):
        k.decode_frame(frame_key(0x02F83201, True), b"\x00" * 7)


def test_bad_tables_are_refused(kernel_cls: Any) -> None:
    from array import array

    k = kernel_cls(10, 1.0)
    with pytest.raises(ValueError, match="id space"):
        k.set_can_tables({1: 0}, array("i", [1]), array("i", [0]), array("i", [1]), array("b", [0]),
                         array("i", [0]), array("i", [8]), array("b", [0]), array("d", [1.0]),
                         array("d", [0.0]), array("i", [99]), array("q", [-1]))
    with pytest.raises(ValueError, match="window"):
        kernel_cls(10, 0)


def test_compiled_and_pure_agree_on_random_input() -> None:
    """Differential: the same random batches through both builds give identical output."""
    if "c" not in KERNELS:
        if BUILD_REQUIRED:
            pytest.fail("EBIKE_AGENT_BUILD_EXT=1 but the compiled kernel is not importable")
        pytest.skip("the compiled kernel was not built")
    rng = random.Random(42)
    kc, dbc = make(KERNELS["c"], KINDS_DBC, window=0.25)
    kp, _ = make(KERNELS["py"], KINDS_DBC, window=0.25)
    db = load_cantools(KINDS_DBC)
    t = 1000.0
    for _ in range(300):
        frames = random_frames(db, rng.randint(0, 200), seed=rng.randint(0, 1 << 30))
        frames += [(rng.randint(0, 0x7FF), rng.randbytes(rng.randint(0, 8)), None) for _ in range(5)]
        rng.shuffle(frames)
        times = []
        for _ in frames:
            t += rng.expovariate(2000.0) - (0.01 if rng.random() < 0.01 else 0.0)
            times.append(t)
        args = ([f[0] for f in frames], [f[1] for f in frames], times)
        assert kc.feed_frames(*args) == kp.feed_frames(*args)
        ids = [rng.randrange(dbc.id_space + 3) for _ in range(20)]
        vals = [rng.uniform(-1e6, 1e6) for _ in ids]
        vt = [t + rng.uniform(0, 0.1) for _ in ids]
        assert kc.feed_values(ids, vt, vals) == kp.feed_values(ids, vt, vals)
        due = t + rng.uniform(0, 0.5)
        assert kc.close_due(due) == kp.close_due(due)
    assert kc.flush() == kp.flush()
    assert kc.latest() == kp.latest()
    assert kc.counters() == kp.counters()
