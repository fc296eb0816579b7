"""The filesystem reader: a walk with stat against dissect.extfs, cat of a big file in an overlay, a walk's memory.

- **walk**: ``FileSystem.walk`` (a ``FileStat`` per entry: lstat's fields, symlink targets) over the
  model root filesystem (conftest.model_image: a Debian bookworm minbase tree, ~6,700 entries, or a
  synthesized tree of the same shape), against dissect.extfs (AGPL, a pure-Python reader: a peer only,
  installed at benchmark time into the git-ignored .cache/bench-peers, never a dependency) walking the
  same image and reading the same fields. Each side opens the image in its timed round.
  Target: >= 2x the peer's entries per second.
- **cat**: one file of half the disk size (1 GiB at full size) in an ext4 overlay whose COW file holds 10%
  of the file's 4 KiB blocks, read through ``FileSystem.open`` with 1 MiB ``readinto`` calls, against
  reading as many bytes sequentially from the overlay's virtual disk with ``ubdcow.open``, from where
  the file starts on it (the same mix of COW and backing pages). Each side opens its image per round.
  Target: >= 0.7x its throughput.
- **memory**: the peak RSS (VmHWM) of a child walking 1,000,000 entries (100,000 below full size):
  at most 200 MiB, asserted at every size.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import mmap
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ubdcow

from .conftest import CACHE, FULL, GiB, Measure, MiB, ModelImage, Results, _system_tool, check_ratios, settle, warm

WALK = pytest.mark.benchmark(group="fs: walk with stat")
CAT = pytest.mark.benchmark(group="fs: cat of a big file in an overlay")
PEERS = CACHE / "bench-peers"
WALK_ENTRIES = 1_000_000 if FULL else 100_000
RSS_LIMIT = 200 * MiB


def _peer() -> Any:
    """dissect.extfs from .cache/bench-peers (installed there on first use), or skip."""
    if not (PEERS / "dissect" / "extfs").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PEERS),
                               "dissect.extfs"], capture_output=True, text=True, timeout=600)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"dissect.extfs could not be installed into {PEERS}: {proc.stderr.strip()[-300:]}")
    if str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
    try:
        return importlib.import_module("dissect.extfs")
    except ImportError as exc:
        pytest.skip(f"dissect.extfs does not import: {exc}")


def peer_walk(extfs: Any, image: Path) -> int:
    """dissect.extfs: every entry below the root with what lstat gives (mode, owner, size, links, times)."""
    count = 0
    with open(image, "rb") as fh:
        fs = extfs.ExtFS(fh)
        stack = [fs.get("/")]
        while stack:
            for child in stack.pop().iterdir():
                if child.filename in (".", ".."):
                    continue
                inode = child.inode
                _ = (inode.i_mode, inode.i_uid, inode.i_gid, child.size, inode.i_links_count, child.atime_ns,
                     child.mtime_ns, child.ctime_ns)  # fmt: skip
                if stat.S_ISLNK(inode.i_mode):
                    _ = child.link
                count += 1
                if stat.S_ISDIR(inode.i_mode):
                    stack.append(child)
    return count


def our_walk(image: Path) -> int:
    with ubdcow.open_fs(image) as fs:
        return sum(1 for _ in fs.walk("/")) - 1  # the root itself is not counted by the peer


@WALK
def test_walk_peer(measure: Measure, model_image: ModelImage, results: Results) -> None:
    extfs = _peer()
    assert peer_walk(extfs, model_image.image) == model_image.entries + 1  # + lost+found
    measure("fs walk dissect.extfs", lambda: peer_walk(extfs, model_image.image))
    results.notes.append(f"fs walk: {model_image.entries} entries of a {model_image.kind} tree")


@WALK
def test_walk_ubdcow(measure: Measure, model_image: ModelImage) -> None:
    assert our_walk(model_image.image) == model_image.entries + 1
    measure("fs walk ubdcow", lambda: our_walk(model_image.image))


def test_walk_ratio(results: Results, pytestconfig: pytest.Config) -> None:
    rows = [results.throughput_ratio("fs walk with stat: ubdcow vs dissect.extfs (entries/s)", "fs walk ubdcow",
                                     "fs walk dissect.extfs", ">=", 2.0)]  # fmt: skip
    check_ratios(pytestconfig, rows)


# -- cat of a big file in an overlay ---------------------------------------------------------------------


class BigFile:
    def __init__(self, cow: Path, path: str, size: int, digest: str, start: int) -> None:
        self.cow, self.path, self.size, self.digest = cow, path, size, digest
        self.start = start  # the file's first byte on the disk (mkfs -d lays it out contiguously)


@pytest.fixture(scope="module")
def big_file(bench_dir: Path) -> BigFile:
    """An ext4 backing image holding /big (random, half the disk size: 1 GiB at full size), and a COW file
    on it that rewrote 10% of /big's blocks; the file's expected sha256 read from the disk at the blocks
    debugfs lists (not through ubdcow's reader)."""
    from .conftest import SIZE

    mkfs, debugfs = _system_tool("mkfs.ext4"), _system_tool("debugfs")
    if mkfs is None or debugfs is None:
        pytest.skip("mkfs.ext4 and debugfs are not installed (e2fsprogs)")
    size = min(GiB, SIZE // 2)
    rng = np.random.default_rng(22)
    tree = bench_dir / "big-tree"
    tree.mkdir()
    with open(tree / "big", "wb") as f:
        for pos in range(0, size, 64 * MiB):
            f.write(rng.bytes(min(64 * MiB, size - pos)))
    backing = bench_dir / "big-backing.img"
    proc = subprocess.run([mkfs, "-q", "-F", "-b", "4096", "-d", str(tree), str(backing), f"{(size >> 20) + 256}M"],
                          capture_output=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    os.unlink(tree / "big")
    blocks = data_blocks(debugfs, backing, "/big")
    assert len(blocks) == size // 4096
    cow = bench_dir / "big.cow"
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as img:
        for block in rng.choice(blocks, size=len(blocks) // 10, replace=False).tolist():
            img.pwrite(rng.bytes(4096), block * 4096)
        digest = hashlib.sha256()
        for block in blocks:
            digest.update(img.pread(4096, block * 4096))
    settle()
    warm(backing, cow)
    return BigFile(cow, "/big", size, digest.hexdigest(), blocks[0] * 4096)


def data_blocks(debugfs: str, image: Path, path: str) -> list[int]:
    """The physical block of each logical block of ``path``, from ``debugfs -R stat``'s extent list (tree
    blocks, "(ETB0):N", left out)."""
    text = subprocess.run([debugfs, "-R", f"stat {path}", str(image)], capture_output=True, text=True,
                          timeout=300).stdout  # fmt: skip
    out: dict[int, int] = {}
    for first, last, start in re.findall(r"\((\d+)(?:-(\d+))?\):(\d+)", text):
        for i in range(int(last or first) - int(first) + 1):
            out[int(first) + i] = int(start) + i
    return [out[i] for i in range(len(out))]


def _aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n))


def cat_ubdcow(big: BigFile, buf: memoryview) -> int:
    done = 0
    with ubdcow.open_fs(big.cow) as fs, fs.open(big.path) as f:
        while n := f.readinto(buf):
            done += n
    return done


def read_disk(big: BigFile, buf: memoryview) -> int:
    """As many bytes as the file holds, read sequentially from the virtual disk where the file starts."""
    done = 0
    with ubdcow.open(big.cow) as img:
        img.seek(big.start)
        while done < big.size:
            done += img.readinto(buf[: min(len(buf), big.size - done)])
    return done


@CAT
def test_cat_reference(measure: Measure, big_file: BigFile) -> None:
    buf = _aligned(MiB)
    assert read_disk(big_file, buf) == big_file.size
    measure("fs cat reference: ubdcow.open sequential", lambda: read_disk(big_file, buf))


@CAT
def test_cat_ubdcow(measure: Measure, big_file: BigFile) -> None:
    buf = _aligned(MiB)
    digest = hashlib.sha256()
    with ubdcow.open_fs(big_file.cow) as fs, fs.open(big_file.path) as f:
        while n := f.readinto(buf):
            digest.update(buf[:n])
    assert digest.hexdigest() == big_file.digest
    measure("fs cat ubdcow: FileSystem.open", lambda: cat_ubdcow(big_file, buf))


def test_cat_ratio(results: Results, pytestconfig: pytest.Config) -> None:
    rows = [results.throughput_ratio("fs cat in an overlay: FileSystem.open vs ubdcow.open sequential",
                                     "fs cat ubdcow: FileSystem.open", "fs cat reference: ubdcow.open sequential",
                                     ">=", 0.7)]  # fmt: skip
    check_ratios(pytestconfig, rows)


# -- the memory of a walk --------------------------------------------------------------------------------


def peak_rss(code: str) -> tuple[int, str]:
    """Peak RSS in bytes (VmHWM) of a fresh interpreter running ``code``, and what it printed."""
    script = f"{code}\nimport re\nprint('HWM', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1])"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return int(lines[-1].split()[1]) * 1024, "\n".join(lines[:-1])


def test_walk_memory(bench_dir: Path, results: Results, pytestconfig: pytest.Config) -> None:
    mkfs = _system_tool("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 is not installed (e2fsprogs)")
    tree = bench_dir / "many"
    per = 1000
    for d in range(WALK_ENTRIES // per):
        folder = tree / f"d{d:04d}"
        folder.mkdir(parents=True)
        for i in range(per - 1):
            os.close(os.open(folder / f"f{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
    image = bench_dir / "many.img"
    proc = subprocess.run([mkfs, "-q", "-F", "-N", str(WALK_ENTRIES * 11 // 10), "-d", str(tree), str(image), "4G"],
                          capture_output=True, timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    baseline, _ = peak_rss("import ubdcow")
    code = f"import ubdcow\nfs = ubdcow.open_fs({str(image)!r})\nprint(sum(1 for _ in fs.walk('/')))"
    rss, out = peak_rss(code)
    assert int(out) == WALK_ENTRIES + 2  # the root and lost+found
    results.notes.append(f"fs walk memory: {WALK_ENTRIES} entries, peak RSS {rss / MiB:.1f} MiB "
                         f"(import alone {baseline / MiB:.1f} MiB)")  # fmt: skip
    print(json.dumps({"entries": WALK_ENTRIES, "peak_rss": rss, "import_rss": baseline}))
    rows = [results.value_ratio(f"fs walk of {WALK_ENTRIES} entries: peak RSS / 200 MiB", rss, RSS_LIMIT,
                                f"{rss / MiB:.1f} MiB", "<=", 1.0)]  # fmt: skip
    check_ratios(pytestconfig, rows)

