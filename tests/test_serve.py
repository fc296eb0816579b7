"""``ubdcow serve`` with real NBD clients: every conformance case, qcow2 conversion, a FUSE + loop mount
of a guest's ext4, writes through qemu-io read back by a real guest, and multi-connection copies.

The oracles are the clients themselves (qemu-img compare, nbdcopy, nbdinfo,
qemu-img map, the kernel's ext4 through nbdfuse, a UML guest's direct reads)
against the conformance corpus's expected images and plain byte models.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from support import fslab
import numpy as np
import pytest
from conftest import Case, require_root
from support.nbdlab import (
    Server,
    ext4_overlay,
    fuse_mount,
    nbd_zero_runs,
    qemu_zero_runs,
    random_overlay,
    require_nbd,
    run,
    serve_run,
    shell_ok,
)
from support.uml import kernel as uml_kernel
from support.uml import ubd_arg

import ubdcow

PAGE = 4096


def zero_truth(cow: Path, backing: Path) -> list[tuple[int, int, bool]]:
    """Where the disk reads as zeros without data, from ``ubdcow map`` and the backing file's holes."""
    out: list[tuple[int, int, bool]] = []
    fd = os.open(backing, os.O_RDONLY)
    try:
        for e in ubdcow.map_image(cow):
            if e["source"] != "backing":
                out.append((e["start"], e["length"], e["source"] == "zero"))
                continue
            pos, end = e["start"], e["start"] + e["length"]
            while pos < end:  # the backing file's own holes read as zeros too
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    data = end
                if data > pos:
                    out.append((pos, min(data, end) - pos, True))
                    pos = min(data, end)
                    continue
                hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
                out.append((pos, hole - pos, False))
                pos = hole
    finally:
        os.close(fd)
    merged: list[tuple[int, int, bool]] = []
    for s, n, z in out:
        if merged and merged[-1][2] == z and merged[-1][0] + merged[-1][1] == s:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, z)
        elif n:
            merged.append((s, n, z))
    return merged


def clip(runs: list[tuple[int, int, bool]], size: int) -> list[tuple[int, int, bool]]:
    """``runs`` cut at ``size``."""
    return [(s, min(n, size - s), z) for s, n, z in runs if s < size]


def test_every_conformance_case_through_nbd(case: Case) -> None:
    require_nbd("nbdkit", "qemu-img", "nbdcopy", "nbdinfo")
    merged = case.dir / "merged.img"
    ubdcow.merge(case.cow, merged, backing=case.backing)
    copy = case.dir / "nbdcopy.img"
    maps = case.dir / "maps.json"
    script = (f'qemu-img compare -f raw -F raw "$uri" {case.expected} && nbdcopy "$uri" {copy} && '
              f'nbdinfo --map --json "$uri" > {maps}')
    shell_ok(serve_run(case.cow, script, "--backing", case.backing))
    assert copy.read_bytes() == merged.read_bytes() == case.expected_bytes
    # the extents both clients see agree with ubdcow map about what reads as zeros without data
    truth = zero_truth(case.cow, case.backing)
    with Server(case.cow, case.dir, "--backing", case.backing) as server:
        assert nbd_zero_runs(server.uri) == truth
        # qemu's NBD client rounds an export's size up to whole sectors (a 1000000-byte disk is 1000448
        # bytes to it, the tail zeros): compare the disk's own bytes
        assert clip(qemu_zero_runs(server.uri), len(case.expected_bytes)) == truth
    expected = case.expected_bytes
    for start, length, zero in truth:  # and what they call zero is zeros
        if zero:
            assert expected[start : start + length] == bytes(length)


def _dirty_image(tmp_path: Path, size: int, rng: random.Random, align: int = PAGE) -> tuple[Path, Path]:
    """A backing of random data (with a hole) and an overlay with ~10% of its pages written (runs of 64 KiB at
    multiples of ``align``), some zeroed."""
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.write(rng.randbytes(size // 2))
        f.seek(size - (1 << 20))
        f.write(rng.randbytes(1 << 20))  # a hole in the middle
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as disk:
        for _ in range(size // PAGE // 10 // 16):
            at = rng.randrange((size - 16 * PAGE) // align) * align
            disk.pwrite(rng.randbytes(16 * PAGE), at)
        for _ in range(20):
            disk.write_zeroes(rng.randrange(size // PAGE - 8) * PAGE, 8 * PAGE)
    return cow, backing


@pytest.mark.parametrize(
    ("align", "options"),
    [
        (64 << 10, ""),  # writes in whole qcow2 clusters (64 KiB by default)
        (PAGE, "-o cluster_size=4096"),  # scattered pages: clusters as small as the pages (docs/serve.md)
    ],
)
def test_qcow2_overlay_on_the_raw_backing(tmp_path: Path, align: int, options: str) -> None:
    require_nbd("nbdkit", "qemu-img")
    rng = random.Random(0x9C2)
    size = 64 << 20
    cow, backing = _dirty_image(tmp_path, size, rng, align)
    merged = tmp_path / "merged.img"
    ubdcow.merge(cow, merged)
    qcow2 = tmp_path / "overlay.qcow2"
    script = f'qemu-img convert -O qcow2 {options} -B {backing} -F raw "$uri" {qcow2}'
    shell_ok(serve_run(cow, script, "--backing-holes"))
    info = json.loads(run(["qemu-img", "info", "--output=json", qcow2]).stdout)
    assert info["backing-filename"] == str(backing) and info["virtual-size"] == size
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2, merged])
    cow_bytes = ubdcow.info(cow)["cow_bytes"]
    allocated = info["actual-size"]
    assert allocated <= 1.1 * cow_bytes + (1 << 20), (allocated, cow_bytes)


def test_nbdfuse_loop_mount_of_a_guests_ext4(tmp_path: Path) -> None:
    require_nbd("nbdkit", "nbdfuse", "fusermount3")
    uml_kernel()
    require_root("a loop mount")
    tree, folders, backing, cow = ext4_overlay(tmp_path, seed=0xF5, files=60, static_files=40)
    work = fslab.Workload(tree, folders, tmp_path / "mnt-guest", tmp_path / "payload", random.Random(7))
    work.random_ops(60)
    script = work.script("ubdb", tmp_path / "manifest.txt", tmp_path / "folders.txt")
    fslab.boot(script, ubd_arg(cow), workdir=tmp_path)
    assert (tmp_path / "manifest.txt").read_text() == fslab.manifest_text(work.tree)

    with Server(cow, tmp_path) as server:
        with fuse_mount(server.uri, tmp_path) as mnt:
            seen = {}
            for path in mnt.rglob("*"):
                if path.is_file() and "lost+found" not in path.parts:
                    seen["./" + str(path.relative_to(mnt))] = hashlib.sha256(path.read_bytes()).hexdigest()
        assert server.stop() in (0, 143)
    assert seen == {p: hashlib.sha256(d).hexdigest() for p, d in work.tree.items()}
    assert not server.socket.exists(), "serve left its socket behind"
    with ubdcow.open(cow, "r+"):  # the locks were released
        pass


def test_writes_through_qemu_io_read_back_by_a_guest(tmp_path: Path) -> None:
    require_nbd("nbdkit", "qemu-io")
    uml_kernel()
    rng = random.Random(0x10)
    size = 4 << 20
    cow, backing = random_overlay(tmp_path, size, rng)
    model = bytearray(backing.read_bytes())
    commands = []
    for i in range(40):
        off, n = rng.randrange(size - 70000), rng.choice((1, 511, 512, 1000, 4096, 5000, 65536))
        kind = rng.choice(("write", "write", "discard", "zero"))
        if kind == "write":
            pattern = rng.randrange(1, 256)
            commands.append(f"write -P {pattern} {off} {n}")
            model[off : off + n] = bytes([pattern]) * n
        elif kind == "zero":
            commands.append(f"write -z {off} {n}")
            model[off : off + n] = bytes(n)
        else:
            # NBD trim: qemu-io's discard aligns to nothing; the export reads zeros afterwards
            commands.append(f"discard {off} {n}")
            model[off : off + n] = bytes(n)
    script = "qemu-io -f raw " + " ".join(f"-c '{c}'" for c in commands) + ' "$uri"'
    out = shell_ok(serve_run(cow, script, "--writable"))
    assert "error" not in out.lower() and "failed" not in out.lower(), out[-3000:]
    with ubdcow.open(cow) as disk:
        assert disk.read() == bytes(model)
    report = ubdcow.check(cow)
    assert (report.exit_code, report.mixed_pages) == (0, 0), report.as_dict()
    dump = tmp_path / "dump.img"
    fslab.boot(fslab.checked(f"dd if=/dev/ubdb of={dump} bs=4096 iflag=direct status=none"), ubd_arg(cow),
               workdir=tmp_path)
    assert dump.read_bytes()[:size] == bytes(model)


def test_nbdcopy_with_four_connections_reads_and_writes_the_same_bytes(tmp_path: Path) -> None:
    require_nbd("nbdkit", "nbdcopy")
    rng = random.Random(0x4C)
    size = 32 << 20
    cow, backing = _dirty_image(tmp_path, size, rng)
    one, four = tmp_path / "one.img", tmp_path / "four.img"
    shell_ok(serve_run(cow, f'nbdcopy --connections=1 "$uri" {one} && nbdcopy --connections=4 "$uri" {four}'))
    merged = tmp_path / "merged.img"
    ubdcow.merge(cow, merged)
    assert one.read_bytes() == four.read_bytes() == merged.read_bytes()

    source = tmp_path / "source.img"
    src = bytearray(np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes())
    src[size // 3 : size // 3 + (4 << 20)] = bytes(4 << 20)  # zeros: nbdcopy may zero or trim them
    source.write_bytes(src)
    results = []
    for n in (1, 4):
        target = tmp_path / f"write{n}.cow"
        ubdcow.create(target, backing)
        shell_ok(serve_run(target, f'nbdcopy --connections={n} {source} "$uri"', "--writable"))
        with ubdcow.open(target) as disk:
            results.append(disk.read())
        report = ubdcow.check(target)
        assert (report.exit_code, report.mixed_pages) == (0, 0), report.as_dict()
    assert results[0] == results[1] == bytes(src)


def test_edit_files_of_a_stopped_guest_through_a_writable_export(tmp_path: Path) -> None:
    """docs/serve.md's recipe: serve --writable, nbdfuse, a read-write loop mount, edit, unmount; then a real
    guest reads every file right, and the overlay is clean with whole pages."""
    require_nbd("nbdkit", "nbdfuse", "fusermount3")
    uml_kernel()
    require_root("a loop mount")
    tree, folders, backing, cow = ext4_overlay(tmp_path, seed=0xED17, files=40, static_files=30, name="pc1.disk")
    rng = random.Random(0xED)
    victims = sorted(tree)[:: max(1, len(tree) // 5)]
    with Server(cow, tmp_path, "--writable") as server:
        with fuse_mount(server.uri, tmp_path, writable=True) as mnt:
            for i, path in enumerate(victims):
                target = mnt / path
                if i % 3 == 0:
                    target.unlink()
                    del tree[path]
                else:
                    data = rng.randbytes(rng.randrange(1, 300_000))
                    target.write_bytes(data)
                    tree[path] = data
            new = rng.randbytes(1_000_000)
            (mnt / "added-by-serve.bin").write_bytes(new)
            tree["./added-by-serve.bin"] = new
        assert server.stop() in (0, 143)
    report = ubdcow.check(cow)
    assert (report.exit_code, report.mixed_pages) == (0, 0), report.as_dict()
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(fslab.manifest_text(tree))
    files = "".join(p + "\n" for p in sorted(tree, key=os.fsencode))
    verdict = fslab.verify(cow, tmp_path, "edited", manifest, files, fslab.folders_text(folders))
    assert verdict.clean, verdict.details()
