"""``ebike-agent plot``: a PNG of a real capture and of the outbox of a running bench
agent, each checked as an image (size, not blank, several colours)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
from matplotlib import image

from agent.control.client import request
from agent.fusion.spec import S_FUSED_SPEED, S_GNSS_SPEED, S_SOC, S_SPEED
from agent.store.outbox import LANE_LIVE
from tests.helpers import wait_for
from tests.workshop import Workshop

REPO = Path(__file__).resolve().parents[1]
LIVE_WINDOWS = 8


def agent(*args: str, pre: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m agent ARGS``; ``pre``: Python run first in that process."""
    code = f"{pre}\nimport sys\nfrom agent.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def assert_picture(png: Path) -> Any:
    """A real chart: at least 800 px wide, not one flat colour, several colours."""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(str(png))
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 400
    rgb = (pixels[..., :3] * 255).round().astype(numpy.uint8).reshape(-1, 3)
    assert rgb.std() > 0
    assert len(numpy.unique(rgb, axis=0)) >= 6
    return pixels


def test_a_real_capture_plots(shared_data: Path, tmp_path: Path) -> None:
    png = tmp_path / "ride.png"
    proc = agent("plot", str(shared_data / "bafang_can" / "ride-coasting-excerpt.log"), "-o", str(png), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["width"] >= 1200 and out["title"].startswith("ride-coasting-excerpt.log")
    assert out["signals"][str(S_SPEED)] >= 2 and out["signals"][str(S_FUSED_SPEED)] >= 2
    pixels = assert_picture(png)
    assert pixels.shape[1] == out["width"]


def test_text_output_and_alarms_of_a_simulated_fault(tmp_path: Path) -> None:
    log = tmp_path / "ride.log"
    subprocess.run([sys.executable, "-m", "firmware_sim", "--scenario", "overheat", "--duration", "100",
                    "--speed", "0", "--out", str(log)], cwd=REPO, check=True, capture_output=True, timeout=60)
    png = tmp_path / "ride.png"
    proc = agent("plot", str(log), "-o", str(png))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{png}: 1400 x ") and "2 alarm marks" in proc.stdout
    assert_picture(png)


def test_neither_or_both_sources_is_a_usage_error(tmp_path: Path) -> None:
    for args in ([], ["ride.log", "--last", "10m"]):
        proc = agent("plot", *args, "-o", str(tmp_path / "x.png"))
        assert proc.returncode == 1 and "FILE or --last" in proc.stderr
    proc = agent("plot", "--last", "ten minutes", "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "duration" in proc.stderr


def test_without_matplotlib_it_says_how_to_install_it(shared_data: Path, tmp_path: Path) -> None:
    proc = agent("plot", str(shared_data / "bafang_can" / "ride-coasting-excerpt.log"), "-o",
                 str(tmp_path / "x.png"), pre="import sys; sys.modules['matplotlib'] = None")
    assert proc.returncode == 1 and "pip install 'ebike-edge[plot]'" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def _live_windows(bench: Workshop) -> int:
    return sum(1 for lane, _t, _body in request(str(bench.socket), "recent")["records"] if lane == LANE_LIVE)


def _outbox_windows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as c:
        return int(c.execute("SELECT count(*) FROM records WHERE lane = ?", (LANE_LIVE,)).fetchone()[0])


def _plot_last(bench: Workshop, png: Path) -> dict[str, Any]:
    proc = bench.cli("plot", "--last", "10m", "-o", str(png), "--config", str(bench.config), "--json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["title"].startswith("workshop-bike-1: the last 10 min")
    # The wheel (CAN), the receiver (NMEA), the fusion and the BMS (JBD) are all drawn.
    for sid in (S_SPEED, S_GNSS_SPEED, S_FUSED_SPEED, S_SOC):
        assert out["signals"].get(str(sid), 0) >= LIVE_WINDOWS // 2, sid
    assert_picture(png)
    return out


@pytest.mark.e2e
def test_the_last_minutes_of_a_running_agent_come_from_its_memory(workshop: Workshop, tmp_path: Path) -> None:
    """On a connected unit the cloud acknowledges every window within a second and the
    outbox is empty: the running agent keeps the last 10 min for the technician."""
    wait_for("live windows", lambda: _live_windows(workshop) >= LIVE_WINDOWS, 60, interval=0.5)
    out = _plot_last(workshop, tmp_path / "last.png")
    assert "(agent's last 10 min)" in out["title"]


@pytest.mark.e2e
def test_the_last_minutes_come_from_the_outbox_when_the_agent_is_down(workshop_down: Workshop,
                                                                       tmp_path: Path) -> None:
    """The bench agent with its broker out of reach, then stopped: the live windows wait
    in the outbox, and plot reads them there."""
    bench = workshop_down
    bench.config.write_text(bench.config.read_text().replace(f"port = {bench.broker.port}", "port = 1"))
    bench.start_agent()
    wait_for("live windows in the outbox", lambda: _outbox_windows(bench.outbox) >= LIVE_WINDOWS, 60, interval=0.5)
    bench.stop_agent()
    out = _plot_last(bench, tmp_path / "last.png")
    assert "(outbox (only what the cloud has not acknowledged))" in out["title"]
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(bench.config.read_text().replace('path = "outbox.sqlite"', 'path = "none.sqlite"'))
    proc = bench.cli("plot", "--last", "10m", "-o", str(tmp_path / "x.png"), "--config", str(elsewhere))
    assert proc.returncode == 1 and "no agent running and no outbox at" in proc.stderr
