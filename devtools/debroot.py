"""Debian 12 roots for building and trying the package: made with debootstrap (for another
architecture, run through qemu-user-static's binfmt handler), kept as tarballs under
build/deb/ so a second build or test unpacks in seconds, and entered with chroot inside a
private mount namespace (``unshare --mount``): /proc, /dev and /dev/pts are mounted for
the commands run there and vanish with them, so nothing is left mounted on the host.
Runs as root (debootstrap, chroot and mount need it; CI and this machine are root)."""

from __future__ import annotations

import fcntl
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".debroots"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What each kind of root holds beyond debootstrap's minbase. The build root compiles the
# kernel and fetches the wheels; the run root is a unit as the image builders make it:
# Debian's python3 and nothing of ours.
PACKAGES = {
    "build": ["python3", "python3-venv", "python3-dev", "gcc", "libc6-dev", "ca-certificates"],
    "run": ["python3"],
}
# Host tools (Debian packages) that making and entering roots needs.
HOST_TOOLS = {"debootstrap": "debootstrap", "unshare": "util-linux", "dpkg-deb": "dpkg"}
FOREIGN_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support"}


class RootError(RuntimeError):
    """A root could not be made or a command in it failed."""


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()


def missing_tools(arch: str) -> list[str]:
    """The Debian packages to install on the host before roots of ``arch`` can be made."""
    tools = dict(HOST_TOOLS)
    if arch != host_arch():
        tools.update(FOREIGN_TOOLS)
    return sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None
                   and not Path("/usr/sbin", tool).exists()})


def ensure_binfmt(arch: str) -> None:
    """Foreign binaries run through qemu: binfmt_misc mounted and the handler enabled."""
    if arch == host_arch():
        return
    qemu = {"arm64": "aarch64", "armhf": "arm"}[arch]
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=True)
    if not (binfmt / f"qemu-{qemu}").exists():
        subprocess.run(["update-binfmts", "--enable", f"qemu-{qemu}"], check=True)
    if not (binfmt / f"qemu-{qemu}").exists():
        raise RootError(f"qemu-{qemu} is not registered with binfmt_misc: cannot run {arch} binaries here")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One maker of a root at a time (pytest-xdist workers and make share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def base_tarball(kind: str, arch: str) -> Path:
    """The tarball of a fresh ``kind`` root of ``arch``, made by debootstrap the first time."""
    tar = WORK / f"{SUITE}-{arch}-{kind}.tar"
    with locked(WORK / f".{tar.name}.lock"):
        if tar.exists():
            return tar
        missing = missing_tools(arch)
        if missing:
            raise RootError(f"install these Debian packages first: apt-get install {' '.join(missing)}")
        ensure_binfmt(arch)
        root = WORK / f"{SUITE}-{arch}-{kind}.making"
        shutil.rmtree(root, ignore_errors=True)
        log = WORK / f"{SUITE}-{arch}-{kind}.debootstrap.log"
        with open(log, "wb") as out:
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--arch={arch}",
                                   f"--include={','.join(PACKAGES[kind])}", SUITE, str(root), MIRROR],
                                  stdout=out, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RootError(f"debootstrap of the {arch} {kind} root failed (exit {done.returncode}); see {log}")
        (root / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        partial = tar.with_suffix(".tar.partial")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
        partial.rename(tar)
        shutil.rmtree(root)
        return tar


def fresh_root(kind: str, arch: str, where: Path) -> Path:
    """A new root of ``kind`` at ``where``, unpacked from the cached tarball."""
    tar = base_tarball(kind, arch)
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(where), "--numeric-owner", "-xf", str(tar)], check=True)
    shutil.copyfile("/etc/resolv.conf", where / "etc/resolv.conf")
    return where


def remove_root(root: Path) -> None:
    """Delete a root; refuses anything still mounted inside (a namespace should have none)."""
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    inside = [m.split()[1] for m in mounts if len(m.split()) > 1 and m.split()[1].startswith(str(root) + "/")]
    if inside:
        raise RootError(f"still mounted under {root}: {inside}")
    shutil.rmtree(root, ignore_errors=True)


def chroot_argv(root: Path, argv: Sequence[str], user: str | None = None) -> list[str]:
    """The host command that runs ``argv`` in ``root`` with /proc, /dev and /dev/pts
    mounted in a private mount namespace (gone when the command ends); ``user`` drops
    to that account (with its groups, e.g. dialout) inside the root."""
    inner = list(argv)
    if user is not None:
        inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *inner]
    r = shlex.quote(str(root))
    script = (f"mount --make-rprivate / && mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev "
              f"&& exec chroot {r} /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
              f"HOME=/root LANG=C.UTF-8 \"$@\"")
    return ["unshare", "--mount", "--", "sh", "-c", script, "sh", *inner]


def run_in(root: Path, argv: Sequence[str], user: str | None = None, timeout: float = 1800,
           env: dict[str, str] | None = None, log: Path | None = None) -> str:
    """Run ``argv`` in ``root`` and return its output; RootError with the tail on failure."""
    inner = list(argv)
    if env:
        inner = ["env", *(f"{k}={v}" for k, v in env.items()), *inner]
    done = subprocess.run(chroot_argv(root, inner, user), capture_output=True, text=True, timeout=timeout,
                          check=False)
    out = done.stdout + done.stderr
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(inner)}\n{out}\n")
    if done.returncode != 0:
        raise RootError(f"in {root}: {shlex.join(inner)} exited {done.returncode}:\n{out[-3000:]}")
    return out
