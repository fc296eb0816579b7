"""``ubdcow changes``: what is not a change, raw writes, partitions, hostile overlays, the command line.

Oracles: the kernel's view of read-only loop mounts of the model and of the overlay merged by ``uml_moo``
(tests/support/changeslab.py computes the expected report), ``debugfs`` for where a file's blocks and inodes are,
``dumpe2fs`` for free blocks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from support import changeslab as C
from support import jbd2lab
import pytest
from conftest import assert_one_line_error, require_root, require_tool, run_cli

import ubdcow
import ubdcow.indexcache

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ext4 of 120 MiB on a disk of 140 MiB (the last 20 MiB belong to no filesystem)."""
    require_root("loop mounts")
    folder = tmp_path_factory.mktemp("changes-edges")
    C.make_tree(folder / "tree")
    image = C.make_model(folder / "tree", folder / "model.img", "ext4", "120M")
    shutil.rmtree(folder / "tree")
    with open(image, "r+b") as f:
        f.truncate(140 * MiB)
    return image


def overlay(model: Path, folder: Path, script: str, name: str = "pc1") -> tuple[Path, Path]:
    """The kernel's changed copy of ``model`` and the overlay holding the difference."""
    changed = C.modify(model, folder / f"{name}.img", script)
    cow = folder / f"{name}.cow"
    ubdcow.diff(model, changed, cow)
    return changed, cow


def merged_view(cow: Path, model: Path, folder: Path, *, noload: bool = True) -> dict[bytes, dict[str, object]]:
    """The kernel's view of the overlay merged by uml_moo (not by ubdcow)."""
    merged = folder / (cow.stem + "-merged.img")
    jbd2lab.merge_overlay(cow, model, merged)
    view = C.kernel_tree(merged, noload=noload)
    merged.unlink()
    return view


def debugfs(image: Path, request: str) -> str:
    return C.run(require_tool("debugfs", "e2fsprogs"), "-R", request, image).stdout


def file_block(image: Path, path: str, logical: int = 0) -> int:
    return int(debugfs(image, f"bmap {path} {logical}").split()[0])


def free_blocks(image: Path) -> tuple[int, int]:
    """A range of free blocks (the last ``Free blocks: A-B`` of dumpe2fs)."""
    out = C.run(require_tool("dumpe2fs", "e2fsprogs"), image).stdout
    ranges = re.findall(r"Free blocks: (\d+)-(\d+)", out)
    a, b = map(int, ranges[-1])
    assert b - a > 64
    return a, b


def test_equal_pages_trimmed_blocks_and_writes_outside_the_filesystem_are_no_change(model: Path, tmp_path: Path):
    require_tool("fstrim", "util-linux")
    changed, cow = overlay(model, tmp_path, "rm var/big && sync && fstrim . || exit 1\n")
    oracle = C.expected(C.kernel_tree(model), C.kernel_tree(changed))
    assert oracle == [{"path": "/var/big", "change": "deleted", "type": "file", "fields": []}]
    with ubdcow.open(cow) as img:
        trimmed = sum(n for _, n, kind, _ in img.mapping() if kind == "zero")
    assert trimmed >= 4 * MiB, "fstrim gave the freed blocks back: the overlay holds them as zeros"
    rng = __import__("random").Random(5)
    journal = file_block(model, "<8>", 100)
    free_a, _ = free_blocks(model)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(img.pread(64 * MiB, 0), 0)  # the first 64 MiB again, as they read: equal to the backing
        img.pwrite(rng.randbytes(MiB), 130 * MiB)  # past the filesystem's end
        img.pwrite(rng.randbytes(MiB), img.size - MiB)
        img.pwrite(rng.randbytes(16 * BLOCK), journal * BLOCK)  # the journal of a clean filesystem
        img.pwrite(rng.randbytes(32 * BLOCK), free_a * BLOCK)  # free blocks
    doc, err = C.changes_json(cow, code=1)
    assert err == ""
    C.assert_same_report(C.entries(doc), C.expected(C.kernel_tree(model), merged_view(cow, model, tmp_path)))
    assert C.entries(doc) == oracle
    # compact gives back the pages equal to the backing and the zeros: the same report
    before = os.stat(cow).st_blocks
    result = ubdcow.compact(cow)
    assert result.pages_returned > 0 and os.stat(cow).st_blocks < before
    doc, _ = C.changes_json(cow, code=1)
    assert C.entries(doc) == oracle
    # an overlay that only rewrote what the model holds: no change at all, exit 0
    same = tmp_path / "same.cow"
    ubdcow.create(same, model)
    with ubdcow.open(same, "r+") as img:
        img.pwrite(img.pread(120 * MiB, 0), 0)
    doc, _ = C.changes_json(same, code=0)
    assert C.entries(doc) == []


def test_a_raw_write_into_a_file_is_a_content_change_only(model: Path, tmp_path: Path) -> None:
    cow = tmp_path / "raw.cow"
    ubdcow.create(cow, model)
    block = file_block(model, "/var/big", 700)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"written under the filesystem's feet", block * BLOCK + 100)
    doc, _ = C.changes_json(cow, code=1)
    assert C.entries(doc) == [{"path": "/var/big", "change": "modified", "type": "file", "fields": ["content"]}]
    C.assert_same_report(C.entries(doc), C.expected(C.kernel_tree(model), merged_view(cow, model, tmp_path)))


def test_a_filesystem_in_a_partition(tmp_path: Path) -> None:
    require_root("loop mounts")
    require_tool("sfdisk", "fdisk")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(100 * MiB)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)], input="start=2048, type=83\n",
                   text=True, check=True, capture_output=True)  # fmt: skip
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("pc1\n")
    C.run("mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", "-d", tree, disk, "90M")
    changed = tmp_path / "changed.img"
    shutil.copyfile(disk, changed)
    point = tmp_path / "mnt"
    point.mkdir()
    C.run("mount", "-o", f"loop,offset={MiB}", changed, point)
    try:
        (point / "etc" / "hostname").write_text("pc2\n")
        (point / "new").mkdir()
    finally:
        C.run("umount", point)
    cow = tmp_path / "pc.cow"
    ubdcow.diff(disk, changed, cow)
    oracle = C.expected(C.kernel_tree(disk, offset=MiB), C.kernel_tree(changed, offset=MiB))
    assert len(oracle) == 2
    for args in ([], ["--partition", "1"]):
        doc, _ = C.changes_json(cow, *args, code=1)
        C.assert_same_report(C.entries(doc), oracle)
    proc = run_cli("changes", cow, "--partition", "2")
    assert proc.returncode == 2
    assert_one_line_error(proc, str(cow), "partition 2")


def test_hostile_overlays_give_one_line_and_exit_2(model: Path, tmp_path: Path) -> None:
    """Garbage over the root's inode, over a directory block, and a directory linked inside itself (a loop)."""
    located = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", debugfs(model, "imap <2>"))
    assert located is not None
    etc_block = file_block(model, "/etc", 0)
    rng = __import__("random").Random(7)
    cases = {"root-inode": int(located[1]) * BLOCK + int(located[2], 16), "etc-block": etc_block * BLOCK}
    for name, at in cases.items():
        cow = tmp_path / f"{name}.cow"
        ubdcow.create(cow, model)
        with ubdcow.open(cow, "r+") as img:
            img.pwrite(rng.randbytes(256 if name == "root-inode" else BLOCK), at)
        proc = run_cli("changes", cow, timeout=120)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert_one_line_error(proc, str(cow))
        doc = json.loads(run_cli("changes", cow, "--json", timeout=120).stdout)
        assert doc["exit_code"] == 2 and doc["disks"][0]["error"], doc
    looped = tmp_path / "looped.img"
    shutil.copyfile(model, looped)
    # /etc named again inside itself: a walk that followed it would never end
    C.run(require_tool("debugfs", "e2fsprogs"), "-w", "-R", "link /etc /etc/dir-to-file/loop", looped)
    cow = tmp_path / "loop.cow"
    ubdcow.diff(model, looped, cow)
    proc = run_cli("changes", cow, timeout=120)
    assert proc.returncode == 2
    assert "reached twice" in assert_one_line_error(proc, str(cow))


def test_several_disks_one_section_each_and_the_worst_exit_code(model: Path, tmp_path: Path) -> None:
    _, cow = overlay(model, tmp_path, "chmod 600 etc/passwd && echo x > etc/new || exit 1\n")
    clean = tmp_path / "clean.cow"
    ubdcow.create(clean, model)
    missing = tmp_path / "missing.cow"
    doc, err = C.changes_json(cow, clean, code=1)
    assert [d["exit_code"] for d in doc["disks"]] == [1, 0]
    assert [set(d) for d in doc["disks"]] == [{"disk", "against", "entries", "exit_code"}] * 2
    assert C.entries(doc) == [{"path": "/etc/new", "change": "added", "type": "file", "fields": []},
                              {"path": "/etc/passwd", "change": "metadata", "type": "file", "fields": ["mode"]}]
    doc, err = C.changes_json(cow, missing, clean, code=2)
    assert [d["exit_code"] for d in doc["disks"]] == [1, 2, 0]
    assert set(doc["disks"][1]) == {"disk", "error", "hint", "exit_code"}
    assert err.startswith(f"ubdcow: {missing}: ")
    proc = run_cli("changes", cow, clean)
    assert proc.returncode == 1
    assert proc.stdout.decode() == f"{cow}:\n+ file    /etc/new\nm file    /etc/passwd\n\n{clean}:\n"
    proc = run_cli("changes", clean)
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_long_output_gives_old_and_new_and_a_summary(model: Path, tmp_path: Path) -> None:
    script = ("chmod 600 etc/passwd && chown 1000:2000 etc/hostname && setfattr -n user.a -v 1 etc/chmod-me && "
              "ln -sfn target2 etc/relink && echo new > etc/new && rm etc/delete-me || exit 1\n")  # fmt: skip
    _, cow = overlay(model, tmp_path, script)
    proc = run_cli("changes", "-l", "--bytes", cow)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.decode().splitlines()
    gone = C.kernel_tree(model)[b"/etc/delete-me"]["size"]  # the kernel's lstat of the deleted file
    assert lines[:2] == ["m file    /etc/chmod-me  (xattrs: +user.a)", f"- file    /etc/delete-me  ({gone})"]
    assert "m file    /etc/hostname  (uid: 0 -> 1000; gid: 0 -> 2000)" in lines
    assert "+ file    /etc/new  (4)" in lines
    assert "m file    /etc/passwd  (mode: 0644 -> 0600)" in lines
    assert any(line.startswith("M symlink /etc/relink  (target: 'target1' -> 'target2'; mtime: ") for line in lines)
    assert lines[-1] == (f"{cow}: 6 changes against {model}: 1 added (4), 1 deleted ({gone}), "
                         "1 modified (0 -> 0), 3 metadata")  # fmt: skip


def test_a_raw_image_needs_another_disk(model: Path) -> None:
    proc = run_cli("changes", model)
    assert proc.returncode == 2
    line = assert_one_line_error(proc, str(model), "no backing file to compare with")
    assert line and f"hint: name the disk to compare it with: ubdcow changes {model} --against PATH" in proc.stderr.decode()


def test_a_lab_reads_and_indexes_its_model_once(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cows = []
    for n in range(3):
        cow = tmp_path / f"pc{n}.cow"
        ubdcow.create(cow, model)
        with ubdcow.open(cow, "r+") as img:
            img.pwrite(b"pc%d" % n, file_block(model, "/etc/hostname") * BLOCK)
        cows.append(cow)
    builds = []
    real = ubdcow.indexcache.build_index
    monkeypatch.setattr(ubdcow.indexcache, "build_index", lambda *a: builds.append(1) or real(*a))
    reports = ubdcow.changes(cows, cache=False)
    assert len(builds) == 1
    assert [[e.as_dict() for e in r.entries] for r in reports] == [
        [{"path": "/etc/hostname", "change": "modified", "type": "file", "fields": ["content"]}]] * 3
    assert [r.disk for r in reports] == [str(c) for c in cows]
