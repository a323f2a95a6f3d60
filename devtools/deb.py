"""``make deb [ARCH=arm64]``: ebike-agent_<version>_<arch>.deb, built with dpkg-deb (for another
architecture than this machine's, then proven there: devtools/deb_proof.py).

The agent's venv is made at its final path, /opt/ebike-agent/venv, inside a Debian 12 root
of the target architecture (debootstrap; qemu-user-static for arm64), so its interpreter is
the unit's own python3.11, the Cython kernel is compiled there for that CPU, and every wheel
it needs is inside the package: a unit installs it with no network. Run as root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from agent import __version__
from devtools import debroot

REPO = debroot.REPO
PACKAGING = REPO / "packaging"
DIST = REPO / "dist"
VENV = "/opt/ebike-agent/venv"
# The package's extras: python-can adapters (kind = "python-can") and a GPIO power-loss
# input on the unit; not the developers' tools, nor matplotlib (plots are drawn on a laptop
# from a diag bundle).
EXTRAS = "can,gpio"
# What the package is made of: a change elsewhere (tests, devtools) does not make it stale.
PACKAGED = ("agent/", "firmware_sim/", "packaging/", "docs/", "setup.py", "pyproject.toml", "README.md")
FILES = {
    "ebike-agent.service": "lib/systemd/system/ebike-agent.service",
    "ebike-agent-provision.service": "lib/systemd/system/ebike-agent-provision.service",
    "agent.toml": "etc/ebike-agent/agent.toml",
    "update-guard": "usr/lib/ebike-agent/update-guard",
}


def sources() -> list[str]:
    """The tree's files as git sees them (tracked, and new ones not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def pip_environment(root: Path) -> dict[str, str]:
    """The host's way to PyPI for pip in the root: its index settings and, where the host
    trusts more certificate authorities than Debian's (a company proxy), its CA bundle."""
    env = {k: v for k, v in os.environ.items() if k in ("PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "HTTPS_PROXY",
                                                       "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY")}
    bundle = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        (root / "etc/ssl").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle, root / "etc/ssl/host-ca-bundle.crt")
        env["PIP_CERT"] = "/etc/ssl/host-ca-bundle.crt"
    return env


def build_venv(root: Path, log: Path) -> None:
    """The venv at /opt/ebike-agent/venv inside ``root``, the kernel compiled (required)."""
    src = root / "src"
    shutil.rmtree(src, ignore_errors=True)
    for rel in sources():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    shutil.rmtree(root / VENV.lstrip("/"), ignore_errors=True)
    debroot.run_in(root, ["python3", "-m", "venv", VENV], log=log)
    pip = [f"{VENV}/bin/python", "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    env = {**pip_environment(root), "EBIKE_AGENT_BUILD_EXT": "1"}
    debroot.run_in(root, [*pip, "install", "-q", "--upgrade", "pip"], env=env, log=log)
    debroot.run_in(root, [*pip, "install", "-q", f"/src[{EXTRAS}]"], env=env, log=log)
    build = debroot.run_in(root, [f"{VENV}/bin/python", "-c", "from agent.fusion import kernel; print(kernel.BUILD)"],
                           log=log).strip()
    if build != "c":
        raise debroot.RootError(f"the venv's kernel is {build!r}, not the compiled one")


def stage(root: Path, arch: str, version: str) -> Path:
    """The package's tree: the venv, the unit files, the conffile, the scripts."""
    tree = debroot.WORK / f"stage-{arch}"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(root / VENV.lstrip("/"), tree / VENV.lstrip("/"), symlinks=True)
    for name, dest in FILES.items():
        (tree / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGING / name, tree / dest)
    (tree / "usr/lib/ebike-agent/update-guard").chmod(0o755)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/ebike-agent").symlink_to(f"{VENV}/bin/ebike-agent")
    share = tree / "opt/ebike-agent/share"
    shutil.copytree(REPO / "docs", share / "docs")
    shutil.copy2(REPO / "README.md", share / "README.md")
    size_kb = sum(p.lstat().st_size for p in tree.rglob("*")) // 1024
    debian = tree / "DEBIAN"
    debian.mkdir()
    for script in (PACKAGING / "debian").iterdir():
        text = script.read_text().replace("#VERSION#", version).replace("#ARCH#", arch)
        (debian / script.name).write_text(text.replace("#SIZE#", str(size_kb)))
        (debian / script.name).chmod(script.stat().st_mode & 0o777)
    return tree


def build(arch: str, version: str) -> Path:
    """Build the package of ``arch``; returns its path under dist/."""
    started = time.monotonic()
    debroot.WORK.mkdir(parents=True, exist_ok=True)
    log = debroot.WORK / f"build-{arch}.log"
    log.write_text("")
    root = debroot.WORK / f"build-{arch}"
    if not (root / "usr/bin/python3").exists():
        shutil.rmtree(root, ignore_errors=True)
        debroot.fresh_root("build", arch, root)
    debroot.ensure_binfmt(arch)
    build_venv(root, log)
    tree = stage(root, arch, version)
    DIST.mkdir(exist_ok=True)
    deb = DIST / f"ebike-agent_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-z6", "--build", str(tree), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    print(f"{deb.relative_to(REPO)}: {deb.stat().st_size / 1e6:.1f} MB, built in {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    return deb


def package(arch: str, version: str = __version__) -> Path:
    """The package of this tree: the one in dist/ if it is newer than every source file,
    else built now (one builder at a time: make and the tests' workers share dist/)."""
    deb = DIST / f"ebike-agent_{version}_{arch}.deb"
    with debroot.locked(debroot.WORK / f".build-{arch}.lock"):
        newest = max((REPO / p).stat().st_mtime for p in sources() if p.startswith(PACKAGED))
        if deb.exists() and deb.stat().st_mtime > newest:
            return deb
        return build(arch, version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=debroot.host_arch(), help="Debian architecture (amd64, arm64)")
    parser.add_argument("--version", default=__version__, help="the package's version (default: the agent's)")
    args = parser.parse_args()
    try:
        if args.arch == debroot.host_arch():
            print(package(args.arch, args.version))
        else:
            from devtools import deb_proof  # it builds with this module

            deb_proof.prove(args.arch)
    except debroot.RootError as e:
        print(f"make deb: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
