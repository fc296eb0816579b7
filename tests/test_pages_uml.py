"""Whole pages: every COW file ubdcow writes must read right through a real guest's page cache.

The Linux ubd driver (Debian's linux.uml, 6.1 and 7.2) misreads a 4 KiB page of a COW
device whose eight bitmap bits are mixed (some set, some clear) when that
page is not the last one of a multi-page read request: the pages after it
come from the wrong offsets. A guest's page cache reads in multi-page
requests (readahead), so a COW file with such "mixed pages" corrupts a
guest's ext4 (``EXT4-fs error ... checksum invalid``, files with the wrong
content), although every sector the file defines is right. ubdcow's writers
therefore keep pages whole (each page all COW or all backing).

The oracle here is a real kernel and a real filesystem: a guest changes an
ext4 image through an overlay (the workload, once per module); the result
is merged and then stored again in COW files made four ways -- ``diff``,
``convert`` of a v2 file written at sector granularity, unaligned API
writes, and a guest's own 512-byte O_DIRECT writes repaired by
``check --repair``. Each must boot in a guest that checks every file's
sha256 with ordinary buffered reads and logs no ``EXT4-fs error``, and
each must have no mixed page by a numpy scan of its raw bitmap bytes
(tests/support/fslab.py, independent of ubdcow). Observations that are the kernel's
business, not ubdcow's (does the unrepaired file corrupt the guest?), are
printed with an ``OBSERVED:`` prefix (``pytest -rP`` or ``-s`` shows them).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from support import fslab
import numpy as np
import pytest
from conftest import run_cli
from support.fslab import PAGE, PAGE_SECTORS, SECTOR, Verdict, checked, q
from support.uml import kernel as uml_kernel
from support.uml import ubd_arg

import ubdcow

pytestmark = pytest.mark.uml

DISK = "64M"


def observe(message: str) -> None:
    print(f"OBSERVED: {message}")


def assert_reads(cow: Path, expected: bytes, what: str) -> None:
    """ubdcow's view of ``cow`` is ``expected``; on failure, name the first differing sector."""
    with ubdcow.open(cow) as disk:
        got = disk.read()
    if got != expected:
        n = min(len(got), len(expected))
        bad = next((i for i in range(0, n, SECTOR) if got[i : i + SECTOR] != expected[i : i + SECTOR]), n)
        pytest.fail(f"{what}: lengths {len(got)} vs {len(expected)}, first differing sector {bad // SECTOR}")


def assert_clean(verdict: Verdict, what: str) -> None:
    assert verdict.clean, f"{what} does not read right in a guest: {verdict.details()}"


def assert_whole_and_boots_clean(lab: Lab, cow: Path, name: str, what: str) -> None:
    """No mixed page by the raw-bitmap scan, and a guest reads every file right (both looked at, then asserted)."""
    mixed = fslab.mixed_pages(cow)
    verdict = lab.verify(cow, name)
    problems = []
    if mixed:
        problems.append(f"{len(mixed)} mixed pages (the first at byte {mixed[0]})")
    if not verdict.clean:
        problems.append(f"a guest does not read it right: {verdict.details()}")
    assert not problems, f"{what}: " + "; ".join(problems)


# -- the lab: an ext4 image, changed by a guest through an overlay, merged -------------------------


@dataclass
class Lab:
    dir: Path
    backing: Path  # the ext4 image made by mkfs.ext4 -d
    overlay: Path  # the COW file the guest workload wrote (through its page cache)
    merged: Path  # ubdcow.merge of the overlay
    manifest: Path  # the expected sha256 manifest of the final tree (from the host-side model)
    files: str  # the expected `find . -type f | sort`
    dirs: str  # the expected `find . -type d | sort`
    differing: np.ndarray  # bool per sector: merged != backing
    workload_seconds: float

    @property
    def merged_bytes(self) -> bytes:
        return self.merged.read_bytes()

    def verify(self, cow: Path, name: str) -> Verdict:
        verdict = fslab.verify(cow, self.dir, name, self.manifest, self.files, self.dirs)
        observe(f"{name}: {verdict.summary()}")
        return verdict


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    uml_kernel()
    fslab.guest_tool_lines()  # gate the host programs before any work
    d = tmp_path_factory.mktemp("pages-lab")
    tree, folders = fslab.make_tree(d / "src", seed=0x50A6E)
    backing = d / "backing.img"
    fslab.make_ext4(backing, d / "src", DISK)
    fslab.fsck(backing)
    overlay = d / "overlay.cow"
    ubdcow.create(overlay, backing)

    work = fslab.Workload(tree, folders, d / "mnt-workload", d / "payload", random.Random(0xF11E))
    for _ in range(3):
        work.mkdir()
    work.random_ops(100)
    work.delete_folder()
    work.create(size=1_500_000)  # one more file over 1 MiB, after the deletions (into freed blocks)
    for _ in range(5):
        work.rewrite()
    guest_manifest, guest_dirs = d / "guest-manifest.txt", d / "guest-dirs.txt"
    run = fslab.boot(work.script("ubdb", guest_manifest, guest_dirs), ubd_arg(overlay), workdir=d)
    assert run.values("FSLAB-WORKLOAD-DONE") == ["1"], run.tail()
    trimmed = re.search(r"([0-9]+) bytes\)? (?:were )?trimmed", run.console)
    assert trimmed and int(trimmed[1]) > 0, "fstrim trimmed nothing:\n" + run.tail()

    manifest = d / "manifest.txt"
    manifest.write_text(fslab.manifest_text(work.tree))
    # the guest did to the tree exactly what the model says
    assert guest_manifest.read_text() == manifest.read_text(), "the guest's tree differs from the host-side model"
    dirs = fslab.folders_text(work.folders)
    assert guest_dirs.read_text() == dirs, "the guest's folders differ from the host-side model"

    merged = d / "merged.img"
    ubdcow.merge(overlay, merged)
    files = "".join(p + "\n" for p in sorted(work.tree, key=os.fsencode))
    return Lab(d, backing, overlay, merged, manifest, files, dirs, fslab.differing_sectors(backing, merged),
               run.seconds)


# -- the control: the guest's own overlay, and the merged image -----------------------------------


def test_the_guest_made_overlay_and_the_merged_image(lab: Lab) -> None:
    observe(f"workload guest: {lab.workload_seconds:.1f} s")
    fslab.fsck(lab.merged)  # the host's e2fsck finds the merged filesystem consistent
    diff = lab.differing
    base = np.fromfile(lab.backing, dtype=np.uint8).reshape(-1, SECTOR)
    new = np.fromfile(lab.merged, dtype=np.uint8).reshape(-1, SECTOR)
    trimmed = diff & ~new.any(axis=1) & base.any(axis=1)
    observe(f"merged vs backing: {int(diff.sum())} differing sectors, {int(trimmed.sum())} of them now zeros")
    assert diff.sum() > 4096, "the workload changed too little to test anything"
    assert trimmed.sum() > 0, "no freed data was trimmed to zeros (fstrim had no effect on the overlay)"
    # the spec: "A guest writing through its page cache never makes mixed pages"
    assert fslab.mixed_pages(lab.overlay) == []
    assert_clean(lab.verify(lab.overlay, "guest-overlay"), "the guest's own overlay")


# -- (a) diff -------------------------------------------------------------------------------------


def test_diff_output_keeps_pages_whole_and_boots_clean(lab: Lab) -> None:
    thin = lab.dir / "thin.cow"
    t0 = time.monotonic()
    result = ubdcow.diff(lab.backing, lab.merged, thin, overwrite=True)
    observe(f"diff: {result.sectors} sectors stored for {int(lab.differing.sum())} differing "
            f"({time.monotonic() - t0:.2f} s)")
    assert fslab.sector_bits(thin)[lab.differing].all(), "a differing sector is not in the diff"
    assert_reads(thin, lab.merged_bytes, "diff output")
    assert_whole_and_boots_clean(lab, thin, "diff", "the diff output")


# -- (b) convert of a v2 file written at sector granularity ---------------------------------------


def test_convert_makes_the_mixed_pages_of_a_v2_file_whole(lab: Lab) -> None:
    # the v2 file records its own name of the backing file (a hard link), so it can be moved away
    link = lab.dir / "backing-v2.img"
    if not link.exists():
        os.link(lab.backing, link)
    v2 = lab.dir / "sectors-v2.cow"
    ubdcow.create(v2, link, layout="v2", overwrite=True)
    g = fslab.cow_geometry(v2)
    h = ubdcow.read_header(v2)
    assert (g.layout, g.bitmap_offset, g.bitmap_len, g.data_offset) == ("v2", h.bitmap_offset, h.bitmap_len,
                                                                          h.data_offset)
    assert 8 * g.bitmap_len >= g.sectors, "this size hits the v2 rounding bug: pick another"
    merged = np.fromfile(lab.merged, dtype=np.uint8)
    fslab.write_sectors(v2, merged, lab.differing)  # only the differing sectors get bits
    assert (fslab.sector_bits(v2) == lab.differing).all()
    mixed = fslab.mixed_pages(v2)
    assert len(mixed) > 0, "the sector-granular v2 file has no mixed page: nothing to test"
    assert_reads(v2, lab.merged_bytes, "the hand-written v2 file")
    observe(f"sector-granular v2 file: {len(mixed)} mixed pages")

    out = lab.dir / "converted.cow"
    result = ubdcow.convert(v2, out, layout="v3", overwrite=True)
    observe(f"convert filled {result.filled_pages} pages, left {result.mixed_pages}")
    assert (result.filled_pages, result.mixed_pages) == (len(mixed), 0)
    assert ubdcow.read_header(out).layout == "v3"
    assert fslab.sector_bits(out)[lab.differing].all()
    assert_reads(out, lab.merged_bytes, "convert output")
    proc = run_cli("convert", v2, "-o", lab.dir / "converted-cli.cow", "--overwrite")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"warning" not in proc.stderr.lower(), proc.stderr.decode(errors="replace")
    assert fslab.mixed_pages(lab.dir / "converted-cli.cow") == []

    moved = lab.dir / "backing-v2-moved-away.img"
    os.rename(link, moved)
    try:
        lost = lab.dir / "converted-without-backing.cow"
        result = ubdcow.convert(v2, lost, layout="v3", overwrite=True)
        assert (result.filled_pages, result.mixed_pages) == (0, len(mixed))
        assert fslab.mixed_pages(lost) == mixed  # left as they were, and counted
        proc = run_cli("convert", v2, "-o", lab.dir / "converted-without-backing-cli.cow", "--overwrite")
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "warning:" in lines[0], f"expected one warning line on stderr: {err!r}"
        assert "Traceback" not in err
    finally:
        os.rename(moved, link)

    assert_whole_and_boots_clean(lab, out, "convert-v2", "the v2 file converted to v3")


# -- (c) unaligned writes through the API ----------------------------------------------------------


def test_unaligned_api_writes_keep_pages_whole_and_boot_clean(lab: Lab) -> None:
    rng = random.Random(0xC0C0)
    cow = lab.dir / "unaligned.cow"
    ubdcow.create(cow, lab.backing, overwrite=True)
    base = np.fromfile(lab.backing, dtype=np.uint8)
    merged = np.fromfile(lab.merged, dtype=np.uint8)
    calls = {"pwrite": 0, "write_zeroes": 0, "discard": 0}
    odd = 0
    with ubdcow.open(cow, "r+") as disk:
        for first, count in fslab.runs(lab.differing):
            a, b = first * SECTOR, min((first + count) * SECTOR, merged.size)
            where = np.flatnonzero(base[a:b] != merged[a:b])
            lo, hi = a + int(where[0]), a + int(where[-1]) + 1  # exactly the bytes that differ
            while lo < hi:
                n = min(hi - lo, rng.choice((1, 3, 511, 513, rng.randrange(1, 5000), rng.randrange(1, 40_000))))
                chunk = merged[lo : lo + n]
                odd += lo % 2
                if not chunk.any() and rng.random() < 0.7:
                    if rng.random() < 0.5:
                        disk.write_zeroes(lo, n)
                        calls["write_zeroes"] += 1
                    else:
                        disk.discard(lo, n)
                        calls["discard"] += 1
                else:
                    disk.pwrite(chunk.tobytes(), lo)
                    calls["pwrite"] += 1
                lo += n
        disk.flush()
    observe(f"unaligned writes: {calls}, {odd} at odd offsets")
    assert odd > 100 and calls["pwrite"] > 100 and calls["write_zeroes"] and calls["discard"]
    assert_reads(cow, lab.merged_bytes, "the overlay written through the API")
    assert_whole_and_boots_clean(lab, cow, "unaligned-api", "the overlay written with unaligned API writes")


# -- (d) a guest's 512-byte O_DIRECT writes, repaired by check --repair ----------------------------


def _scattered_sectors(lab: Lab, cow: Path, rng: random.Random) -> tuple[list[int], list[int]]:
    """Sectors to rewrite in pages that are all backing and not all zero: (sectors, their pages).

    Every candidate page of the filesystem's metadata (superblock, group
    descriptors, bitmaps, inode tables) and about 250 pages of the rest
    (file data, folders, extent blocks); one or two sectors in each.
    """
    bits = fslab.sector_bits(cow).reshape(-1, PAGE_SECTORS)
    pages = np.fromfile(lab.merged, dtype=np.uint8).reshape(-1, PAGE)
    candidates = ~bits.any(axis=1) & pages.any(axis=1)
    meta = np.zeros(len(pages), dtype=bool)
    for first, last in fslab.metadata_blocks(lab.merged):  # 4 KiB blocks: one page each
        meta[first : last + 1] = True
    meta_pages = [int(p) for p in np.flatnonzero(candidates & meta)]
    data_pages = [int(p) for p in np.flatnonzero(candidates & ~meta)]
    assert len(meta_pages) >= 10 and len(data_pages) >= 250, (len(meta_pages), len(data_pages))
    chosen = sorted(rng.sample(meta_pages, min(len(meta_pages), 120)) + rng.sample(data_pages, 250))
    observe(f"O_DIRECT sectors: {len(chosen)} pages, {min(len(meta_pages), 120)} of them metadata")
    sectors = []
    for p in chosen:
        sectors += [p * PAGE_SECTORS + s for s in rng.sample(range(PAGE_SECTORS), rng.choice((1, 1, 2)))]
    return sorted(sectors), chosen


def test_guest_odirect_sector_writes_are_repaired_by_check(lab: Lab) -> None:
    rng = random.Random(0xD1DD)
    cow = lab.dir / "odirect.cow"
    fslab.sparse_copy(lab.overlay, cow)
    before = fslab.sector_bits(cow)
    baseline = fslab.mixed_pages(cow)
    sectors, pages = _scattered_sectors(lab, cow, rng)
    # each sector rewritten with its own content, by 512-byte direct requests: the content stays, the pages mix
    script = fslab.guest_tool_lines() + fslab.rewrite_sectors_lines("ubdb", sectors, lab.dir)
    run = fslab.boot(script, ubd_arg(cow), workdir=lab.dir)
    assert run.values("FSLAB-REWRITTEN") == [str(len(sectors))], run.tail()
    observe(f"O_DIRECT guest: {len(sectors)} sectors in {run.seconds:.1f} s")

    expected_bits = before.copy()
    expected_bits[sectors] = True
    assert (fslab.sector_bits(cow) == expected_bits).all(), "the guest's writes set other bits than its sectors"
    expected = sorted(set(baseline) | {p * PAGE for p in pages})
    assert fslab.mixed_pages(cow) == expected
    assert_reads(cow, lab.merged_bytes, "the overlay after the guest's same-content writes")

    unrepaired = lab.verify(cow, "odirect-unrepaired")  # recorded, not asserted: the kernel's misreads
    observe(f"unrepaired file with {len(expected)} mixed pages: "
            f"{'reads clean' if unrepaired.clean else 'CORRUPT in the guest'}; "
            f"first EXT4 error: {unrepaired.ext4_errors[:1]}; first bad files: {unrepaired.bad_files[:3]}")
    assert fslab.mixed_pages(cow) == expected, "the read-only verification changed the file"

    report = ubdcow.check(cow)
    assert report.exit_code == 0, report.as_dict()
    assert (report.mixed_pages, report.mixed_page_offsets, report.repaired_pages) == (
        len(expected), expected[:16], 0)
    assert not [f for f in report.findings if f.severity == "error"], report.findings
    assert [f for f in report.findings if f.severity == "warning"], "mixed pages should be a warning"
    facts = report.as_dict()
    assert (facts["mixed_pages"], facts["mixed_page_offsets"], facts["repaired_pages"]) == (
        len(expected), expected[:16], 0)
    proc = run_cli("check", "--json", cow)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert json.loads(proc.stdout)["disks"][0]["mixed_pages"] == len(expected)
    proc = run_cli("check", cow)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, out
    assert [line for line in out.splitlines() if line.startswith("warning:") and f"{len(expected)} mixed page" in line
            ], f"no warning line naming {len(expected)} mixed pages:\n{out}"

    # the library's repair, on a copy
    copy = lab.dir / "odirect-api-repair.cow"
    fslab.sparse_copy(cow, copy)
    repaired = ubdcow.check(copy, repair=True)
    assert repaired.repaired_pages == len(expected), repaired.as_dict()
    assert fslab.mixed_pages(copy) == []
    assert_reads(copy, lab.merged_bytes, "the copy repaired by ubdcow.check(repair=True)")

    proc = run_cli("check", "--repair", cow)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, out
    assert re.search(rf"repaired {len(expected)} mixed page", out), out
    after = ubdcow.check(cow)
    assert (after.exit_code, after.mixed_pages, after.mixed_page_offsets) == (0, 0, []), after.as_dict()
    assert fslab.sector_bits(cow)[expected_bits].all(), "the repair cleared bits"
    assert_reads(cow, lab.merged_bytes, "the repaired overlay")
    assert_whole_and_boots_clean(lab, cow, "odirect-repaired", "the overlay repaired by check --repair")


# -- one mixed page, read by 64 KiB direct requests ------------------------------------------------


def test_one_mixed_page_in_a_64k_direct_read_then_repair(tmp_path: Path) -> None:
    uml_kernel()
    fslab.require_host_tool("dd", "coreutils")
    rng = random.Random(0x64)
    size = 1 << 20
    backing = tmp_path / "backing.img"
    backing.write_bytes(rng.randbytes(size))
    cow = tmp_path / "one-mixed.cow"
    ubdcow.create(cow, backing)
    npages = size // PAGE
    sectors = np.zeros(size // SECTOR, dtype=bool)
    mixed_page = 3  # inside the first 64 KiB request, with whole pages after it
    sectors[mixed_page * PAGE_SECTORS + np.array([1, 2, 5])] = True
    cow_pages = [4, 5, 8, 9, 10, 13, 17, 18, 33, 40, 41, 100, 101, 102, npages - 1]
    for p in cow_pages:
        sectors[p * PAGE_SECTORS : (p + 1) * PAGE_SECTORS] = True
    image = np.frombuffer(rng.randbytes(size), dtype=np.uint8)  # COW data unlike the backing everywhere
    fslab.write_sectors(cow, image, sectors)
    model = np.where(np.repeat(sectors, SECTOR), image, np.fromfile(backing, dtype=np.uint8)).tobytes()
    assert fslab.mixed_pages(cow) == [mixed_page * PAGE]
    assert_reads(cow, model, "the hand-made file")

    dump1 = tmp_path / "dump-mixed.img"
    fslab.boot(checked(f"dd if=/dev/ubdb of={q(dump1)} bs=64k iflag=direct status=none"), ubd_arg(cow),
               workdir=tmp_path)
    first = dump1.read_bytes()
    assert len(first) == size
    bad = [p for p in range(npages) if first[p * PAGE : (p + 1) * PAGE] != model[p * PAGE : (p + 1) * PAGE]]
    observe(f"64 KiB direct read over one mixed page: {'right' if not bad else f'{len(bad)} wrong pages {bad[:12]}'}")

    proc = run_cli("check", "--repair", cow)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, out
    assert re.search(r"repaired 1 mixed page", out), out
    assert fslab.mixed_pages(cow) == []
    assert_reads(cow, model, "the repaired file")

    dump2 = tmp_path / "dump-repaired.img"
    fslab.boot(checked(f"dd if=/dev/ubdb of={q(dump2)} bs=64k iflag=direct status=none"), ubd_arg(cow),
               workdir=tmp_path)
    with ubdcow.open(cow) as disk:
        ours = disk.read()
    second = dump2.read_bytes()
    bad = [p for p in range(npages) if second[p * PAGE : (p + 1) * PAGE] != ours[p * PAGE : (p + 1) * PAGE]]
    assert len(second) == size and not bad, f"the guest's 64 KiB direct reads differ from ubdcow in pages {bad[:12]}"
