"""``ubdcow mount`` (issue 25): ordinary tools over the FUSE folder against the kernel's read-only loop mount.

The model: conftest.model_image (a Debian bookworm minbase root as a 2 GiB ext4 image, ``mkfs.ext4 -d``) as
the backing file of an overlay a real UML guest changed (it mounted the disk, copied the host's /etc and
a few MiB of new files in, deleted a folder, renamed and chmod'ed some), mounted with ``ubdcow mount``;
the reference is the same disk merged (``ubdcow merge``) and mounted by the kernel (``mount -o loop,ro``).
Both sides run the same shell command in the same session:

- **tar, first pass**: ``tar -cf - -C MNT . | wc -c`` over the whole tree, both folders freshly mounted and
  the disks' pages dropped from the kernel's cache (the COW file, the backing file, the merged image:
  ``POSIX_FADV_DONTNEED``) before each round, so nothing is kept from an earlier round (the FUSE side's own
  process is a new one too). Target: <= 5x the loop mount.
- **tar, second pass**: the same command again on folders that have just been read: the kernel's caches
  (entries, attributes, file pages: ``kernel_cache`` and long timeouts) serve the FUSE side.
  Target: <= 1.5x the loop mount.
- **grep -r, first pass**: ``grep -r -F`` of a string that is in no file, fresh mounts and dropped caches
  as for tar. Target: <= 5x the loop mount.

Both tars must print the same number of bytes (the same tree, read by tar), and both greps find nothing.
Root, fusermount3, /dev/fuse, mfusepy and a UML kernel are needed, else the benchmarks skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ubdcow

from .conftest import ROUNDS, Measure, ModelImage, Results, _system_tool, check_ratios, settle

TAR = pytest.mark.benchmark(group="mount: tar of the whole tree")
GREP = pytest.mark.benchmark(group="mount: grep -r of a missing string")
#: rounds of the first passes (each remounts both folders and drops the caches: a few are enough)
COLD_ROUNDS = max(1, min(ROUNDS, 3))
MISSING = "ubdcow-no-file-holds-this-7f3a9c"


@dataclass
class MountLab:
    """The guest's overlay on the model, its merged image, and the two folders they are mounted at."""

    cow: Path
    backing: Path
    merged: Path
    fuse: Path
    loop: Path
    fuse_pid: int | None = None

    def mount_fuse(self) -> None:
        proc = subprocess.run([sys.executable, "-m", "ubdcow", "mount", str(self.cow), str(self.fuse), "--json"],
                              capture_output=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        self.fuse_pid = int(json.loads(proc.stdout)["pid"])

    def mount_loop(self) -> None:
        proc = subprocess.run(["mount", "-o", "loop,ro", str(self.merged), str(self.loop)], capture_output=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")

    def unmount(self) -> None:
        """Both folders taken away (the FUSE one with ``ubdcow umount``, which waits for its process to end);
        fallbacks so that nothing is left mounted even when a step fails."""
        if _mounted(self.fuse):
            subprocess.run([sys.executable, "-m", "ubdcow", "umount", str(self.fuse)], capture_output=True,
                           timeout=300)  # fmt: skip
        for cmd in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
            if _mounted(self.fuse):
                subprocess.run([*cmd, str(self.fuse)], capture_output=True, timeout=120)
        if self.fuse_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.fuse_pid, 9) if not _gone(self.fuse_pid, 10) else None
            self.fuse_pid = None
        for cmd in (["umount"], ["umount", "-l"]):  # (the loop device goes with it: mount -o loop sets autoclear)
            if _mounted(self.loop):
                subprocess.run([*cmd, str(self.loop)], capture_output=True, timeout=120)

    def fresh(self) -> None:
        """New mounts and none of the disks' pages in the kernel's cache: a first pass. (The three files' pages
        are dropped with POSIX_FADV_DONTNEED rather than every cache of the machine with drop_caches: the same
        cold start for both sides, without slowing what else runs here.)"""
        self.unmount()
        for path in (self.cow, self.backing, self.merged):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        self.mount_loop()
        self.mount_fuse()


def _mounted(point: Path) -> bool:
    where = os.path.realpath(point)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(line.split()[4] == where for line in f)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _uml_kernel() -> str | None:
    chosen = os.environ.get("UBDCOW_UML_KERNEL")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("linux.uml") or next((p for p in ("/usr/bin/linux.uml",) if os.access(p, os.X_OK)), None)


def _guest_changes(folder: Path, cow: Path) -> None:
    """A UML guest mounts the overlay's disk and changes it, then halts: the COW file a real guest writes."""
    kernel = _uml_kernel()
    if kernel is None:
        pytest.skip("no UML kernel (linux.uml, or $UBDCOW_UML_KERNEL)")
    point = folder / "guest-point"
    point.mkdir()
    m = shlex.quote(str(point))
    script = folder / "guest.sh"
    script.write_text(
        "#!/bin/sh\nmount -t proc proc /proc\n"
        f"mount -t ext4 /dev/ubdb {m} || echo UBDCOW-FAIL\n"
        f"cp -a /etc {m}/guest-etc || echo UBDCOW-FAIL\n"
        f"mkdir {m}/guest-data && i=0; while [ $i -lt 32 ]; do dd if=/dev/urandom of={m}/guest-data/blob-$i "
        "bs=65536 count=4 status=none; i=$((i+1)); done\n"
        f"rm -rf {m}/usr/share/zoneinfo/America\n"
        f"mv {m}/usr/share/doc {m}/usr/share/doc-moved && chmod -R go-w {m}/usr/share/doc-moved\n"
        f"umount {m} || echo UBDCOW-FAIL\necho UBDCOW-GUEST-END\nsync\nhalt -f\n"
    )
    script.chmod(0o755)
    home = folder / "uml-home"
    home.mkdir()
    proc = subprocess.run([kernel, "mem=256M", "rootfstype=hostfs", "rootflags=/", "rw", f"init={script}",
                           f"ubdb={cow}", "con=null", "con0=fd:0,fd:1", f"uml_dir={home}"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900,
                          env=dict(os.environ, TMPDIR=str(folder)))  # fmt: skip
    console = proc.stdout.decode(errors="replace")
    assert "UBDCOW-GUEST-END" in console and "UBDCOW-FAIL" not in console, console[-3000:]


@pytest.fixture(scope="module")
def mount_lab(bench_dir: Path, model_image: ModelImage) -> Iterator[MountLab]:
    if os.geteuid() != 0:
        pytest.skip("the reference is the kernel's loop mount: root needed")
    if _system_tool("fusermount3") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("no FUSE here (the package fuse3, /dev/fuse)")
    if importlib.util.find_spec("mfusepy") is None:
        pytest.skip("mfusepy is not installed (pip install 'ubdcow[mount]')")
    folder = bench_dir / "mount"
    folder.mkdir()
    cow = folder / "guest.cow"
    ubdcow.create(cow, model_image.image)
    _guest_changes(folder, cow)
    merged = folder / "merged.img"
    ubdcow.merge(cow, merged)
    lab = MountLab(cow, model_image.image, merged, folder / "fuse", folder / "loop")
    lab.fuse.mkdir()
    lab.loop.mkdir()
    settle()
    try:
        yield lab
    finally:
        lab.unmount()
        assert not _mounted(lab.fuse) and not _mounted(lab.loop)


def _tar(point: Path) -> int:
    proc = subprocess.run(f"tar -cf - -C {shlex.quote(str(point))} . | wc -c", shell=True, capture_output=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def _grep(point: Path) -> None:
    proc = subprocess.run(["grep", "-r", "-F", "-q", MISSING, str(point)], capture_output=True, timeout=1800)
    assert proc.returncode == 1, proc.stderr  # found nothing, read everything (2 would be an error)


SIDES = pytest.mark.parametrize("side", ["loop mount", "ubdcow mount"])
#: what each tar printed (bytes), per pass and side: both sides must print the same
TAR_BYTES: dict[tuple[str, str], int] = {}


def _point(lab: MountLab, side: str) -> Path:
    return lab.loop if side == "loop mount" else lab.fuse


@TAR
@SIDES
def test_tar_first_pass(measure: Measure, mount_lab: MountLab, side: str) -> None:
    point = _point(mount_lab, side)
    measure(f"tar first pass, {side}", lambda: TAR_BYTES.__setitem__(("first", side), _tar(point)),
            setup=mount_lab.fresh, rounds=COLD_ROUNDS)  # fmt: skip


@TAR
@SIDES
def test_tar_second_pass(measure: Measure, mount_lab: MountLab, side: str) -> None:
    point = _point(mount_lab, side)
    mount_lab.fresh()
    _tar(point)  # the first pass, untimed: it fills the caches
    measure(f"tar second pass, {side}", lambda: TAR_BYTES.__setitem__(("second", side), _tar(point)))


@GREP
@SIDES
def test_grep_first_pass(measure: Measure, mount_lab: MountLab, side: str) -> None:
    point = _point(mount_lab, side)
    measure(f"grep -r first pass, {side}", lambda: _grep(point), setup=mount_lab.fresh, rounds=COLD_ROUNDS)


def test_mount_ratios(results: Results, pytestconfig: pytest.Config) -> None:
    for which in ("first", "second"):  # the same tree, as tar reads it
        if (which, "loop mount") in TAR_BYTES and (which, "ubdcow mount") in TAR_BYTES:
            assert TAR_BYTES[(which, "ubdcow mount")] == TAR_BYTES[(which, "loop mount")] > 100 << 20, TAR_BYTES
    if ("first", "loop mount") in TAR_BYTES:
        results.notes.append(f"mount: tar of {TAR_BYTES[('first', 'loop mount')] / (1 << 20):.0f} MiB, a guest's "
                             "overlay on the model")  # fmt: skip
    rows = [
        results.time_ratio(
            "mount: tar first pass, ubdcow / loop",
            "tar first pass, ubdcow mount",
            "tar first pass, loop mount",
            "<=",
            5.0,
        ),
        results.time_ratio(
            "mount: tar second pass, ubdcow / loop",
            "tar second pass, ubdcow mount",
            "tar second pass, loop mount",
            "<=",
            1.5,
        ),
        results.time_ratio(
            "mount: grep -r first pass, ubdcow / loop",
            "grep -r first pass, ubdcow mount",
            "grep -r first pass, loop mount",
            "<=",
            5.0,
        ),
    ]
    check_ratios(pytestconfig, rows)
