"""The fusion kernel, compiled and pure: decoding through compiled DBC tables (against
cantools), window aggregation, and the two builds against each other on random input.
Fusion, alarms and capture have their own tests in tests/test_fusion.py."""

from __future__ import annotations

import functools
import random
import struct
from pathlib import Path
from typing import Any

import cantools
import pytest

from agent.dbc.compile import compile_dbc, compile_isolated, frame_key, load_cantools, profile_path
from agent.errors import ConfigError
from agent.fusion import kernel as kernel_module
from agent.fusion.kernel import KERNELS
from agent.fusion.spec import OUT_WINDOW, WIN_HISTORY, WIN_LIVE
from agent.signals import ID_SPACE, limits, signal_id
from tests.conftest import BUILD_REQUIRED, assert_same_outputs

KINDS_DBC = str(Path(__file__).parent / "data" / "kinds.dbc")
DIFFERENTIAL_FRAMES = 100_000
SPEED = signal_id("Vehicle.Speed")
VOLTAGE = signal_id("Vehicle.Powertrain.TractionBattery.CurrentVoltage")


@functools.cache
def compiled(path: str) -> Any:
    return compile_dbc(path)


def make(kernel_cls: Any, path: str, window: float = 1.0) -> tuple[Any, Any]:
    dbc = compiled(path)
    k = kernel_cls(dbc.id_space, window)
    k.set_can_tables(*dbc.kernel_tables())
    k.set_limits(*limits(dbc.id_space))
    return k, dbc


def windows(out: list[Any], which: int = WIN_LIVE) -> list[tuple[float, float, dict[int, Any]]]:
    """The closed windows of one set among a kernel's outputs: (start, length, rows by id)."""
    return [(o[2], o[3], {r[0]: r for r in o[4]}) for o in out if o[0] == OUT_WINDOW and o[1] == which]


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
    """Every signal of 100,000 random frames decodes to exactly what cantools decodes,
    multiplexed ones included (only the active branch is present)."""
    k, dbc = make(kernel_cls, path)
    db = load_cantools(path)
    for key, data, msg in random_frames(db, DIFFERENTIAL_FRAMES, seed=7):
        first = dbc.msg_first[dbc.msg_index[key]]
        rows = range(first, first + dbc.msg_count[dbc.msg_index[key]])
        ours_name = {dbc.sig_dbc_names[r]: dbc.sig_names[r] for r in rows}
        ours = {dbc.signal_name(sid): value for sid, value in k.decode_frame(key, data)}
        try:
            scaled = msg.decode(data, decode_choices=False, scaling=True)
            raw = msg.decode(data, decode_choices=False, scaling=False)
        except cantools.database.DecodeError:
            # A multiplexer value the DBC does not define: cantools refuses the frame, we
            # keep what is not multiplexed.
            plain = {ours_name[s.name] for s in msg.signals if not s.multiplexer_ids}
            assert set(ours) == plain, (msg.name, data.hex())
            continue
        na = {dbc.sig_dbc_names[r]: dbc.sig_no_value[r] for r in rows if dbc.sig_no_value[r] >= 0}
        expected = {
            ours_name[name]: float(value) for name, value in scaled.items()
            if name not in na or raw[name] != na[name]
        }
        assert ours == expected, (msg.name, data.hex())


def test_windows_aggregate_min_max_mean_last_count(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    assert windows(k.feed_values([SPEED, SPEED, VOLTAGE], [10.1, 10.5, 10.7], [20.0, 22.0, 36.5])) == []
    assert windows(k.feed_values([SPEED], [10.9], [24.0])) == []
    closed = windows(k.feed_values([SPEED], [11.2], [30.0]))
    assert len(closed) == 1
    start, length, rows = closed[0]
    assert (start, length) == (10.0, 1.0)
    assert rows[SPEED] == (SPEED, 3, 20.0, 24.0, 22.0, 24.0, 10.9)
    assert rows[VOLTAGE] == (VOLTAGE, 1, 36.5, 36.5, 36.5, 36.5, 10.7)
    last = windows(k.flush())
    assert [(w[0], w[1], w[2][SPEED]) for w in last] == [(11.0, 1.0, (SPEED, 1, 30.0, 30.0, 30.0, 30.0, 11.2))]
    assert k.flush() == []


def test_history_windows_cover_their_own_span(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0, 60.0)
    out = []
    for i in range(130):
        out += k.feed_values([VOLTAGE], [600.0 + i], [float(i)])
    hist = windows(out, WIN_HISTORY)
    assert [(w[0], w[1]) for w in hist] == [(600.0, 60.0), (660.0, 60.0)]
    assert hist[0][2][VOLTAGE][1:6] == (60, 0.0, 59.0, 29.5, 59.0)
    assert len(windows(out)) == 129


def test_quiet_bus_window_closes_on_time_and_stale_signals_stop(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.feed_values([SPEED], [5.5], [1.0])
    assert k.close_due(5.99) == []
    assert [w[0] for w in windows(k.close_due(6.0))] == [5.0]
    later = windows(k.close_due(9.0))
    # The fused speed follows the wheel only while it is fresh (1 s here), then stops.
    assert all(r[6] <= 6.5 for w in later for r in w[2].values())
    assert windows(k.close_due(12.0)) == []
    assert [s[4] for s in k.state(12.0) if s[0] == SPEED] == [True]
    assert [s[4] for s in k.state(6.0) if s[0] == SPEED] == [False]


def test_late_sample_goes_to_open_window_and_is_counted(kernel_cls: Any) -> None:
    k = kernel_cls(ID_SPACE, 1.0)
    k.feed_values([SPEED], [5.5], [1.0])
    k.feed_values([SPEED], [4.2], [3.0])
    assert k.counters()["late"] == 1
    assert windows(k.flush())[0][2][SPEED][1] == 2


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


def test_a_child_process_compiles_the_same_tables(tmp_path: Path) -> None:
    """The agent compiles its DBC in a child process (cantools never loads in the agent):
    the same tables, and a bad file refused the same way."""
    for path in (KINDS_DBC, profile_path("bafang")):
        ours = compile_isolated(path)
        assert ours.path == path and ours.to_json() == compiled(path).to_json()
        assert ours.kernel_tables() == compiled(path).kernel_tables()
    bad = tmp_path / "bad.dbc"
    bad.write_text('VERSION ""\nBO_ 100 M: 8 X\n SG_ S : 0|8@1+ (1,0) [0|1] "" X\n\n'
                   'BA_ "SignalName" SG_ 100 S "No.Such";\n')
    with pytest.raises(ConfigError) as direct:
        compile_dbc(str(bad))
    with pytest.raises(ConfigError) as child:
        compile_isolated(str(bad))
    assert (child.value.path, child.value.key, child.value.reason) == (str(bad), direct.value.key, direct.value.reason)


def test_decode_frame_rejects_short_and_ignores_unknown(kernel_cls: Any) -> None:
    k, _ = make(kernel_cls, profile_path("bafang"))
    assert k.decode_frame(0x7FF, b"") is None
    with pytest.raises(ValueError, match="needs 8"):
        k.decode_frame(frame_key(0x02F83201, True), b"\x00" * 7)


def test_bad_tables_are_refused(kernel_cls: Any) -> None:
    from array import array

    k = kernel_cls(ID_SPACE, 1.0)
    with pytest.raises(ValueError, match="id space"):
        k.set_can_tables({1: 0}, array("i", [1]), array("i", [0]), array("i", [1]), array("b", [0]),
                         array("i", [0]), array("i", [8]), array("b", [0]), array("d", [1.0]),
                         array("d", [0.0]), array("i", [ID_SPACE]), array("q", [-1]), array("i", [-1]),
                         array("q", [-1]), array("d", [0.0]), array("d", [1.0]))
    with pytest.raises(ValueError, match="window"):
        kernel_cls(ID_SPACE, 0)
    with pytest.raises(ValueError, match="id space"):
        kernel_cls(10, 1.0)
    with pytest.raises(ValueError, match="ring"):
        kernel_cls(ID_SPACE, 1.0, 60.0, 1000)


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
        assert_same_outputs(kc.feed_frames(*args), kp.feed_frames(*args))
        ids = [rng.randrange(dbc.id_space + 3) for _ in range(20)]
        vals = [rng.uniform(-1e6, 1e6) for _ in ids]
        vt = [t + rng.uniform(0, 0.1) for _ in ids]
        assert_same_outputs(kc.feed_values(ids, vt, vals), kp.feed_values(ids, vt, vals))
        due = t + rng.uniform(0, 0.5)
        assert_same_outputs(kc.close_due(due), kp.close_due(due))
        still_kmh = rng.uniform(0.5, 3.0)
        assert_same_outputs(kc.motion(due, still_kmh), kp.motion(due, still_kmh))
    assert kc.counters()["refused"] > 0, "random values must exercise the range and rate checks"
    assert_same_outputs(kc.refusals(0), kp.refusals(0))
    assert_same_outputs(kc.flush(), kp.flush())
    assert_same_outputs(kc.latest(), kp.latest())
    assert_same_outputs(kc.alarms(), kp.alarms())
    assert kc.counters() == kp.counters()


def _fmt_frames(frames: list[tuple[int, bytes, Any]]) -> tuple[bytes, bytes, bytes]:
    """The same frames as packed can_frame records, SLCAN text and candump -L text."""
    packed, slcan, cand = [], [], []
    for i, (key, data, _msg) in enumerate(frames):
        ext = bool(key & 0x80000000)
        can_id = key & 0x1FFFFFFF
        packed.append(struct.pack("=IB3x8s", key if ext else can_id, len(data), data))
        hid = b"%08X" % can_id if ext else b"%03X" % can_id
        slcan.append((b"T" if ext else b"t") + hid + b"%d" % len(data) + data.hex().upper().encode() + b"\r")
        cand.append(b"(1.%06d) can0 " % i + hid + b"#" + data.hex().encode() + (b" R\n" if i % 2 else b"\n"))
    return b"".join(packed), b"".join(slcan), b"".join(cand)


def test_packed_slcan_and_candump_feeds_decode_like_split_frames(kernel_cls: Any) -> None:
    """The three wire forms the sources deliver reach the same state as pre-split frames."""
    db = load_cantools(KINDS_DBC)
    frames = [f for f in random_frames(db, 3000, seed=11) if len(f[1]) <= 8]
    packed, slcan, cand = _fmt_frames(frames)
    ref, _ = make(kernel_cls, KINDS_DBC)
    ref.feed_frames([f[0] for f in frames], [f[1] for f in frames], [1.5] * len(frames))
    for feed in ("packed", "slcan", "candump"):
        k, _ = make(kernel_cls, KINDS_DBC)
        if feed == "packed":
            k.feed_packed(packed, 1.5)
        elif feed == "slcan":
            assert k.feed_slcan(slcan + b"t12", 1.5)[0] == len(slcan)
        else:
            assert k.feed_candump(cand + b"(1.0) ca", 0.0)[0] == len(cand)
        assert k.counters()["frames"] == ref.counters()["frames"] == len(frames), feed
        assert [(sid, v) for sid, v, _t in k.latest()] == [(sid, v) for sid, v, _t in ref.latest()], feed


def test_candump_feed_stamps_each_line_with_its_own_time(kernel_cls: Any) -> None:
    k, _ = make(kernel_cls, profile_path("bafang"))
    _, closed = k.feed_candump(b"(100.250000) can0 02F83201#6C091F05840D40FF\n"
                               b"(101.500000) can0 02F83201#B809E7048E0D40FF R\n", 1000.0)
    assert [(w[0], w[2][SPEED][1], w[2][SPEED][4]) for w in windows(closed)] == [(1100.0, 1, 24.12)]
    speed = {sid: (v, t) for sid, v, t in k.latest()}[SPEED]
    assert speed == (24.88, 1101.5)  # 0x09B8 = 2488 x 0.01 km/h


def test_packed_feed_counts_remote_error_and_bad_records(kernel_cls: Any) -> None:
    k, _ = make(kernel_cls, profile_path("bafang"))
    recs = (struct.pack("=IB3x8s", 0x02F83201 | 0x80000000 | 0x40000000, 0, b"")
            + struct.pack("=IB3x8s", 0x20000080, 8, bytes(8))
            + struct.pack("=IB3x8s", 0x123, 9, bytes(8)))
    k.feed_packed(recs + b"\x00" * 5, 1.0)
    c = k.counters()
    assert (c["remote_frames"], c["error_frames"], c["bad_lines"], c["frames"]) == (1, 1, 2, 0)


SLCAN_ALPHABET = b"tTrRzZ0123456789ABCDEFabcdefG .\x07\r"
CANDUMP_ALPHABET = b"(0123456789.) can0ABCDEF#R.T"


def test_kernel_slcan_parser_agrees_with_the_python_parser(kernel_cls: Any) -> None:
    """Differential: random and mutated SLCAN streams give the kernel exactly the frames
    the reference parser in agent/sources/slcan.py accepts, and both count the rest."""
    from agent.protocols.slcan import SlcanParser

    rng = random.Random(5)
    db = load_cantools(KINDS_DBC)
    _, good, _ = _fmt_frames(random_frames(db, 400, seed=3))
    lines = good.split(b"\r")[:-1]
    for _ in range(300):
        stream = bytearray()
        for _ in range(rng.randint(1, 30)):
            line = bytearray(rng.choice(lines))
            for _ in range(rng.choice((0, 0, 1, 2))):
                line[rng.randrange(len(line))] = rng.choice(SLCAN_ALPHABET)
            stream += line + b"\r"
        k, _ = make(kernel_cls, KINDS_DBC)
        consumed, _ = k.feed_slcan(bytes(stream), 1.0)
        parser = SlcanParser()
        keys, datas = parser.feed(bytes(stream))
        ref, _ = make(kernel_cls, KINDS_DBC)
        ref.feed_frames(keys, datas, [1.0] * len(keys))
        c, r = k.counters(), ref.counters()
        assert (c["frames"], c["unknown"], c["truncated"]) == (r["frames"], r["unknown"], r["truncated"])
        assert k.latest() == ref.latest()
        assert c["bad_lines"] + c["remote_frames"] >= parser.bad + parser.remote - parser.tail.count(b"\r")


def test_kernel_candump_parser_agrees_with_the_python_parser(kernel_cls: Any) -> None:
    """Differential: every mutated candump line is accepted by the kernel exactly when
    agent/protocols/candump.py accepts it as a classic data frame, with the same content."""
    from agent.errors import DecodeError
    from agent.protocols import candump

    rng = random.Random(9)
    db = load_cantools(KINDS_DBC)
    _, _, good = _fmt_frames(random_frames(db, 400, seed=4))
    lines = good.split(b"\n")[:-1]
    for _ in range(3000):
        line = bytearray(rng.choice(lines))
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            pos = rng.randrange(len(line))
            if rng.random() < 0.3:
                del line[pos]
            else:
                line[pos] = rng.choice(CANDUMP_ALPHABET)
        text = bytes(line)
        k, _ = make(kernel_cls, KINDS_DBC)
        k.feed_candump(text + b"\n", 0.0)
        try:
            frame = candump.parse_candump_line(text.decode("ascii", "replace"))
        except DecodeError:
            frame = None
        c = k.counters()
        data_frame = frame is not None and not frame[3] & (candump.ERROR | candump.REMOTE | candump.FD)
        decoded_or_counted = c["frames"] + c["unknown"] + c["truncated"]
        assert decoded_or_counted == (1 if data_frame else 0), text
        if data_frame:
            ref, _ = make(kernel_cls, KINDS_DBC)
            ref.feed_frames([frame_key(frame[2], bool(frame[3] & candump.EXTENDED))], [frame[4]], [frame[0]])
            ours, theirs = k.latest(), ref.latest()
            assert [r[:2] for r in ours] == [r[:2] for r in theirs], text
            assert [r[2] for r in ours] == pytest.approx([r[2] for r in theirs], abs=1e-9), text
