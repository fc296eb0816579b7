"""``ubdcow changes`` on overlays written by real UML guests, judged by the kernel's view.

Each guest mounts /dev/ubdb (its overlay on the model) and makes the changes itself; the oracle is the
kernel's read-only loop mount of the model and of the overlay merged by ``uml_moo``, walked in full by
tests/support/changeslab.py (lstat, readlink, xattrs, sha256), and the report the issue's rules give.

- every kind of change (tests/support/changeslab.py's workload) on ext2, ext3 and ext4; ``--all``, ``--renames``
  and ``compact`` on the same overlays;
- a guest SIGKILLed after ``sync``, with more writes committed to the journal only: the report equals the
  kernel's view of a merged copy after ``e2fsck -fy``, and with ``--no-journal`` the ``ro,noload`` view;
- a guest writing past the end of its filesystem (a disk bigger than it): no change;
- packages installed with ``dpkg -i`` in a Debian minbase root (chroot in the guest): files added, the
  dpkg database and /etc/passwd changed, and files removed and re-created so that inode numbers are reused.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from support import changeslab as C
from support import jbd2lab
import pytest
from conftest import require, require_root, require_tool
from support.fslab import boot
from support.uml import ubd_arg

import ubdcow

pytestmark = [pytest.mark.uml, pytest.mark.slow]
FAIL = C.FAIL
REPO = Path(__file__).parent.parent
MINBASE = REPO / ".cache" / "debian-minbase"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def q(path: Path) -> str:
    return shlex.quote(str(path))


def guest_script(mnt: Path, body: str, fstype: str) -> str:
    """Mount /dev/ubdb on ``mnt`` (a host folder, seen through hostfs), run ``body`` there, unmount. The ext4
    driver mounts ext2 and ext3 too (the ext2 driver cannot see xattrs kept in the inode, as mkfs -d puts them)."""
    del fstype
    return (f"mount -t ext4 /dev/ubdb {q(mnt)} || echo {FAIL}: mount\n"
            f"cd {q(mnt)} || echo {FAIL}: cd\n{body}\ncd /\nsync\n"
            f"umount {q(mnt)} || echo {FAIL}: umount\n")  # fmt: skip


def run_guest_on(cow: Path, model: Path, folder: Path, body: str, fstype: str, *, mem: str = "192M") -> None:
    require_tool("linux.uml")
    mnt = folder / "mnt"
    mnt.mkdir(exist_ok=True)
    boot(guest_script(mnt, body, fstype), ubd_arg(cow), workdir=folder, timeout=600, mem=mem)


def merged_view(cow: Path, model: Path, folder: Path, *, fsck: bool = False, noload: bool = True
                ) -> tuple[dict[bytes, dict[str, Any]], Path]:  # fmt: skip
    """The kernel's view of the overlay merged by uml_moo (after ``e2fsck -fy`` with ``fsck``); and the image."""
    merged = folder / f"{cow.stem}-merged.img"
    jbd2lab.merge_overlay(cow, model, merged)
    if fsck:
        proc = subprocess.run(["e2fsck", "-fy", str(merged)], capture_output=True, text=True, timeout=600)
        assert proc.returncode in (0, 1), proc.stdout[-3000:]
    return C.kernel_tree(merged, noload=noload), merged


@pytest.mark.parametrize("fstype", ["ext2", "ext3", "ext4"])
def test_every_kind_of_change_a_guest_makes(tmp_path: Path, fstype: str) -> None:
    require_root("loop mounts")
    C.make_tree(tmp_path / "tree")
    model = C.make_model(tmp_path / "tree", tmp_path / "model.img", fstype)
    shutil.rmtree(tmp_path / "tree")
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, model)
    run_guest_on(cow, model, tmp_path, C.workload_script(guest=True), fstype)
    old = C.kernel_tree(model)
    new, merged = merged_view(cow, model, tmp_path)
    oracle = C.expected(old, new)
    assert len(oracle) > 100
    doc, err = C.changes_json(cow, code=1)
    assert err == ""
    C.assert_same_report(C.entries(doc), oracle)
    doc, _ = C.changes_json(cow, "--all", code=1)
    C.assert_same_report(C.entries(doc), C.expected(old, new, all_fields=True))
    doc, _ = C.changes_json(cow, "--renames", code=1)
    C.assert_same_report(C.entries(doc), C.expected_renames(oracle, old, new, model, merged))
    # compact gives back what reads the same: the report does not move
    compacted = tmp_path / "compacted.cow"
    shutil.copy2(cow, compacted)
    ubdcow.compact(compacted)
    doc, _ = C.changes_json(compacted, code=1)
    C.assert_same_report(C.entries(doc), oracle)


@pytest.mark.parametrize("fstype", ["ext3", "ext4"])
def test_a_guest_killed_after_sync_is_read_with_its_journal(tmp_path: Path, fstype: str) -> None:
    require_root("loop mounts")
    C.make_tree(tmp_path / "tree")
    model = C.make_model(tmp_path / "tree", tmp_path / "model.img", fstype)
    shutil.rmtree(tmp_path / "tree")
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, model)
    half = len(C.WORKLOAD) // 2
    body = (C.workload_script(C.WORKLOAD[:half], guest=True) + "sync\n"
            + C.workload_script(C.WORKLOAD[half:], guest=True)
            + "sync var/append etc/renamed\n")  # fmt: skip  (fsync: committed to the journal, not yet written home)
    jbd2lab.crash_guest(tmp_path, cow, model, body, fstype=fstype)
    old = C.kernel_tree(model)
    replayed, _ = merged_view(cow, model, tmp_path, fsck=True, noload=False)
    doc, _ = C.changes_json(cow, code=1)
    C.assert_same_report(C.entries(doc), C.expected(old, replayed))
    on_disk, _ = merged_view(cow, model, tmp_path, noload=True)
    doc, _ = C.changes_json(cow, "--no-journal", code=1)
    C.assert_same_report(C.entries(doc), C.expected(old, on_disk))
    assert C.expected(old, replayed) != C.expected(old, on_disk)  # the journal mattered


def test_a_guest_writing_past_the_end_of_its_filesystem_changes_nothing(tmp_path: Path) -> None:
    require_root("loop mounts")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("pc1\n")
    model = C.make_model(tree, tmp_path / "model.img", "ext4", "64M")
    with open(model, "r+b") as f:
        f.truncate(80 << 20)  # 16 MiB after the filesystem
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, model)
    script = "".join(jbd2lab.checked(f"dd if=/dev/urandom of=/dev/ubdb bs=4096 seek={s} count=64 oflag=direct "
                                     "status=none") for s in (64 * 256, 70 * 256, 80 * 256 - 64))  # fmt: skip
    require_tool("linux.uml")
    boot(script, ubd_arg(cow), workdir=tmp_path, timeout=300)
    with ubdcow.open(cow) as img:
        assert img.count_cow_sectors() == 3 * 64 * 8
    doc, _ = C.changes_json(cow, code=0)
    assert C.entries(doc) == []
    assert C.expected(C.kernel_tree(model), merged_view(cow, model, tmp_path)[0]) == []


# -- dpkg -i in a Debian minbase root -----------------------------------------------------------------------


def minbase() -> Path:
    """The Debian bookworm minbase tree (benchmarks/conftest.py makes and caches it with debootstrap)."""
    if not (MINBASE / "var" / "lib" / "dpkg" / "status").exists():
        tool = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        scratch = MINBASE.with_name("debootstrap-tmp")
        if os.path.exists(tool) and os.geteuid() == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            proc = subprocess.run([tool, "--variant=minbase", "bookworm", str(scratch)], capture_output=True,
                                  timeout=1800)  # fmt: skip
            if proc.returncode == 0:
                scratch.rename(MINBASE)
    require((MINBASE / "var" / "lib" / "dpkg" / "status").exists(),
            "a Debian minbase tree (debootstrap --variant=minbase bookworm, root and the network)")  # fmt: skip
    return MINBASE


def build_packages(folder: Path) -> list[Path]:
    """Two .deb packages made with dpkg-deb: files in /usr/bin, /usr/share, a conffile in /etc, and maintainer
    scripts that add a system user and create state in /var/lib."""
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    debs = []
    for name, files in (("ubdcow-lab-tools", 40), ("ubdcow-lab-docs", 300)):
        root = folder / name
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: lab <lab@example.org>\n"
            f"Description: test package for ubdcow changes\n")  # fmt: skip
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "usr" / "share" / name).mkdir(parents=True)
        (root / "etc").mkdir()
        (root / "etc" / f"{name}.conf").write_text(f"setting = {name}\n")
        (root / "DEBIAN" / "conffiles").write_text(f"/etc/{name}.conf\n")
        for i in range(files):
            (root / "usr" / "share" / name / f"file{i:03d}.txt").write_text(f"{name} {i}\n" * (i + 1))
        tool = root / "usr" / "bin" / name
        tool.write_text("#!/bin/sh\necho hello\n")
        tool.chmod(0o755)
        postinst = root / "DEBIAN" / "postinst"
        postinst.write_text(f"#!/bin/sh\nset -e\nmkdir -p /var/lib/{name}\necho installed > /var/lib/{name}/state\n"
                            f"useradd --system --no-create-home {name.replace('ubdcow-lab-', 'lab')} || true\n")  # fmt: skip
        postinst.chmod(0o755)
        deb = folder / f"{name}.deb"
        C.run(dpkg_deb, "--root-owner-group", "--build", root, deb)
        debs.append(deb)
    return debs


def test_packages_installed_with_dpkg(tmp_path: Path) -> None:
    require_root("loop mounts")
    tree = minbase()
    model = tmp_path / "model.img"
    C.run(require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-d", tree, model, "2G")
    debs = build_packages(tmp_path / "debs")
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, model)
    body = (
        jbd2lab.checked("mount -t proc proc proc")
        + jbd2lab.checked("mkdir -p tmp/debs")
        + "".join(jbd2lab.checked(f"cp {q(d)} tmp/debs/") for d in debs)
        + "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        + jbd2lab.checked("chroot . dpkg -i " + " ".join(f"/tmp/debs/{d.name}" for d in debs))
        + jbd2lab.checked("rm -rf tmp/debs usr/share/doc/bash usr/share/doc/gzip")
        + jbd2lab.checked("for i in $(seq 1 40); do echo new$i > usr/share/doc/new$i; done")
        + jbd2lab.checked("umount proc")
    )
    run_guest_on(cow, model, tmp_path, body, "ext4", mem="256M")
    old = C.kernel_tree(model)
    new, merged = merged_view(cow, model, tmp_path)
    oracle = C.expected(old, new)
    paths = {e["path"]: e for e in oracle}
    assert paths["/usr/bin/ubdcow-lab-tools"]["change"] == "added"
    assert paths["/etc/passwd"]["change"] == "modified" and paths["/var/lib/dpkg/status"]["change"] == "modified"
    assert len(oracle) > 400
    reused = {old[os.fsencode(e["path"])]["inode"] for e in oracle if e["change"] == "deleted"}
    assert reused & {new[os.fsencode(e["path"])]["inode"] for e in oracle if e["change"] == "added"}
    doc, err = C.changes_json(cow, code=1)
    assert err == ""
    C.assert_same_report(C.entries(doc), oracle)
    doc, _ = C.changes_json(cow, "--renames", code=1)
    C.assert_same_report(C.entries(doc), C.expected_renames(oracle, old, new, model, merged))
