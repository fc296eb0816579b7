"""A guest SIGKILLed after writing and ``sync``: ubdcow reads its overlay as the kernel would.

The guest mounts an ext4 (on its COW overlay), writes, renames, deletes, makes folders, symlinks,
hard links and xattrs, runs ``sync``, goes on (more of the same, committed by fsync but not yet
written home) and is SIGKILLed with the filesystem mounted. Then, on the overlay itself:

- ``ubdcow.open_fs(overlay)`` replays the journal in memory: its walk (lstat of every entry,
  symlink targets, xattrs, sha256 of every file) equals the kernel's read-only loop mount of a
  merged copy (uml_moo) after ``e2fsck -fy``;
- ``ubdcow.open_fs(overlay, journal=False)`` equals the on-disk state: the kernel's loop mount with
  ``ro,noload`` of the merged copy before e2fsck.

The two kernel views differ (the replay matters), and nothing ubdcow did wrote to the overlay
or the backing file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import jbd2lab as J
import pytest
from conftest import require_tool

import ubdcow

pytestmark = pytest.mark.skipif(not hasattr(ubdcow, "open_fs"), reason="ubdcow.open_fs is not there yet")

WORKLOAD = r"""
mkdir -p etc/net home/user/docs var/log gone
for i in $(seq 1 40); do head -c $((i * 997)) /dev/urandom > home/user/docs/doc$i; done
for i in $(seq 1 120); do echo "line $i" > gone/n$i; done
dd if=/dev/urandom of=var/log/big bs=64k count=40 status=none
echo "hostname pc1" > etc/hostname
ln -s ../etc/hostname home/user/short-link
ln -s "$(head -c 3000 /dev/zero | tr '\0' 'x')" home/user/long-link
ln home/user/docs/doc1 home/user/hard
setfattr -n user.lab -v pc1 etc/hostname
setfattr -n user.big -v "$(head -c 2000 /dev/zero | tr '\0' 'y')" home/user/docs/doc2
sync
rm -rf gone home/user/docs/doc3
mv home/user/docs/doc4 home/user/renamed
mkdir -p srv/new/deeper
for i in $(seq 1 30); do head -c $((i * 311)) /dev/urandom > srv/new/deeper/f$i; done
dd if=/dev/urandom of=var/log/big bs=4k count=3 seek=5 conv=notrunc status=none
truncate -s 100000 var/log/big
echo "hostname pc2" > etc/hostname
setfattr -n user.lab -v pc2 etc/hostname
setfattr -x user.big home/user/docs/doc2
ln -s new srv/link-to-new
sync home/user/renamed srv/new/deeper/f30 var/log/big etc/hostname
"""


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, or a failure if it has not returned after ``seconds`` (a hang must not stall the suite)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"ubdcow's reader did not finish in {seconds} s: it hangs")
    if "error" in result:
        raise result["error"]
    return result["value"]


def read_view(cow: Path, journal: bool) -> tuple[bool, int, dict[bytes, dict[str, Any]]]:
    from support import fstree

    with ubdcow.open_fs(cow, journal=journal) as fs:
        return fs.needs_recovery, fs.journal_transactions, fstree.reader_view(fs)


@pytest.mark.uml
@pytest.mark.slow
def test_a_killed_guest_reads_as_the_kernel_sees_it_with_and_without_the_journal(tmp_path):
    from support import fstree

    for tool in ("setfattr", "tr", "head", "truncate"):
        require_tool(tool, "attr" if tool == "setfattr" else "coreutils")
    backing = tmp_path / "backing.img"
    J.mkfs(backing, "256M", "-b", "4096")
    cow = tmp_path / "overlay.cow"
    J.crash_guest(tmp_path, cow, backing, WORKLOAD)
    merged = tmp_path / "merged.img"
    J.merge_overlay(cow, backing, merged)
    assert "needs_recovery" in J.superblock_fields(merged)["Filesystem features"].split()
    before = (fingerprint(cow), fingerprint(backing))

    with fstree.mounted(merged, noload=True) as point:
        on_disk = fstree.kernel_view(point)
    needs_recovery, transactions, ours = within(120, lambda: read_view(cow, journal=False))
    assert needs_recovery and transactions == 0
    fstree.assert_same_view(on_disk, ours)

    fixed = tmp_path / "fixed.img"
    shutil.copyfile(merged, fixed)
    proc = subprocess.run(["e2fsck", "-fy", str(fixed)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    with fstree.mounted(fixed, noload=False) as point:
        replayed = fstree.kernel_view(point)
    needs_recovery, transactions, ours = within(120, lambda: read_view(cow, journal=True))
    assert not needs_recovery and transactions >= 1
    fstree.assert_same_view(replayed, ours)

    assert replayed != on_disk  # the journal held changes the disk did not have yet
    assert b"/srv/new/deeper/f30" in replayed and b"/home/user/renamed" in replayed
    assert before == (fingerprint(cow), fingerprint(backing))
