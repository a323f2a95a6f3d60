"""``ebike-agent diag bundle -o FILE``: everything a remote engineer needs about this
vehicle, in one archive the technician can mail: made here, over the control socket, so
it works with the cloud unreachable, and with the agent down (then with what can still
be had: the configuration, the journal, an offline selftest).

Inside the tar.gz: status.json, config.toml (secrets replaced by "(hidden)"; key files
are named, never included), log.txt, sources.json, alarms.json, capture/<source>.bin
(the raw bytes each bus gave over --capture seconds, from the agent's tap) and
capture/tap.jsonl (every read of every bus as the tap gave it, with its time: what
``ebike-agent replay`` and ``plot`` read, so the road's problem reproduces on a desk), selftest.txt
when the agent is down, and manifest.json: what is inside, and what is not and why.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from typing import Any

from agent import __version__, config
from agent.cli import view
from agent.cli.common import agent_options, control_socket
from agent.control.client import follow_tap, request
from agent.errors import AgentError, ConfigError

CAPTURE_S = 10.0
JOURNAL_LINES = 500
JOURNAL_TIMEOUT_S = 10.0
SELFTEST_LISTEN_S = 1.0
SELFTEST_TIMEOUT_S = 120.0
HIDDEN = "(hidden)"
# A key whose name holds one of these has its value hidden; so has any PEM private key.
SECRET_WORDS = ("password", "passphrase", "secret", "token")
PRIVATE_KEY = "PRIVATE KEY"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def redact(value: Any, key: str = "") -> Any:
    """The configuration with every secret replaced by HIDDEN."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and value and (any(w in key.lower() for w in SECRET_WORDS) or PRIVATE_KEY in value):
        return HIDDEN
    return value


class Bundle:
    """The archive's members as they are collected, and what could not be, with why."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.missing: dict[str, str] = {}

    def add(self, name: str, data: bytes | str) -> None:
        self.files[name] = data.encode() if isinstance(data, str) else data

    def add_json(self, name: str, obj: Any) -> None:
        self.add(name, json.dumps(obj, indent=1, default=str) + "\n")

    def lack(self, name: str, why: str) -> None:
        self.missing[name] = why

    def write(self, path: str, manifest: dict[str, Any]) -> int:
        """The tar.gz at ``path`` (written beside it, then renamed over it); its size."""
        manifest = {**manifest, "files": {n: len(d) for n, d in sorted(self.files.items())},
                    "missing": dict(sorted(self.missing.items()))}
        members = {**self.files, "manifest.json": (json.dumps(manifest, indent=1) + "\n").encode()}
        tmp = f"{path}.part"
        now = time.time()
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), now, 0o644
                    tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)
            return os.path.getsize(path)
        except OSError as e:
            raise AgentError(f"cannot write {path}: {e.strerror or e}") from e


def raw_config(bundle: Bundle, path: str) -> dict[str, Any] | None:
    """config.toml with its secrets hidden; the document as read, or None."""
    import tomli_w

    try:
        raw = config.read_raw(path)
    except ConfigError as e:
        bundle.lack("config.toml", e.reason)
        return None
    bundle.add("config.toml", f"# {path}, secrets hidden by ebike-agent diag bundle\n" + tomli_w.dumps(redact(raw)))
    return raw


def socket_path(args: argparse.Namespace, raw: dict[str, Any] | None) -> str | None:
    """The control socket: --socket, else the configuration's (validated or as written)."""
    try:
        return control_socket(args)
    except ConfigError:
        pass  # a broken file: the socket it names, as written, is still tried
    control = (raw or {}).get("control_socket")
    if not isinstance(control, str):
        return None
    return control if os.path.isabs(control) else os.path.join(os.path.dirname(os.path.abspath(args.config)), control)


def journal() -> tuple[str | None, str]:
    """The system journal's newest lines of the agent's unit, or None and why not."""
    exe = shutil.which("journalctl")
    if exe is None:
        return None, "journalctl: not on this system"
    try:
        out = subprocess.run([exe, "-u", "ebike-agent", "-n", str(JOURNAL_LINES), "--no-pager"], capture_output=True,
                             text=True, timeout=JOURNAL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"journalctl: {e}"
    if out.returncode != 0:
        return None, f"journalctl: {out.stderr.strip() or f'exit {out.returncode}'}"
    return out.stdout, ""


def agent_parts(bundle: Bundle, path: str) -> dict[str, Any] | None:
    """status.json, sources.json, alarms.json and the agent's log lines; its status, or
    None when it is down (status.json then says so)."""
    try:
        st: dict[str, Any] = request(path, "status")["status"]
    except AgentError as e:
        bundle.add_json("status.json", {"agent": "down", "why": str(e)})
        for name in ("sources.json", "alarms.json", "log.txt (agent)", "capture/"):
            bundle.lack(name, "agent down")
        return None
    bundle.add_json("status.json", st)
    bundle.add_json("sources.json", {"sources": st.get("sources", []), "health": st.get("health", [])})
    try:
        alarms = request(path, "alarms")
        bundle.add_json("alarms.json", {"active": alarms["active"], "recent": alarms["recent"]})
    except AgentError as e:
        bundle.lack("alarms.json", str(e))
    try:
        lines = request(path, "log")["lines"]
        bundle.add("log.txt", "\n".join(["# the agent's recent lines (control socket)", *lines, ""]))
    except AgentError as e:
        bundle.lack("log.txt (agent)", str(e))
    return st


def capture(bundle: Bundle, path: str, names: list[str], seconds: float, bar: view.Progress, done: float) -> None:
    """capture/<source>.bin and capture/tap.jsonl: every read of each source over
    ``seconds``, following the agent's tap."""
    data: dict[str, bytearray] = {n: bytearray() for n in names}
    reads: list[str] = []
    lost = False
    start = time.monotonic()
    try:
        for chunks, dropped in follow_tap(path, names, seconds):
            lost = lost or dropped
            for chunk in chunks:
                data[chunk["source"]] += chunk["data"]
                reads.append(json.dumps(dict(chunk, data=base64.b64encode(chunk["data"]).decode())))
            total = sum(len(d) for d in data.values())
            bar.update(done + min((time.monotonic() - start) / seconds, 1.0), note=f"{view.number(total)} bytes")
    except AgentError as e:
        bundle.lack("capture/", f"stopped after {time.monotonic() - start:.0f} s: {e}")
    if lost:
        bundle.lack("capture/ (part)", "the agent dropped reads before they were fetched (over 4 MiB a source)")
    for name in names:
        stem = "capture/" + _UNSAFE.sub("_", name)
        if not data[name]:
            bundle.lack(f"{stem}.bin", f"no bytes from {name} in {seconds:g} s")
            continue
        bundle.add(f"{stem}.bin", bytes(data[name]))
    if reads:
        bundle.add("capture/tap.jsonl", "\n".join(reads) + "\n")


def offline_selftest(bundle: Bundle, config_path: str) -> None:
    """selftest.txt: the offline checks with a short listen (the agent is down)."""
    cmd = [sys.executable, "-m", "agent", "selftest", "--config", config_path, "--listen", str(SELFTEST_LISTEN_S)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SELFTEST_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        bundle.lack("selftest.txt", str(e))
        return
    bundle.add("selftest.txt", f"$ ebike-agent selftest --config {config_path} --listen {SELFTEST_LISTEN_S:g}\n"
                               f"{out.stdout}{out.stderr}(exit {out.returncode})\n")


def _bundle(args: argparse.Namespace) -> int:
    bundle = Bundle()
    with view.progress("diag bundle", total=6) as bar:
        raw = raw_config(bundle, args.config)
        path = socket_path(args, raw)
        bar.update(1, note="status")
        st = agent_parts(bundle, path) if path else None
        if path is None:
            bundle.add_json("status.json", {"agent": "unknown", "why": "no control socket: no configuration"})
        bar.update(2, note="journal")
        lines, why = journal()
        if lines is not None:
            log = bundle.files.get("log.txt", b"")
            bundle.add("log.txt", log + f"# journalctl -u ebike-agent -n {JOURNAL_LINES}\n{lines}".encode())
        else:
            bundle.lack("log.txt (journal)", why)
        if st is not None and path is not None:
            capture(bundle, path, [s["name"] for s in st.get("sources", [])], args.capture, bar, 3)
        elif raw is not None:
            bar.update(3, note="selftest")
            offline_selftest(bundle, args.config)
        else:
            bundle.lack("selftest.txt", "no configuration to test")
        bar.update(5, note="writing")
        manifest = {"created_at": time.time(), "host": socket.gethostname(), "version": __version__,
                    "device_id": (raw or {}).get("device_id"), "config": os.path.abspath(args.config),
                    "agent": "running" if st is not None else "down", "capture_s": args.capture}
        size = bundle.write(args.output, manifest)
        bar.update(6, note="done")
    if args.json:
        view.print_json({"path": os.path.abspath(args.output), "bytes": size, "agent": manifest["agent"],
                         "files": sorted(bundle.files), "missing": bundle.missing})
        return 0
    print(f"diag bundle: {args.output} ({view.number(size)} bytes), agent {manifest['agent']}")
    print(textwrap.fill(f"inside: {', '.join([*sorted(bundle.files), 'manifest.json'])}", view.WIDTH,
                        subsequent_indent="  "))
    reasons: dict[str, list[str]] = {}
    for name, reason in sorted(bundle.missing.items()):
        reasons.setdefault(reason, []).append(name)
    for reason, names in reasons.items():
        print(textwrap.fill(f"missing: {', '.join(names)} ({reason})", view.WIDTH, subsequent_indent="  "))
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("diag", help="diagnostics to hand on: diag bundle -o FILE")
    dsub = p.add_subparsers(dest="diag_command", required=True, metavar="ACTION")
    b = dsub.add_parser("bundle", help="one archive: status, configuration (no secrets), log, alarms, raw capture",
                        description="Made here over the control socket: works with the cloud unreachable, and "
                                    "with the agent down (then the configuration, the journal and an offline "
                                    "selftest).")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write (.tar.gz)")
    agent_options(b)
    b.add_argument("--capture", type=float, default=CAPTURE_S, metavar="S",
                   help="seconds of raw bytes from each bus (default %(default)s)")
    b.set_defaults(func=_bundle)

