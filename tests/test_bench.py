"""``make bench`` runs: ``python -m devtools.bench --smoke`` (every section once at tiny
sizes, real processes as in the full run) writes a bench-results.json whose summary holds
every figure the README and the issues quote, each a finite number. The figures
themselves are not judged here (performance is measured, not asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every key of bench-results.json's summary; a new figure is added here.
SUMMARY_KEYS = (
    "decode_speedup_vs_cantools",
    "decode_vs_c_loop",
    "replay_speedup_vs_python_can",
    "outbox_append_records_per_s",
    "kernel_frames_per_s",
    "kernel_speedup_vs_pure",
    "kernel_frames_per_s_commute",
    "kernel_speedup_vs_pure_commute",
    "drain_24h_backlog_s",
    "reconnect_to_first_live_s",
    "reconnect_connack_to_first_live_s",
    "wire_full_rate_bytes_per_sample_signal",
    "full_rate_smaller_than_json",
    "full_rate_smaller_than_protobuf",
    "wire_aggregates_bytes_per_signal_window",
    "aggregates_smaller_than_json",
    "aggregates_smaller_than_protobuf",
    "aggregates_smaller_than_json_deflated",
    "aggregates_smaller_than_protobuf_deflated",
    "agent_cpu_pct_saturated_can",
    "agent_rss_mb",
    "agent_can_frames_per_s_received",
    "sd_write_mb_per_h_riding",
    "sd_write_mb_per_h_parked",
    "kernel_instructions_per_frame",
    "agent_instructions_per_s_saturated",
    "agent_instructions_per_s_commute",
    "pi_zero2_cpu_pct_saturated",
    "pi_zero2_cpu_pct_commute",
    "mb_per_month_typical",
    "fleet_records_per_s_1_consumers",
    "fleet_ack_p99_s_1_consumers",
    "fleet_records_per_s_4_consumers",
    "fleet_ack_p99_s_4_consumers",
    "fleet_lost",
    "fleet_stored_twice",
    "fleet_devices_per_consumer",
    "fleet_devices_per_consumer_core",
)


@pytest.mark.e2e
def test_smoke_run_writes_every_summary_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench-results.json"
    proc = subprocess.run([sys.executable, "-m", "devtools.bench", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True
    summary = results["summary"]
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    assert not missing, f"not in the summary: {missing}"
    not_numbers = {key: summary[key] for key in SUMMARY_KEYS
                   if not isinstance(summary[key], (int, float)) or not math.isfinite(summary[key])}
    assert not not_numbers, f"not finite numbers: {not_numbers}"
