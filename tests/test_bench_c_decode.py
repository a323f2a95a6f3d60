"""The bench's C reference decoder (devtools/bench_c_decode.py) decodes the DBC as cantools
does, so ``decode_vs_c_loop`` compares like with like; without ``cc`` it says why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.dbc.compile import compile_dbc, load_cantools, profile_path
from devtools import bench, bench_c_decode


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_c_loop_keeps_the_latest_value_cantools_decodes() -> None:
    path = profile_path("bafang")
    db = load_cantools(path)
    dbc = compile_dbc(path)
    frames = bench._frames(db, 2000, seed=7)
    current = db.get_message_by_name("Battery_34_01")  # last: its signed current negative
    frames.append((current.frame_id | 0x80000000, current.frame_id, bytes.fromhex("ffff102700"), True))
    # A remote and an error frame and an unknown id among them: skipped, not decoded.
    buf = bench._packed(frames) + bench._packed([(0, 0x7FF, b"\x01", False)])
    buf += bytes.fromhex("01000040") + bytes(12) + bytes.fromhex("01000020") + bytes(12)
    dec = bench_c_decode.CDecoder(dbc)
    assert dec.decode(buf) == len(frames)
    expected: dict[int, float] = {}
    for key, frame_id, data, _ in frames:
        values = db.decode_message(frame_id, data, decode_choices=False)
        row = dbc.msg_index[key]
        for s in range(dbc.msg_first[row], dbc.msg_first[row] + dbc.msg_count[row]):
            expected[dbc.sig_id[s]] = values[dbc.sig_dbc_names[s]]
    assert -0.01 in expected.values()
    assert {sid: dec.values[sid] for sid in expected} == expected


def test_without_cc_the_row_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    run, error = bench_c_decode.c_contender(compile_dbc(profile_path("bafang")), b"", 0)
    assert run is None and error is not None and "cc" in error
