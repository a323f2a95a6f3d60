"""``ebike-agent diag bundle``: with the workshop's agent running (its status, alarms, log
and a raw capture of each bus through the tap), and with the agent down and the broker
unreachable (still written, the manifest saying what is missing and why). Never a
password or a private key in the archive."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import pytest

from agent.cli.diag import HIDDEN, redact
from agent.protocols.sniff import identify
from devtools.broker import free_port
from tests.workshop import Workshop

PASSWORD = "s3cret horse battery"


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        out = {}
        for info in tar.getmembers():
            f = tar.extractfile(info)
            assert f is not None, info.name
            out[info.name] = f.read()
    return out


def with_broker(config: Path, lines: str) -> None:
    """Put ``lines`` at the top of the [broker] table (the running agent does not see it)."""
    text = config.read_text()
    assert "\n[broker]\n" in text
    config.write_text(text.replace("\n[broker]\n", f"\n[broker]\n{lines}\n", 1))


def test_secrets_are_hidden_and_the_rest_kept() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI...\n-----END PRIVATE KEY-----\n"
    raw = {"device_id": "bike-1", "broker": {"username": "bike", "password": PASSWORD, "tls_key": "/etc/k.pem"},
           "sources": [{"name": "gnss", "api_token": "t0k"}], "note": pem, "empty_password": ""}
    assert redact(raw) == {"device_id": "bike-1",
                           "broker": {"username": "bike", "password": HIDDEN, "tls_key": "/etc/k.pem"},
                           "sources": [{"name": "gnss", "api_token": HIDDEN}], "note": HIDDEN, "empty_password": ""}


@pytest.mark.e2e
def test_a_bundle_of_the_running_agent(workshop: Workshop) -> None:
    with_broker(workshop.config, f'username = "bike"\npassword = "{PASSWORD}"')
    archive = workshop.tmp / "diag.tar.gz"
    out = workshop.cli("diag", "bundle", "-o", str(archive), "--config", str(workshop.config), "--capture", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"diag bundle: {archive} (")
    assert "agent running" in out.stdout.splitlines()[0]
    got = members(archive)
    names = ("gnss", "can0", "bms")
    assert set(got) == {"status.json", "config.toml", "log.txt", "sources.json", "alarms.json", "manifest.json",
                        "capture/tap.jsonl", *(f"capture/{n}.bin" for n in names)}
    status = json.loads(got["status.json"])
    assert [s["name"] for s in status["sources"]] == list(names)
    assert [s["name"] for s in json.loads(got["sources.json"])["sources"]] == list(names)
    assert set(json.loads(got["alarms.json"])) == {"active", "recent"}
    assert b"# the agent's recent lines" in got["log.txt"]
    config = got["config.toml"].decode()
    assert PASSWORD not in config
    assert f'password = "{HIDDEN}"' in config and 'username = "bike"' in config
    for name, proto in zip(names, ("nmea", "slcan", "jbd"), strict=True):
        data = got[f"capture/{name}.bin"]
        assert data, name
        assert identify(data)[0][0] == proto, name
        reads = [json.loads(x) for x in got["capture/tap.jsonl"].decode().splitlines()]
        assert b"".join(base64.b64decode(r["data"]) for r in reads if r["source"] == name) == data
    slcan_lines = [x for x in got["capture/can0.bin"].split(b"\r") if x[:1] == b"T"]
    assert len(slcan_lines) > 100
    manifest = json.loads(got["manifest.json"])
    assert manifest["agent"] == "running"
    assert manifest["missing"].keys() <= {"log.txt (journal)"}
    assert manifest["files"]["capture/can0.bin"] == len(got["capture/can0.bin"])
    # The capture replays on a desk: every bus through the kernel, with the reads' times.
    tap = workshop.tmp / "tap.jsonl"
    tap.write_bytes(got["capture/tap.jsonl"])
    replay = workshop.cli("replay", str(tap), "--json")
    assert replay.returncode == 0, replay.stderr
    summary = json.loads(replay.stdout.splitlines()[-1])
    assert summary["type"] == "summary" and summary["format"] == "tap"
    assert all(s["frames"] > 0 for s in summary["sources"]) and {s["name"] for s in summary["sources"]} == set(names)


@pytest.mark.e2e
def test_a_bundle_with_the_agent_down_and_no_broker(workshop_down: Workshop) -> None:
    bench = workshop_down
    config = bench.config
    config.write_text(config.read_text().replace(f"port = {bench.broker.port}\n", f"port = {free_port()}\n", 1))
    with_broker(config, f'password = "{PASSWORD}"')
    archive = bench.tmp / "down.tar.gz"
    out = bench.cli("diag", "bundle", "-o", str(archive), "--config", str(config), "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["agent"] == "down"
    got = members(archive)
    assert {"status.json", "config.toml", "selftest.txt", "manifest.json"} <= set(got)
    assert not any(n.startswith("capture/") for n in got)
    assert json.loads(got["status.json"])["agent"] == "down"
    assert PASSWORD not in got["config.toml"].decode()
    selftest = got["selftest.txt"].decode()
    assert "agent: not running" in selftest
    assert "FAIL  broker tcp: connection refused at 127.0.0.1:" in selftest
    # (the simulator starts its ride, and the GNSS its sentences, once the SLCAN adapter is opened)
    assert "PASS  can0 data: " in selftest and "PASS  bms data: " in selftest, selftest
    manifest = json.loads(got["manifest.json"])
    assert manifest["agent"] == "down"
    for name in ("sources.json", "alarms.json", "log.txt (agent)", "capture/"):
        assert manifest["missing"][name] == "agent down"
    assert set(manifest["files"]) == set(got) - {"manifest.json"}
