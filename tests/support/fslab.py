"""A real ext4 filesystem in a real UML guest, for the mixed-page tests (tests/test_pages_uml.py).

The Linux ubd driver misreads a 4 KiB page of a COW device whose eight
bitmap bits are mixed (some set, some clear) when the page is not the last
one of a multi-page read request: the page cache's readahead makes such
requests, so a COW file with mixed pages corrupts what a guest's ext4 reads
(``EXT4-fs error ... checksum invalid``). The helpers here build the pieces
the tests need, each independent of ubdcow where it serves as an oracle:

- :func:`make_tree` / :func:`make_ext4`: a deterministic folder of a few
  hundred files (random, text-like, sparse, some > 1 MiB, nested folders)
  and an ext4 image made from it with ``mkfs.ext4 -d``;
- :class:`Workload`: a guest script that mounts ``/dev/ubdb`` read-write and
  creates, partly rewrites, appends to, truncates, renames and deletes files,
  makes folders, runs ``fstrim`` and unmounts, with a host-side model of the
  resulting tree (the expected sha256 manifest);
- :func:`verify_script` / :func:`verify`: a guest that mounts the device
  read-only and checks every file with ``sha256sum -c`` (ordinary buffered
  reads, so readahead makes multi-page requests), lists files and folders,
  and collects ``EXT4-fs error`` lines;
- :func:`rewrite_sectors_lines`: a guest rewriting chosen sectors with their
  own content by 512-byte O_DIRECT requests (which makes mixed pages);
- :func:`cow_geometry`, :func:`mixed_pages`, :func:`write_sectors`: the COW
  header, a mixed-page scan of the raw bitmap bytes (numpy) and a plain
  ``os.pwrite`` writer of sectors, written from docs/format.md, not from ubdcow;
- :func:`boot`: one guest run with a timeout that kills the whole UML
  process group, asserting the guest reached the end of its script.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from .uml import run_guest, ubd_arg

SECTOR = 512
PAGE = 4096
PAGE_SECTORS = PAGE // SECTOR
FAIL = "UBDCOW-FAIL"
MAGIC = 0x4F4F4F4D
#: a fixed time for the tree's files and mkfs (2023-11-14); only the inodes' ctimes (and what the guest
#: does) differ from run to run
FIXED_TIME = 1_700_000_000


# -- gates ---------------------------------------------------------------------------------------


def require_host_tool(name: str, package: str) -> str:
    """Path of a host program (the guest runs the host's binaries through hostfs); see ``conftest.require_tool``."""
    return require_tool(name, package)


#: the host programs the guest scripts run, and the Debian package of each
GUEST_TOOLS = {
    "mount": "mount", "umount": "mount", "sha256sum": "coreutils", "dd": "coreutils", "fstrim": "util-linux",
    "find": "findutils", "sort": "coreutils", "xargs": "findutils", "dmesg": "util-linux", "grep": "grep",
    "truncate": "coreutils", "cp": "coreutils", "mv": "coreutils", "rm": "coreutils", "mkdir": "coreutils",
    "cat": "coreutils", "wc": "coreutils", "sync": "coreutils",
}


def guest_tool_lines() -> str:
    """Gate every program the guest scripts use on the host, and check it again inside the guest."""
    lines = []
    for name, package in GUEST_TOOLS.items():
        require_host_tool(name, package)
        lines.append(checked(f"command -v {name} >/dev/null"))
    lines.append(checked("grep -qw ext4 /proc/filesystems"))  # the guest kernel must know ext4
    return "".join(lines)


# -- guest runs ----------------------------------------------------------------------------------


def q(path: str | os.PathLike[str]) -> str:
    return shlex.quote(os.path.abspath(path))


def checked(cmd: str) -> str:
    """A guest script line that prints a marker the test looks for when ``cmd`` fails."""
    return f"{cmd} || echo {FAIL}: {shlex.quote(cmd)}\n"


@dataclass
class Run:
    """One finished guest run."""

    console: str
    seconds: float

    def tail(self, n: int = 4000) -> str:
        return self.console[-n:]

    def values(self, key: str) -> list[str]:
        """The values of the ``key=VALUE`` marker lines the guest printed."""
        return [line.split("=", 1)[1].strip() for line in self.console.splitlines() if line.startswith(key + "=")]


def boot(script: str, *ubd: str, workdir: Path, timeout: float = 150, mem: str = "192M",
         allow_failures: bool = False) -> Run:
    """Boot a guest running ``script``; fail with the console's tail if it did not reach the end.

    Unless ``allow_failures``, also fail when a :func:`checked` command failed.
    """
    t0 = time.monotonic()
    proc = run_guest(script, *ubd, workdir=workdir, mem=mem, background=True)
    assert isinstance(proc, subprocess.Popen)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # UML runs several host processes, all in this group
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"guest timed out after {timeout} s; console tail:\n{out.decode(errors='replace')[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    run = Run(out.decode(errors="replace"), time.monotonic() - t0)
    assert "UBDCOW-GUEST-END" in run.console, "guest did not finish its script; console tail:\n" + run.tail()
    if not allow_failures:
        failures = [line for line in run.console.splitlines() if line.startswith(FAIL)]
        assert not failures, "guest commands failed:\n" + "\n".join(failures) + "\nconsole tail:\n" + run.tail()
    return run


# -- the tree and the image ----------------------------------------------------------------------

WORDS = ("copy on write overlay backing sector page bitmap kernel guest ext4 inode extent journal block "
         "user mode linux ubd driver readahead request checksum superblock directory file data hole").split()


def _content(rng: random.Random, size: int) -> bytes:
    """``size`` bytes of one of several kinds: random, text-like, repetitive, or mostly zeros."""
    kind = rng.random()
    if size == 0:
        return b""
    if kind < 0.45:
        return rng.randbytes(size)
    if kind < 0.75:
        out = bytearray()
        while len(out) < size:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 14)))
            out += f"{rng.randrange(10**6):06d} {line}\n".encode()
        return bytes(out[:size])
    if kind < 0.85:
        unit = rng.randbytes(rng.randrange(1, 700))
        return (unit * (size // len(unit) + 1))[:size]
    buf = bytearray(size)  # mostly zeros, with islands of data
    for _ in range(max(1, size // 20000)):
        a = rng.randrange(size)
        n = min(rng.randrange(1, 3000), size - a)
        buf[a : a + n] = rng.randbytes(n)
    return bytes(buf)


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.05:
        return rng.choice((0, 1, 511, 512, 4095, 4096, 4097))
    if r < 0.42:
        return rng.randrange(1, 4096)
    if r < 0.80:
        return rng.randrange(4096, 65536)
    if r < 0.985:
        return rng.randrange(65536, 250_000)
    return rng.randrange(1 << 20, 3 << 20)


#: the part of the tree the workload never touches (like most of a root filesystem): its inodes,
#: folders and data stay in the backing file, so a guest can make mixed pages in their metadata
STATIC = "./static"


def make_tree(root: Path, seed: int, files: int = 320, static_files: int = 500) -> tuple[dict[str, bytes], set[str]]:
    """Write a deterministic tree under ``root``.

    Returns ``{"./rel/path": content}`` and the folders (``./rel``, some of
    them empty). ``files`` files in nested folders up to four deep, sizes from
    0 to 3 MiB (at least four above 1 MiB), two sparse files (holes made by
    seeking), and ``static_files`` small files under :data:`STATIC`.
    """
    rng = random.Random(seed)
    folders = ["."]
    for i in range(36):
        parent = rng.choice([f for f in folders if f.count("/") < 4])
        folders.append(f"{parent}/d{i:02d}")
    tree: dict[str, bytes] = {}
    for i in range(files):
        folder = rng.choice(folders)
        size = _size(rng) if i >= 4 else rng.randrange(1 << 20, 3 << 20)  # the first four are big
        tree[f"{folder}/f{i:03d}.{rng.choice(('txt', 'bin', 'dat', 'log', 'img'))}"] = _content(rng, size)
    for i, (off, n) in enumerate(((300_000, 5000), (2_000_003, 70_000))):  # sparse: a hole, then data
        tree[f"./d00/sparse{i}.img"] = bytes(off) + rng.randbytes(n)
    static = [STATIC] + [f"{STATIC}/s{i}" for i in range(8)]
    folders += static
    for i in range(static_files):
        tree[f"{rng.choice(static)}/doc{i:03d}.txt"] = _content(rng, rng.choice((0, rng.randrange(1, 12_000))))
    for f in folders:
        (root / f).mkdir(parents=True, exist_ok=True)
    for rel, data in tree.items():
        if "sparse" in rel:
            with open(root / rel, "wb") as out:
                start = len(data) - len(data.lstrip(b"\0"))
                out.seek(start)
                out.write(data[start:])
        else:
            (root / rel).write_bytes(data)
    for path in [root, *root.rglob("*")]:
        os.utime(path, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    return tree, set(folders) - {"."}


def make_ext4(image: Path, source: Path, size: str) -> None:
    """``mkfs.ext4 -d source`` into a new ``image`` of ``size``: 4 KiB blocks (like any real root image), fixed UUID."""
    mkfs = require_host_tool("mkfs.ext4", "e2fsprogs")
    uuid = "6f7d3a52-8e1b-4c2a-9d57-0c5e6b1f2a33"
    # inode tables and journal written now (not zeroed lazily by the kernel at the first mount): the
    # pages the workload does not change stay in the backing file
    extended = f"hash_seed={uuid},lazy_itable_init=0,lazy_journal_init=0"
    cmd = [mkfs, "-q", "-F", "-b", "4096", "-U", uuid, "-E", extended, "-L", "ubdcow-lab", "-d", str(source),
           str(image), size]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_TIME))
    proc = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode(errors='replace')}"


def fsck(image: Path) -> str:
    """``e2fsck -fn image``; assert it found nothing (exit 0) and return its report."""
    e2fsck = require_host_tool("e2fsck", "e2fsprogs")
    proc = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, timeout=120)
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"e2fsck -fn {image.name} exited {proc.returncode}:\n{text[-3000:]}"
    return text


def manifest_text(tree: dict[str, bytes]) -> str:
    """The manifest ``find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum`` prints for ``tree``."""
    return "".join(f"{hashlib.sha256(tree[p]).hexdigest()}  {p}\n" for p in sorted(tree, key=os.fsencode))


def metadata_blocks(image: Path) -> list[tuple[int, int]]:
    """``(first, last)`` 4 KiB blocks of the superblocks, group descriptors, bitmaps and inode tables (``dumpe2fs``)."""
    dumpe2fs = require_host_tool("dumpe2fs", "e2fsprogs")
    proc = subprocess.run([dumpe2fs, str(image)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    found = re.findall(r"(?:superblock|Group descriptors|Reserved GDT blocks|Block bitmap|Inode bitmap|Inode table) "
                       r"at (\d+)(?:-(\d+))?", proc.stdout.decode())
    ranges = [(int(a), int(b or a)) for a, b in found]
    assert any(b - a > 8 for a, b in ranges), f"dumpe2fs listed no inode table: {ranges}"
    return ranges


# -- the guest workload --------------------------------------------------------------------------


@dataclass
class Workload:
    """Guest script lines that change a mounted tree, and the model of the tree they leave.

    Paths are ``./rel`` relative to the mount point ``mnt``; payloads are host
    files under ``payload_dir`` that the guest reads through hostfs.
    """

    tree: dict[str, bytes]
    folders: set[str]
    mnt: Path
    payload_dir: Path
    rng: random.Random
    lines: list[str] = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.tree = dict(self.tree)
        self.folders = set(self.folders) | {"."}
        self.payload_dir.mkdir(parents=True, exist_ok=True)

    def _at(self, rel: str) -> str:
        return q(self.mnt / rel)

    def _payload(self, data: bytes) -> str:
        self._n += 1
        path = self.payload_dir / f"p{self._n:04d}"
        path.write_bytes(data)
        return q(path)

    def _file(self, min_size: int = 0) -> str:
        choices = sorted(p for p, d in self.tree.items() if len(d) >= min_size and not p.startswith(STATIC + "/"))
        return self.rng.choice(choices)

    def _folder(self, max_depth: int = 99, min_depth: int = 0) -> str:
        choices = sorted(f for f in self.folders
                         if min_depth <= f.count("/") <= max_depth and f != STATIC and not f.startswith(STATIC + "/"))
        return self.rng.choice(choices)

    def mkdir(self) -> str:
        parent = self._folder(max_depth=4)
        rel = f"{parent}/new{self._n:04d}"
        self._n += 1
        self.lines.append(checked(f"mkdir -p {self._at(rel)}"))
        self.folders.add(rel)
        return rel

    def create(self, size: int | None = None) -> None:
        folder = self._folder()
        rel = f"{folder}/c{self._n:04d}.dat"
        data = _content(self.rng, _size(self.rng) if size is None else size)
        self.lines.append(checked(f"cp {self._payload(data)} {self._at(rel)}"))
        self.tree[rel] = data

    def rewrite(self) -> None:
        """Overwrite a stretch in the middle of a file in place (``dd conv=notrunc`` at an odd offset)."""
        rel = self._file(min_size=2)
        old = self.tree[rel]
        off = self.rng.randrange(1, len(old))
        data = _content(self.rng, self.rng.choice((1, 3, 700, 5000, 40_000, 150_000)))
        self.lines.append(checked(f"dd if={self._payload(data)} of={self._at(rel)} bs=65536 seek={off} "
                                  "oflag=seek_bytes conv=notrunc status=none"))
        new = bytearray(old)
        new[off : off + len(data)] = data  # past the end: the file grows
        self.tree[rel] = bytes(new)

    def append(self) -> None:
        rel = self._file()
        data = _content(self.rng, self.rng.choice((1, 100, 4096, 9000, 200_000)))
        self.lines.append(checked(f"cat {self._payload(data)} >> {self._at(rel)}"))
        self.tree[rel] += data

    def replace(self) -> None:
        """Write a file anew (``cp`` truncates it first: its old blocks are freed)."""
        rel = self._file(min_size=65536)
        data = _content(self.rng, self.rng.randrange(10_000, 600_000))
        self.lines.append(checked(f"cp {self._payload(data)} {self._at(rel)}"))
        self.tree[rel] = data

    def truncate(self) -> None:
        rel = self._file(min_size=4)
        old = self.tree[rel]
        n = self.rng.choice((self.rng.randrange(len(old)), len(old) + self.rng.randrange(1, 300_000)))
        self.lines.append(checked(f"truncate -s {n} {self._at(rel)}"))
        self.tree[rel] = old[:n] + bytes(max(0, n - len(old)))

    def rename(self) -> None:
        rel = self._file()
        new = f"{self._folder()}/m{self._n:04d}.mv"
        self._n += 1
        self.lines.append(checked(f"mv {self._at(rel)} {self._at(new)}"))
        self.tree[new] = self.tree.pop(rel)

    def delete(self) -> None:
        rel = self._file()
        self.lines.append(checked(f"rm {self._at(rel)}"))
        del self.tree[rel]

    def delete_folder(self) -> None:
        folder = self._folder(min_depth=2)
        self.lines.append(checked(f"rm -r {self._at(folder)}"))
        self.tree = {p: d for p, d in self.tree.items() if not p.startswith(folder + "/")}
        self.folders = {f for f in self.folders if f != folder and not f.startswith(folder + "/")}

    def random_ops(self, count: int) -> None:
        ops = ([self.create] * 5 + [self.rewrite] * 6 + [self.append] * 3 + [self.replace] * 2
               + [self.truncate] * 2 + [self.rename] * 2 + [self.delete] * 4 + [self.mkdir])
        for _ in range(count):
            self.rng.choice(ops)()

    def script(self, device: str, manifest: Path, folders: Path) -> str:
        """Mount, change, sync, fstrim, write the manifest (to a host file) and unmount."""
        mnt = q(self.mnt)
        return "".join([
            guest_tool_lines(),
            f"mkdir -p {mnt}\n",
            checked(f"mount -t ext4 -o noatime /dev/{device} {mnt}"),  # noatime: reading leaves inodes alone
            *self.lines,
            checked("sync"),
            checked(f"fstrim -v {mnt}"),
            f"cd {mnt}\n",
            checked(f"find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > {q(manifest)}"),
            checked(f"find . -type d | LC_ALL=C sort > {q(folders)}"),
            "cd /\n",
            checked(f"umount {mnt}"),
            "echo FSLAB-WORKLOAD-DONE=1\n",
        ])


def folders_text(folders: Iterable[str]) -> str:
    """What ``find . -type d | LC_ALL=C sort`` prints for these folders (``.`` and mkfs's lost+found added)."""
    return "".join(f + "\n" for f in sorted(set(folders) | {".", "./lost+found"}, key=os.fsencode))


# -- guest verification --------------------------------------------------------------------------


def verify_script(device: str, mnt: Path, manifest: Path, out: Path) -> str:
    """Mount ``/dev/device`` read-only (no journal replay) and check every file with ``sha256sum -c``.

    Writes ``out/sha.txt`` (the lines of files that failed), ``out/files.txt``
    and ``out/dirs.txt`` (what the guest sees), ``out/dmesg.txt``, and prints
    ``FSLAB-SHA-RC=``, ``FSLAB-EXT4-ERRORS=`` and ``FSLAB-VERIFY-DONE=1``.
    """
    out.mkdir(parents=True, exist_ok=True)
    m = q(mnt)
    return "".join([
        guest_tool_lines(),
        f"mkdir -p {m}\n",
        checked(f"mount -t ext4 -o ro,noload /dev/{device} {m}"),
        f"cd {m}\n",
        f"sha256sum -c --quiet {q(manifest)} > {q(out / 'sha.txt')} 2>&1\n",
        "echo FSLAB-SHA-RC=$?\n",
        checked(f"find . -type f | LC_ALL=C sort > {q(out / 'files.txt')}"),
        checked(f"find . -type d | LC_ALL=C sort > {q(out / 'dirs.txt')}"),
        "cd /\n",
        checked(f"umount {m}"),
        f"dmesg > {q(out / 'dmesg.txt')}\n",
        f"echo FSLAB-EXT4-ERRORS=$(grep -ci 'EXT4-fs error' {q(out / 'dmesg.txt')})\n",
        "echo FSLAB-VERIFY-DONE=1\n",
    ])


@dataclass
class Verdict:
    """What a verification guest saw."""

    sha_rc: int
    bad_files: list[str]  # sha256sum -c lines: "./path: FAILED" or "FAILED open or read"
    ext4_errors: list[str]  # EXT4-fs error lines, from dmesg and the console
    files_match: bool
    dirs_match: bool
    failed_commands: list[str]  # mount, find or umount in the guest
    run: Run

    @property
    def mount_failed(self) -> bool:
        return any("mount -t ext4" in line for line in self.failed_commands)

    @property
    def clean(self) -> bool:
        return (self.sha_rc == 0 and not self.bad_files and not self.ext4_errors and self.files_match
                and self.dirs_match and not self.failed_commands)

    def summary(self) -> str:
        return (f"sha256sum rc {self.sha_rc}, {len(self.bad_files)} bad files, {len(self.ext4_errors)} EXT4-fs error "
                f"lines, file list {'ok' if self.files_match else 'DIFFERS'}, folder list "
                f"{'ok' if self.dirs_match else 'DIFFERS'}, {len(self.failed_commands)} failed commands"
                f"{' (the mount failed)' if self.mount_failed else ''} ({self.run.seconds:.1f} s)")

    def details(self) -> str:
        return (self.summary() + "\nfailed: " + "; ".join(self.failed_commands)
                + "\nbad files: " + "; ".join(self.bad_files[:10])
                + "\nEXT4 errors:\n" + "\n".join(self.ext4_errors[:10]) + "\nconsole tail:\n" + self.run.tail(3000))


def verify(cow: Path, lab_dir: Path, name: str, manifest: Path, expected_files: str, expected_dirs: str,
           *, timeout: float = 150) -> Verdict:
    """Boot a guest with ``cow`` as a read-only /dev/ubdb and check the tree it holds against ``manifest``."""
    out = lab_dir / f"verify-{name}"
    if out.exists():
        shutil.rmtree(out)
    script = verify_script("ubdb", lab_dir / f"mnt-{name}", manifest, out)
    # "r": a read-only device, so the check cannot change the file it checks
    run = boot(script, ubd_arg(cow, flags="r"), workdir=lab_dir, timeout=timeout, allow_failures=True)
    assert run.values("FSLAB-VERIFY-DONE") == ["1"], "verification did not finish:\n" + run.tail()
    failures = [line for line in run.console.splitlines() if line.startswith(FAIL)]
    # what a corrupt filesystem can make fail is part of the verdict; anything else (a missing tool) is not
    tolerated = ("mount -t ext4", "umount", "find .")
    other = [line for line in failures if not any(t in line for t in tolerated)]
    assert not other, "guest commands failed:\n" + "\n".join(other) + "\n" + run.tail()
    sha_lines = (out / "sha.txt").read_text(errors="replace").splitlines() if (out / "sha.txt").exists() else []
    dmesg = (out / "dmesg.txt").read_text(errors="replace") if (out / "dmesg.txt").exists() else ""
    # the same message is in dmesg (with a time stamp) and on the console (without): count it once
    errors = [re.sub(r"^\[\s*[0-9.]+\]\s*", "", line.strip())
              for line in (dmesg + "\n" + run.console).splitlines() if "ext4-fs error" in line.lower()]
    errors = list(dict.fromkeys(errors))
    files = (out / "files.txt").read_text(errors="replace") if (out / "files.txt").exists() else ""
    dirs = (out / "dirs.txt").read_text(errors="replace") if (out / "dirs.txt").exists() else ""
    rc = run.values("FSLAB-SHA-RC")
    return Verdict(int(rc[0]) if rc else -1, sha_lines, errors, files == expected_files, dirs == expected_dirs,
                   [line for line in failures if line not in other], run)


# -- COW files, read and written without ubdcow ---------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    layout: str
    size: int
    bitmap_offset: int
    bitmap_len: int
    data_offset: int

    @property
    def sectors(self) -> int:
        return -(-self.size // SECTOR)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cow_geometry(path: Path) -> Geometry:
    """The geometry of a v2 or v3 COW file, from its header bytes (docs/format.md, "Geometry")."""
    with open(path, "rb") as f:
        head = f.read(4136)
    magic, version = struct.unpack(">II", head[:8])
    assert magic == MAGIC, f"{path}: not a big-endian COW file (magic {magic:#x})"
    if version == 2:
        size, sectorsize = struct.unpack(">Qi", head[4108:4120])
        assert sectorsize == SECTOR
        bitmap_offset = 4120
        bitmap_len = (size + sectorsize - 1) // (8 * sectorsize)
        return Geometry("v2", size, bitmap_offset, bitmap_len, _round_up(bitmap_offset + bitmap_len, sectorsize))
    assert version == 3, f"{path}: version {version}"
    assert head[32:36] != bytes(4), f"{path}: a v3-broken header"
    size, sectorsize, alignment, cow_format = struct.unpack(">QIII", head[12:32])
    assert (sectorsize, cow_format) == (SECTOR, 0)
    bitmap_offset = _round_up(4128, alignment)
    sectors = -(-size // sectorsize)
    bitmap_len = -(-sectors // 8)
    return Geometry("v3", size, bitmap_offset, bitmap_len, _round_up(bitmap_offset + bitmap_len, alignment))


def sector_bits(path: Path) -> np.ndarray:
    """One bool per sector of the disk: is its bit set? (bits past the bitmap count as clear.)"""
    g = cow_geometry(path)
    with open(path, "rb") as f:
        f.seek(g.bitmap_offset)
        raw = np.frombuffer(f.read(g.bitmap_len), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little").astype(bool)[: g.sectors]
    return np.concatenate([bits, np.zeros(g.sectors - bits.size, dtype=bool)])


def mixed_pages(path: Path) -> list[int]:
    """Byte offsets of the 4 KiB pages of the disk whose bits are mixed, from the raw bitmap bytes.

    Page *p* is bitmap byte *p*: mixed when it is neither 0x00 nor 0xFF. For a
    last, partial page only the bits of sectors on the disk count.
    """
    g = cow_geometry(path)
    nbytes = -(-g.sectors // 8)
    assert g.bitmap_len >= nbytes, f"{path}: the bitmap is short of the disk's sectors (the v1/v2 rounding bug)"
    with open(path, "rb") as f:
        f.seek(g.bitmap_offset)
        raw = np.frombuffer(f.read(nbytes), dtype=np.uint8)
    assert raw.size == nbytes, f"{path}: truncated bitmap"
    full = np.full(nbytes, 0xFF, dtype=np.uint8)
    if g.sectors % 8:
        full[-1] = (1 << (g.sectors % 8)) - 1
    masked = raw & full
    mixed = (masked != 0) & (masked != full)
    return [int(p) * PAGE for p in np.flatnonzero(mixed)]


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of True in a bool array."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def write_sectors(path: Path, image: np.ndarray, sectors: np.ndarray) -> None:
    """Store sectors ``sectors`` (bool per sector) of ``image`` (the disk's bytes) in the COW file at ``path``.

    Plain ``os.pwrite``: the data of each run at ``data_offset + 512 * first``
    (all-zero sectors are left as holes: a set bit over a hole reads as
    zeros), then the bitmap bytes, OR-ed into the ones already there.
    """
    g = cow_geometry(path)
    assert sectors.size == g.sectors and image.size == g.size
    fd = os.open(path, os.O_RDWR)
    try:
        for first, count in runs(sectors):
            a, b = first * SECTOR, min((first + count) * SECTOR, g.size)
            chunk = image[a:b]
            for x in range(0, b - a, 1 << 20):
                piece = chunk[x : x + (1 << 20)]
                if piece.any():
                    os.pwrite(fd, piece.tobytes(), g.data_offset + a + x)
        old = np.frombuffer(os.pread(fd, g.bitmap_len, g.bitmap_offset), dtype=np.uint8)
        bits = np.packbits(np.concatenate([sectors, np.zeros(8 * g.bitmap_len - g.sectors, dtype=bool)]),
                           bitorder="little")
        os.pwrite(fd, (old | bits).tobytes(), g.bitmap_offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def differing_sectors(a: Path, b: Path) -> np.ndarray:
    """One bool per 512-byte sector: do the two equal-sized raw images differ there?"""
    x = np.fromfile(a, dtype=np.uint8)
    y = np.fromfile(b, dtype=np.uint8)
    assert x.size == y.size
    pad = (-x.size) % SECTOR
    x = np.concatenate([x, np.zeros(pad, np.uint8)]).reshape(-1, SECTOR)
    y = np.concatenate([y, np.zeros(pad, np.uint8)]).reshape(-1, SECTOR)
    return (x != y).any(axis=1)


#: A guest program: rewrite each listed sector of /dev/ubdb with its own content, one 512-byte O_DIRECT
#: pread and pwrite per sector -- what ``dd bs=512 count=1 skip=S seek=S iflag=direct oflag=direct`` does,
#: without starting a process per sector (55 ms each in the guest).
SECTOR_REWRITER = """
import mmap, os, sys
sectors = [int(s) for s in open(sys.argv[2]).read().split()]
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
view = memoryview(mmap.mmap(-1, 4096))[:512]  # page-aligned, as O_DIRECT needs
for s in sectors:
    assert os.preadv(fd, [view], 512 * s) == 512, s
    assert os.pwritev(fd, [view], 512 * s) == 512, s
os.close(fd)
print("FSLAB-REWRITTEN=%d" % len(sectors))
"""


def rewrite_sectors_lines(device: str, sectors: Iterable[int], workdir: Path) -> str:
    """Guest script lines running :data:`SECTOR_REWRITER` (the host's Python, through hostfs) on ``sectors``."""
    program = workdir / "rewrite-sectors.py"
    program.write_text(SECTOR_REWRITER)
    listing = workdir / "rewrite-sectors.txt"
    listing.write_text("\n".join(map(str, sectors)) + "\n")
    return checked(f"{q(sys.executable)} -S -I {q(program)} /dev/{device} {q(listing)}")


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a (sparse) COW file, keeping its holes and its mtime."""
    subprocess.run(["cp", "--sparse=always", "--preserve=timestamps", str(src), str(dst)], check=True, timeout=60)
