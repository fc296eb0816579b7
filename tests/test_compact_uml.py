"""``compact`` on an overlay a real guest wrote, and a real guest reading the compacted overlay.

A guest mounts an ext4 image (made by ``mkfs.ext4 -d`` from a known tree) through an overlay and rewrites
data it already had: two big files copied over themselves (``dd`` in place: the same bytes in the same
blocks), zeros written over half of a third file, a fourth deleted and ``fstrim``-ed. ``compact`` must give
back at least what was rewritten, leave the disk identical (``compare`` with the image merged before), keep
every page whole, and a second guest must read every file's sha256 right from the compacted overlay.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from support import fslab
import pytest
from conftest import run_cli
from support.fslab import PAGE, checked, q
from support.uml import kernel as uml_kernel
from support.uml import ubd_arg

import ubdcow

pytestmark = pytest.mark.uml


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def no_zero_page(data: bytes) -> bool:
    return all(any(data[i : i + PAGE]) for i in range(0, len(data) - PAGE + 1, PAGE))


def test_compact_gives_back_what_the_guest_rewrote_and_the_guest_reads_every_file(tmp_path: Path) -> None:
    uml_kernel()
    lines = fslab.guest_tool_lines()
    d = tmp_path
    tree, folders = fslab.make_tree(d / "src", seed=0xC0A7)
    backing = d / "backing.img"
    fslab.make_ext4(backing, d / "src", "64M")
    backing_sha = sha256(backing)
    overlay = d / "overlay.cow"
    ubdcow.create(overlay, backing)

    big = sorted((p for p, data in tree.items() if len(data) >= 1 << 20 and "sparse" not in p
                  and not p.startswith(fslab.STATIC + "/") and no_zero_page(data)), key=os.fsencode)
    assert len(big) >= 4, "the tree has too few big files"
    copied, zeroed, deleted = big[:2], big[2], big[3]
    zero_pages = len(tree[zeroed]) // PAGE // 2
    mnt = d / "mnt"
    script = [lines, f"mkdir -p {q(mnt)}\n", checked(f"mount -t ext4 -o noatime /dev/ubdb {q(mnt)}")]
    for rel in copied:  # the same bytes over themselves, in place
        script.append(checked(f"dd if={q(mnt / rel)} of={q(mnt / rel)} bs=1M conv=notrunc status=none"))
    script.append(checked(f"dd if=/dev/zero of={q(mnt / zeroed)} bs=4096 count={zero_pages} conv=notrunc "
                          "status=none"))
    script.append(checked(f"rm {q(mnt / deleted)}"))
    guest_manifest = d / "guest-manifest.txt"
    script += [checked("sync"), checked(f"fstrim -v {q(mnt)}"), f"cd {q(mnt)}\n",
               checked(f"find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > {q(guest_manifest)}"),
               "cd /\n", checked(f"umount {q(mnt)}"), "echo COMPACT-WORKLOAD-DONE=1\n"]
    run = fslab.boot("".join(script), ubd_arg(overlay), workdir=d)
    assert run.values("COMPACT-WORKLOAD-DONE") == ["1"], run.tail()

    model = dict(tree)
    model[zeroed] = bytes(zero_pages * PAGE) + tree[zeroed][zero_pages * PAGE :]
    del model[deleted]
    manifest = d / "manifest.txt"
    manifest.write_text(fslab.manifest_text(model))
    assert guest_manifest.read_text() == manifest.read_text(), "the guest's tree differs from the model"

    before = d / "before.img"
    ubdcow.merge(overlay, before)
    os.sync()  # allocated as written back (a file's extent blocks are counted once its data is)
    allocated_before = os.stat(overlay).st_blocks * 512
    proc = run_cli("compact", "--json", overlay)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["disks"][0]
    rewritten = sum(-(-len(tree[rel]) // PAGE) * PAGE for rel in copied) + zero_pages * PAGE
    print(f"OBSERVED: rewritten {rewritten} bytes; compact: {allocated_before} -> {result['allocated_after']} "
          f"allocated, {result['pages_returned']} pages returned, {result['pages_punched']} punched, "
          f"{result['seconds']} s")
    assert result["allocated_before"] == allocated_before
    assert result["allocated_after"] == os.stat(overlay).st_blocks * 512
    assert result["reclaimed_bytes"] >= rewritten
    assert result["pages_returned"] * PAGE >= rewritten - zero_pages * PAGE
    assert result["pages_punched"] >= zero_pages
    assert result["mixed_pages"] == 0

    same = run_cli("compare", overlay, before)
    assert same.returncode == 0 and b"identical" in same.stdout, same.stdout + same.stderr
    assert run_cli("check", overlay).returncode == 0
    assert fslab.mixed_pages(overlay) == []
    assert sha256(backing) == backing_sha  # the backing file is only read

    files = "".join(p + "\n" for p in sorted(model, key=os.fsencode))
    verdict = fslab.verify(overlay, d, "compacted", manifest, files, fslab.folders_text(folders))
    print(f"OBSERVED: compacted overlay in a guest: {verdict.summary()}")
    assert verdict.clean, verdict.details()
