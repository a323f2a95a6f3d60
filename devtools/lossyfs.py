"""A FUSE filesystem that forgets what was never fsynced: a power cut for the tests.

A killed process keeps what the kernel cached; a power cut does not. Mounted over a
backing directory (the "disk"), this filesystem holds every write in its own memory
until the file is fsynced (``fsync`` or ``fdatasync``), and every change to the
directory (create, unlink, rename) until the directory itself is fsynced; the backing
directory only ever holds what was made durable. A power cut kills this process:

- SIGKILL: everything not yet durable is gone (an fsync in progress may be half done,
  as on a disk);
- SIGUSR1: a torn cut, as a disk with a volatile cache may leave things: each 4 KiB
  block written since its file's last fsync reaches the disk or not at random, and the
  directory as it is now reaches it or not, then the process exits without unmounting;
- SIGTERM: a clean shutdown (sync, then unmount).

SIGUSR2 turns the filesystem read-only, or back: every write, create, truncate,
rename, unlink, fsync of unsynced bytes and open for writing then fails with EROFS, as a
worn SD card's does (the kernel remounts it read-only under the files held open; a
``mount -o remount,ro`` refuses while a file is open for writing).

After a cut, ``fusermount3 -u -z`` detaches the dead mount and a new mount over the same
backing directory shows what survived. ``LossyMount`` does all that for the tests.

The backing directory holds ``names`` (the durable directory, JSON: name -> inode) and
``inodes/<n>`` (the durable bytes of inode n); inodes no durable name refers to are
removed when it is mounted.

Fidelity limits, what a real disk and filesystem do that this does not:
- one flat directory: no subdirectories, links, symlinks, xattrs or special files;
- a block is persisted whole (a real disk may tear inside a 4 KiB block only below
  its atomic sector size, which SQLite's default powersafe-overwrite also assumes);
- fsync of a file persists its data and size, not its name (as POSIX says; ext4 in
  practice often persists the name too, so this is the stricter model); fsync of the
  directory persists every name in it, not only the ones the caller cares about;
- times and modes are kept in memory only; a new mount shows the files as 0644 with
  the mount time;
- the backing directory is written with plain writes, not fsynced: the host's own
  power is out of scope, only this process's death is the cut;
- every file is held whole in memory while mounted (fine for an outbox of a few MB);
- POSIX record locks are not implemented here, so the kernel's FUSE module keeps them
  itself, between the processes of this machine, as on a local disk; a shared
  writable mmap (SQLite's ``-shm``) goes through the kernel's page cache like any
  write, and what it dirtied is written here on msync, munmap or writeback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import trio

BLOCK = 4096
ATTR_TIMEOUT = 1.0
START_TIMEOUT = 10.0


class Node:
    """One file: its current bytes, and which blocks changed since its last fsync."""

    def __init__(self, ino: int, data: bytearray) -> None:
        self.ino = ino
        self.data = data
        self.dirty: set[int] = set()
        self.size_dirty = False
        self.mode = 0o644
        self.mtime_ns = time.time_ns()
        self.lookups = 0


class Volume:
    """The filesystem's state, independent of FUSE: current names and bytes in memory,
    durable ones in the backing directory."""

    def __init__(self, backing: str) -> None:
        self.backing = Path(backing)
        self.inode_dir = self.backing / "inodes"
        self.inode_dir.mkdir(parents=True, exist_ok=True)
        names_file = self.backing / "names"
        durable: dict[str, int] = json.loads(names_file.read_text()) if names_file.exists() else {}
        self.names: dict[bytes, int] = {k.encode("utf-8", "surrogateescape"): v for k, v in durable.items()}
        self.nodes: dict[int, Node] = {}
        for path in self.inode_dir.iterdir():
            if int(path.name) not in durable.values():
                path.unlink()  # durable bytes no durable name leads to: gone with the cut
        for ino in self.names.values():
            path = self.inode_dir / str(ino)
            self.nodes[ino] = Node(ino, bytearray(path.read_bytes() if path.exists() else b""))
        self.next_ino = max([pyfuse3.ROOT_INODE, *self.names.values()]) + 1
        self.mounted_ns = time.time_ns()
        self.read_only = False

    def writable(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def lookup(self, name: bytes) -> Node:
        ino = self.names.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.nodes[ino]

    def create(self, name: bytes, mode: int) -> Node:
        node = Node(self.next_ino, bytearray())
        node.mode = mode & 0o7777
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.names[name] = node.ino
        return node

    def write(self, node: Node, off: int, buf: bytes) -> None:
        end = off + len(buf)
        if end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
            node.size_dirty = True
        node.data[off:end] = buf
        node.dirty.update(range(off // BLOCK, (end - 1) // BLOCK + 1))
        node.mtime_ns = time.time_ns()

    def truncate(self, node: Node, size: int) -> None:
        if size < len(node.data):
            del node.data[size:]
            if size % BLOCK:
                node.dirty.add(size // BLOCK)
        else:
            old = len(node.data)
            node.data.extend(bytes(size - old))
            node.dirty.update(range(old // BLOCK, size // BLOCK + 1))
        node.size_dirty = True
        node.mtime_ns = time.time_ns()

    def unlink(self, name: bytes) -> None:
        node = self.lookup(name)
        del self.names[name]
        self.forget(node, 0)

    def rename(self, old: bytes, new: bytes, flags: int) -> None:
        ino = self.lookup(old).ino
        if flags & pyfuse3.RENAME_EXCHANGE:
            other = self.lookup(new).ino
            self.names[old], self.names[new] = other, ino
            return
        if flags & pyfuse3.RENAME_NOREPLACE and new in self.names:
            raise pyfuse3.FUSEError(errno.EEXIST)
        replaced = self.names.get(new)
        self.names[new] = self.names.pop(old)
        if replaced is not None:
            self.forget(self.nodes[replaced], 0)

    def forget(self, node: Node, n: int) -> None:
        """The kernel forgot ``n`` lookups; a node with no name and no lookup is gone
        (from memory: its durable bytes stay until a directory fsync drops its name)."""
        node.lookups -= n
        if node.lookups <= 0 and node.ino not in self.names.values():
            self.nodes.pop(node.ino, None)

    def fsync(self, node: Node, blocks: set[int] | None = None) -> None:
        """Make the node's bytes and size durable (only ``blocks`` of them, for a torn cut)."""
        fd = os.open(self.inode_dir / str(node.ino), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for block in sorted(node.dirty if blocks is None else blocks):
                os.pwrite(fd, node.data[block * BLOCK:(block + 1) * BLOCK], block * BLOCK)
            if blocks is None or node.size_dirty:
                os.ftruncate(fd, len(node.data))
        finally:
            os.close(fd)
        if blocks is None:
            node.dirty.clear()
            node.size_dirty = False

    def fsyncdir(self) -> None:
        """Make the directory as it is now durable, atomically (a rename on the backing side)."""
        tmp = self.backing / "names.tmp"
        tmp.write_text(json.dumps({k.decode("utf-8", "surrogateescape"): v for k, v in self.names.items()}))
        os.replace(tmp, self.backing / "names")

    def sync(self) -> None:
        """Everything durable: a clean shutdown."""
        for node in list(self.nodes.values()):
            self.fsync(node)
        self.fsyncdir()

    def torn(self, rng: random.Random) -> None:
        """What a disk with a volatile write cache may hold after a cut: each unsynced block
        written or not, at random, and the directory as it is now, or as it was."""
        for node in list(self.nodes.values()):
            picked = {b for b in node.dirty if rng.random() < 0.5}
            if picked:
                self.fsync(node, picked)
        if rng.random() < 0.5:
            self.fsyncdir()

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_blksize = BLOCK
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        if ino == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            stamp = self.mounted_ns
        else:
            node = self.node(ino)
            entry.st_mode = stat.S_IFREG | node.mode
            entry.st_nlink = int(ino in self.names.values())
            entry.st_size = len(node.data)
            entry.st_blocks = (len(node.data) + 511) // 512
            stamp = node.mtime_ns
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = stamp
        return entry


class LossyOps(pyfuse3.Operations):
    """The FUSE requests, mapped onto a ``Volume``; file handles are inode numbers."""

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        self.volume = volume

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self.volume.attrs(node.ino)

    @staticmethod
    def _root(parent: int) -> None:
        if parent != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._root(parent_inode)
        if name in (b".", b".."):
            return self.volume.attrs(pyfuse3.ROOT_INODE)
        return self._looked_up(self.volume.lookup(name))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, n in inode_list:
            if ino in self.volume.nodes:
                self.volume.forget(self.volume.nodes[ino], n)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.volume.attrs(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            self.volume.writable()
            node = self.volume.node(inode)
            if fields.update_size:
                self.volume.truncate(node, attr.st_size)
            if fields.update_mode:
                node.mode = attr.st_mode & 0o7777
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
        return self.volume.attrs(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._root(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.volume.names.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self.volume.attrs(ino), i + 1):
                return
            self.volume.nodes[ino].lookups += 1

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not self.volume.read_only:
            self.volume.fsyncdir()

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.volume.node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.volume.writable()
        if flags & os.O_TRUNC:
            self.volume.truncate(node, 0)
        return pyfuse3.FileInfo(fh=inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._root(parent_inode)
        self.volume.writable()
        if name in self.volume.names:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            node = self.volume.lookup(name)
        else:
            node = self.volume.create(name, mode)
        return pyfuse3.FileInfo(fh=node.ino), self._looked_up(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.volume.node(fh).data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.volume.writable()
        self.volume.write(self.volume.node(fh), off, buf)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self.volume.node(fh)
        if node.dirty or node.size_dirty:
            self.volume.writable()
        self.volume.fsync(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._root(parent_inode)
        self.volume.writable()
        self.volume.unlink(name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._root(parent_inode_old)
        self._root(parent_inode_new)
        self.volume.writable()
        self.volume.rename(name_old, name_new, flags)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        disk = os.statvfs(self.volume.backing)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(out, field, getattr(disk, field))
        return out


async def _serve(volume: Volume, seed: int) -> None:
    """The FUSE loop, and the signals that end it: a clean stop or a torn power cut."""
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                           signal.SIGUSR2) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR2:
                        volume.read_only = not volume.read_only
                        print(f"read-only {volume.read_only}", flush=True)
                        continue
                    if signum == signal.SIGUSR1:
                        volume.torn(random.Random(seed))
                        os._exit(0)  # no unmount, no cleanup: the power is off
                    volume.sync()
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.lossyfs", description=__doc__.split("\n\n")[0])
    p.add_argument("backing", help="directory holding what is durable")
    p.add_argument("mountpoint")
    p.add_argument("--seed", type=int, default=0, help="random choices of a torn cut (SIGUSR1)")
    args = p.parse_args(argv)
    volume = Volume(args.backing)
    pyfuse3.init(LossyOps(volume), args.mountpoint, set(pyfuse3.default_options) | {"fsname=lossyfs"})
    print(f"mounted {args.mountpoint}", flush=True)
    try:
        trio.run(_serve, volume, args.seed)
    finally:
        pyfuse3.close(unmount=True)
    return 0


def _mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, also when its FUSE process is dead (a stat of
    it fails then, so ``os.path.ismount`` says no)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


class LossyMount:
    """A ``python -m devtools.lossyfs`` process, mounted, cut and mounted again by pid."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.ro = False

    def start(self, seed: int = 0) -> LossyMount:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "devtools.lossyfs", str(self.backing), str(self.mountpoint), "--seed",
                 str(seed)], cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._detach()
                raise OSError(f"lossyfs did not mount {self.mountpoint}: {self.log.read_text(errors='replace')}")
            time.sleep(0.02)
        return self

    def cut(self, torn: bool = False) -> None:
        """Power off: the process dies with what it held (SIGKILL), or after leaving a
        random part of it on the disk (SIGUSR1); the dead mount is detached."""
        self._end(signal.SIGUSR1 if torn else signal.SIGKILL)

    def read_only(self, on: bool) -> None:
        """Writes refused with EROFS from now on (or allowed again), under the open files."""
        assert self.proc is not None
        if on == self.ro:
            return
        self.ro = on
        mark = f"read-only {on}"
        seen = self.log.read_text(errors="replace").count(mark)
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + START_TIMEOUT
        while self.log.read_text(errors="replace").count(mark) <= seen:
            if time.monotonic() > deadline:
                raise OSError(f"lossyfs did not switch to {mark}: {self.log.read_text(errors='replace')}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Clean shutdown: everything synced, unmounted."""
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        self._detach()

    def _detach(self) -> None:
        if _mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False, timeout=10,
                           capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
